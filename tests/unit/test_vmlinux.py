"""Unpacking the ELF kernel from a bzImage (a VM boots it without decompressing itself)."""

import struct
from pathlib import Path

import pytest

from pytest_incus.errors import ImageError
from pytest_incus.images import vm


def _bzimage(payload: bytes) -> bytes:
    head = bytearray(5 * 512)
    head[0x1F1] = 4  # setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<II", head, 0x248, 0, len(payload))
    return bytes(head) + payload


def test_no_vmlinux_falls_back_to_the_bzimage(tmp_path: Path) -> None:
    assert vm.boot_kernel(tmp_path) == tmp_path / vm.KERNEL


def test_not_a_bzimage() -> None:
    assert vm.elf_kernel(b"\x7fELF" + bytes(4096)) is None


def test_gzip_payload_without_pvh_note_is_not_used() -> None:
    import gzip

    assert vm.elf_kernel(_bzimage(gzip.compress(b"\x7fELF\x02\x01" + bytes(200)) + b"size")) is None


def test_unknown_compression_is_a_clear_error() -> None:
    with pytest.raises(ImageError, match="unknown compression"):
        vm.elf_kernel(_bzimage(b"\x99\x99\x99\x99" + bytes(64)))
