"""Where things live and the run-wide defaults, from pytest's config, the environment or the CLI."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from pytest_incus.errors import ConfigError
from pytest_incus.spec import network_problem
from pytest_incus.values import AccelMode, Keep

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_IMAGE_SERVER = "https://images.linuxcontainers.org"  # the public Incus image server
DEFAULT_IMAGE = "debian/12"
DEFAULT_KIND = "container"
DEFAULT_EXEC_TIMEOUT = 600.0
# The most processes (threads count too: the kernel's pids controller counts tasks) a container
# or app may have unless its `processes` option says otherwise. A debian/12 container under
# systemd runs some tens, a test suite that builds software a few hundred: 1024 leaves room for
# those, while a fork bomb stops at it within milliseconds, and even sixteen instances that
# each reach it stay under half of the smallest common pid_max (32768). A fixed number rather
# than a share of this host's pid_max, so that a test that passes here behaves the same on CI.
DEFAULT_MAX_PROCESSES = 1024
KEEP_CHOICES = tuple(Keep)
BACKEND_CHOICES = ("local", "incus")  # the plugin as its own engine, or an Incus server
DEFAULT_PROJECT = "default"
ACCEL_CHOICES = tuple(AccelMode)
CACHE_ENV = "PYTEST_INCUS_CACHE_DIR"
DEFAULT_NETWORK = "none"
# The prefix lengths --incus-subnet may have: a /8 is the largest private range (10.0.0.0/8);
# a /24 still holds 253 instances besides the host's own address on the bridge.
SUBNET_PREFIXES = (8, 24)
# Ranges that are no instance's to have: their addresses mean something else to every host.
_UNUSABLE = tuple(
    (ipaddress.IPv4Network(net), what)
    for net, what in (
        ("0.0.0.0/8", '"this network"'),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)


def default_cache_dir() -> Path:
    """The cache directory when none is configured: env, then the per-user default."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.geteuid() == 0:
        return Path("/var/cache/pytest-incus")
    return Path.home() / ".cache" / "pytest-incus"


def check_subnet(text: str) -> str:
    """The IPv4 network ``text`` names (``--incus-subnet``), written canonically; ConfigError
    for one that host-only networks cannot use."""
    low, high = SUBNET_PREFIXES
    asked = f"--incus-subnet={text!r}"
    like = f"like 10.250.0.0/16 (a /{low} to a /{high})"
    try:
        given = ipaddress.IPv4Interface(text.strip())
    except ValueError:
        raise ConfigError(f"{asked} is not an IPv4 network; give one {like}") from None
    subnet = given.network
    if "/" not in text:
        raise ConfigError(f"{asked} has no prefix length; give one {like}")
    if not low <= subnet.prefixlen <= high:
        why = (
            f"is larger than the largest private range (a /{low})"
            if subnet.prefixlen < low
            else f"leaves too few addresses for a network (a /{high} holds 253 instances)"
        )
        raise ConfigError(f"{asked}: a /{subnet.prefixlen} {why}; give a subnet {like}")
    if given.ip != subnet.network_address:
        raise ConfigError(f"{asked} has host bits set; give the network's address: {subnet}")
    for unusable, what in _UNUSABLE:
        if subnet.overlaps(unusable):
            raise ConfigError(
                f"{asked} overlaps {unusable}, the {what} range, which instances cannot use; "
                "give a private range that no route of this host uses, like 10.250.0.0/16"
            )
    return str(subnet)


@dataclass(frozen=True)
class Settings:
    """Run-wide settings shared by the image store, the runtimes and the CLI."""

    cache_dir: Path
    mirror: str = DEFAULT_MIRROR
    image_server: str = DEFAULT_IMAGE_SERVER  # of images:<distro>/<release> names
    exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    max_processes: int = DEFAULT_MAX_PROCESSES  # per container or app (its `processes`)
    default_image: str = DEFAULT_IMAGE
    default_kind: str = DEFAULT_KIND
    keep: Keep = Keep.NEVER
    skip_unavailable: bool = False
    accel: AccelMode = AccelMode.AUTO  # VMs: KVM, TCG, or AUTO (probe that KVM really runs a guest)
    insecure_registries: frozenset[str] = frozenset()  # host[:port] of plain-HTTP registries
    vm_snapshots: bool = True  # VMs resume a saved first boot (runtimes/snapshot.py)
    subnet: str | None = None  # host-only networks' addresses; None: the network module chooses
    default_network: str = DEFAULT_NETWORK  # of instances whose `network` option says none
    backend: str = "local"  # one of BACKEND_CHOICES
    # the Incus server of backend "incus": a unix socket path or https://HOST:PORT; None for
    # Incus's own socket
    remote: str | None = None
    project: str = DEFAULT_PROJECT
    target: str | None = None  # a cluster member to place instances on; None: the cluster does
    client_cert: Path | None = None  # of an https remote; None: the incus command's own
    client_key: Path | None = None

    def __post_init__(self) -> None:
        path = str(self.cache_dir)
        if not self.cache_dir.is_absolute() or any(c in path for c in " :\n\t,"):
            raise ConfigError(
                f"cache directory {path!r} must be an absolute path without spaces, ':' or ','"
                " (LXC configuration cannot express them); choose another --incus-cache-dir"
            )
        if not self.exec_timeout >= 0:  # NaN too
            raise ConfigError(
                f"incus_exec_timeout = {self.exec_timeout:g} is not a number of seconds; give 0 "
                "or more (0 for no limit)"
            )
        if (
            not isinstance(self.max_processes, int)
            or isinstance(self.max_processes, bool)
            or self.max_processes < 1
        ):
            raise ConfigError(
                f"incus_max_processes = {self.max_processes!r}; give a whole number of "
                f"processes, at least 1 (default {DEFAULT_MAX_PROCESSES})"
            )
        if self.keep not in KEEP_CHOICES:
            raise ConfigError(f"--incus-keep={self.keep!r}; use one of {', '.join(KEEP_CHOICES)}")
        if self.accel not in ACCEL_CHOICES:
            raise ConfigError(
                f"--incus-accel={self.accel!r}; use one of {', '.join(ACCEL_CHOICES)}"
            )
        # the words of the ini file and the command line, as the enums they name
        object.__setattr__(self, "keep", Keep(self.keep))
        object.__setattr__(self, "accel", AccelMode(self.accel))
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(
                f"--incus-backend={self.backend!r}; use one of {', '.join(BACKEND_CHOICES)}"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigError(
                "--incus-client-cert and --incus-client-key go together: give both (a "
                "certificate the server trusts and its private key), or neither to use the "
                "incus command's own"
            )
        if self.subnet is not None:
            # canonical ("10.250.0.0/16"), so that every worker and run writes it the same way
            object.__setattr__(self, "subnet", check_subnet(self.subnet))
        if problem := network_problem(self.default_network):
            raise ConfigError(f"incus_default_network = {self.default_network!r} {problem}")

    def command(self, args: str) -> str:
        """The ``pytest-incus`` command line that runs ``args`` on this cache directory."""
        cache = "" if self.cache_dir == default_cache_dir() else f"--cache-dir {self.cache_dir} "
        return f"pytest-incus {cache}{args}"

    @property
    def images_dir(self) -> Path:
        """Complete image entries, one directory each."""
        return self.cache_dir / "images"

    @property
    def instances_dir(self) -> Path:
        """One directory per instance; for containers it is also LXC's lxcpath."""
        return self.cache_dir / "instances"

    @property
    def staging_dir(self) -> Path:
        """Builds in progress, renamed into ``images_dir`` when complete."""
        return self.cache_dir / "staging"
