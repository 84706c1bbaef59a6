"""``wait_for_log`` on real containers: a busybox container's console log is what its init and
its programs write to ``/dev/console``. (``wait_for_port`` needs a network: its polling is
tested against loopback in tests/unit/test_waits.py.)"""

from __future__ import annotations

import time

import pytest

from pytest_incus import ConfigError, Instance, NotRunningError, WaitTimeoutError


@pytest.mark.instance(image="busybox")
def test_wait_for_log_returns_what_a_program_prints_later(instance: Instance) -> None:
    assert instance.ipv4 is None  # network="none", the ini default
    instance.exec("(sleep 0.3; echo 'service ready on 8080' > /dev/console) >/dev/null 2>&1 &")
    found = instance.wait_for_log(r"ready on (\d+)", timeout=20)
    assert found.group(1) == "8080"
    assert "service ready on 8080" in instance.logs()


@pytest.mark.instance(image="busybox")
def test_wait_for_log_times_out_with_the_log_tail(instance: Instance) -> None:
    instance.exec("for n in $(seq 1 40); do echo console line $n; done > /dev/console")
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        instance.wait_for_log("never printed", timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert isinstance(info.value, TimeoutError)
    assert f"the log of container {instance.name} did not match within 0.5 s" in str(info.value)
    notes = "\n".join(info.value.__notes__)
    assert notes.startswith(f"log of {instance.name}:\n")
    assert "console line 40" in notes and "console line 11" in notes
    assert "console line 10\n" not in notes  # the tail: its last 30 lines


@pytest.mark.instance(image="busybox")
def test_wait_for_log_of_a_container_that_powers_off(instance: Instance) -> None:
    instance.exec("(sleep 0.3; poweroff) >/dev/null 2>&1 &")
    started = time.monotonic()
    with pytest.raises(NotRunningError, match=r"it stopped by itself, see logs\(\)"):
        instance.wait_for_log("never printed", timeout=60)
    assert time.monotonic() - started < 20  # at once, not at the timeout
    # what it printed while going down is still there to be found
    assert instance.wait_for_log("Requesting system poweroff", timeout=0)


@pytest.mark.instance(image="busybox")
def test_wait_for_port_without_a_network(instance: Instance) -> None:
    with pytest.raises(ConfigError, match=r'launch it with network="bridged"'):
        instance.wait_for_port(80, timeout=1)
