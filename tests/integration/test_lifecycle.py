"""Life cycle of real containers: state, stop, start, restart, delete and the console log."""

from __future__ import annotations

import time

import pytest
from integration_helpers import assert_nothing_left, wait_until

from pytest_incus import Instance, InstanceState, NotRunningError
from pytest_incus.settings import Settings


def boot_id(instance: Instance) -> str:
    """Something that changes with every boot of the container: its init's start time."""
    return instance.exec("cut -d' ' -f22 /proc/1/stat").stdout.strip()


@pytest.mark.instance(image="busybox")
def test_stop_start_restart_busybox(instance: Instance) -> None:
    assert instance.state is InstanceState.RUNNING
    instance.write_file("/root/survives", "kept across restarts\n")
    first = boot_id(instance)

    started = time.monotonic()
    instance.stop()
    assert time.monotonic() - started < 10
    assert instance.state is InstanceState.STOPPED
    with pytest.raises(NotRunningError, match=r"is stopped .*start\(\) it"):
        instance.exec("true")

    instance.start()
    assert instance.state is InstanceState.RUNNING
    assert instance.exec("echo again").stdout == "again\n"
    assert instance.read_text("/root/survives") == "kept across restarts\n"
    second = boot_id(instance)

    instance.restart()
    assert instance.state is InstanceState.RUNNING
    assert instance.exec("echo restarted").ok
    assert len({first, second, boot_id(instance)}) == 3  # three boots of init


@pytest.mark.instance(image="busybox")
def test_force_stop_and_start_on_running_is_a_no_op(instance: Instance) -> None:
    instance.start()  # already running: nothing happens
    assert instance.exec("true").ok
    instance.stop(force=True)
    assert instance.state is InstanceState.STOPPED
    instance.stop()  # already stopped
    instance.start()
    assert instance.exec("true").ok


@pytest.mark.instance(image="busybox")
def test_state_notices_an_instance_that_stopped_by_itself(instance: Instance) -> None:
    instance.exec("poweroff -f")  # at once, without init's clean shutdown
    wait_until(lambda: instance.state is InstanceState.STOPPED, 10, "the container halted")
    instance.start()
    assert instance.state is InstanceState.RUNNING
    assert instance.exec("true").ok


@pytest.mark.instance(image="busybox")
def test_delete_is_idempotent_and_final(instance: Instance, settings: Settings) -> None:
    name = instance.name
    assert (settings.instances_dir / name).is_dir()
    instance.delete()
    assert instance.state is InstanceState.DELETED
    instance.delete()
    instance.stop()  # stopping a deleted instance does nothing
    assert instance.state is InstanceState.DELETED
    assert_nothing_left(settings, name)
    with pytest.raises(NotRunningError, match="was deleted"):
        instance.start()


@pytest.mark.instance(image="busybox")
def test_delete_of_a_stopped_instance(instance: Instance, settings: Settings) -> None:
    instance.stop(force=True)
    instance.delete()
    assert_nothing_left(settings, instance.name)


@pytest.mark.instance(image="debian/12")
def test_debian_lifecycle_and_console_log(instance: Instance, settings: Settings) -> None:
    log = instance.logs()
    # what systemd printed on the console while booting
    assert "systemd" in log and "Welcome to" in log and "Debian GNU/Linux 12" in log
    assert "Reached target" in log
    first = boot_id(instance)

    started = time.monotonic()
    instance.stop()
    stop_time = time.monotonic() - started
    assert instance.state is InstanceState.STOPPED
    assert stop_time < 15, f"a clean shutdown took {stop_time:.1f}s"
    # the console log goes on: it now shows systemd's clean shutdown
    assert "Reached target shutdown.target" in instance.logs()

    instance.start()
    assert instance.exec("systemctl is-system-running").stdout.strip() in ("running", "degraded")
    assert boot_id(instance) != first

    instance.restart()
    assert instance.exec("systemctl is-system-running").stdout.strip() in ("running", "degraded")
    name = instance.name
    instance.delete()
    assert_nothing_left(settings, name)
