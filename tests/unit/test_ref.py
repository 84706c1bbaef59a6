"""parse_ref: image names as users write them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_incus.errors import ConfigError
from pytest_incus.images.sources import parse_ref


@pytest.mark.parametrize(
    ("image", "codename"),
    [
        ("debian/11", "bullseye"),
        ("debian/12", "bookworm"),
        ("debian/13", "trixie"),
        ("debian/bookworm", "bookworm"),
        ("debian/trixie", "trixie"),
    ],
)
def test_debian_by_number_or_codename(image: str, codename: str) -> None:
    ref = parse_ref(image)
    assert (ref.source, ref.release, ref.key, ref.name) == (
        "debian",
        codename,
        f"debian-{codename}",
        image,
    )


def test_number_and_codename_share_one_cache_entry() -> None:
    assert parse_ref("debian/12").key == parse_ref("debian/bookworm").key


@pytest.mark.parametrize("image", ["debian/9", "debian/sid2", "debian/"])
def test_unknown_debian_release(image: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown Debian release .*known: debian/11 \(debian/"):
        parse_ref(image)


def test_busybox() -> None:
    ref = parse_ref("busybox")
    assert (ref.source, ref.key) == ("busybox", "busybox")


def test_local_directory(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    ref = parse_ref(str(rootfs))
    assert ref.source == "local" and ref.path == rootfs and ref.key.startswith("local-")
    assert parse_ref(str(rootfs)).key == ref.key  # stable while unchanged


def test_local_tarball(tmp_path: Path) -> None:
    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(b"")
    assert parse_ref(str(tarball)).source == "local"


def test_local_paths_that_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such rootfs directory or tarball"):
        parse_ref(str(tmp_path / "missing"))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ConfigError, match="neither a directory nor a tarball"):
        parse_ref(str(other))


@pytest.mark.parametrize(
    ("image", "key"),
    [("unit/thing", "hook-unit-thing"), ("mine", "hook-mine"), ("a.b+c-1", "hook-a.b+c-1")],
)
def test_hook_names(image: str, key: str) -> None:
    ref = parse_ref(image)
    assert (ref.source, ref.key) == ("hook", key)


@pytest.mark.parametrize("image", ["bad name", "-dash", "x;y"])
def test_names_nobody_can_build(image: str) -> None:
    with pytest.raises(ConfigError, match="is not a name pytest-incus knows"):
        parse_ref(image)


def test_remote_names_are_recognised() -> None:
    assert parse_ref("images:alpine/3.20").source == "simplestreams"
    assert parse_ref("docker://registry/app:1").source == "oci"
    assert parse_ref("oci:/layout:tag").source == "oci"
