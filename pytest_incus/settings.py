"""Where things live and the run-wide defaults, from pytest's config, the environment or the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pytest_incus.errors import ConfigError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
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
KEEP_CHOICES = ("never", "failed", "always")
ACCEL_CHOICES = ("auto", "kvm", "tcg")
CACHE_ENV = "PYTEST_INCUS_CACHE_DIR"


def default_cache_dir() -> Path:
    """The cache directory when none is configured: env, then the per-user default."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.geteuid() == 0:
        return Path("/var/cache/pytest-incus")
    return Path.home() / ".cache" / "pytest-incus"


@dataclass(frozen=True)
class Settings:
    """Run-wide settings shared by the image store, the runtimes and the CLI."""

    cache_dir: Path
    mirror: str = DEFAULT_MIRROR
    exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    max_processes: int = DEFAULT_MAX_PROCESSES  # per container or app (its `processes`)
    default_image: str = DEFAULT_IMAGE
    default_kind: str = DEFAULT_KIND
    keep: str = "never"
    skip_unavailable: bool = False
    accel: str = "auto"  # VMs: "kvm", "tcg", or "auto" (probe that KVM really runs a guest)
    insecure_registries: frozenset[str] = frozenset()  # host[:port] of plain-HTTP registries
    vm_snapshots: bool = True  # VMs resume a saved first boot (runtimes/snapshot.py)
    subnet: str | None = None  # networks' IPv4 range; None: chosen (network/subnet.py)
    default_network: str = "none"  # the network of instances whose spec names none

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
