"""``Instance.wait_for_port`` and ``wait_for_log`` against real sockets on loopback.

No instance here: the ``Instance`` wraps a small machine double whose network attachment has
the address 127.0.0.1, so the polling, the deadline and the errors are tested for real against
a listener of the test's own. ``wait_for_log`` on real containers:
tests/integration/test_wait_for_log.py.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_incus import ConfigError, IncusError, Instance, NotRunningError, WaitTimeoutError
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import NetworkAttachment

LOOPBACK = NetworkAttachment(
    network="bridged",
    bridge="ptitest0",
    device="ptitest0v",
    address="127.0.0.1",
    prefix=8,
    gateway="127.0.0.1",
    mac="0a:70:74:00:00:01",
)
LOG = "".join(f"boot line {n}\n" for n in range(1, 41))


class LogMachine:
    """The part of a ``Machine`` that waits use: whether it runs, and its log. Its other
    methods are not for these tests."""

    name = "pti-double"
    directory = Path("/nonexistent/pti-double")

    def __init__(self, log: str = LOG) -> None:
        self.log = log
        self.alive = True
        self.destroyed = False
        self.network: NetworkAttachment | None = None

    @property
    def ipv4(self) -> str | None:
        return None if self.network is None else self.network.address

    def running(self) -> bool:
        return self.alive

    def logs(self) -> str:
        return "" if self.destroyed else self.log

    def stop(self, timeout: float, force: bool) -> None:
        self.alive = False

    def destroy(self) -> None:
        self.alive = False
        self.destroyed = True

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the waits used machine.{name}")


def make_instance(machine: LogMachine, network: NetworkAttachment | None = LOOPBACK) -> Instance:
    spec = InstanceSpec.parse("container", "busybox", {}, where="test").with_defaults(
        max_processes=64, network="none" if network is None else network.network
    )
    machine.network = network
    return Instance(
        machine,  # type: ignore[arg-type]  # a partial machine, enough for the waits
        spec,
        exec_timeout=0,
        on_delete=lambda inst: machine.destroy(),
        on_use=lambda inst: None,
    )


@pytest.fixture
def machine() -> LogMachine:
    return LogMachine()


@pytest.fixture
def instance(machine: LogMachine) -> Instance:
    return make_instance(machine)


@pytest.fixture
def port() -> Iterator[socket.socket]:
    """A TCP socket bound to a port of 127.0.0.1 that does not listen (yet): connections to
    it are refused, as to a service that has not started; bound, so no one else takes it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def later(seconds: float, action: Any) -> threading.Thread:
    """Run ``action`` in a thread after ``seconds``: what the instance does meanwhile."""

    def run() -> None:
        time.sleep(seconds)  # the lateness under test, not a synchronisation
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_ipv4_is_the_machines_address(machine: LogMachine) -> None:
    assert make_instance(machine).ipv4 == "127.0.0.1"
    assert make_instance(machine, network=None).ipv4 is None


def test_wait_for_port_returns_once_a_late_listener_accepts(
    instance: Instance, port: socket.socket
) -> None:
    number = port.getsockname()[1]
    listening: list[float] = []
    accepted: list[bytes] = []

    def serve() -> None:
        listening.append(time.monotonic())
        port.listen()
        port.settimeout(10)
        connection, _ = port.accept()
        with connection:
            connection.settimeout(10)
            accepted.append(connection.recv(1))  # b"": the waiter closed its connection

    started = time.monotonic()
    server = later(0.3, serve)
    instance.wait_for_port(number, timeout=10)
    returned = time.monotonic()
    server.join(10)
    assert listening and returned >= listening[0], "returned before anything listened"
    assert returned - started < 0.3 + 1.0, f"took {returned - started:.2f}s to see the listener"
    assert accepted == [b""]


def test_wait_for_port_times_out_with_the_log_tail(instance: Instance, port: socket.socket) -> None:
    number = port.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        instance.wait_for_port(number, timeout=0.5)
    took = time.monotonic() - started
    assert 0.5 <= took < 1.5
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, IncusError)
    message = str(info.value)
    assert message.startswith(f"wait_for_port({number}): nothing accepted a TCP connection to ")
    assert f"127.0.0.1:{number}" in message and "within 0.5 s" in message
    assert "Connection refused" in message and "give a longer timeout" in message
    notes = "\n".join(info.value.__notes__)
    assert "boot line 40" in notes and "boot line 11" in notes  # the last 30 lines
    assert "boot line 10\n" not in notes


def test_wait_for_port_with_timeout_zero_tries_once(
    instance: Instance, port: socket.socket
) -> None:
    port.listen()
    instance.wait_for_port(port.getsockname()[1], timeout=0)


def test_wait_for_port_of_an_instance_without_network(machine: LogMachine) -> None:
    inst = make_instance(machine, network=None)
    with pytest.raises(ConfigError, match=r'has no network .*launch it with network="bridged"'):
        inst.wait_for_port(80)


@pytest.mark.parametrize("bad", [0, 65536, -1, "80", 80.0, True, None])
def test_wait_for_port_of_a_bad_port(instance: Instance, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"port=.* is not a TCP port number"):
        instance.wait_for_port(bad)


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", True, None])
def test_waits_with_a_bad_timeout(instance: Instance, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"timeout=.* is not a number of seconds; give 0 or more"):
        instance.wait_for_port(80, timeout=bad)
    with pytest.raises(ConfigError, match=r"timeout=.* is not a number of seconds; give 0 or more"):
        instance.wait_for_log("x", timeout=bad)


@pytest.mark.parametrize(
    ("action", "said"),
    [
        ("crash", "is stopped (not running: it stopped by itself, see logs())"),
        ("delete", "was deleted; launch a new instance"),
        ("stop", "is stopped (not running)"),
    ],
)
@pytest.mark.parametrize("wait", ["port", "log"])
def test_a_wait_ends_at_once_when_the_instance_stops(
    machine: LogMachine, instance: Instance, port: socket.socket, action: str, said: str, wait: str
) -> None:
    actions = {
        "crash": lambda: setattr(machine, "alive", False),
        "delete": instance.delete,
        "stop": lambda: instance.stop(force=True),
    }
    started = time.monotonic()
    later(0.2, actions[action])
    with pytest.raises(NotRunningError, match=re.escape(said)):
        if wait == "port":
            instance.wait_for_port(port.getsockname()[1], timeout=30)
        else:
            instance.wait_for_log("never printed", timeout=30)
    assert time.monotonic() - started < 2


def test_waits_on_an_instance_already_stopped(instance: Instance) -> None:
    instance.stop()
    with pytest.raises(NotRunningError, match=r"wait_for_port\(80\): .* is stopped"):
        instance.wait_for_port(80)
    instance.delete()
    with pytest.raises(NotRunningError, match=r"wait_for_log\('x'\): .* was deleted"):
        instance.wait_for_log("x")


def test_wait_for_log_returns_the_match_once_it_is_printed(
    machine: LogMachine, instance: Instance
) -> None:
    later(0.3, lambda: setattr(machine, "log", machine.log + "service up on port 8080\n"))
    started = time.monotonic()
    found = instance.wait_for_log(r"up on port (\d+)", timeout=10)
    assert time.monotonic() - started >= 0.3
    assert found.group(1) == "8080"


def test_wait_for_log_takes_a_compiled_pattern_with_its_flags(instance: Instance) -> None:
    found = instance.wait_for_log(re.compile(r"^BOOT LINE 7$", re.I | re.M), timeout=0)
    assert found.group() == "boot line 7"


def test_wait_for_log_sees_what_was_printed_before_the_stop(
    machine: LogMachine, instance: Instance
) -> None:
    def last_words() -> None:  # an app that prints its last line and ends
        machine.log += "done: 42\n"
        machine.alive = False

    later(0.2, last_words)
    assert instance.wait_for_log(r"done: (\d+)", timeout=10).group(1) == "42"


def test_wait_for_log_times_out_with_the_log_tail(instance: Instance) -> None:
    with pytest.raises(WaitTimeoutError) as info:
        instance.wait_for_log(r"ready\b", timeout=0.3)
    message = str(info.value)
    assert message.startswith(r"wait_for_log('ready\\b'): the log of container pti-double ")
    assert "did not match within 0.3 s" in message and "longer timeout" in message
    notes = "\n".join(info.value.__notes__)
    assert "boot line 40" in notes and "boot line 10\n" not in notes


def test_wait_for_log_tail_of_an_empty_log(machine: LogMachine, instance: Instance) -> None:
    machine.log = ""
    with pytest.raises(WaitTimeoutError) as info:
        instance.wait_for_log("x", timeout=0)
    assert "(empty: nothing printed yet)" in info.value.__notes__[0]


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("(unclosed", r"pattern='\(unclosed' is not a regular expression \(missing \)"),
        (b"bytes", r"pattern=b'bytes' is not a regular expression \(a str"),
        (re.compile(b"bytes"), r"is not a regular expression \(a str"),
        (42, r"pattern=42 is not a regular expression"),
    ],
)
def test_wait_for_log_of_a_bad_pattern(instance: Instance, bad: Any, said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        instance.wait_for_log(bad)
