"""Instance names, claimed host-wide: one name, one instance, whatever its cache directory.

Each cache directory keeps its own instances (``<cache>/instances/<name>``), but a name is also
seen by the whole host: liblxc's monitor, the hostname inside, the messages a user reads. Two
runs with different cache directories that both launch ``name="x"`` must not both get it. So a
launch first claims its name here: one file per name in a directory of the host's run state
(``/run/pytest-incus/names``, cleared at boot where ``/run`` is a tmpfs), naming the claim's
instance directory and owner (pid and start time of the launching process). Claims are made
and released under one lock, so two launches of one name cannot both win.

A claim is stale, and is taken over, once its owner is gone, unless its instance is kept
(``--incus-keep``) and still there: a killed run's orphan does not block the name until it is
reaped. Releasing removes only the claim of the instance released, never one that
another instance has since taken over.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import filelock

from pytest_incus import fsutil
from pytest_incus.errors import ConfigError
from pytest_incus.ownership import Owner

LOCK_TIMEOUT = 30.0  # seconds; every operation under the lock is a few file accesses


def claims_dir() -> Path:
    """Where the claims are: the host's run state for root, the user's otherwise."""
    if os.geteuid() == 0:
        return Path("/run/pytest-incus/names")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(runtime) / f"pytest-incus-{os.geteuid()}" / "names"


@dataclass(frozen=True)
class Claim:
    """Who holds an instance name."""

    name: str
    directory: Path  # the instance directory: <cache>/instances/<name>
    owner: Owner | None
    kept: bool

    @property
    def cache_dir(self) -> Path:
        """The cache directory of the instance that holds the name."""
        return self.directory.parent.parent

    @property
    def stale(self) -> bool:
        """True if nothing holds the name any more (see the module docstring)."""
        if self.owner is not None and self.owner.alive():
            return False  # a live owner holds it (its directory may not be made yet)
        return not (self.kept and self.directory.is_dir())


def _lock() -> filelock.FileLock:
    base = claims_dir()
    base.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(base / ".lock", timeout=LOCK_TIMEOUT)


def read(name: str) -> Claim | None:
    """The claim on ``name``, or None."""
    data = fsutil.read_json(claims_dir() / name)
    if not isinstance(data, dict) or not isinstance(data.get("directory"), str):
        return None
    return Claim(
        name=name,
        directory=Path(data["directory"]),
        owner=Owner.from_dict(data.get("owner")),
        kept=bool(data.get("kept")),
    )


def _write(claim: Claim) -> None:
    data = {
        "directory": str(claim.directory),
        "owner": claim.owner.to_dict() if claim.owner else None,
        "kept": claim.kept,
    }
    fsutil.write_atomic(claims_dir() / claim.name, json.dumps(data))


def take(name: str, directory: Path, owner: Owner) -> None:
    """Claim ``name`` for the instance to be made in ``directory``; ConfigError, saying whose
    it is, if another instance holds it."""
    with _lock():
        held = read(name)
        if held is not None and not held.stale:
            raise ConfigError(_taken_message(held))
        _write(Claim(name, directory, owner, kept=False))


def _taken_message(held: Claim) -> str:
    cache = held.cache_dir
    if held.kept:
        whose = "kept after its run (--incus-keep)"
    elif held.owner is None:
        whose = "owner unknown"
    else:
        me = " (this process)" if held.owner.pid == os.getpid() else ""
        whose = f"launched by pid {held.owner.pid}{me}, which still runs"
    return (
        f"an instance named {held.name!r} already exists on this host: {held.directory} "
        f"(cache directory {cache}; {whose}); choose another name, or delete it first: "
        f"pytest-incus --cache-dir {cache} rm {held.name}"
    )


def keep(name: str, directory: Path) -> None:
    """Note that the instance in ``directory`` is kept after its run: the name stays taken."""
    with _lock():
        held = read(name)
        if held is not None and held.directory == directory:
            _write(Claim(name, directory, held.owner, kept=True))


def release(name: str, directory: Path) -> None:
    """Give up the claim of the instance in ``directory`` on ``name`` (if it still holds it)."""
    with _lock():
        held = read(name)
        if held is not None and held.directory == directory:
            (claims_dir() / name).unlink(missing_ok=True)


def sweep() -> None:
    """Remove the stale claims (of instances whose directory is gone, say with the cache)."""
    base = claims_dir()
    if not base.is_dir():
        return
    with _lock():
        for path in base.iterdir():
            if path.name.startswith("."):
                continue  # the lock, a write in progress
            held = read(path.name)
            if held is None or (held.stale and not held.directory.is_dir()):
                path.unlink(missing_ok=True)
