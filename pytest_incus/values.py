"""The kind-neutral values that instances, runtimes and the agent client exchange.

A leaf module: it imports nothing of pytest-incus, so every other module can import it, in any
order, without making an import cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Choice(enum.StrEnum):
    """A word the user writes (a kind, a ``--incus-keep`` value): a ``str`` that compares,
    hashes and formats as the word, so that ``kind == "vm"``, ``{"vm": ...}[kind]`` and JSON
    records keep working; its repr is the word's, so messages quote it as the user wrote it."""

    def __repr__(self) -> str:
        return repr(self.value)


class Kind(Choice):
    """The three kinds of instance that Incus knows."""

    CONTAINER = "container"  # a system container: a full distro with its own init
    APP = "app"  # an application container of an OCI image
    VM = "vm"  # a virtual machine with its own kernel


class Keep(Choice):
    """``--incus-keep``: which instances stay after their test."""

    NEVER = "never"
    FAILED = "failed"  # those a failed test used
    ALWAYS = "always"


class AccelMode(Choice):
    """``--incus-accel``: how VMs run."""

    AUTO = "auto"  # KVM if it really runs a guest here, else TCG
    KVM = "kvm"
    TCG = "tcg"


class VmInit(Choice):
    """A VM's ``init`` option: what its kernel starts."""

    SYSTEMD = "systemd"  # the image's systemd; ready when the system is up
    AGENT = "agent"  # straight into the guest agent, for the fastest start


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
class CommandRecord:
    """A command that ran in an instance, for the report of a failed test."""

    command: str  # as a shell would show it
    exit_code: int | None  # None: it gave no exit code (see ``failure``)
    duration: float  # seconds
    failure: str | None = None  # what ended it instead, e.g. "timed out"

    @property
    def outcome(self) -> str:
        """``exit 0``, ``exit 127`` or what ended it."""
        return f"exit {self.exit_code}" if self.failure is None else self.failure


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
