"""The cgroup hierarchies of this host (v1, v2 or hybrid), for limits and for cleanup.

By default liblxc names a container's cgroups ``lxc.payload.<name>`` and
``lxc.monitor.<name>``, at the root of every hierarchy: names global to the host, so two runs
with different cache directories that both launch ``name="x"`` would share them, and the
second's cleanup would wait on the first's. So each container gets a cgroup directory of its
own (``lxc.cgroup.dir.container`` and ``lxc.cgroup.dir.monitor``, liblxc 4.0+), named after
its instance directory, which no other instance on this host has while it exists:
``pytest-incus.<name>.<digest of the directory>/{payload,monitor}``. liblxc removes the
payload itself but neither the monitor's (its monitor process is still inside) nor the parent,
so we remove the whole directory once the container is gone, and only the paths recorded for
that instance.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PREFIX = "pytest-incus."
LEGACY_PREFIXES = ("lxc.payload.", "lxc.monitor.")  # liblxc's defaults, of older versions


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy."""

    mount: Path
    version: int  # 1 or 2
    controllers: frozenset[str]


@cache
def hierarchies() -> tuple[Hierarchy, ...]:
    """Every cgroup hierarchy mounted in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            mount = Path(fields[4])
            if fstype == "cgroup2":
                controllers = (mount / "cgroup.controllers").read_text().split()
                found.append(Hierarchy(mount, 2, frozenset(controllers)))
            elif fstype == "cgroup":
                names = {
                    o
                    for o in options
                    if o
                    not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec", "clone_children")
                }
                found.append(Hierarchy(mount, 1, frozenset(names)))
    return tuple(found)


def config_key(controller: str, setting_v1: str, setting_v2: str) -> str | None:
    """The LXC config key that sets ``controller`` where it is mounted on this host."""
    for h in hierarchies():
        if controller in h.controllers:
            return f"lxc.cgroup.{setting_v1}" if h.version == 1 else f"lxc.cgroup2.{setting_v2}"
    return None


def _own_paths(pid: int) -> list[Path]:
    """The cgroup directories of process ``pid``, one per hierarchy it is in."""
    paths = []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, rel = line.rstrip("\n").split(":", 2)
            for h in hierarchies():
                v1_match = (
                    h.version == 1
                    and names
                    and (
                        set(names.split(",")) <= h.controllers
                        or names.removeprefix("name=") in h.controllers
                    )
                )
                if (h.version == 2 and not names) or v1_match:
                    paths.append(h.mount / rel.lstrip("/"))
    return paths


def candidate_parents(recorded: list[str]) -> list[Path]:
    """Where to look for a container's cgroups: recorded parents, ours, and each root."""
    seen: dict[str, Path] = {}
    for path in [*map(Path, recorded), *_own_paths(os.getpid()), *(h.mount for h in hierarchies())]:
        seen.setdefault(str(path), path)
    return list(seen.values())


def container_dir(name: str, directory: Path) -> str:
    """The cgroup directory of container ``name`` whose instance directory is ``directory``:
    unique on this host while that directory exists, and the same for every process that
    looks (a reaper too)."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return f"{PREFIX}{name}.{digest}"


def config_lines(cgroup_dir: str) -> list[str]:
    """The LXC config lines that put the container's and its monitor's cgroups below
    ``cgroup_dir``."""
    return [
        f"lxc.cgroup.dir.container = {cgroup_dir}/payload",
        f"lxc.cgroup.dir.monitor = {cgroup_dir}/monitor",
    ]


def placements(cgroup_dir: str) -> list[Path]:
    """Every path at which liblxc may make ``cgroup_dir``: below each hierarchy's root (where
    it goes as root) or below this process's own cgroups (where it stays when it cannot
    escape); record them before the start, so that teardown and reap find them."""
    return [parent / cgroup_dir for parent in candidate_parents([])]


def legacy_paths(name: str, recorded_parents: list[str]) -> list[Path]:
    """The cgroups of container ``name`` as liblxc names them by default (instances made
    before each container had a directory of its own)."""
    return [
        parent / f"{prefix}{name}"
        for parent in candidate_parents(recorded_parents)
        for prefix in LEGACY_PREFIXES
    ]


def payload(recorded: list[Path], controller: str) -> Path | None:
    """The cgroup of a running container's processes in the hierarchy that holds
    ``controller`` (where its limits of that controller are), or None; ``recorded`` are the
    container's cgroups as its instance records them."""
    mounts = [h.mount for h in hierarchies() if controller in h.controllers]
    for path in recorded:
        if any(mount in path.parents for mount in mounts):
            # ours are <dir>/payload; an older instance's is liblxc's lxc.payload.<name>
            for candidate in (path / "payload", path):
                payload = candidate.name == "payload" or candidate.name.startswith("lxc.payload.")
                if payload and candidate.is_dir():
                    return candidate
    return None


@dataclass(frozen=True)
class Processes:
    """What the pids controller says of one cgroup."""

    current: int
    limit: int | None  # None: no limit ("max")
    refused: int  # forks refused at the limit so far (pids.events "max")


def processes(cgroup: Path) -> Processes | None:
    """The process count and limit of ``cgroup`` (in the pids hierarchy), or None if it is
    gone."""
    try:
        current = int((cgroup / "pids.current").read_text())
        limit = (cgroup / "pids.max").read_text().strip()
        events = dict(line.split() for line in (cgroup / "pids.events").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return Processes(current, None if limit == "max" else int(limit), int(events.get("max", 0)))


def _rmdir_tree(path: Path, deadline: float) -> bool:
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir_tree(child, deadline)
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            # EBUSY while a process (the exiting LXC monitor) is still inside
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def leftovers(name: str, directory: Path) -> list[Path]:
    """The cgroups of container ``name`` in ``directory`` that still exist (under liblxc's
    own names too, which older versions used)."""
    found = [*placements(container_dir(name, directory)), *legacy_paths(name, [])]
    return [p for p in found if p.is_dir()]


def remove(paths: list[Path], timeout: float = 5.0) -> list[Path]:
    """Remove the cgroups at ``paths`` with everything below them; returns those that could
    not be removed (a process still inside past ``timeout``)."""
    deadline = time.monotonic() + timeout
    return [p for p in paths if p.is_dir() and not _rmdir_tree(p, deadline)]
