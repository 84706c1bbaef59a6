"""The host's network devices that pytest-incus makes: bridges, tap devices, and the veth
peers that liblxc makes on them. Every change goes through one ``ip -batch`` run, so a bridge
costs one process, not five; nothing here touches a device whose name is not ours."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from pytest_incus import tools
from pytest_incus.errors import IncusError

PREFIX = "pti"  # every device made here: bridges ptib*, taps ptit*, veth peers ptiv*
IP_TIMEOUT = 20.0


def ours(name: str) -> bool:
    """True for a device name this module makes."""
    return name.startswith(PREFIX)


def exists(name: str) -> bool:
    """True if this network namespace has a device ``name``. Asked of the kernel, not of
    ``/sys/class/net``, which shows the devices of the namespace that mounted it."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def present() -> list[str]:
    """The names of the devices that this module made (of every cache directory)."""
    return sorted(name for _, name in socket.if_nameindex() if ours(name))


def batch(commands: Sequence[str], *, what: str) -> None:
    """Run ``ip`` commands (one per line, as ``ip -batch`` takes them); IncusError if one fails."""
    tools.run(
        ["ip", "-batch", "-"],
        input="\n".join(commands).encode() + b"\n",
        what=f"ip ({what})",
        error=IncusError,
        fix="pytest-incus doctor says whether host-only networks work here",
        timeout=IP_TIMEOUT,
    )


def make_bridge(name: str, address: str, prefix: int, mac: str) -> None:
    """A bridge ``name`` with the host's address ``address/prefix`` on it, up: no STP, no
    forward delay, so a new port forwards at once. Its MAC is ``mac``, fixed: a bridge left
    to itself takes the lowest MAC of its ports, which changes as instances come and go, and
    every instance that has the old one in its ARP cache then sends the host its replies in
    vain for seconds."""
    _check(name)
    batch(
        [
            f"link add {name} address {mac} type bridge stp_state 0 forward_delay 0",
            f"addr add {address}/{prefix} dev {name}",
            f"link set {name} up",
        ],
        what=f"making bridge {name}",
    )


def make_tap(name: str, bridge: str) -> None:
    """A tap device ``name`` (for QEMU's ``-netdev tap,ifname=...``), a port of ``bridge``, up."""
    _check(name)
    if exists(name):
        delete([name])  # of a crashed launch of the same instance name
    batch(
        [
            f"tuntap add dev {name} mode tap",
            f"link set {name} master {bridge}",
            f"link set {name} up",
        ],
        what=f"making tap {name} on {bridge}",
    )


def delete(names: Sequence[str]) -> None:
    """Delete the devices ``names`` that exist (only ours)."""
    names = [n for n in names if ours(n) and exists(n)]
    if names:
        # "-force": go on past a device that vanished in between
        tools.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"link delete {n}\n" for n in names).encode(),
            what=f"ip (deleting {', '.join(names)})",
            error=IncusError,
            timeout=IP_TIMEOUT,
        )


def _check(name: str) -> None:
    if not ours(name) or len(name) > 15:
        raise ValueError(f"not a device name of ours: {name!r}")
