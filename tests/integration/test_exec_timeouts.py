"""The exec timeout holds whatever the command does to the exec server inside containers and
apps: it stops it, kills it, ignores SIGTERM, forks a tree that keeps forking, or stops its own
children. Each test asserts the error, that it came within the timeout and a bounded grace,
that nothing the command started is left, and that the next exec works (a new server if the
old one is gone).

The time each case took is printed (``-s`` shows it): the figures of the timeout's effect."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import host_descendants, host_processes, wait_until
from registry_helpers import SCRATCH_ROOT, image_of_rootfs

from pytest_incus import (
    ExecError,
    ExecTimeoutError,
    IncusError,
    Instance,
    InstanceFactory,
    InstanceState,
    NotRunningError,
    fsutil,
)
from pytest_incus.images.store import ImageStore

TIMEOUT = 2.0
GRACE = 3.0  # what the host may take past the timeout to kill, collect and answer


@pytest.fixture(scope="module")
def app_layout(image_store: ImageStore) -> Iterator[Path]:
    """An OCI layout whose image ``busybox`` is the cached busybox image's rootfs (all the
    applets: ps, kill, sleep) with ``sleep`` as its program; pruned afterwards."""
    work = SCRATCH_ROOT / f"timeouts-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    rootfs = image_store.get("busybox").rootfs
    try:
        image_of_rootfs(work / "layout", "busybox", rootfs, ["--config.cmd=sleep"])
        yield work / "layout"
    finally:
        image_store.prune(f"oci:{work / 'layout'}:busybox")
        fsutil.remove_tree(work)


@pytest.fixture(params=["container", "app"])
def target(
    request: pytest.FixtureRequest, instance_factory: InstanceFactory, app_layout: Path
) -> Iterator[Instance]:
    """A fresh debian/12 container, or a busybox app whose program sleeps (each test wrecks
    its instance's exec server)."""
    if request.param == "container":
        inst = instance_factory.launch(image="debian/12")
    else:
        inst = instance_factory.launch(
            kind="app", image=f"oci:{app_layout}:busybox", command=["sleep", "100000"]
        )
    yield inst
    inst.delete()


def _marker() -> int:
    """A number to put on the command lines of what a command starts, to find them on the
    host."""
    return 200_000 + secrets.randbelow(100_000)


def _timed_out(instance: Instance, cmd: str, what: str) -> ExecTimeoutError:
    """Run ``cmd`` with TIMEOUT; assert that ExecTimeoutError came within TIMEOUT + GRACE."""
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as excinfo:
        instance.exec(cmd, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"\n{instance.kind} {what}: the timeout of {TIMEOUT}s took effect in {elapsed:.2f}s")
    assert TIMEOUT <= elapsed < TIMEOUT + GRACE, f"{what}: took {elapsed:.2f}s"
    assert excinfo.value.exit_code == 128 + 9
    assert "timeout" in str(excinfo.value)
    return excinfo.value


def _nothing_left(instance: Instance, marker: int) -> None:
    """Nothing whose command line carries ``marker`` runs on the host (inside the instance
    included), or is left as our child; and the next exec works."""
    wait_until(lambda: host_processes(str(marker)) == [], 5, f"processes of {marker} ended")
    assert [p for p in host_descendants(os.getpid()) if str(marker) in p] == []
    assert instance.exec("echo alive", timeout=30).stdout == "alive\n"


@pytest.mark.local_only(
    reason="stops the plugin's exec server inside the container; Incus's exec runs from outside, with no such process"
)
@pytest.mark.parametrize(
    "cmd",
    [
        "kill -STOP -1; echo x",  # everything stopped (the server too); the command ends
        "kill -STOP $PPID; sleep {n}",  # the server stopped, the command runs on
    ],
    ids=["stop-all", "stop-server"],
)
def test_timeout_holds_with_the_exec_server_stopped(target: Instance, cmd: str) -> None:
    n = _marker()
    _timed_out(target, f": {n}; " + cmd.format(n=n), "stopped server")
    _nothing_left(target, n)
    target.exec("kill -CONT -1")  # let what the command stopped go on
    assert target.exec("echo again").stdout == "again\n"


@pytest.mark.local_only(
    reason="kills the plugin's exec server inside the container, which the incus backend does not have"
)
def test_a_killed_exec_server_is_said_so(target: Instance) -> None:
    n = _marker()
    started = time.monotonic()
    with pytest.raises(IncusError) as excinfo:
        target.exec(f"kill -9 $PPID; sleep {n}", timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"\n{target.kind} killed server: the error came in {elapsed:.2f}s")
    error = excinfo.value
    assert not isinstance(error, ExecError), "not the command's exit: its result is unknown"
    assert "exec server" in str(error) and "killed" in str(error), error
    assert "result is unknown" in str(error)
    assert elapsed < TIMEOUT + GRACE
    assert target.state is InstanceState.RUNNING
    _nothing_left(target, n)


@pytest.mark.local_only(
    reason="expects the local exec server's message; under Incus, kill -9 -1 inside kills no server"
)
def test_a_command_that_kills_everything_in_a_container(instance_factory: InstanceFactory) -> None:
    # in a system container, kill -9 -1 kills every process but init and the command itself:
    # the exec server among them; init goes on, and so does the container
    inst = instance_factory.launch(image="debian/12")
    try:
        n = _marker()
        with pytest.raises(IncusError, match="exec server") as excinfo:
            inst.exec(f"kill -9 -1; sleep {n}", timeout=TIMEOUT)
        assert not isinstance(excinfo.value, ExecError)
        assert inst.state is InstanceState.RUNNING
        _nothing_left(inst, n)
    finally:
        inst.delete()


def test_an_app_whose_program_is_killed_stopped(
    instance_factory: InstanceFactory, app_layout: Path
) -> None:
    # in an app, kill -9 -1 kills the program too: the app ends, and exec says that, not that
    # the exec server was killed
    app = instance_factory.launch(
        kind="app", image=f"oci:{app_layout}:busybox", command=["sleep", "100000"]
    )
    try:
        n = _marker()
        started = time.monotonic()
        try:
            result = app.exec(f"kill -9 -1; sleep {n}", timeout=TIMEOUT)
        except NotRunningError:
            pass
        else:  # as for a system container that stops under a command: killed with it
            assert result.exit_code == 128 + 9
        assert time.monotonic() - started < TIMEOUT + GRACE
        wait_until(lambda: app.state is InstanceState.STOPPED, 10, "the app stopped")
        assert host_processes(str(n)) == []
        app.start()
        assert app.exec("echo alive").stdout == "alive\n"
    finally:
        app.delete()


def test_timeout_holds_for_a_command_that_ignores_sigterm(target: Instance) -> None:
    n = _marker()
    cmd = f"trap '' TERM INT HUP; sh -c \"trap '' TERM; sleep {n}\" & sleep {n}"
    _timed_out(target, cmd, "SIGTERM-ignoring command")
    _nothing_left(target, n)


def test_timeout_holds_for_a_tree_that_keeps_forking(target: Instance) -> None:
    n = _marker()
    # every 20 ms a new level: a sleeper and a subshell that starts the next level
    cmd = f"f() {{ sleep {n} & sleep 0.02; f & wait; }}; f"
    _timed_out(target, cmd, "fork tree")
    _nothing_left(target, n)


def test_timeout_holds_for_a_command_whose_children_are_stopped(target: Instance) -> None:
    n = _marker()
    cmd = f"sleep {n} & kill -STOP $!; sh -c 'kill -STOP $$; : {n}'; echo never"
    error = _timed_out(target, cmd, "stopped children")
    assert "never" not in error.stdout
    _nothing_left(target, n)
