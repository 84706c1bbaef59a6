"""Whether a cached rootfs's /sbin/init can run: what a damaged image is told apart by."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_incus.images.busybox import host_busybox
from pytest_incus.images.rootfs import init_problem


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A rootfs whose /sbin/init is an absolute link to a copy of the host's busybox."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(host_busybox().read_bytes())
    (tmp_path / "sbin" / "init").symlink_to("/bin/busybox")  # resolved inside, not on the host
    return tmp_path


def test_a_whole_program_or_a_script_is_fine(rootfs: Path) -> None:
    assert init_problem(rootfs) is None
    (rootfs / "sbin" / "init").unlink()
    (rootfs / "sbin" / "init").write_text("#!/bin/sh\nexec /bin/busybox init\n")
    assert init_problem(rootfs) is None


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
    problem = init_problem(rootfs)
    assert problem is not None
    assert re.match(said, problem), problem


def test_no_init_or_something_else(rootfs: Path) -> None:
    (rootfs / "bin" / "busybox").write_bytes(b"MZ this is no program for Linux")
    assert (
        init_problem(rootfs) == "/sbin/init (/bin/busybox) is neither an ELF program nor a script"
    )
    (rootfs / "bin" / "busybox").unlink()
    assert init_problem(rootfs) == "/sbin/init is missing (or leads nowhere)"
