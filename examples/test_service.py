"""A systemd service and its configuration, tested in a real Debian 12 container.

The service is a tiny TCP server (Python's standard library only, as in Debian's
``python3-minimal``) that greets every client with a line taken from its config file,
``/etc/default/greeter``, which the unit reads as an ``EnvironmentFile``. It tells systemd
when it listens (``Type=notify``), so ``systemctl start`` returns only once it is ready: the
test never has to sleep or poll.

The checks are written two ways, side by side: with pytest-testinfra's modules through
``instance.testinfra`` (service, socket, file, process), as a testinfra user writes them, and
with pytest-incus's own ``exec`` and ``file()``. The first test's image adds ``procps`` and
``iproute2`` (a derived image, built once), because testinfra's ``process`` and ``socket``
modules run ``ps`` and ``ss`` inside.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pytest_incus import Instance

SERVER = """\
import os
import socket

greeting = os.environ["GREETING"].encode() + b"\\n"
server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))

# tell systemd we are ready (Type=notify); the protocol is one datagram on a unix socket
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
address = os.environ["NOTIFY_SOCKET"]
notify.sendto(b"READY=1", "\\0" + address[1:] if address.startswith("@") else address)

while True:
    client, _ = server.accept()
    with client:
        client.sendall(greeting)
"""

UNIT = """\
[Unit]
Description=Greets every TCP client with a configured line

[Service]
Type=notify
EnvironmentFile=/etc/default/greeter
ExecStart=/usr/bin/python3 /usr/local/bin/greeter

[Install]
WantedBy=multi-user.target
"""

CLIENT = """\
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    print(s.makefile().readline(), end="")
"""


def install_greeter(instance: Instance, greeting: str, port: int = 7000) -> None:
    """Install the service, its unit and its config file; start nothing yet."""
    instance.write_file("/usr/local/bin/greeter", SERVER, mode=0o755)
    instance.write_file("/etc/systemd/system/greeter.service", UNIT)
    write_config(instance, greeting, port)
    instance.exec("systemctl daemon-reload", check=True)


def write_config(instance: Instance, greeting: str, port: int) -> None:
    """Write the service's config file."""
    instance.write_file("/etc/default/greeter", f'GREETING="{greeting}"\nPORT={port}\n')


def ask(instance: Instance, port: int = 7000) -> str:
    """Connect to the service from inside the container and return its greeting line."""
    return instance.exec(["python3", "-c", CLIENT, str(port)], check=True).stdout.strip()


@pytest.mark.instance(image="debian/12", packages=["iproute2", "procps"])
def test_service_follows_its_config(instance: Instance) -> None:
    install_greeter(instance, "hello from the first config")
    host = instance.testinfra

    instance.exec("systemctl start greeter", check=True)
    # testinfra's modules ...
    greeter = host.service("greeter")
    assert greeter.is_running and not greeter.is_enabled
    assert host.socket("tcp://127.0.0.1:7000").is_listening
    (server,) = host.process.filter(args="/usr/bin/python3 /usr/local/bin/greeter")
    assert server.user == "root" and server.ppid == 1
    config = host.file("/etc/default/greeter")
    assert config.user == "root" and config.mode == 0o644
    assert config.content == b'GREETING="hello from the first config"\nPORT=7000\n'
    # ... and pytest-incus's own
    assert instance.exec("systemctl is-active greeter").stdout.strip() == "active"
    unit = instance.file("/etc/systemd/system/greeter.service")
    assert unit.is_file and unit.uid == 0 and unit.contains("Type=notify")
    assert ask(instance) == "hello from the first config"

    # change the config: the running service keeps the old one until it is restarted
    write_config(instance, "hello again", port=7001)
    assert ask(instance) == "hello from the first config"
    instance.exec("systemctl restart greeter", check=True)
    assert ask(instance, port=7001) == "hello again"
    assert ask_fails(instance, port=7000)
    assert host.socket("tcp://127.0.0.1:7001").is_listening
    assert not host.socket("tcp://127.0.0.1:7000").is_listening


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait until ``condition()`` is true, at most ``timeout`` seconds; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def ask_fails(instance: Instance, port: int) -> bool:
    """True if nothing listens on ``port`` any more."""
    result = instance.exec(["python3", "-c", CLIENT, str(port)])
    return result.exit_code != 0 and "ConnectionRefusedError" in result.stderr


@pytest.mark.instance(image="debian/12")
def test_broken_config_fails_the_unit(instance: Instance) -> None:
    install_greeter(instance, "unused")
    instance.write_file("/etc/default/greeter", 'GREETING="no port"\n')

    result = instance.exec("systemctl start greeter")

    assert result.exit_code != 0
    assert instance.exec("systemctl is-active greeter").stdout.strip() == "failed"
    show = instance.exec("systemctl show -p Result -p ExecMainStatus greeter").stdout
    assert dict(line.split("=", 1) for line in show.split()) == {
        "Result": "exit-code",
        "ExecMainStatus": "1",
    }
    # the journal says why; journald stores the line asynchronously, so wait for it
    assert eventually(
        lambda: "KeyError: 'PORT'" in instance.exec("journalctl -u greeter -o cat").stdout
    )


@pytest.mark.instance(image="debian/12")
def test_enabled_service_starts_at_boot(instance: Instance) -> None:
    install_greeter(instance, "up after a reboot")
    instance.exec("systemctl enable greeter", check=True)

    instance.restart()  # a clean shutdown and a fresh boot, waited for until systemd is up

    assert instance.exec("systemctl is-active greeter").stdout.strip() == "active"
    assert ask(instance) == "up after a reboot"
