"""Images from a local rootfs directory or tarball."""

from __future__ import annotations

from pathlib import Path

from pytest_incus import tools
from pytest_incus.errors import ImageError


def build(source: Path, rootfs: Path) -> None:
    """Copy the rootfs directory or unpack the tarball ``source`` into ``rootfs``."""
    if source.is_dir():
        cmd = ["cp", "-a", "--reflink=auto", f"{source}/.", str(rootfs)]
    else:
        cmd = [
            "tar",
            "-x",
            "-p",
            "--numeric-owner",
            "--xattrs",
            "-f",
            str(source),
            "-C",
            str(rootfs),
        ]
    tools.run(
        cmd,
        what=f"importing the rootfs {source} ({cmd[0]})",
        error=ImageError,
        fix="check that it is a readable rootfs directory or tarball",
    )
    if not (rootfs / "sbin" / "init").exists() and not (rootfs / "sbin" / "init").is_symlink():
        raise ImageError(f"rootfs {source} has no /sbin/init, so no system container can boot it")


def detect_init(rootfs: Path) -> str:
    """``systemd``, ``busybox`` or ``other``, from where the rootfs's /sbin/init leads."""
    target = rootfs / "sbin" / "init"
    for _ in range(10):
        if not target.is_symlink():
            break
        link = target.readlink()
        # resolve inside the rootfs, never on the host
        target = (rootfs / str(link).lstrip("/")) if link.is_absolute() else target.parent / link
    name = str(target)
    if "systemd" in name:
        return "systemd"
    if "busybox" in name:
        return "busybox"
    return "other"
