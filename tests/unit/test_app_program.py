"""Finding an app's program in its image's rootfs, symlinks followed inside the rootfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_incus.runtimes.app import find_program

PATH = "/usr/local/bin:/usr/bin:/bin"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A rootfs with a program, links to it of every kind, a loop and a plain file."""
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "srv").mkdir()
    tool = root / "bin" / "busybox"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")  # relative
    (root / "usr" / "bin" / "env").symlink_to("/bin/busybox")  # absolute: inside the rootfs
    (root / "usr" / "bin" / "up").symlink_to("../../bin/busybox")
    (root / "usr" / "bin" / "loop").symlink_to("loop")
    (root / "usr" / "bin" / "host").symlink_to("/etc/hostname")  # on the host, not inside
    (root / "srv" / "data").write_text("not a program\n")
    (root / "srv" / "run").symlink_to("/bin/sh")
    return root


@pytest.mark.parametrize(
    ("program", "found"),
    [
        ("busybox", "/bin/busybox"),
        ("sh", "/bin/sh"),
        ("env", "/usr/bin/env"),
        ("up", "/usr/bin/up"),
        ("/bin/sh", "/bin/sh"),
        ("./run", "/srv/./run"),
        ("loop", None),
        ("host", None),
        ("nothere", None),
        ("/srv/data", None),
        ("/bin", None),
    ],
)
def test_find_program(rootfs: Path, program: str, found: str | None) -> None:
    assert find_program(rootfs, program, PATH, "/srv") == found


def test_the_host_root_is_never_reached(rootfs: Path) -> None:
    assert Path("/etc/passwd").is_file()  # the host has one; the rootfs has none
    (rootfs / "usr" / "bin" / "passwd").symlink_to("/etc/passwd")
    assert find_program(rootfs, "passwd", PATH, "/") is None
