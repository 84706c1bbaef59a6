"""The instances this tool created, found on disk, and the reaping of those a dead run left.

Every instance has a directory ``<cache>/instances/<name>/`` whose ``instance.json`` names its
backend, kind, image and owner (pid and start time of the launching process); an instance of
the ``incus`` backend lives on the server, and its record here lets this host reap it by name. The record is written
before anything else of the instance exists, so whatever a killed run leaves can be found.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import filelock

from pytest_incus import claims, fsutil, network
from pytest_incus.ownership import Owner
from pytest_incus.runtimes import cgroups, process
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.table import RuntimeTable
from pytest_incus.settings import Settings

log = logging.getLogger("pytest_incus")

RECORD = "instance.json"
ORPHAN_AGE = 60.0  # a directory with no record, older than this, was left by a killed launch


@dataclass(frozen=True)
class Record:
    """What ``instance.json`` says of one instance."""

    name: str
    kind: str
    image: str
    owner: Owner | None
    created: float
    kept: bool
    directory: Path
    backend: str = "local"

    @property
    def orphaned(self) -> bool:
        """True if its owning process is gone and nobody asked to keep it."""
        return not self.kept and (self.owner is None or not self.owner.alive())


def write_record(
    directory: Path,
    *,
    kind: str,
    image: str,
    owner: Owner,
    kept: bool = False,
    backend: str = "local",
) -> None:
    """Write (or rewrite) the record of the instance in ``directory``."""
    data = {
        "name": directory.name,
        "backend": backend,
        "kind": kind,
        "image": image,
        "owner": owner.to_dict(),
        "created": time.time(),
        "kept": kept,
    }
    fsutil.write_atomic(directory / RECORD, json.dumps(data))


def mark_kept(directory: Path) -> None:
    """Record that the instance is kept after its run (``--incus-keep``): never reaped, and
    its name stays taken."""
    data = fsutil.read_json(directory / RECORD)
    if isinstance(data, dict):
        data["kept"] = True
        fsutil.write_atomic(directory / RECORD, json.dumps(data))
    claims.keep(directory.name, directory)


def forget(directory: Path) -> None:
    """Remove the directory of an instance whose processes are gone, and free its name."""
    try:
        fsutil.remove_tree(directory)
    finally:
        claims.release(directory.name, directory)


def read_record(directory: Path) -> Record | None:
    """The record in ``directory``, or None if it has none (yet)."""
    data = fsutil.read_json(directory / RECORD)
    if not isinstance(data, dict):
        return None
    return Record(
        name=directory.name,
        kind=str(data.get("kind", "container")),
        image=str(data.get("image", "?")),
        owner=Owner.from_dict(data.get("owner")),
        created=float(data.get("created", 0)),
        kept=bool(data.get("kept")),
        directory=directory,
        backend=str(data.get("backend", "local")),
    )


def records(settings: Settings) -> list[Record]:
    """Every instance with a record, in creation order."""
    base = settings.instances_dir
    if not base.is_dir():
        return []
    found = [read_record(d) for d in base.iterdir() if d.is_dir()]
    return sorted((r for r in found if r is not None), key=lambda r: r.created)


def _reap_lock(settings: Settings) -> filelock.FileLock:
    settings.instances_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(settings.instances_dir / ".reap.lock", timeout=120)


def default_runtimes(settings: Settings) -> RuntimeTable:
    """The runtime table of a caller that has none of its own (the CLI, a test)."""
    from pytest_incus.images.store import ImageStore  # the store imports this module's users

    return RuntimeTable.default(RuntimeContext.of(ImageStore(settings)))


def remove_instance(
    settings: Settings,
    name: str,
    kind: str,
    *,
    backend: str = "local",
    runtimes: RuntimeTable | None = None,
) -> None:
    """Remove all of instance ``name``: its processes, cgroups, mounts, network lease and
    device (or, of the incus backend, the instance on the server), and directory."""
    directory = settings.instances_dir / name
    runtime = (runtimes or default_runtimes(settings)).get(backend, kind)
    try:
        runtime.reap(name, directory)
        runtime.networks.detach(name, directory)
    finally:
        forget(directory)


def reap(
    settings: Settings,
    *,
    include_kept: bool = False,
    names: list[str] | None = None,
    runtimes: RuntimeTable | None = None,
) -> list[str]:
    """Remove the instances whose owning process is gone; returns their names.

    Instances of live processes (this run, other xdist workers, nested pytest runs) are never
    touched. Kept instances stay unless ``include_kept``.
    """
    base = settings.instances_dir
    if not base.is_dir():
        return []
    removed = []
    with _reap_lock(settings):
        for directory in sorted(base.iterdir()):
            if not directory.is_dir() or (names is not None and directory.name not in names):
                continue
            record = read_record(directory)
            if record is None:
                if time.time() - directory.stat().st_mtime < ORPHAN_AGE:
                    continue  # a launch that is writing its record right now
                kind, backend = "container", "local"
            else:
                if not (
                    record.orphaned
                    or (
                        include_kept and record.kept and not (record.owner and record.owner.alive())
                    )
                ):
                    continue
                kind, backend = record.kind, record.backend
            log.info("reaping instance %s left by a process that is gone", directory.name)
            if runtimes is None:
                runtimes = default_runtimes(settings)
            remove_instance(settings, directory.name, kind, backend=backend, runtimes=runtimes)
            removed.append(directory.name)
        network.sweep(settings)  # leases of instances gone, bridges nobody uses
    claims.sweep()
    return removed


def leftovers(settings: Settings, name: str) -> list[str]:
    """What still exists of instance ``name`` on this host, described; empty when all gone.

    Looks for its directory, mounts below it, LXC monitor or other processes naming it, a QEMU
    using its files, cgroups in every hierarchy, and its claim on the name.
    """
    found = []
    directory = settings.instances_dir / name
    if directory.exists():
        found.append(f"directory {directory}")
    found += [f"mount {m}" for m in fsutil.mounts_below(directory)]  # even with no directory
    # an LXC monitor is "[lxc monitor] <lxcpath> <name>"
    monitor = f"{settings.instances_dir} {name}"
    for pid, cmdline in process.cmdlines():
        lxc = (monitor in cmdline or str(directory) in cmdline) and "lxc" in cmdline
        vm = "qemu" in cmdline and f"{directory}/" in cmdline  # a VM's disk and sockets
        if lxc or vm:
            found.append(f"process {pid}: {cmdline}")
    found += [f"cgroup {p}" for p in cgroups.leftovers(name, directory)]
    claim = claims.read(name)
    if claim is not None and claim.directory == directory:
        found.append(f"name claim {claims.claims_dir() / name}")
    found += network.leftovers(settings, name)
    return found
