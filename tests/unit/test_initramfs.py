"""The initramfs of VM images: the cpio writer, module resolution, /init, the command line."""

from __future__ import annotations

import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images import initramfs, vm
from pytest_incus.images.initramfs import CpioEntry, read_cpio, write_cpio

BUSYBOX = "/bin/busybox"

ENTRIES = [
    CpioEntry.directory("bin"),
    CpioEntry.directory("dev", 0o700),
    CpioEntry.chardev("dev/console", 5, 1),
    CpioEntry.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
    CpioEntry.file("empty", b""),
    CpioEntry.file("odd", b"x" * 4099),  # sizes that are not multiples of 4 need padding
    CpioEntry.symlink("bin/sh", "tool"),
]


def test_cpio_round_trip() -> None:
    archive = write_cpio(ENTRIES)
    assert archive.startswith(b"070701")
    assert len(archive) % 4 == 0
    assert list(read_cpio(archive)) == ENTRIES


def test_cpio_read_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="no newc cpio header at offset 0"):
        list(read_cpio(b"not a cpio archive, not at all, no" * 4))


@pytest.mark.skipif(shutil.which(BUSYBOX) is None, reason="needs busybox (busybox-static)")
def test_busybox_cpio_reads_our_archive(scratch_cache: Path) -> None:
    archive = write_cpio(ENTRIES)
    listing = subprocess.run(
        [BUSYBOX, "cpio", "-t", "-v"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines] == [
        e.name for e in ENTRIES
    ]
    assert lines[2].startswith("crw-------") and lines[6].endswith("bin/sh -> tool")
    # and extracts it (device nodes left out: their creation is not what is tested here)
    plain = write_cpio([e for e in ENTRIES if not stat.S_ISCHR(e.mode)])
    subprocess.run(
        [BUSYBOX, "cpio", "-i", "-d"],
        input=plain,
        cwd=scratch_cache,
        check=True,
        capture_output=True,
    )
    assert (scratch_cache / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (scratch_cache / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (scratch_cache / "odd").stat().st_size == 4099
    assert (scratch_cache / "bin/sh").readlink() == Path("tool")


DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio-console.ko.zst: kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


def test_modules_dep_is_parsed_with_compressed_names_and_dashes() -> None:
    table = initramfs.parse_modules_dep(DEP)
    assert table["virtio_blk"] == (
        "kernel/drivers/block/virtio_blk.ko.xz",
        ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"],
    )
    assert table["virtio_console"][0] == "kernel/drivers/char/virtio-console.ko.zst"


def test_modules_are_resolved_dependencies_first_each_once() -> None:
    table = initramfs.parse_modules_dep(DEP)
    order = initramfs.resolve_modules(["virtio_pci", "virtio_blk", "ext4"], table, {"ext4"})
    names = [initramfs.module_name(p) for p in order]
    assert sorted(names) == sorted(set(names))
    assert set(names) == {
        "virtio",
        "virtio_ring",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "virtio_blk",
    }
    for module in ("virtio", "virtio_ring", "virtio_pci_modern_dev"):
        assert names.index(module) < names.index("virtio_pci")
    assert names.index("virtio_ring") < names.index("virtio_blk")


def test_a_module_that_is_nowhere_is_an_error() -> None:
    with pytest.raises(ImageError, match="'virtio_gpu' is neither built into the kernel"):
        initramfs.resolve_modules(["virtio_gpu"], initramfs.parse_modules_dep(DEP), set())


def test_compressed_modules_are_unpacked(scratch_cache: Path) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 8
    xz = scratch_cache / "m.ko.xz"
    xz.write_bytes(lzma.compress(elf))
    assert initramfs.read_module(xz) == elf
    if shutil.which("zstd"):
        plain = scratch_cache / "n.ko"
        plain.write_bytes(elf)
        subprocess.run(["zstd", "-q", str(plain)], check=True)
        assert initramfs.read_module(scratch_cache / "n.ko.zst") == elf
    assert initramfs.read_module(scratch_cache / "n.ko") == elf


def fake_rootfs(root: Path, release: str) -> None:
    moddir = root / "lib/modules" / release
    for line in DEP.replace("\\\n", "").splitlines():
        path = moddir / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"module {path.name}".encode()
        if path.name.endswith(".xz"):
            data = lzma.compress(data)
        elif path.name.endswith(".zst"):
            data = subprocess.run(["zstd", "-c"], input=data, capture_output=True).stdout
        path.write_bytes(data)
    (moddir / "modules.dep").write_text(DEP)
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")


@pytest.mark.skipif(
    not (shutil.which(BUSYBOX) and shutil.which("zstd")), reason="needs busybox-static and zstd"
)
def test_initramfs_holds_init_busybox_console_and_modules_in_order(scratch_cache: Path) -> None:
    fake_rootfs(scratch_cache, "6.1.0-test")
    entries = {e.name: e for e in read_cpio(initramfs.build(scratch_cache, "6.1.0-test"))}
    assert entries["bin/busybox"].data == Path(BUSYBOX).read_bytes()
    assert entries["dev/console"].rdev == (5, 1) and stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["lib/modules/virtio_blk.ko"].data == b"module virtio_blk.ko.xz"
    assert entries["lib/modules/virtio_console.ko"].data == b"module virtio-console.ko.zst"
    init = entries["init"]
    assert init.mode & 0o111 and init.data.startswith(b"#!/bin/sh\n")
    script = init.data.decode()
    loads = [line.split("/")[-1] for line in script.splitlines() if line.startswith("insmod")]
    assert loads.index("virtio.ko") < loads.index("virtio_pci.ko") < loads.index("virtio_blk.ko")
    assert "virtio_console.ko" in loads
    # the NIC's driver too (init="agent" has no udev to load it), after what it needs
    assert (
        loads.index("failover.ko") < loads.index("net_failover.ko") < loads.index("virtio_net.ko")
    )
    for applet in ("sh", "mount", "insmod", "switch_root", "poweroff"):
        assert entries[f"bin/{applet}"].data == b"busybox"
    # the script is valid for the shell that runs it
    subprocess.run([BUSYBOX, "sh", "-n", "-c", script], check=True)


def test_init_passes_init_on_and_fails_fast_without_a_disk() -> None:
    script = initramfs.init_script(["a.ko"])
    assert 'init="${arg#init=}"' in script and 'exec /bin/switch_root /root "$init"' in script
    assert "poweroff -f" in script and f"after {initramfs.ROOT_WAIT}s" in script
    # the script's PATH must not leak into the real init's environment
    assert script.index("unset PATH") < script.index("exec /bin/switch_root")


def test_kernel_cmdline() -> None:
    systemd = vm.kernel_cmdline("systemd")
    assert "console=ttyS0" in systemd and "root=/dev/vda" in systemd and "init=" not in systemd
    agent = vm.kernel_cmdline("agent", "loglevel=7 foo=bar")
    assert f"init={vm.AGENT_INIT}" in agent
    assert agent.endswith(" loglevel=7 foo=bar")
    with pytest.raises(ConfigError, match="init='busybox' is not a VM init"):
        vm.kernel_cmdline("busybox")


def test_recipe_follows_the_agent() -> None:
    recipe = vm.recipe()
    assert recipe.startswith(vm.RECIPE + "+agent.") and recipe == vm.recipe()
