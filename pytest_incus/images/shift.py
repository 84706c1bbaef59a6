"""The uid-shifted copy of a rootfs that unprivileged containers boot from."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_incus import tools
from pytest_incus.errors import ImageError


def _shift_one(path: str, base_id: int) -> None:
    st = os.lstat(path)
    os.lchown(path, st.st_uid + base_id, st.st_gid + base_id)
    # chown clears setuid/setgid bits; put them back (never on a symlink)
    if st.st_mode & 0o6000 and not os.path.islink(path):
        os.chmod(path, st.st_mode & 0o7777)


def copy_shifted(source: Path, dest: Path, base_id: int) -> None:
    """Copy the tree ``source`` into the existing directory ``dest``, owners moved up by
    ``base_id`` (uid 0 inside becomes ``base_id`` on the host)."""
    tools.run(
        ["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)],
        what=f"copying {source} for unprivileged containers (cp -a)",
        error=ImageError,
        fix="check the free space of the cache directory",
    )
    _shift_one(str(dest), base_id)
    for root, dirs, files in os.walk(dest):
        for name in dirs + files:
            _shift_one(os.path.join(root, name), base_id)
