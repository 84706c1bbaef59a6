"""What a killed run leaves is reaped (by `pytest-incus reap` and by the next run's start);
a live run's instances are never touched; a normal run leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_helpers import (
    INNER_HEADER,
    InnerInstances,
    cache_args,
    hold_module,
    run_cli,
    wait_until,
)

from pytest_incus import registry
from pytest_incus.settings import Settings

HOLD_MODULE = hold_module()


class HeldRun:
    """An inner pytest run, in its own process, that holds one instance."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.log = open(root / "inner.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *cache_args(cache), "-q", "test_hold.py"],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> str:
        """Wait until the test holds its instance; its name."""
        ready = self.root / "ready"

        def is_ready() -> bool:
            assert self.proc.poll() is None, f"inner run ended early:\n{self.output()}"
            return ready.exists()

        wait_until(is_ready, 60, "the inner test did not launch its instance")
        return ready.read_text()

    def output(self) -> str:
        """What the inner run printed so far."""
        self.log.flush()
        return (self.root / "inner.log").read_text(errors="replace")

    def stop(self) -> None:
        """Kill the inner run if it still runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def held_run(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> Iterator[HeldRun]:
    """A run holding an instance in a scratch cache (a shared one would let other tests'
    reaping interfere)."""
    inner_instances.caches.add(scratch_cache)
    pytester.makepyfile(test_hold=HOLD_MODULE)
    run = HeldRun(pytester.path, scratch_cache)
    try:
        yield run
    finally:
        run.stop()


def kill_mid_test(run: HeldRun, settings: Settings) -> str:
    """SIGKILL the inner pytest while its test holds an instance; the instance's name."""
    name = run.wait_ready()
    before = registry.leftovers(settings, name)
    assert any(item.startswith("directory") for item in before), before
    assert any(item.startswith("process") for item in before), before
    assert any(item.startswith("cgroup") for item in before), before
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.proc.wait(timeout=30) == -signal.SIGKILL
    after = registry.leftovers(settings, name)
    assert any(item.startswith("directory") for item in after), after
    assert any(item.startswith("process") for item in after), after  # still running
    return name


def test_reap_removes_what_a_killed_run_left(held_run: HeldRun, scratch_cache: Path) -> None:
    settings = Settings(cache_dir=scratch_cache)
    name = kill_mid_test(held_run, settings)
    listed = run_cli(scratch_cache, "ls").stdout
    assert name in listed and "orphaned" in listed

    reaped = run_cli(scratch_cache, "reap")
    assert (reaped.returncode, reaped.stdout) == (0, f"reaped {name}\n"), reaped.stderr
    assert registry.leftovers(settings, name) == []
    assert run_cli(scratch_cache, "ls").stdout == ""
    assert run_cli(scratch_cache, "reap").stdout == "nothing to reap\n"


def test_next_run_reaps_what_a_killed_run_left(
    held_run: HeldRun, pytester: pytest.Pytester, scratch_cache: Path
) -> None:
    settings = Settings(cache_dir=scratch_cache)
    name = kill_mid_test(held_run, settings)
    pytester.makepyfile(test_next="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), "test_next.py", timeout=120)
    result.assert_outcomes(passed=1)
    assert registry.leftovers(settings, name) == []


def test_reap_leaves_a_live_run_alone(
    held_run: HeldRun, pytester: pytest.Pytester, scratch_cache: Path
) -> None:
    settings = Settings(cache_dir=scratch_cache)
    name = held_run.wait_ready()

    reaped = run_cli(scratch_cache, "reap", "--kept")
    assert (reaped.returncode, reaped.stdout) == (0, "nothing to reap\n"), reaped.stderr
    # nor does another session's start (another xdist worker, a nested run)
    pytester.makepyfile(test_next="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), "test_next.py", timeout=120)
    result.assert_outcomes(passed=1)

    assert f"pid {held_run.proc.pid}" in run_cli(scratch_cache, "ls").stdout
    alive = run_cli(scratch_cache, "shell", name, "--", "echo", "alive")
    assert (alive.returncode, alive.stdout) == (0, "alive\n"), alive.stderr

    (pytester.path / "release").write_text("")
    assert held_run.proc.wait(timeout=60) == 0, held_run.output()
    assert registry.leftovers(settings, name) == []


NORMAL_MODULE = (
    INNER_HEADER
    + """
@pytest.fixture
def broken_fixture(instance):
    record(instance)
    raise RuntimeError("setup fails after the launch")

@pytest.mark.instance(image="busybox")
def test_passes(instance):
    record(instance)
    assert instance.exec("true").ok

@pytest.mark.instance(image="busybox", privileged=True)
def test_fails(instance):
    record(instance)
    assert instance.exec("false").ok

@pytest.mark.instance(image="busybox")
def test_setup_error(broken_fixture):
    pass

def test_factory_instances_left_to_the_session(instance_factory):
    for _ in range(2):
        record(instance_factory.launch(kind="container", image="busybox"))

@pytest.mark.instance(image="busybox")
def test_stopped(instance):
    record(instance)
    instance.stop()
"""
)


def test_nothing_leaks_after_a_normal_run(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_normal=NORMAL_MODULE)
    result = pytester.runpytest_subprocess(*args, timeout=180)
    result.assert_outcomes(passed=3, failed=1, errors=1)
    names = inner_instances.names()
    assert len(names) == 6
    for name in names:
        assert not (settings.instances_dir / name).exists()
        assert registry.leftovers(settings, name) == []
