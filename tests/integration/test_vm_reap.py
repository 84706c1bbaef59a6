"""A VM whose pytest run was killed keeps running; reaping kills its QEMU (that very process,
checked by pid and start time) and removes its disk and sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, host_processes, wait_until

from pytest_incus import registry
from pytest_incus.ownership import process_start_time
from pytest_incus.runtimes import qemu
from pytest_incus.settings import Settings

HOLD = """
import pathlib, time
import pytest

HERE = pathlib.Path(__file__).parent

@pytest.mark.instance(kind="vm", image="debian/12", init="agent")
def test_hold(instance):
    (HERE / "ready").write_text(instance.name)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.1)
"""


@pytest.fixture
def held_vm(pytester: pytest.Pytester, settings: Settings) -> Iterator[tuple[str, int]]:
    """An inner pytest run holding a VM, killed with SIGKILL: (instance name, QEMU pid)."""
    pytester.makepyfile(test_hold=HOLD)
    log = open(pytester.path / "inner.log", "wb")  # noqa: SIM115 (closed below)
    argv = [sys.executable, "-m", "pytest", f"--incus-cache-dir={settings.cache_dir}"]
    argv += ["-p", "no:cacheprovider", "-q", "test_hold.py"]
    inner = subprocess.Popen(
        argv,
        cwd=pytester.path,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ready = pytester.path / "ready"
    name = None
    try:

        def holding() -> bool:
            assert inner.poll() is None, (pytester.path / "inner.log").read_text()
            return ready.exists()

        wait_until(holding, 180, "the inner run did not launch its VM")
        name = ready.read_text()
        os.kill(inner.pid, signal.SIGKILL)
        inner.wait(timeout=30)
        record = json.loads((settings.instances_dir / name / qemu.RECORD).read_text())
        yield name, int(record["pid"])
    finally:
        if inner.poll() is None:
            os.kill(inner.pid, signal.SIGKILL)
            inner.wait(timeout=30)
        log.close()
        if name is not None:
            registry.reap(settings, names=[name])


def test_reap_kills_the_qemu_of_a_killed_run(held_vm: tuple[str, int], settings: Settings) -> None:
    name, pid = held_vm
    directory = settings.instances_dir / name
    # the owner is gone, the VM is not
    assert qemu.recorded_pid(directory) == pid
    assert any(f"{directory}/" in p for p in host_processes("qemu"))
    assert any(r.name == name and r.orphaned for r in registry.records(settings))

    assert registry.reap(settings, names=[name]) == [name]
    wait_until(lambda: process_start_time(pid) is None, 10, "the reaped QEMU to be gone")
    assert_nothing_left(settings, name)


def test_reap_never_kills_a_pid_that_is_not_the_recorded_qemu(
    settings: Settings, scratch_cache: Path
) -> None:
    # a record naming a live process that is not that QEMU (here: this pytest, with a wrong
    # start time, as after pid reuse; then with the right start time but no QEMU command line)
    directory = scratch_cache / "pti-fake"
    directory.mkdir()
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    for recorded_start in (start + 1, start):
        (directory / qemu.RECORD).write_text(json.dumps({"pid": me, "start_time": recorded_start}))
        assert qemu.recorded_pid(directory) is None
        qemu.kill_recorded(directory)  # must not kill us


def _cli(
    settings: Settings, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_incus.cli", "--cache-dir", str(settings.cache_dir), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def test_kept_vm_has_a_shell_and_is_removed_by_rm(
    pytester: pytest.Pytester, settings: Settings, inner_args: list[str]
) -> None:
    pytester.makepyfile(
        """
        import pathlib
        import pytest

        @pytest.mark.instance(kind="vm", image="debian/12", init="agent")
        def test_keep(instance):
            (pathlib.Path(__file__).parent / "name").write_text(instance.name)
            instance.write_file("/root/mark", "kept vm\\n")
        """
    )
    result = pytester.runpytest_subprocess(*inner_args, "--incus-keep=always", timeout=300)
    result.assert_outcomes(passed=1)
    name = (pytester.path / "name").read_text()
    try:
        assert qemu.recorded_pid(settings.instances_dir / name) is not None, "not kept running"
        shell = _cli(settings, "shell", name, "cat", "/root/mark")
        assert (shell.returncode, shell.stdout) == (0, "kept vm\n"), shell.stderr
        failing = _cli(settings, "shell", name, "sh", "-c", "echo oops >&2; exit 7")
        assert (failing.returncode, failing.stderr) == (7, "oops\n")
        # no command: a line-by-line loop on stdin, exiting with the last line's status
        loop = _cli(settings, "shell", name, input="cd /root; cat mark\nexit 5\n")
        assert "kept vm" in loop.stdout and loop.returncode == 5, loop.stderr
    finally:
        removed = _cli(settings, "rm", name)
    assert removed.returncode == 0, removed.stderr
    assert_nothing_left(settings, name)
