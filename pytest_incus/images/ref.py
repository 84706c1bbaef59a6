"""Image names as users write them, parsed into what the store needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEBIAN_RELEASES = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
DEBIAN_NUMBERS = {codename: number for number, codename in DEBIAN_RELEASES.items()}

OCI_PREFIXES = ("docker://", "oci:", "oci-archive:", "docker-archive:")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image name.

    ``source`` names the image source that claimed it (images/sources.py): ``busybox``,
    ``debian``, ``simplestreams``, ``oci``, ``derived``, ``local`` (a rootfs directory or
    tarball) or ``hook`` (a ``pytest_incus_build_image`` implementation). ``key`` names its
    cache entry, for sources whose names always mean the same build.
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
