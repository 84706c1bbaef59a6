"""Whether a cached rootfs's /sbin/init was cut short: what a damaged image is told apart by."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_incus.images.busybox import host_busybox
from pytest_incus.images.rootfs import init_damage


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A rootfs whose /sbin/init is an absolute link to a copy of the host's busybox."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(host_busybox().read_bytes())
    (tmp_path / "sbin" / "init").symlink_to("/bin/busybox")  # resolved inside, not on the host
    return tmp_path


def test_a_whole_program_or_a_script_is_not_damaged(rootfs: Path) -> None:
    assert init_damage(rootfs) is None
    (rootfs / "sbin" / "init").unlink()
    (rootfs / "sbin" / "init").write_text("#!/bin/sh\nexec /bin/busybox init\n")
    assert init_damage(rootfs) is None


@pytest.mark.parametrize(
    ("keep", "said"),
    [
        (100_000, r"/sbin/init \(/bin/busybox\) is truncated \(100000 bytes, but it loads"),
        (40, r"/sbin/init \(/bin/busybox\) is truncated or damaged \(40 bytes"),
        (0, r"/sbin/init \(/bin/busybox\) is empty"),
    ],
)
def test_a_program_cut_short(rootfs: Path, keep: int, said: str) -> None:
    program = rootfs / "bin" / "busybox"
    program.write_bytes(program.read_bytes()[:keep])
    problem = init_damage(rootfs)
    assert problem is not None
    assert re.match(said, problem), problem


def test_no_init_or_no_program_is_the_image_s_doing_not_damage(rootfs: Path) -> None:
    # the start reports these (liblxc: 'Failed to exec "/sbin/init"'); pruning would not help
    (rootfs / "bin" / "busybox").write_bytes(b"MZ this is no program for Linux")
    assert init_damage(rootfs) is None
    (rootfs / "bin" / "busybox").unlink()
    assert init_damage(rootfs) is None
