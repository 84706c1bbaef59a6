"""SIGTERM and SIGHUP (how CI systems cancel a job) tear a run down as Ctrl-C does: every
instance it holds is deleted, a launch in progress too, and pytest exits with status 2; with
pytest-xdist as well, whether the controller alone gets the signal or its whole process group."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from leftover_helpers import assert_run_left_nothing, host_processes
from plugin_helpers import INNER_HEADER, InnerInstances, InnerRun, wait_until

from pytest_incus import registry
from pytest_incus.settings import Settings

INTERRUPTED = 2  # pytest's ExitCode.INTERRUPTED
EXECNET_PATIENCE = 5.0  # seconds execnet waits for a worker's test before it sends SIGINT

# Each test holds a container (its `instance`) and a VM, says so with a marker file, and waits
# for the signal.
HOLD_MODULE = (
    INNER_HEADER
    + """
HERE = pathlib.Path(__file__).parent

def hold(instance, instance_factory, label):
    record(instance)
    record(instance_factory.launch(kind="vm", image="debian/12", init="agent"))
    (HERE / f"ready-{label}").write_text("")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise AssertionError("no signal came")

@pytest.mark.instance(kind="container", image="busybox")
def test_hold_a(instance, instance_factory):
    hold(instance, instance_factory, "a")

@pytest.mark.instance(kind="container", image="busybox")
def test_hold_b(instance, instance_factory):
    hold(instance, instance_factory, "b")
"""
)

# The test says it is about to launch a VM (booting from scratch: seconds under TCG), and
# says so again once the launch returned, which it must never do here.
LAUNCH_MODULE = """
import pathlib

HERE = pathlib.Path(__file__).parent

def test_launch(instance_factory):
    (HERE / "launching").write_text("")
    instance_factory.launch(kind="vm", image="debian/12", init="agent", name="{name}")
    (HERE / "launched").write_text("")
"""


@pytest.fixture
def runs(pytester: pytest.Pytester, settings: Settings) -> Iterator[list[InnerRun]]:
    """Inner runs started by the test, killed at the end if still there."""
    started: list[InnerRun] = []
    yield started
    for run in started:
        run.stop()
    registry.reap(settings)  # what a killed one left


@pytest.mark.parametrize(
    ("signum", "workers", "group"),
    [
        (signal.SIGTERM, 0, False),
        (signal.SIGHUP, 0, False),
        (signal.SIGTERM, 2, False),
        (signal.SIGTERM, 2, True),
        (signal.SIGHUP, 2, False),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGTERM-xdist-controller", "SIGTERM-xdist-group", "SIGHUP-xdist"],
)
def test_signal_deletes_the_instances_the_run_holds(
    pytester: pytest.Pytester,
    settings: Settings,
    inner_instances: InnerInstances,
    runs: list[InnerRun],
    signum: int,
    workers: int,
    group: bool,
) -> None:
    pytester.makepyfile(test_hold=HOLD_MODULE)
    xdist = ["-n", str(workers)] if workers else []
    run = InnerRun(pytester.path, settings.cache_dir, *xdist, "test_hold.py")
    runs.append(run)
    run.wait_for(*(["ready-a", "ready-b"] if workers else ["ready-a"]))
    names = inner_instances.names()
    assert len(names) == (4 if workers else 2), names
    for name in names:  # all there, and the check can see them
        assert any(item.startswith("process") for item in registry.leftovers(settings, name))

    status, seconds = run.end(signum, group)
    output = run.output()
    assert status == INTERRUPTED, output
    assert signal.Signals(signum).name in output, output
    assert_run_left_nothing(settings, names)
    print(f"{signal.Signals(signum).name} with {workers} workers: exited in {seconds:.1f}s")
    # at once: execnet alone would give a busy worker 5 s before it interrupts it
    assert seconds < EXECNET_PATIENCE, output


def test_sigterm_during_a_launch_removes_the_half_started_instance(
    pytester: pytest.Pytester, settings: Settings, runs: list[InnerRun]
) -> None:
    name = f"pti-sigterm-{os.getpid()}"
    pytester.makepyfile(test_launch=LAUNCH_MODULE.format(name=name))
    run = InnerRun(pytester.path, settings.cache_dir, "--incus-vm-snapshots=off", "test_launch.py")
    runs.append(run)
    run.wait_for("launching")
    directory = settings.instances_dir / name
    # QEMU runs: the launch is under way and has made things to clean up
    wait_until(lambda: host_processes(f"{directory}/"), 60, "QEMU of the launch to start")

    status, seconds = run.end(signal.SIGTERM, group=False)
    output = run.output()
    assert not (pytester.path / "launched").exists(), "the launch ended before the signal"
    assert status == INTERRUPTED, output
    assert_run_left_nothing(settings, [name])
    print(f"SIGTERM during a VM launch: exited in {seconds:.1f}s")
