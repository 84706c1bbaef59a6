"""OCI app images: resolved, fetched into the shared layout and unpacked once, from a real
registry (Debian's docker-registry on loopback) with real skopeo and umoci."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_helpers import (
    SCRATCH_ROOT,
    Registry,
    build_image,
    manifest,
    push,
    running_registry,
)

from pytest_incus import fsutil
from pytest_incus.errors import ImageError
from pytest_incus.images import oci
from pytest_incus.images.busybox import host_busybox
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

BASE_CONFIG = (
    "--config.entrypoint=/bin/sh",
    "--config.cmd=-c",
    "--config.cmd=echo hello",
    "--config.env=GREETING=hello world",
    "--config.workingdir=/srv",
    "--config.user=nobody:nogroup",
)


@dataclass(frozen=True)
class Images:
    """The images of this module: ``base`` (busybox) and ``child`` (base plus one layer)."""

    layout: Path
    registry: Registry
    base: str
    child: str


def _digest(layout: Path, tag: str) -> str:
    for desc in json.loads((layout / "index.json").read_text())["manifests"]:
        if desc["annotations"]["org.opencontainers.image.ref.name"] == tag:
            return str(desc["digest"])
    raise AssertionError(tag)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """A registry on loopback for this module."""
    with running_registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def images(registry: Registry) -> Iterator[Images]:
    """Two images built with umoci and pushed: ``base`` and ``child`` sharing its layer."""
    work = SCRATCH_ROOT / f"oci-src-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        layout = work / "layout"
        build_image(layout, "base", files={"srv/motd": "base\n"}, config=BASE_CONFIG)
        build_image(layout, "child", base="base", files={"srv/child": "child\n"})
        yield Images(
            layout,
            registry,
            push(layout, "base", registry, "tiny/base:1"),
            push(layout, "child", registry, "tiny/child:1"),
        )
    finally:
        fsutil.remove_tree(work)


@pytest.fixture
def store(scratch_cache: Path, registry: Registry) -> ImageStore:
    """An image store on an empty cache that trusts the loopback registry over plain HTTP."""
    return ImageStore(
        Settings(cache_dir=scratch_cache, insecure_registries=frozenset({registry.host}))
    )


def _blobs(store: ImageStore) -> set[str]:
    blobs = oci.layout_dir(store.settings.cache_dir) / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in blobs.iterdir()}


def test_pull_unpacks_the_rootfs_and_records_the_config(store: ImageStore, images: Images) -> None:
    image = store.get(images.base, kind="app")
    digest = _digest(images.layout, "base")
    assert image.kind == "app"
    assert image.key == f"oci-{digest.split(':')[1][:16]}"
    assert image.path == store.settings.images_dir / image.key
    busybox = image.rootfs / "bin" / "busybox"
    assert busybox.read_bytes() == host_busybox().read_bytes()
    assert busybox.stat().st_uid == 0  # unpacked as root, owners kept
    assert (image.rootfs / "bin" / "sh").readlink() == Path("busybox")
    assert (image.rootfs / "srv" / "motd").read_text() == "base\n"
    assert not (image.path / "bundle").exists()
    app = image.app
    assert app is not None
    assert app.entrypoint == ("/bin/sh",)
    assert app.cmd == ("-c", "echo hello")
    assert "GREETING=hello world" in app.env
    assert app.working_dir == "/srv"
    assert app.user == "nobody:nogroup"
    assert app.digest == digest
    # the record on disk says the same (a later session reads it from there)
    assert ImageStore(store.settings).list() == [image]


def test_a_shared_base_layer_is_fetched_once(store: ImageStore, images: Images) -> None:
    base_layer = manifest(images.layout, "base")["layers"][0]["digest"]
    fetches = images.registry.blob_fetches(base_layer)
    store.get(images.base, kind="app")
    before = _blobs(store)
    assert base_layer in before
    assert images.registry.blob_fetches(base_layer) == fetches + 1

    child = store.get(images.child, kind="app")
    child_manifest = manifest(images.layout, "child")
    layers = [d["digest"] for d in child_manifest["layers"]]
    assert layers[0] == base_layer
    new = {_digest(images.layout, "child"), child_manifest["config"]["digest"], layers[1]}
    assert _blobs(store) - before == new  # only the child's own layer, config and manifest
    assert images.registry.blob_fetches(base_layer) == fetches + 1  # not downloaded again
    assert (child.rootfs / "srv" / "child").read_text() == "child\n"
    assert (child.rootfs / "srv" / "motd").read_text() == "base\n"


def test_get_twice_builds_once(store: ImageStore, images: Images) -> None:
    first = store.get(images.base, kind="app")
    assert store.get(images.base, kind="app") is first
    # another session resolves the tag again, finds the same digest, and builds nothing
    again = ImageStore(store.settings).get(images.base, kind="app")
    assert again == first
    # the same image from an OCI layout has the same digest: the same entry
    assert store.get(f"oci:{images.layout}:base", kind="app") == first
    assert [b["key"] for b in store.builds()] == [first.key]


def test_a_tag_is_resolved_once_per_session(store: ImageStore, images: Images) -> None:
    name = f"tiny/moving:{secrets.token_hex(3)}"
    ref = push(images.layout, "base", images.registry, name)
    first = store.get(ref, kind="app")
    push(images.layout, "child", images.registry, name)  # the tag moves
    assert store.get(ref, kind="app") is first  # this session keeps what it resolved
    moved = ImageStore(store.settings).get(ref, kind="app")  # the next one sees the move
    assert moved.key != first.key
    assert moved.app is not None
    assert moved.app.digest == _digest(images.layout, "child")


def test_oci_layout_and_archive_sources(store: ImageStore, images: Images) -> None:
    from_layout = store.get(f"oci:{images.layout}:child", kind="app")
    assert (from_layout.rootfs / "srv" / "child").read_text() == "child\n"
    archive = images.layout.parent / f"child-{secrets.token_hex(3)}.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{images.layout}:child", f"oci-archive:{archive}"],
        check=True,
        capture_output=True,
    )
    from_archive = store.get(f"oci-archive:{archive}", kind="app")
    assert from_archive.app is not None
    assert from_archive.app.digest == _digest(images.layout, "child")
    assert from_archive == from_layout  # same manifest digest: the same entry


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tiny/nothere:1", r"repository 127\.0\.0\.1:\d+/tiny/nothere does not exist"),
        ("tiny/base:2", r"has no tag '2'; its tags are: 1"),
    ],
)
def test_missing_repository_and_wrong_tag(
    store: ImageStore, images: Images, name: str, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        store.get(images.registry.ref(name), kind="app")
    assert store.list() == []


def test_unreachable_registry(store: ImageStore) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        with pytest.raises(ImageError, match=rf"registry 127\.0\.0\.1:{port} cannot be reached"):
            store.get(f"docker://127.0.0.1:{port}/tiny/base:1", kind="app")


def test_plain_http_registry_must_be_named_insecure(scratch_cache: Path, images: Images) -> None:
    store = ImageStore(Settings(cache_dir=scratch_cache))
    with pytest.raises(ImageError, match=r"--incus-insecure-registry=127\.0\.0\.1:"):
        store.get(images.base, kind="app")


def test_missing_tools_say_what_to_install(
    store: ImageStore, images: Images, monkeypatch: pytest.MonkeyPatch, scratch_cache: Path
) -> None:
    skopeo = shutil.which("skopeo")
    assert skopeo is not None
    empty = scratch_cache / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ImageError, match="apt-get install skopeo"):
        store.get(images.base, kind="app")
    (empty / "skopeo").symlink_to(skopeo)
    with pytest.raises(ImageError, match="apt-get install umoci"):
        store.get(images.base, kind="app")
    assert store.list() == []


def test_unprivileged_copy_keeps_the_config(store: ImageStore, images: Images) -> None:
    image = store.get(images.base, kind="app")
    shifted = store.shifted(image, 100000)
    assert shifted.app == image.app
    assert (shifted.rootfs / "bin" / "busybox").stat().st_uid == 100000
    reloaded = {e.key: e for e in ImageStore(store.settings).list()}
    assert reloaded == {image.key: image, shifted.key: shifted}  # the record keeps it too


def _image_blobs(layout: Path, tag: str) -> set[str]:
    """The digests of the manifest, config and layers of image ``layout:tag``."""
    found = manifest(layout, tag)
    layers = {str(d["digest"]) for d in found["layers"]}
    return {_digest(layout, tag), str(found["config"]["digest"]), *layers}


def test_prune_removes_the_blobs_no_other_image_needs(store: ImageStore, images: Images) -> None:
    base = store.get(images.base, kind="app")
    child = store.get(images.child, kind="app")
    shifted = store.shifted(base, 100000)
    base_blobs = _image_blobs(images.layout, "base")
    child_blobs = _image_blobs(images.layout, "child")
    shared = base_blobs & child_blobs
    assert len(shared) == 1  # the busybox layer
    assert _blobs(store) == base_blobs | child_blobs

    assert store.prune(images.base) == [base, shifted]
    assert store.list() == [child]
    assert _blobs(store) == child_blobs  # the shared layer stays, the base's own blobs go
    assert child.app is not None
    layout = oci.layout_dir(store.settings.cache_dir)
    assert oci.read_config(layout, oci.Resolved(images.child, child.app.digest).layout_tag)

    assert store.prune(images.child) == [child]
    assert store.list() == []
    assert _blobs(store) == set()
    assert store.get(images.child, kind="app").key == child.key  # fetched again


def test_prune_when_the_tag_is_already_gone(store: ImageStore, images: Images) -> None:
    base = store.get(images.base, kind="app")
    assert base.app is not None
    layout = oci.layout_dir(store.settings.cache_dir)
    tag = oci.Resolved(images.base, base.app.digest).layout_tag
    subprocess.run(["umoci", "rm", "--image", f"{layout}:{tag}"], check=True)
    assert _blobs(store)  # untagged, not collected yet
    assert store.prune() == [base]
    assert _blobs(store) == set()  # collected all the same


def test_prune_everything_drops_images_no_entry_holds(store: ImageStore, images: Images) -> None:
    base = store.get(images.base, kind="app")
    child = store.get(images.child, kind="app")
    fsutil.remove_tree(child.path)  # an entry removed by hand: its image stays in the layout
    assert store.prune(images.base) == [base]
    assert _blobs(store) == _image_blobs(images.layout, "child")
    assert store.prune() == []
    assert _blobs(store) == set()
    assert oci.layout_tags(store.settings.cache_dir) == set()
