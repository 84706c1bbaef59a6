"""The cgroup hierarchies of this host (v1, v2 or hybrid), for limits and for cleanup.

liblxc creates ``lxc.payload.<name>`` and ``lxc.monitor.<name>`` next to the cgroup of the
process that starts a container, in every hierarchy. It removes the payload itself but cannot
remove the monitor's while its monitor process is still inside, so we remove both once the
container is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path


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


def own() -> list[Path]:
    """The cgroup directories of this process, one per hierarchy."""
    return _own_paths(os.getpid())


def candidate_parents(recorded: list[str]) -> list[Path]:
    """Where to look for a container's cgroups: recorded parents, ours, and each root."""
    seen: dict[str, Path] = {}
    for path in [*map(Path, recorded), *_own_paths(os.getpid()), *(h.mount for h in hierarchies())]:
        seen.setdefault(str(path), path)
    return list(seen.values())


def payload(name: str, recorded: list[str], controller: str) -> Path | None:
    """The cgroup directory of running container ``name`` in the hierarchy that holds
    ``controller`` (where its limits of that controller are), or None."""
    mounts = [h.mount for h in hierarchies() if controller in h.controllers]
    for parent in candidate_parents(recorded):
        if any(parent == mount or mount in parent.parents for mount in mounts):
            path = parent / f"lxc.payload.{name}"
            if path.is_dir():
                return path
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


def leftovers(name: str, recorded: list[str]) -> list[Path]:
    """The cgroups of container ``name`` that still exist."""
    found = []
    for parent in candidate_parents(recorded):
        for prefix in ("lxc.payload.", "lxc.monitor."):
            path = parent / f"{prefix}{name}"
            if path.is_dir():
                found.append(path)
    return found


def remove(name: str, recorded: list[str], timeout: float = 5.0) -> list[Path]:
    """Remove the cgroups of container ``name``; returns those that could not be removed."""
    deadline = time.monotonic() + timeout
    return [p for p in leftovers(name, recorded) if not _rmdir_tree(p, deadline)]
