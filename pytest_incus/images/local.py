"""Images from a local rootfs directory or tarball."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pytest_incus import tools
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.source import Built, Context, Version, container_only, default_version

TARBALLS = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst", ".tar.bz2")


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


def _key(path: Path) -> str:
    """A cache key that changes when the directory or tarball is replaced or touched."""
    st = path.stat()
    digest = hashlib.sha256(f"{path}\0{st.st_mtime_ns}\0{st.st_size}".encode()).hexdigest()
    return f"local-{digest[:16]}"


class LocalSource:
    """A rootfs directory or tarball on the host, copied into the cache."""

    name = "local"

    def parse(self, image: str) -> ImageRef | None:
        """A path (absolute, relative with ``./``, ``~``, or one that exists)."""
        if not (
            image.startswith(("/", "./", "../", "~")) or (os.sep in image and Path(image).exists())
        ):
            return None
        path = Path(image).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"image {image!r}: no such rootfs directory or tarball ({path})")
        if not (path.is_dir() or path.name.endswith(TARBALLS)):
            raise ConfigError(f"image {image!r}: {path} is neither a directory nor a tarball")
        return ImageRef(image, self.name, _key(path), path=path)

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """System containers only."""
        return container_only(form)

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """The path's key (its modification time in it)."""
        return default_version(ref, form)

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Copy or unpack it."""
        assert ref.path is not None
        build(ref.path, rootfs)
        return Built(detect_init(rootfs))
