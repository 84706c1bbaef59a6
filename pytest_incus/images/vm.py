"""``debian/<release>`` VM images: a bootable disk, a Debian kernel and our own initramfs.

An entry (cache key ``<container key>.vm``) holds::

    disk.qcow2    ext4 on the whole disk (no partitions): the guest's /dev/vda
    vmlinuz       the release's cloud kernel (its modules are on the disk)
    vmlinux       the same kernel unpacked (ELF), when it has a PVH entry point: QEMU boots
                  it directly, skipping the bzImage's self-decompression (boot_kernel())
    initrd.img    our initramfs (images/initramfs.py): virtio (disk, console, NIC) + ext4 modules,
                  then switch_root

The root filesystem is its own debootstrap (not the container image's): it adds the kernel,
udev, kmod, the full ``python3`` (the agent needs ``json``), Debian's ``qemu-guest-agent`` and
our agent with its systemd units. It is built in two cached steps, because the agent changes
far more often than Debian: ``<container key>.vmroot`` (a rootfs entry: debootstrap and
configuration, minutes) and, from it, the VM entry (agent, initramfs and disk, seconds), which
is rebuilt whenever the agent changes (:func:`recipe`) or the rootfs entry is rebuilt. The VM
entry holds no root filesystem tree: its disk is the image.

Which agent answers on the port ``org.qemu.guest_agent.0``:

- ``init="agent"``: our agent is PID 1 (``init=`` :data:`AGENT_INIT`), no systemd at all;
- ``init="systemd"``: ``pytest-incus-agent.service`` starts it as early as systemd can;
- kernel argument ``pytest_incus.agent=qemu-ga`` with systemd: Debian's ``qemu-ga`` instead.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import lzma
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from importlib.resources.abc import Traversable
from pathlib import Path

from pytest_incus import tools
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images import debootstrap, initramfs

# Versions of the two build steps: bump one when its step changes, and cached entries of the
# other version are rebuilt. The disk step's recipe also follows the agent (see recipe()).
ROOTFS_RECIPE = "2"  # build_rootfs: packages
RECIPE = "10"  # build: agent installation, initramfs, disk
PACKAGES = (
    "systemd-sysv",
    "python3",  # not python3-minimal: the agent needs json
    "linux-image-cloud-amd64",
    "qemu-guest-agent",
    "kmod",
    "udev",
)
DISK = "disk.qcow2"
KERNEL = "vmlinuz"
VMLINUX = "vmlinux"
INITRD = "initrd.img"
BOOT_STATE = "boot.state"  # a boot snapshot's saved machine (QEMU migration stream)
BOOT_CONSOLE = "console.log"  # a boot snapshot's console output up to the save
BOOT_RECORD = "boot.json"  # a boot snapshot's record of the image disk its disk is made on
DISK_SIZE = 4 << 30  # virtual size; the raw image and the qcow2 are sparse
AGENT_PORT = "org.qemu.guest_agent.0"
AGENT_DIR = "/usr/lib/pytest-incus"
AGENT_INIT = f"{AGENT_DIR}/agent-init"
QEMU_GA_ARG = "pytest_incus.agent=qemu-ga"
MKFS_TIMEOUT = 600.0

# The kernel command line every VM gets. No "quiet": the console (an 8250 UART, console.log,
# what logs() returns) carries every message of the kernel and of systemd, so a failed boot can
# be read from it; measured under TCG, the full log (20-30 KB) costs nothing measurable against
# a quiet boot (2.07 s against 2.10 s to the first exec with init="agent", 8.20 s against
# 8.23 s with systemd), and a virtio console (hvc0) gained nothing and lost what the kernel
# printed before the virtio_console module loaded. panic=-1: a guest that panics (say, init
# died) reboots at once, so with QEMU's -no-reboot a broken boot ends in a second instead of
# hanging until the boot timeout. "rw" and root= only matter for a kernel booted without our
# initramfs (kernel= without initrd=). The rest cut checks that only cost time in a throwaway
# VM (TSC and timer checks, audit, lockup watchdogs, which also cry wolf when a loaded host
# deschedules an emulated CPU, and the crypto self-tests: 0.42 s of initcalls under TCG,
# measured with initcall_debug): about 0.5 s less to the agent's first answer under TCG for the
# first four, measured. kernel_args can undo them (the last value of a repeated argument wins:
# e.g. kernel_args="mitigations=auto quiet").
BASE_CMDLINE = (
    "root=/dev/vda",
    "rootfstype=ext4",
    "rw",
    "console=ttyS0",
    "panic=-1",
    "tsc=reliable",
    "no_timer_check",
    "audit=0",
    "nowatchdog",
    "cryptomgr.notests",
    # measured with the ELF kernel (vmboot): together about 0.4 s less to the first exec
    "mitigations=off",  # no speculation workarounds to patch in (and none on every syscall)
    "init_on_alloc=0",  # Debian zeroes every kernel allocation; the page allocator still does
    "8250.nr_uarts=1",  # probe the one serial port, not four
    "noreplace-smp",  # keep the SMP alternatives (no text patching) with cpus > 1
    # the PC's on-board IDE controller: udev would load libata and SCSI for it, for nothing
    "modprobe.blacklist=ata_piix,pata_acpi,ata_generic",
    # a VM's NIC (network="bridged") stays eth0: udev renaming it while the agent configures
    # it (right after a cold boot) would race that configuration
    "net.ifnames=0",
)

Progress = Callable[[str], None]

_AGENT_INIT_SCRIPT = f"""#!/bin/sh
# PID 1 of an init="agent" VM (kernel command line init={AGENT_INIT}): the guest agent.
PYTHONPATH={AGENT_DIR} exec /usr/bin/python3 -S -m guest_agent --init "$@"
"""

_AGENT_UNIT = f"""[Unit]
Description=pytest-incus guest agent
# as early as systemd can: the initramfs already loaded virtio_console, so the port exists
DefaultDependencies=no
ConditionKernelCommandLine=!{QEMU_GA_ARG}
StartLimitIntervalSec=0

[Service]
Environment=PYTHONPATH={AGENT_DIR}
ExecStart=/usr/bin/python3 -S -m guest_agent
Restart=always
RestartSec=200ms
# the agent's start competes with the whole boot for the (emulated) CPUs; readiness waits on it
Nice=-10
IOSchedulingClass=best-effort
IOSchedulingPriority=0

[Install]
WantedBy=sysinit.target
"""

# The port's /dev/virtio-ports/ name comes from udev, late in the boot: like our agent, qemu-ga
# opens the port's /dev/vportNpM, found through sysfs, as soon as systemd starts.
_QEMU_GA_UNIT = f"""[Unit]
Description=QEMU guest agent (Debian's qemu-ga, chosen by {QEMU_GA_ARG})
DefaultDependencies=no
ConditionKernelCommandLine={QEMU_GA_ARG}
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/sh -c 'for port in /sys/class/virtio-ports/*; do \\
    [ "$$(cat $$port/name)" = {AGENT_PORT} ] && \\
    exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/$${{port##*/}}; done; \\
    echo "no virtio-serial port {AGENT_PORT}" >&2; exit 1'
Restart=always
RestartSec=200ms
"""

# Replaces Debian's rule, which would ask systemd to start its (masked) qemu-guest-agent.service.
_UDEV_RULE = f'SUBSYSTEM=="virtio-ports", ATTR{{name}}=="{AGENT_PORT}", TAG+="systemd"\n'

_UNITS = {
    "pytest-incus-agent.service": _AGENT_UNIT,
    "pytest-incus-qemu-ga.service": _QEMU_GA_UNIT,
}

# Masked: Debian's own qemu-ga (ours runs instead, or it runs from our unit), and what only
# slows a throwaway test VM's boot down or runs jobs in the middle of a test.
_MASKED_UNITS = (
    "qemu-guest-agent.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",  # the console is ttyS0, and there is no password to log in with
    "serial-getty@ttyS0.service",
    "getty-static.service",
    "systemd-journald-audit.socket",
    "systemd-tmpfiles-clean.timer",  # would clean /tmp in the middle of a long test session
    "dpkg-db-backup.timer",
    # preloads that the kernel and udev do on demand anyway; each costs a process at boot
    "modprobe@.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "dev-hugepages.mount",
)
# The journal of a throwaway VM stays in memory: no flush to disk at boot.
_JOURNALD_CONF = "[Journal]\nStorage=volatile\n"


def recipe() -> str:
    """The version of this build: :data:`RECIPE` and a digest of the agent it installs, so
    that a changed agent (a new pytest-incus) rebuilds the image."""
    digest = hashlib.sha256()
    for name, data in sorted(_agent_files(_agent_package())):
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return f"{RECIPE}+agent.{digest.hexdigest()[:12]}"


def kernel_cmdline(init: str, extra: str = "") -> str:
    """The kernel command line of a VM booting with ``init`` ("systemd" or "agent").

    ``extra`` (the spec's ``kernel_args``) comes last, so it can override what comes before.
    """
    args = list(BASE_CMDLINE)
    if init == "agent":
        args.append(f"init={AGENT_INIT}")
    elif init != "systemd":
        raise ConfigError(f"init={init!r} is not a VM init: use 'systemd' or 'agent'")
    if extra.strip():
        args.append(extra.strip())
    return " ".join(args)


def build_rootfs(release: str, rootfs: Path, mirror: str, progress: Progress) -> str:
    """Debootstrap and configure the root filesystem of Debian ``release`` (a codename) VMs,
    everything but the agent; returns its init flavour."""
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:  # checked now, not after minutes of debootstrap
            raise ImageError(f"building a VM image needs {tool}: apt-get install {package}")
    debootstrap.run(
        release, rootfs, mirror, PACKAGES, progress, what=f"the debian/{release} VM image"
    )
    _kernel_release(rootfs)
    _clean(rootfs)
    return "systemd"


def build(source: Path, entry: Path, rootfs: Path, progress: Progress) -> str:
    """Make a VM image in the directory ``entry`` from the root filesystem ``source`` (made by
    :func:`build_rootfs`) and the agent of this pytest-incus; returns the kernel release.

    ``rootfs`` (an empty directory inside ``entry``) receives a hard-linked copy of ``source``
    plus the agent, and is removed at the end: only new files are written into it, so
    ``source`` is never modified.
    """
    kernel_release = _kernel_release(source)
    progress(f"making the VM disk from {source.parent.name} (kernel {kernel_release})")
    rootfs.rmdir()
    _run("cp", "-a", "--link", str(source), str(rootfs))
    try:
        _install_agent(rootfs)
        _configure(rootfs)
        shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kernel_release}", entry / KERNEL)
        elf = elf_kernel((entry / KERNEL).read_bytes())
        if elf is not None:
            (entry / VMLINUX).write_bytes(elf)
        (entry / INITRD).write_bytes(initramfs.build(rootfs, kernel_release))
        make_disk(rootfs, entry / DISK)
    finally:
        shutil.rmtree(rootfs)
    return kernel_release


# -- the ELF kernel for PVH boot ----------------------------------------------------------------
# A bzImage decompresses itself before the kernel runs: under TCG that (plus the firmware's
# real-mode path) cost 1.3-3 s of every boot, measured. QEMU boots the ELF vmlinux inside it
# directly, through its PVH entry point (Xen note XEN_ELFNOTE_PHYS32_ENTRY, CONFIG_PVH=y in
# Debian's kernels), so the build unpacks it once into the entry.

_XEN_ELFNOTE_PHYS32_ENTRY = 18
_BZIMAGE_MAGIC = b"HdrS"


def _decompress(payload: bytes) -> bytes:
    """The kernel payload of a bzImage, decompressed (the compressors a kernel may use; the
    size the kernel build appends after the stream is ignored)."""
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload[:-4])
    unpackers = {b"\x02\x21\x4c\x18": ("lz4", "lz4"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd")}
    tool = unpackers.get(payload[:4])
    if tool is None:
        raise ImageError(f"unknown compression of the kernel payload (magic {payload[:4].hex()})")
    if shutil.which(tool[0]) is None:
        raise ImageError(
            f"the VM kernel is {tool[0]}-compressed: apt-get install {tool[1]} to unpack it "
            "(the unpacked kernel boots seconds faster under TCG)"
        )
    done = tools.run(
        [tool[0], "-d", "-c"],
        input=payload[:-4],
        what=f"{tool[0]} -d of the VM kernel's payload",
        error=ImageError,
        timeout=MKFS_TIMEOUT,
    )
    return done.stdout


def _has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has the PVH entry note QEMU boots it through."""
    if elf[:5] != b"\x7fELF\x02" or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def elf_kernel(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside ``bzimage`` if QEMU can boot it directly (PVH), else None."""
    if bzimage[0x202:0x206] != _BZIMAGE_MAGIC:
        return None
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:  # no payload_offset/payload_length before boot protocol 2.08
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    elf = _decompress(bzimage[start : start + length])
    return elf if _has_pvh_note(elf) else None


def boot_kernel(entry: Path) -> Path:
    """The kernel file of the VM image in ``entry`` to boot: the unpacked ELF if the build
    made one (faster), else the bzImage."""
    elf = entry / VMLINUX
    return elf if elf.is_file() else entry / KERNEL


def _kernel_release(rootfs: Path) -> str:
    releases = sorted(p.name for p in (rootfs / "lib/modules").iterdir() if p.is_dir())
    if len(releases) != 1 or not (rootfs / "boot" / f"vmlinuz-{releases[0]}").is_file():
        raise ImageError(
            f"expected one kernel in the VM rootfs, found modules for {releases or 'none'} "
            f"and {sorted(p.name for p in (rootfs / 'boot').glob('vmlinuz-*'))}"
        )
    return releases[0]


def _agent_package() -> Traversable:
    try:
        return importlib.resources.files("guest_agent")
    except ModuleNotFoundError as exc:
        raise ImageError(
            "the guest_agent package (shipped with pytest-incus) is not importable, so it "
            "cannot be installed into the VM image: reinstall pytest-incus"
        ) from exc


def _agent_files(source: Traversable, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """(relative path, contents) of every file of the package, compiled files left out."""
    for item in source.iterdir():
        if item.name == "__pycache__" or item.name.endswith(".pyc"):
            continue
        if item.is_dir():
            yield from _agent_files(item, f"{prefix}{item.name}/")
        else:
            yield f"{prefix}{item.name}", item.read_bytes()


def _install_agent(rootfs: Path) -> None:
    """Copy every file of the ``guest_agent`` package into the guest and precompile it with
    the guest's own python (its startup is on the boot's critical path)."""
    target = rootfs / AGENT_DIR.lstrip("/")
    for name, data in _agent_files(_agent_package()):
        path = target / "guest_agent" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    script = target / "agent-init"
    script.write_text(_AGENT_INIT_SCRIPT)
    script.chmod(0o755)
    _run("chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q", AGENT_DIR)


def _clean(rootfs: Path) -> None:
    """Remove what a VM image does not need from a fresh debootstrap."""
    # the initramfs-tools image made when the kernel was installed: ours replaces it
    for leftover in (*rootfs.glob("boot/initrd.img-*"), *rootfs.glob("initrd.img*")):
        leftover.unlink()
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for deb in (rootfs / cache).glob("*.deb"):
            deb.unlink()


def _write(path: Path, text: str) -> None:
    # a new inode: the file may be a hard link into the rootfs entry, which must not change
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_text(text)


def _configure(rootfs: Path) -> None:
    """Units, masks, fstab: a VM that boots fast and cleanly (done in the disk step, on the
    hard-linked copy, so that changing them costs seconds, not a debootstrap)."""
    systemd = rootfs / "etc/systemd/system"
    for name, text in _UNITS.items():
        _write(systemd / name, text)
    for name in _UNITS:
        wants = systemd / "sysinit.target.wants" / name
        wants.unlink(missing_ok=True)
        wants.symlink_to(f"/etc/systemd/system/{name}")
    for unit in _MASKED_UNITS:
        link = systemd / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    _write(rootfs / "etc/udev/rules.d/60-qemu-guest-agent.rules", _UDEV_RULE)
    # pass 0: no fsck of a disk that is a fresh overlay of a clean image at every boot
    _write(rootfs / "etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 0\n")
    _write(rootfs / "etc/hostname", "debian\n")
    # what the agent writes for a VM on a network (guest_agent/network.py): into tmpfs, which
    # costs a resumed guest less than a file of ext4 (and a VM with no network has no DNS)
    resolv_conf = rootfs / "etc/resolv.conf"
    resolv_conf.unlink(missing_ok=True)
    resolv_conf.symlink_to("/run/resolv.conf")
    _write(rootfs / "etc/systemd/journald.conf.d/pytest-incus.conf", _JOURNALD_CONF)


def make_disk(rootfs: Path, disk: Path, size: int = DISK_SIZE) -> None:
    """An ext4 filesystem of ``rootfs`` on a whole qcow2 disk (no partition table)."""
    raw = disk.with_suffix(".raw")
    try:
        with raw.open("wb") as f:
            f.truncate(size)
        # itables and journal zeroed now (sparse, free) rather than by ext4lazyinit in the
        # guest, where under TCG it would compete with the test for the CPU
        _run(
            "mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(rootfs),
            "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw),
        )  # fmt: skip
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk))
    finally:
        raw.unlink(missing_ok=True)


def _run(*cmd: str) -> None:
    what = f"{' '.join(cmd[:2])} (making a VM image)"
    tools.run(cmd, what=what, error=ImageError, timeout=MKFS_TIMEOUT, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}
