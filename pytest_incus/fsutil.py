"""Filesystem helpers that are safe around mounts and partial writes."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import stat as stat_module
from pathlib import Path
from typing import Any

from pytest_incus import tools
from pytest_incus.errors import IncusError

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_table() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in this mount namespace, in the order of
    ``/proc/self/mountinfo``."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            table.append((_unescape(fields[4]), fields[fields.index("-") + 1]))
    return table


def mounts_below(path: Path) -> list[Path]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    prefix = str(path.resolve())
    found = [
        Path(point)
        for point, _ in mount_table()
        if point == prefix or point.startswith(prefix + "/")
    ]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_below(path: Path) -> None:
    """Detach every mount at or below ``path`` (a killed debootstrap leaves /proc mounted)."""
    for point in mounts_below(path):
        if _libc.umount2(str(point).encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise IncusError(
                f"cannot unmount {point} (to remove {path}): {os.strerror(err)}; unmount it by "
                f"hand (umount -l {point}), then remove {path}",
                exc=OSError(err, os.strerror(err), str(point)),
            )


def remove_tree(path: Path) -> None:
    """Remove ``path`` and all below it, never crossing into another filesystem.

    Mounts below are detached first; ``rm --one-file-system`` then guarantees that a mount we
    failed to see (a host directory bound in) is never emptied.
    """
    if not path.exists() and not path.is_symlink():
        return
    unmount_below(path)
    tools.run(
        ["rm", "-rf", "--one-file-system", "--", str(path)],
        what=f"rm -rf --one-file-system {path}",
        error=IncusError,
        fix=f"look for a mount below it (findmnt -R {path}), unmount it and remove it by hand",
    )


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` so that readers see the old content or the whole new one.

    No fsync: the cache guards against killed processes, not against power loss."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(raw)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a partial write)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return None


def unsearchable(path: Path, uid: int, gid: int) -> tuple[Path, os.stat_result] | None:
    """The first directory on the way to ``path`` (from ``/``, ``path`` itself included if it
    is a directory) that the user ``uid``/``gid`` may not enter (no search permission by its
    mode bits, for a user without capabilities on the host), with its stat; None if none."""
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except OSError:
            return None  # not made yet: what exists of the way was checked
        if not stat_module.S_ISDIR(st.st_mode):
            return None
        if st.st_uid == uid:
            allowed = st.st_mode & stat_module.S_IXUSR
        elif st.st_gid == gid:
            allowed = st.st_mode & stat_module.S_IXGRP
        else:
            allowed = st.st_mode & stat_module.S_IXOTH
        if not allowed:
            return directory, st
    return None


def tree_size(path: Path) -> int:
    """Bytes used by the files below ``path`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total
