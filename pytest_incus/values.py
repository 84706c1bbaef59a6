"""The kind-neutral values that instances, runtimes and the agent client exchange.

A leaf module: it imports nothing of pytest-incus, so every other module can import it, in any
order, without making an import cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class InstanceState(enum.Enum):
    """Where an instance is in its life."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class ExecResult:
    """What a command did: its exit code, output and duration (seconds)."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float

    @property
    def stdout(self) -> str:
        """Standard output, decoded as UTF-8 with errors replaced."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error, decoded as UTF-8 with errors replaced."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """True when the exit code is 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class Stat:
    """What ``stat`` says of a path inside an instance, ids as the instance sees them."""

    mode: int  # full st_mode
    uid: int
    gid: int
    size: int
    is_symlink: bool  # of the path itself, not followed


@dataclass(frozen=True)
class ExecRequest:
    """One command to run inside an instance, fully resolved by ``Instance.exec``."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    user: str | int | None
    input: bytes | None
    timeout: float | None  # seconds; None for no limit


@dataclass(frozen=True)
class NetworkAttachment:
    """An instance's place on a host-only network (``pytest_incus.network``): everything
    its runtime needs to plug it in, the same for every kind.

    The instance gets ``address``/``prefix`` on one interface with MAC ``mac``, no default
    route, and ``gateway`` (the host's address on the bridge) as its DNS server, which
    answers the names of the instances on the network.
    """

    network: str  # the network's name: "bridged" or the user's own
    bridge: str  # the host bridge the instance's link joins
    device: str  # host side of that link, named by us: a veth peer (liblxc) or a tap (QEMU)
    address: str  # the instance's IPv4 address, "10.213.0.5"
    prefix: int  # the network's prefix length
    gateway: str  # the host's address on the bridge: DNS server, never a default route
    mac: str  # the instance's MAC, "0a:70:74:00:00:05": derived from its address

    @property
    def resolv_conf(self) -> str:
        """The ``/etc/resolv.conf`` the instance gets: the network's DNS server only."""
        return f"nameserver {self.gateway}\noptions timeout:1 attempts:2\n"
