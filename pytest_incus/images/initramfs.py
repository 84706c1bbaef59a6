"""Our own small initramfs for VM images: busybox, a few kernel modules and an ``/init``.

The initramfs is a "newc" cpio archive written here in Python (no cpio tool needed, and device
nodes such as ``/dev/console`` need no privileges). Its ``/init`` loads the modules that the
stock Debian cloud kernel needs to see its disk, the agent port and the NIC (virtio_pci,
virtio_blk, virtio_console, virtio_net, ext4 and their dependencies, resolved from the image's
``modules.dep``), waits for ``/dev/vda`` with a deadline, mounts it and ``switch_root``s to
the ``init=`` of the kernel command line: the kernel hands ``init=`` to the initramfs, which
must pass it on, or the guest would boot ``/sbin/init`` whatever was asked.

It is kept uncompressed and tiny because under TCG every millisecond of boot counts.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pytest_incus import tools
from pytest_incus.errors import ImageError

# What the stock kernel must load before /init can mount the root disk and the agent can
# open its port, and the NIC's driver: with init="agent" no udev loads it later, and a VM on
# a network must have its interface. Dependencies are added from modules.dep.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "ext4")
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "poweroff", "cat")
ROOT_DEVICE = "/dev/vda"
ROOT_WAIT = 15  # seconds /init waits for the root disk before it gives up and powers off

_TRAILER = "TRAILER!!!"
_MAGIC = b"070701"


# -- the cpio "newc" format ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: a file, directory, symlink or device node."""

    name: str
    mode: int  # st_mode, type bits included
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        """A regular file."""
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        """A directory."""
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        """A symbolic link to ``target``."""
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        """A character device node."""
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: CpioEntry, size: int, namesize: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime: fixed, so the same inputs give the same archive
        size,
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        namesize,
        0,  # check (unused by newc)
    )
    return _MAGIC + b"".join(b"%08X" % value for value in fields)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """The newc archive of ``entries``, in their order (parents must come before children)."""
    out = bytearray()
    for ino, entry in enumerate((*entries, CpioEntry(_TRAILER, 0)), start=1):
        name = entry.name.lstrip("/").encode() + b"\0"
        out += _header(0 if entry.name == _TRAILER else ino, entry, len(entry.data), len(name))
        out += name + _pad4(110 + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def read_cpio(archive: bytes) -> Iterator[CpioEntry]:
    """The entries of a newc archive (the reverse of :func:`write_cpio`)."""
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        if len(header) < 110 or header[:6] != _MAGIC:
            raise ValueError(f"no newc cpio header at offset {offset}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        offset += 110
        name = archive[offset : offset + namesize - 1].decode()
        offset += namesize + len(_pad4(110 + namesize))
        if name == _TRAILER:
            return
        data = archive[offset : offset + size]
        offset += size + len(_pad4(size))
        yield CpioEntry(name, mode, data, rdev)


# -- kernel modules -----------------------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/fs/ext4/ext4.ko.xz`` -> ``ext4``; dashes and underscores are the same."""
    base = PurePosixPath(path).name
    return base.split(".ko", 1)[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` as {name: (path, [paths of its dependencies])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[module_name(path)] = (path.strip(), deps.split())
    return table


def resolve_modules(
    wanted: Iterable[str], dep_table: dict[str, tuple[str, list[str]]], builtin: set[str]
) -> list[str]:
    """Paths of the modules ``wanted`` needs, each after its dependencies (load order).

    A wanted name that is built into the kernel needs nothing; one that is neither a module
    nor built in is an ImageError.
    """
    by_path = {path: name for name, (path, _) in dep_table.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order or path in visiting:
            return
        visiting.add(path)
        for dep in dep_table[by_path[path]][1] if path in by_path else ():
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in dep_table:
            visit(dep_table[key][0])
        elif key not in builtin:
            raise ImageError(
                f"kernel module {name!r} is neither built into the kernel nor in modules.dep; "
                "the VM could not mount its disk or reach its agent"
            )
    return order


def read_module(path: Path) -> bytes:
    """A module file's contents, decompressed (busybox insmod loads plain ELF only)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise ImageError(f"{path} is zstd-compressed: apt-get install zstd to unpack it")
        unpacked = tools.run(
            ["zstd", "-dc", str(path)],
            what=f"zstd -dc {path} (a kernel module for the VM initramfs)",
            error=ImageError,
            fix="the kernel package may be damaged: reinstall it in the image",
        )
        return unpacked.stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def modules_for(rootfs: Path, kernel_release: str) -> list[tuple[str, bytes]]:
    """(file name, ELF contents) of the modules /init loads, in load order."""
    moddir = rootfs / "lib/modules" / kernel_release
    try:
        table = parse_modules_dep((moddir / "modules.dep").read_text())
    except FileNotFoundError as exc:
        raise ImageError(
            f"{moddir}/modules.dep is missing: the kernel package did not run depmod"
        ) from exc
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    return [
        (module_name(path) + ".ko", read_module(moddir / path))
        for path in resolve_modules(ROOT_MODULES, table, builtin)
    ]


# -- the archive --------------------------------------------------------------------------------


def init_script(modules: Iterable[str]) -> str:
    """The initramfs's ``/init``: load ``modules`` (file names, in order), mount the root
    disk and switch to the real init of the kernel command line."""
    insmods = "".join(f"insmod /lib/modules/{name}\n" for name in modules)
    return f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}fail() {{
    echo "pytest-incus initramfs: $*" >/dev/console
    /bin/poweroff -f
}}
read up rest </proc/uptime
deadline=$((${{up%.*}} + {ROOT_WAIT}))
while [ ! -b {ROOT_DEVICE} ]; do
    read up rest </proc/uptime
    [ "${{up%.*}}" -ge "$deadline" ] && fail "no root disk {ROOT_DEVICE} after {ROOT_WAIT}s \
(is the disk attached with if=virtio?)"
    sleep 0.01
done
mount -t ext4 -o rw {ROOT_DEVICE} /root || fail "cannot mount {ROOT_DEVICE} (ext4) on /root"
init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in init=*) init="${{arg#init=}}" ;; esac
done
# -L too: /sbin/init is an absolute symlink, which only resolves inside the new root
[ -e "/root$init" ] || [ -L "/root$init" ] || fail "init=$init does not exist on {ROOT_DEVICE}"
mount --move /dev /root/dev
mount --move /sys /root/sys
mount --move /proc /root/proc
# the real init starts with the kernel's environment, not with this script's PATH
unset PATH
exec /bin/switch_root /root "$init"
fail "switch_root to $init failed"
"""


def build(rootfs: Path, kernel_release: str, busybox: Path = BUSYBOX) -> bytes:
    """The initramfs (uncompressed newc cpio) for the kernel ``kernel_release`` of ``rootfs``."""
    if not busybox.is_file():
        raise ImageError(
            f"building a VM image needs a static busybox at {busybox}: "
            "apt-get install busybox-static"
        )
    modules = modules_for(rootfs, kernel_release)
    entries = [
        CpioEntry.directory(d) for d in ("bin", "dev", "lib", "lib/modules", "proc", "root", "sys")
    ]
    entries.append(CpioEntry.chardev("dev/console", 5, 1))
    entries.append(CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755))
    entries += [CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    entries += [CpioEntry.file(f"lib/modules/{name}", data) for name, data in modules]
    entries.append(CpioEntry.file("init", init_script(n for n, _ in modules).encode(), 0o755))
    return write_cpio(entries)


# -- the KVM probe's initramfs ------------------------------------------------------------------

PROBE_TOKEN = "pytest-incus-kvm-probe-reached-userspace"


def probe(busybox: Path = BUSYBOX) -> bytes:
    """The initramfs of the KVM probe (runtimes/accel.py): its ``/init`` writes
    :data:`PROBE_TOKEN` on the console and powers the machine off. Seeing the token proves
    that a Linux kernel booted through long mode, paging and its first process."""
    if not busybox.is_file():
        raise ImageError(
            f"the KVM probe needs a static busybox at {busybox}: apt-get install busybox-static"
        )
    init = f"#!/bin/busybox sh\necho {PROBE_TOKEN} >/dev/console\n/bin/busybox poweroff -f\n"
    return write_cpio(
        [
            CpioEntry.directory("bin"),
            CpioEntry.directory("dev"),
            CpioEntry.chardev("dev/console", 5, 1),
            CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755),
            CpioEntry.file("init", init.encode(), 0o755),
        ]
    )
