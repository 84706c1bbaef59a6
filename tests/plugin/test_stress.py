"""A run of misbehaving tests, bounded in time, leaves nothing behind.

Four xdist workers run 60 tests over containers, apps and VMs. Some stop every process in
their instance, fork-bomb it, start daemons that keep stdout open, print 20 MB, or time out;
each checks that its instance still answers afterwards. One test SIGKILLs its own worker.
The same run is then interrupted once with SIGINT and once with SIGTERM. After each run no
instance of it is left: no directory, registry entry, monitor, QEMU, cgroup or mount.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from leftover_helpers import assert_run_left_nothing
from plugin_helpers import INNER_HEADER, InnerInstances, InnerRun, wait_until
from registry_helpers import SCRATCH_ROOT, build_image

from pytest_incus import fsutil
from pytest_incus.settings import Settings

STRESS_MODULE = (
    INNER_HEADER
    + """
import signal
from pytest_incus import ExecTimeoutError

HERE = pathlib.Path(__file__).parent
# runs until its timeout kills it, with every process it started: a shell's top loop gives up
# once a fork fails (dash and busybox ash do, at a time that depends on the load), and the
# exec would then end with the rest of the bomb still running at the limit, as background
# processes that the contract leaves alone. So the bomb runs in the background, and the
# command that the exec waits for is a sleep, which forks nothing
BOMB = "f(){ f | f; }; while :; do f; done & exec sleep 100"
CASES = ["echo", "stop-all", "timeout", "background", "output", "bomb"]


def misbehave(instance, case):
    record(instance)
    if case == "echo":
        assert instance.exec("echo ok").stdout == "ok\\n"
    elif case == "stop-all":  # stops the exec server (or agent) too, where it can
        with pytest.raises(ExecTimeoutError):
            instance.exec("kill -STOP -1; sleep 30", timeout=2)
    elif case == "timeout":
        with pytest.raises(ExecTimeoutError):
            instance.exec("trap '' TERM; sleep 100; echo never", timeout=1)
    elif case == "background":  # the daemon keeps stdout open; exec returns anyway
        started = time.monotonic()
        result = instance.exec("setsid nohup sleep 1002 & echo started", timeout=20)
        assert result.stdout == "started\\n" and time.monotonic() - started < 10
    elif case == "output":
        result = instance.exec("head -c 20000000 /dev/zero", timeout=120)
        assert len(result.stdout_bytes) == 20000000
    elif case == "bomb":  # the default process limit keeps it inside
        with pytest.raises(ExecTimeoutError):
            instance.exec(BOMB, timeout=2)
    assert instance.exec("echo alive", timeout=60).stdout == "alive\\n"


@pytest.mark.parametrize("n", range(35))
@pytest.mark.instance(kind="container", image="busybox")
def test_busybox(instance, n):
    misbehave(instance, CASES[n % len(CASES)])


@pytest.mark.parametrize("case", CASES * 2)
@pytest.mark.instance(kind="container", image="debian/12")
def test_debian(instance, case):
    misbehave(instance, case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.instance(kind="app", image="{app}", command=["/bin/busybox", "sleep", "1000"])
def test_app(instance, case):
    misbehave(instance, case)


@pytest.mark.parametrize("case", ["echo", "stop-all", "timeout", "background", "output", "echo"])
@pytest.mark.instance(kind="vm", image="debian/12", init="agent")
def test_vm(instance, case):
    misbehave(instance, case)


@pytest.mark.instance(kind="container", image="busybox")
def test_worker_dies(instance):
    record(instance)
    if (HERE / "kill-worker").exists() and "PYTEST_XDIST_WORKER" in os.environ:
        os.kill(os.getpid(), signal.SIGKILL)
"""
)
TESTS = 60
RUN_DEADLINE = 420.0  # seconds for one run of the 60 tests on a 2-core machine under TCG
INTERRUPTED = 2  # pytest's ExitCode.INTERRUPTED


@pytest.fixture(scope="module")
def app_ref() -> Iterator[str]:
    """A busybox OCI layout for the app tests: its image reference."""
    work = SCRATCH_ROOT / f"stress-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        build_image(work / "layout", "app")
        yield f"oci:{work / 'layout'}:app"
    finally:
        fsutil.remove_tree(work)


@pytest.fixture
def stress_run(
    pytester: pytest.Pytester, settings: Settings, inner_instances: InnerInstances, app_ref: str
) -> Iterator[InnerRun]:
    """The stress module, run by its own pytest with four workers (started once the test has
    written what it needs: see ``start``)."""
    pytester.makepyfile(test_stress_inner=STRESS_MODULE.replace("{app}", app_ref))
    runs: list[InnerRun] = []

    def start() -> InnerRun:
        runs.append(InnerRun(pytester.path, settings.cache_dir, "-n", "4", "test_stress_inner.py"))
        return runs[-1]

    yield start  # type: ignore[misc]
    for run in runs:
        run.stop()


def test_full_run_with_a_killed_worker(
    stress_run: Callable[[], InnerRun],
    pytester: pytest.Pytester,
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    (pytester.path / "kill-worker").write_text("")
    started = time.monotonic()
    run = stress_run()
    code = run.wait(RUN_DEADLINE)
    output = run.output()
    print(f"stress run: exit {code} in {time.monotonic() - started:.1f}s")
    assert code == 1, output[-5000:]  # the killed worker's test fails, all others pass
    assert "59 passed" in output and "1 failed" in output, output[-5000:]
    assert "crashed while running" in output, output[-5000:]
    assert len(inner_instances.names()) == TESTS
    assert_run_left_nothing(settings, inner_instances.names())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run(
    stress_run: Callable[[], InnerRun],
    settings: Settings,
    inner_instances: InnerInstances,
    sig: signal.Signals,
) -> None:
    run = stress_run()

    def busy() -> bool:
        assert run.proc.poll() is None, run.output()[-5000:]
        return len(inner_instances.names()) >= 12

    wait_until(busy, RUN_DEADLINE, "the stress run did not get going")
    code, teardown = run.end(sig, group=False, deadline=120)
    print(f"{sig.name}: exit {code}, torn down in {teardown:.1f}s")
    assert code == INTERRUPTED, run.output()[-5000:]
    assert_run_left_nothing(settings, inner_instances.names())
