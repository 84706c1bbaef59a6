"""The debian/12 VM image: built once into the shared cache, then checked piece by piece.

Booting it is the VM runtime's business (test_vm_*.py); here the entry itself is checked:
its record, its kernel, its initramfs and what is on its disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import SCRATCH_ROOT

from pytest_incus.images import initramfs, vm
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.settings import Settings

pytestmark = pytest.mark.skipif(
    shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs) to look into the disk"
)


@pytest.fixture(scope="module")
def image(settings: Settings) -> Image:
    """The debian/12 VM image of the shared cache (built on first use)."""
    return ImageStore(settings).get("debian/12", kind="vm")


@pytest.fixture(scope="module")
def raw_disk(image: Image) -> Iterator[Path]:
    """The image's disk as a raw (sparse) file, for debugfs."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    raw = SCRATCH_ROOT / f"vm-image-{image.key}-{os.getpid()}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.disk), str(raw)],
        check=True,
    )
    yield raw
    raw.unlink()


def debugfs(disk: Path, request: str) -> str:
    """The answer of debugfs (read-only) to ``request`` about ``disk``."""
    done = subprocess.run(
        ["debugfs", "-R", request, str(disk)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DEBUGFS_PAGER": "__none__", "PAGER": "__none__"},
    )
    return done.stdout


def kernel_version(kernel: Path) -> str:
    """The version string a bzImage carries in its setup header (x86 boot protocol)."""
    data = kernel.read_bytes()
    assert data[0x202:0x206] == b"HdrS", "not a bzImage"
    offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    return data[offset : data.index(b"\0", offset)].decode()


def test_entry_record(image: Image, settings: Settings) -> None:
    assert (image.ref, image.kind, image.key, image.init) == (
        "debian/12",
        "vm",
        "debian-bookworm.vm",
        "systemd",
    )
    assert image.recipe == vm.recipe()
    assert image.base == "debian-bookworm.vmroot"  # the rootfs entry it was made from
    assert image.kernel_release and image.kernel_release.endswith("-cloud-amd64")
    record = json.loads((image.path / "image.json").read_text())
    assert record["kernel_release"] == image.kernel_release
    # the scratch root filesystem of the build is gone: the disk is the image
    assert sorted(p.name for p in image.path.iterdir()) == [
        "disk.qcow2",
        "image.json",
        "initrd.img",
        "vmlinux",  # the same kernel unpacked: what QEMU boots
        "vmlinuz",
    ]
    assert image.size >= image.disk.stat().st_blocks * 512
    builds = [b for b in ImageStore(settings).builds() if b["key"] == image.key]
    assert builds, "no builds.jsonl line for the VM image"
    # a second store (another worker, a later run) finds it without building
    assert ImageStore(settings).get("debian/12", kind="vm") == image
    assert len([b for b in ImageStore(settings).builds() if b["key"] == image.key]) == len(builds)
    listed = {entry.key: entry for entry in ImageStore(settings).list()}
    assert listed[image.key] == image
    root = listed["debian-bookworm.vmroot"]
    assert (root.kind, root.recipe) == (
        "vm-rootfs",
        vm.ROOTFS_RECIPE,
    ) and root.created <= image.created
    assert (root.rootfs / "lib/modules" / str(image.kernel_release)).is_dir()
    assert not (root.rootfs / vm.AGENT_DIR.lstrip("/")).exists()  # the agent is the VM step's


def test_disk_is_qcow2_of_an_ext4_whole_disk(image: Image, raw_disk: Path) -> None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image.disk)],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["virtual-size"] == vm.DISK_SIZE
    blkid = subprocess.run(
        ["blkid", "-p", "-o", "export", str(raw_disk)], capture_output=True, text=True, check=True
    ).stdout
    assert "TYPE=ext4" in blkid.splitlines() and "PTTYPE" not in blkid


def test_kernel_modules_and_kernel_agree(image: Image, raw_disk: Path) -> None:
    assert kernel_version(image.kernel).split()[0] == image.kernel_release
    modules = debugfs(raw_disk, "ls -p /lib/modules").split("\n")
    names = [line.split("/")[5] for line in modules if line.count("/") >= 6]
    assert [n for n in names if n not in (".", "..")] == [image.kernel_release]


def test_initrd_has_init_busybox_and_root_modules(image: Image) -> None:
    entries = {e.name: e for e in initramfs.read_cpio(image.initrd.read_bytes())}
    assert "exec /bin/switch_root /root" in entries["init"].data.decode()
    assert entries["bin/busybox"].data.startswith(b"\x7fELF")
    for module in ("virtio_pci", "virtio_blk", "virtio_console"):
        data = entries[f"lib/modules/{module}.ko"].data
        assert data.startswith(b"\x7fELF")  # decompressed, for busybox insmod
        assert f"vermagic={image.kernel_release} ".encode() in data


def test_disk_has_agent_units_and_masks(image: Image, raw_disk: Path) -> None:
    agent_files = debugfs(raw_disk, f"ls -p {vm.AGENT_DIR}/guest_agent")
    assert "/__main__.py/" in agent_files and "/__pycache__/" in agent_files
    init = debugfs(raw_disk, f"cat {vm.AGENT_INIT}")
    assert "-m guest_agent --init" in init
    units = debugfs(raw_disk, "ls -p /etc/systemd/system/sysinit.target.wants")
    assert "/pytest-incus-agent.service/" in units and "/pytest-incus-qemu-ga.service/" in units
    qemu_ga = debugfs(raw_disk, "cat /etc/systemd/system/pytest-incus-qemu-ga.service")
    assert f"ConditionKernelCommandLine={vm.QEMU_GA_ARG}" in qemu_ga
    # Debian's udev rule, which would start its masked qemu-guest-agent.service, is replaced
    rule = debugfs(raw_disk, "cat /etc/udev/rules.d/60-qemu-guest-agent.rules")
    assert "SYSTEMD_WANTS" not in rule
    unit = debugfs(raw_disk, "cat /etc/systemd/system/pytest-incus-agent.service")
    assert f"ConditionKernelCommandLine=!{vm.QEMU_GA_ARG}" in unit
    masked = debugfs(raw_disk, "stat /etc/systemd/system/qemu-guest-agent.service")
    assert 'Fast link dest: "/dev/null"' in masked
    assert debugfs(raw_disk, "cat /etc/fstab").startswith("/dev/vda / ext4 ")
    for binary in ("/usr/sbin/qemu-ga", "/usr/bin/python3", "/usr/lib/python3.11/json/__init__.py"):
        assert "Inode:" in debugfs(raw_disk, f"stat {binary}"), binary


def test_image_boots_the_unpacked_kernel(image: Image) -> None:
    elf = (image.path / vm.VMLINUX).read_bytes()
    assert elf[:4] == b"\x7fELF"
    assert vm.elf_kernel((image.path / vm.KERNEL).read_bytes()) == elf
    assert vm.boot_kernel(image.path) == image.path / vm.VMLINUX
