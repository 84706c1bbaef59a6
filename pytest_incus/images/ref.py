"""Image names as users write them, parsed into what the store needs."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pytest_incus.errors import ConfigError

DEBIAN_RELEASES = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
DEBIAN_NUMBERS = {codename: number for number, codename in DEBIAN_RELEASES.items()}

OCI_PREFIXES = ("docker://", "oci:", "oci-archive:", "docker-archive:")
_HOOK_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/+-]*$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image name.

    ``source`` says who makes it: ``busybox``, ``debian``, ``local`` (a rootfs directory or
    tarball), ``hook`` (a ``pytest_incus_build_image`` implementation), ``simplestreams`` or
    ``oci`` (not built yet by this version). ``key`` names its cache entry.
    """

    name: str
    source: str
    key: str
    release: str | None = None
    path: Path | None = None

    @property
    def vm_key(self) -> str:
        """The cache key of this image's VM form (disk, kernel and initrd)."""
        return f"{self.key}.vm"

    @property
    def vm_root_key(self) -> str:
        """The cache key of the root filesystem that this image's VM form is made from."""
        return f"{self.key}.vmroot"

    def keys(self) -> set[str]:
        """Every cache key of this image: its container, VM and VM rootfs forms."""
        return {self.key, self.vm_key, self.vm_root_key}


def _local_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256(f"{path}\0{st.st_mtime_ns}\0{st.st_size}".encode()).hexdigest()
    return f"local-{digest[:16]}"


def parse_ref(image: str) -> ImageRef:
    """Parse ``image``; ConfigError for a name that can never work."""
    if image == "busybox":
        return ImageRef(image, "busybox", "busybox")
    if image.startswith("debian/"):
        release = image.split("/", 1)[1]
        codename = DEBIAN_RELEASES.get(release, release)
        if codename not in DEBIAN_NUMBERS:
            known = ", ".join(f"debian/{n} (debian/{c})" for n, c in DEBIAN_RELEASES.items())
            raise ConfigError(f"unknown Debian release in image {image!r}; known: {known}")
        return ImageRef(image, "debian", f"debian-{codename}", release=codename)
    if image.startswith("images:"):
        return ImageRef(image, "simplestreams", "ss-" + image[7:].replace("/", "-"))
    if image.startswith(OCI_PREFIXES):
        return ImageRef(image, "oci", "oci-" + hashlib.sha256(image.encode()).hexdigest()[:16])
    if image.startswith(("/", "./", "../", "~")) or (os.sep in image and Path(image).exists()):
        path = Path(image).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"image {image!r}: no such rootfs directory or tarball ({path})")
        if not (
            path.is_dir()
            or path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst", ".tar.bz2"))
        ):
            raise ConfigError(f"image {image!r}: {path} is neither a directory nor a tarball")
        return ImageRef(image, "local", _local_key(path), path=path)
    if _HOOK_NAME.match(image):
        key = "hook-" + image.replace("/", "-")
        return ImageRef(image, "hook", key)
    raise ConfigError(
        f"image {image!r} is not a name pytest-incus knows: use busybox, debian/<release>, "
        "a rootfs path, or a name that a pytest_incus_build_image hook builds"
    )
