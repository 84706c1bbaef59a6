"""The ``busybox`` image: a tiny system made from the host's static busybox."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pytest_incus import tools
from pytest_incus.errors import ImageError
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.source import Built, Context, Version, container_only, default_version

_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

_INITTAB = """\
# busybox init: nothing to start; the instance is ready as soon as init runs
::sysinit:/bin/mkdir -p /tmp /run
::shutdown:/bin/true
"""


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF with no program interpreter (PT_INTERP)."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    types = (int.from_bytes(data[phoff + i * phentsize :][:4], "little") for i in range(phnum))
    return 3 not in types


def host_busybox() -> Path:
    """The host's statically linked busybox, or ImageError saying how to get one."""
    for candidate in _CANDIDATES:
        path = Path(candidate)
        if path.exists() and _is_static_elf(path):
            return path
    raise ImageError(
        "image 'busybox' needs a statically linked busybox on the host; "
        "install it with: apt-get install busybox-static"
    )


def build(rootfs: Path) -> str:
    """Lay out a busybox system in ``rootfs``; returns its init flavour."""
    busybox = host_busybox()
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/log",
        "home",
    ):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    listed = tools.run(
        [str(busybox), "--list-full"],
        what=f"{busybox} --list-full (the applets of the busybox image)",
        error=ImageError,
        fix="reinstall it: apt-get install --reinstall busybox-static",
    )
    applets = listed.stdout.decode().split()
    for applet in applets:
        link = rootfs / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(rootfs / "bin" / "busybox", link.parent))
    (rootfs / "etc" / "inittab").write_text(_INITTAB)
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (rootfs / "etc" / "hostname").write_text("busybox\n")
    (rootfs / "etc" / "os-release").write_text('NAME="BusyBox"\nID=busybox\n')
    return "busybox"


class BusyboxSource:
    """``busybox``: made from the host's static busybox in well under a second."""

    name = "busybox"

    def parse(self, image: str) -> ImageRef | None:
        """Only the name ``busybox``."""
        return ImageRef(image, self.name, "busybox") if image == "busybox" else None

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """System containers only."""
        return container_only(form)

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """Always the same build."""
        return default_version(ref, form)

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Lay the system out."""
        return Built(build(rootfs))
