"""``images:`` names through the image store and the factory: real trees written by
``incus-simplestreams``, served on loopback, launched as real containers.

(The client's own details, resume and checks, are in test_simplestreams.py.)
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from simplestreams_helpers import CREATED, SCRATCH_ROOT, ImageServer, build_tree, make_image

from pytest_incus import fsutil
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.factory import InstanceFactory
from pytest_incus.images import simplestreams
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

NAME = "images:ptios/1"


@pytest.fixture
def tree() -> Iterator[Path]:
    """A tree of one image, ptios/1 (and alpine/3.20), of this test's own."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    work = SCRATCH_ROOT / f"ss-remote-{secrets.token_hex(4)}"
    build_tree(
        work / "tree",
        [
            make_image(work, os="ptios", release="1", files={"etc/pti-version": "first\n"}),
            make_image(work, os="alpine", release="3.20"),
        ],
    )
    yield work / "tree"
    fsutil.remove_tree(work)


def _store(cache: Path, url: str, lines: list[str] | None = None) -> ImageStore:
    progress = lines.append if lines is not None else None
    return ImageStore(Settings(cache_dir=cache, image_server=url), progress=progress)


def test_an_images_container_launches_and_runs(tree: Path, scratch_cache: Path) -> None:
    with ImageServer(tree) as server:
        settings = Settings(cache_dir=scratch_cache, image_server=server.url)
        factory = InstanceFactory(settings, ImageStore(settings))
        try:
            instance = factory.launch(kind="container", image=NAME)
            assert instance.read_text("/etc/pti-version") == "first\n"
            assert "ID=ptios" in instance.exec("cat /etc/os-release").stdout
            instance.delete()
        finally:
            factory.close()
        (entry,) = [e for e in ImageStore(settings).list() if e.ref == NAME and not e.base]
        assert entry.fingerprint and entry.key == f"images-{entry.fingerprint[:24]}"
        assert len(server.gets(".squashfs")) == 1


def test_resolved_once_per_session_and_an_update_is_picked_up(
    tree: Path, scratch_cache: Path
) -> None:
    with ImageServer(tree) as server:
        store = _store(scratch_cache, server.url)
        first = store.get(NAME)
        assert store.get(NAME) == first
        assert len(server.gets("index.json")) == 1  # one alias resolution per session
        build_tree(
            tree,
            [
                make_image(
                    tree.parent,
                    os="ptios",
                    release="1",
                    created=CREATED + 86400,
                    files={"etc/pti-version": "second\n"},
                )
            ],
        )
        assert store.get(NAME) == first  # this session keeps what it resolved
        second = _store(scratch_cache, server.url).get(NAME)  # a new session sees the update
        assert second.fingerprint != first.fingerprint
        assert (second.rootfs / "etc/pti-version").read_text() == "second\n"
        # and another session on the same version downloads nothing
        before = len(server.gets(".squashfs"))
        assert _store(scratch_cache, server.url).get(NAME) == second
        assert len(server.gets(".squashfs")) == before == 2


def test_an_unreachable_server_falls_back_to_the_newest_cached_version(
    tree: Path, scratch_cache: Path
) -> None:
    with ImageServer(tree) as server:
        cached = _store(scratch_cache, server.url).get(NAME)
        url = server.url
    lines: list[str] = []
    assert _store(scratch_cache, url, lines).get(NAME) == cached
    assert any(line.startswith("warning:") and "newest cached version" in line for line in lines)
    with pytest.raises(ImageError, match="no version of it is cached"):
        _store(scratch_cache, url).get("images:alpine/3.20")


def test_a_corrupted_download_caches_nothing(tree: Path, scratch_cache: Path) -> None:
    with ImageServer(tree, corrupt=".squashfs") as server:
        store = _store(scratch_cache, server.url)
        with pytest.raises(ImageError, match="sha256"):
            store.get(NAME)
    assert store.list() == []
    downloads = simplestreams.downloads_dir(scratch_cache)
    assert [p.name for p in downloads.iterdir() if p.name != ".lock"] == []


def test_a_cut_download_resumes(tree: Path, scratch_cache: Path) -> None:
    with ImageServer(tree, cut_after=300_000) as server:
        entry = _store(scratch_cache, server.url).get(NAME)
        ranges = [r[2] for r in server.gets(".squashfs") if r[2]]
        # the retry asks for the rest only: from what the cut connection had delivered
        assert len(ranges) == 1 and 0 < int(ranges[0].split("=")[1].rstrip("-")) <= 300_000
    assert (entry.rootfs / "etc/pti-version").read_text() == "first\n"


def test_an_unknown_alias_lists_close_ones(tree: Path, scratch_cache: Path) -> None:
    with ImageServer(tree) as server, pytest.raises(ImageError, match=r"alpine/3\.20"):
        _store(scratch_cache, server.url).get("images:alpine/3.2")


def test_names_and_kinds_that_cannot_work_are_config_errors(scratch_cache: Path) -> None:
    store = _store(scratch_cache, "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="a VM of an images: image is not supported yet"):
        store.check(NAME, "vm")
    with pytest.raises(ConfigError, match=r"images:<distro>/<release>\[/<variant>\]"):
        store.check("images:debian")


def test_prune_removes_the_downloads_no_entry_needs(tree: Path, scratch_cache: Path) -> None:
    with ImageServer(tree) as server:
        store = _store(scratch_cache, server.url)
        entry = store.get(NAME)
        other = store.get("images:alpine/3.20")
    downloads = simplestreams.downloads_dir(scratch_cache)
    assert set(entry.downloads) | set(other.downloads) <= {p.name for p in downloads.iterdir()}
    store.prune(NAME)
    left = {p.name for p in downloads.iterdir()} - {".lock"}
    assert left == set(other.downloads)
    store.prune()
    assert {p.name for p in downloads.iterdir()} - {".lock"} == set()


def test_https_with_a_private_ca_named_by_requests_ca_bundle(
    tree: Path, scratch_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ImageServer(tree, tls=True) as server:
        assert server.ca_file is not None
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        with pytest.raises(ImageError, match="certificate"):
            _store(scratch_cache, server.url).get(NAME)  # not trusted: no fallback either
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_file))
        entry = _store(scratch_cache, server.url).get(NAME)
    assert (entry.rootfs / "etc/pti-version").read_text() == "first\n"
