"""The ``images:`` client against trees written by the real ``incus-simplestreams``, served
over real HTTP and HTTPS on loopback (tests/simplestreams_helpers.py).

No instance is started here: what is checked is lookup, download (resume, retry, checks,
caching) and unpacking, as the store will call them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from simplestreams_helpers import (
    CREATED,
    SCRATCH_ROOT,
    ImageServer,
    build_tree,
    make_image,
    version_of,
)

from pytest_incus import fsutil
from pytest_incus.errors import ImageError
from pytest_incus.images import simplestreams
from pytest_incus.images.simplestreams import RemoteImage, ServerUnreachable


def _scratch(prefix: str) -> Path:
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    path = SCRATCH_ROOT / f"{prefix}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    """A tree shared by the tests that only read it: debian/12 (two versions, the newer with
    /etc/newer), debian/12/cloud, debian/13 and alpine/3.20."""
    work = _scratch("ss-tree")
    images = [
        make_image(work, os="debian", release="12"),
        make_image(
            work, os="debian", release="12", created=CREATED + 3600, files={"etc/newer": "yes"}
        ),
        make_image(work, os="debian", release="12", variant="cloud"),
        make_image(work, os="debian", release="13"),
        make_image(work, os="alpine", release="3.20"),
    ]
    build_tree(work / "tree", images)
    yield work / "tree"
    fsutil.remove_tree(work)


@pytest.fixture
def work() -> Iterator[Path]:
    """A scratch directory of this test (downloads, rootfs, trees of its own)."""
    path = _scratch("ss")
    yield path
    fsutil.remove_tree(path)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    """A session that ignores the environment: no proxy for loopback, no CA bundle but the
    one a test gives."""
    with requests.Session() as s:
        s.trust_env = False
        yield s


def _products(tree: Path) -> dict[str, dict[str, object]]:
    return json.loads((tree / "streams/v1/images.json").read_text())["products"]


def _check_fetched(image: RemoteImage, meta: Path, rootfs: Path, tree: Path) -> None:
    """The two files are the tree's, and their fingerprint is what incus-simplestreams wrote."""
    assert meta.read_bytes() == (tree / image.metadata.path).read_bytes()
    assert rootfs.read_bytes() == (tree / image.rootfs.path).read_bytes()
    both = hashlib.sha256(meta.read_bytes() + rootfs.read_bytes()).hexdigest()
    item = _products(tree)[image.product]["versions"][image.version]["items"]["incus.tar.xz"]
    assert both == image.fingerprint == item["combined_squashfs_sha256"]


def test_lookup_download_unpack_over_http(
    tree: Path, work: Path, session: requests.Session
) -> None:
    threads = threading.active_count()
    lines: list[str] = []
    with ImageServer(tree) as server:
        image = simplestreams.lookup(server.url, "debian/12", session=session)
        meta, rootfs_file = simplestreams.download(image, work / "dl", lines.append)
    assert threading.active_count() == threads  # the server left no thread behind
    assert image.product == "debian:12:default:amd64"
    assert (image.metadata.ftype, image.rootfs.ftype) == ("incus.tar.xz", "squashfs")
    _check_fetched(image, meta, rootfs_file, tree)
    assert sorted(p.name for p in (work / "dl").iterdir()) == sorted(
        [image.metadata.sha256, image.rootfs.sha256]
    )
    # a final progress line per file, with bytes, total and rate
    assert any(line.startswith("debian/12 squashfs: ") and "/s" in line for line in lines)
    assert len(lines) >= 2
    rootfs = work / "rootfs"
    rootfs.mkdir()
    simplestreams.unpack(image, rootfs_file, rootfs)
    assert 'VERSION_ID="12"' in (rootfs / "etc/os-release").read_text()
    assert (rootfs / "bin/busybox").stat().st_size > 0
    assert (rootfs / "sbin/init").is_symlink()
    properties = simplestreams.read_metadata(meta)["properties"]
    assert (properties["os"], properties["release"]) == ("debian", "12")


def test_https_with_the_test_ca(tree: Path, work: Path, session: requests.Session) -> None:
    with ImageServer(tree, tls=True) as server:
        assert server.url.startswith("https://127.0.0.1:")
        session.verify = str(server.ca_file)
        image = simplestreams.lookup(server.url, "debian/13", session=session)
        meta, rootfs = simplestreams.download(image, work / "dl", lambda _: None, session=session)
    _check_fetched(image, meta, rootfs, tree)


def test_https_with_an_untrusted_certificate(tree: Path, session: requests.Session) -> None:
    with (
        ImageServer(tree, tls=True) as server,
        pytest.raises(ImageError, match="certificate is not trusted") as info,
    ):
        simplestreams.lookup(server.url, "debian/12", session=session)
    assert not isinstance(info.value, ServerUnreachable)  # not a reason to fall back silently
    assert server.url in str(info.value)
    assert isinstance(info.value.exc, requests.exceptions.SSLError)


def test_newest_version_and_a_later_one(work: Path, session: requests.Session) -> None:
    first = make_image(work, os="debian", release="12")
    second = make_image(work, os="debian", release="12", created=CREATED + 60)
    build_tree(work / "tree", [second, first])  # added out of order: the newest still wins
    with ImageServer(work / "tree") as server:
        image = simplestreams.lookup(server.url, "debian/12", session=session)
        assert image.version == version_of(CREATED + 60)
        third = make_image(work, os="debian", release="12", created=CREATED + 120)
        build_tree(work / "tree", [third])
        updated = simplestreams.lookup(server.url, "debian/12", session=session)
    assert updated.version == version_of(CREATED + 120)
    assert updated.fingerprint != image.fingerprint
    assert updated.product == image.product


def test_release_alias_names_the_default_variant(
    tree: Path, work: Path, session: requests.Session
) -> None:
    with ImageServer(tree) as server:
        plain = simplestreams.lookup(server.url, "debian/12", session=session)
        default = simplestreams.lookup(server.url, "Debian/12/Default", session=session)
        cloud = simplestreams.lookup(server.url, "debian/12/cloud", session=session)
        _, rootfs_file = simplestreams.download(plain, work / "dl", lambda _: None, session=session)
    assert plain.product == default.product == "debian:12:default:amd64"
    assert plain.fingerprint == default.fingerprint
    assert cloud.product == "debian:12:cloud:amd64"
    # the newer of the two debian/12 versions: the one with /etc/newer
    assert plain.version == version_of(CREATED + 3600)
    rootfs = work / "rootfs"
    rootfs.mkdir()
    simplestreams.unpack(plain, rootfs_file, rootfs)
    assert (rootfs / "etc/newer").read_text() == "yes"


def test_unknown_alias_lists_close_ones(tree: Path, session: requests.Session) -> None:
    with ImageServer(tree) as server, pytest.raises(ImageError) as info:
        simplestreams.lookup(server.url, "debain/12", session=session)
    message = str(info.value)
    assert server.url in message
    assert "'debain/12'" in message
    assert "debian/12/default" in message
    assert "alpine/3.20/default" not in message  # not close


def test_other_architecture_is_refused(tree: Path, session: requests.Session) -> None:
    with (
        ImageServer(tree) as server,
        pytest.raises(ImageError, match=r"for the architecture arm64 .*only for amd64"),
    ):
        simplestreams.lookup(server.url, "debian/12", arch="arm64", session=session)


def test_cut_download_resumes_with_range(tree: Path, work: Path, session: requests.Session) -> None:
    with ImageServer(tree, cut_after=300_000) as server:
        image = simplestreams.lookup(server.url, "debian/13", session=session)
        assert image.rootfs.size > 300_000  # else the cut would not happen
        meta, rootfs = simplestreams.download(image, work / "dl", lambda _: None, session=session)
    gets = server.gets(".squashfs")
    assert len(gets) == 2
    assert gets[0][2] is None
    resumed_from = int(str(gets[1][2]).removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_from <= 300_000
    _check_fetched(image, meta, rootfs, tree)


def test_download_resumes_after_a_crash(
    tree: Path, work: Path, session: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(Exception):
        pass

    def crash_midway(line: str) -> None:
        if "squashfs" in line and not line.startswith("debian/13 squashfs: 0.0"):
            raise Crash  # the process dies once some of the rootfs is on disk

    monkeypatch.setattr(simplestreams, "PROGRESS_EVERY", 0.0)  # a line per block read
    with ImageServer(tree) as server:
        image = simplestreams.lookup(server.url, "debian/13", session=session)
        with pytest.raises(Crash):
            simplestreams.download(image, work / "dl", crash_midway, session=session)
        left = [p for p in (work / "dl").iterdir() if p.name.endswith(".part")]
        assert left, "the crash left no partial file"
        have = sum(p.stat().st_size for p in left if p.name.startswith(f".{image.rootfs.sha256}"))
        assert 0 < have < image.rootfs.size
        before = len(server.requests)
        meta, rootfs = simplestreams.download(image, work / "dl", lambda _: None, session=session)
        later = server.requests[before:]
    assert [r for r in later if r[1].endswith(".squashfs")] == [
        ("GET", "/" + image.rootfs.path, f"bytes={have}-")
    ]
    _check_fetched(image, meta, rootfs, tree)
    assert not [p for p in (work / "dl").iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("damaged", [".squashfs", ".incus.tar.xz"])
def test_corrupted_file_is_refused_and_not_kept(
    tree: Path, work: Path, session: requests.Session, damaged: str
) -> None:
    with ImageServer(tree, corrupt=damaged) as server:
        image = simplestreams.lookup(server.url, "debian/12", session=session)
        with pytest.raises(ImageError, match="sha256") as info:
            simplestreams.download(image, work / "dl", lambda _: None, session=session)
    item = image.rootfs if damaged == ".squashfs" else image.metadata
    assert f"{item.ftype} ({item.path})" in str(info.value)
    assert item.sha256 in str(info.value)
    assert not isinstance(info.value, ServerUnreachable)
    assert list((work / "dl").iterdir()) == []


def test_fingerprint_mismatch_is_refused(tree: Path, work: Path, session: requests.Session) -> None:
    with ImageServer(tree) as server:
        image = simplestreams.lookup(server.url, "debian/12", session=session)
        wrong = dataclasses.replace(image, fingerprint="0" * 64)
        with pytest.raises(ImageError, match="fingerprint") as info:
            simplestreams.download(wrong, work / "dl", lambda _: None, session=session)
    assert image.fingerprint in str(info.value)  # what it is, beside what the index says
    assert list((work / "dl").iterdir()) == []


def test_unreachable_server(session: requests.Session) -> None:
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match="cannot talk to the server") as info:
        simplestreams.lookup(f"http://127.0.0.1:{port}", "debian/12", session=session)
    assert time.monotonic() - start < 5
    assert isinstance(info.value.exc, requests.exceptions.ConnectionError)


def test_cached_files_are_not_requested_again(
    tree: Path, work: Path, session: requests.Session
) -> None:
    with ImageServer(tree) as server:
        image = simplestreams.lookup(server.url, "alpine/3.20", session=session)
        first = simplestreams.download(image, work / "dl", lambda _: None, session=session)
        before = len(server.requests)
        lines: list[str] = []
        again = simplestreams.download(image, work / "dl", lines.append, session=session)
        assert server.requests[before:] == []
    assert again == first
    assert lines == []


def test_not_a_simplestreams_server(work: Path, session: requests.Session) -> None:
    (work / "streams/v1").mkdir(parents=True)
    (work / "streams/v1/index.json").write_text('{"hello": "world"}')
    with ImageServer(work) as server, pytest.raises(ImageError, match="not a simplestreams"):
        simplestreams.lookup(server.url, "debian/12", session=session)


def _image_with_rootfs(ftype: str) -> RemoteImage:
    meta = simplestreams.RemoteFile("incus.tar.xz", "images/m", "a" * 64, 1)
    rootfs = simplestreams.RemoteFile(ftype, "images/r", "b" * 64, 1)
    return RemoteImage(
        "http://127.0.0.1:1", "x/y", "x:y:default:amd64", "1", "f" * 64, meta, rootfs
    )


def test_unpack_root_tar_xz_keeps_owners_and_xattrs(work: Path) -> None:
    # incus-simplestreams writes only squashfs trees ("Unsupported data type .tar.xz"), so
    # the tarball that public servers also carry is made here
    source = work / "source"
    (source / "etc").mkdir(parents=True)
    marker = source / "etc" / "marker"
    marker.write_text("tarball\n")
    os.chown(marker, 1234, 4321)
    os.setxattr(marker, "user.pti", b"kept")
    tarball = work / "root.tar.xz"
    subprocess.run(
        [
            "tar",
            "-c",
            "-J",
            "--numeric-owner",
            "--xattrs",
            "-f",
            str(tarball),
            "-C",
            str(source),
            ".",
        ],
        check=True,
    )
    rootfs = work / "rootfs"
    rootfs.mkdir()
    simplestreams.unpack(_image_with_rootfs("root.tar.xz"), tarball, rootfs)
    unpacked = rootfs / "etc" / "marker"
    assert unpacked.read_text() == "tarball\n"
    assert (unpacked.stat().st_uid, unpacked.stat().st_gid) == (1234, 4321)
    assert os.getxattr(unpacked, "user.pti") == b"kept"


def test_unpack_of_a_broken_squashfs_says_what_the_tool_said(work: Path) -> None:
    broken = work / "broken.squashfs"
    broken.write_bytes(b"not a squashfs" * 100)
    rootfs = work / "rootfs"
    rootfs.mkdir()
    with pytest.raises(ImageError, match=r"unsquashfs failed \(exit \d+\): .*squashfs") as info:
        simplestreams.unpack(_image_with_rootfs("squashfs"), broken, rootfs)
    assert str(broken) in str(info.value)
