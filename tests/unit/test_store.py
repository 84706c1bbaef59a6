"""The image store, with a builder that needs no containers (the build hook)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

NAME = "unit/thing"
KEY = "hook-unit-thing"


class Builder:
    """A build hook that lays out a tiny rootfs and counts its runs."""

    def __init__(self, names: tuple[str, ...] = (NAME, "unit/other")) -> None:
        self.names = names
        self.runs: list[str] = []

    def __call__(self, ref: str, rootfs: Path) -> bool | None:
        if ref not in self.names:
            return None
        self.runs.append(ref)
        (rootfs / "etc").mkdir()
        (rootfs / "etc" / "hostname").write_text(f"{ref}\n")
        return True


@pytest.fixture
def store_settings(scratch_cache: Path) -> Settings:
    return Settings(cache_dir=scratch_cache)


def keys(store: ImageStore) -> list[str]:
    return [image.key for image in store.list()]


def test_built_once_then_cached(store_settings: Settings) -> None:
    builder = Builder()
    progress: list[str] = []
    store = ImageStore(store_settings, build_hook=builder, progress=progress.append)
    image = store.get(NAME)
    assert (image.ref, image.kind, image.key) == (NAME, "container", KEY)
    assert (image.rootfs / "etc" / "hostname").read_text() == "unit/thing\n"
    assert image.size > 0 and image.created <= time.time()
    assert any(line.startswith("building image unit/thing") for line in progress)
    assert store.get(NAME) == image
    # another store (another worker or a later run) finds it in the cache
    other_builder = Builder()
    assert ImageStore(store_settings, build_hook=other_builder).get(NAME) == image
    assert builder.runs == [NAME] and other_builder.runs == []
    assert [b["key"] for b in store.builds()] == [KEY]
    assert keys(store) == [KEY]


def test_name_nobody_builds(store_settings: Settings) -> None:
    store = ImageStore(store_settings, build_hook=Builder())
    with pytest.raises(ImageError, match="no builder knows image 'unit/nobody'"):
        store.get("unit/nobody")
    assert store.list() == []
    assert not any(store_settings.staging_dir.iterdir())


def test_name_for_a_hook_when_no_plugin_has_one(store_settings: Settings) -> None:
    message = "image 'nosuch/1' is not a name pytest-incus knows .* no plugin implements"
    for store in (
        ImageStore(store_settings),
        ImageStore(store_settings, build_hook=Builder(), hook_implemented=lambda: False),
    ):
        with pytest.raises(ConfigError, match=message):
            store.check("nosuch/1")
        with pytest.raises(ConfigError, match=message):
            store.get("nosuch/1")
    # with a hook, the name is the hook's to build: checked, then an ImageError if none did
    store = ImageStore(store_settings, build_hook=Builder())
    assert store.check("nosuch/1").source == "hook"
    with pytest.raises(ImageError, match="no pytest_incus_build_image hook built it"):
        store.get("nosuch/1")


def test_failed_build_leaves_nothing(store_settings: Settings) -> None:
    def broken(ref: str, rootfs: Path) -> bool:
        (rootfs / "half").write_text("x")
        raise RuntimeError("builder broke")

    store = ImageStore(store_settings, build_hook=broken)
    with pytest.raises(RuntimeError, match="builder broke"):
        store.get(NAME)
    assert store.list() == []
    assert not any(store_settings.staging_dir.iterdir())


def test_kinds_and_sources_that_do_not_match(store_settings: Settings) -> None:
    store = ImageStore(store_settings)
    with pytest.raises(ConfigError, match="kind='pod' images are not supported yet"):
        store.get("busybox", kind="pod")
    with pytest.raises(ConfigError, match="app images are OCI references"):
        store.get("busybox", kind="app")
    with pytest.raises(ConfigError, match="a VM needs an image with a kernel"):
        store.get("busybox", kind="vm")
    with pytest.raises(ConfigError, match="use kind='app' with an OCI reference"):
        store.get("docker://registry/app:1")


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_damaged_entry_is_rebuilt(store_settings: Settings, damage: str) -> None:
    first = ImageStore(store_settings, build_hook=Builder()).get(NAME)
    record = first.path / "image.json"
    if damage == "corrupt":
        record.write_text("{not json")
    elif damage == "missing":
        record.unlink()
    else:
        record.write_text(json.dumps({"ref": NAME}))
    assert ImageStore(store_settings).list() == []  # a damaged entry is never shown
    builder = Builder()
    store = ImageStore(store_settings, build_hook=builder)
    again = store.get(NAME)
    assert builder.runs == [NAME]
    assert again.created > first.created
    assert json.loads((again.path / "image.json").read_text())["key"] == KEY
    assert keys(store) == [KEY]


# The child builds with a hook that writes part of the rootfs, says so, then hangs.
_KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytest_incus.images.store import ImageStore
    from pytest_incus.settings import Settings

    def hook(ref, rootfs):
        (rootfs / "half-written").write_text("x")
        Path(sys.argv[2]).write_text("mid-build")
        time.sleep(600)

    ImageStore(Settings(cache_dir=Path(sys.argv[1])), build_hook=hook).get("unit/thing")
    """
)


def wait_for(path: Path, child: subprocess.Popen[bytes], deadline: float) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        assert child.poll() is None, f"the build exited early with {child.returncode}"
        assert time.monotonic() < end, f"no {path} after {deadline}s"
        time.sleep(0.02)


def test_build_killed_midway_is_never_used(store_settings: Settings, scratch_cache: Path) -> None:
    signal_file = scratch_cache / "mid-build"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILD, str(scratch_cache), str(signal_file)]
    )
    try:
        wait_for(signal_file, child, deadline=30)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    stale = list(store_settings.staging_dir.iterdir())
    assert [p.name.split(".")[0] for p in stale] == [KEY]
    assert (stale[0] / "rootfs" / "half-written").exists()

    builder = Builder()
    store = ImageStore(store_settings, build_hook=builder)
    assert store.list() == []
    assert not (store_settings.images_dir / KEY).exists()

    image = store.get(NAME)  # the lock died with the child: no wait
    assert builder.runs == [NAME]
    assert not (image.rootfs / "half-written").exists()
    assert not stale[0].exists()
    assert list(store_settings.staging_dir.iterdir()) == []
    assert keys(store) == [KEY]


def test_prune(store_settings: Settings) -> None:
    store = ImageStore(store_settings, build_hook=Builder())
    thing, other = store.get(NAME), store.get("unit/other")
    assert keys(store) == sorted([KEY, "hook-unit-other"])

    assert store.prune(NAME, in_use={KEY}) == []
    assert [i.key for i in store.prune(NAME)] == [KEY]
    assert not thing.path.exists()
    assert keys(store) == ["hook-unit-other"]

    builder = Builder()
    rebuilt = ImageStore(store_settings, build_hook=builder)
    rebuilt.get(NAME)
    assert builder.runs == [NAME]  # pruned means built again on the next get

    # an entry directory with no record (damaged, or of an older layout) goes with the rest
    stale = store_settings.images_dir / "hook-unit-stale"
    (stale / "rootfs").mkdir(parents=True)
    # and so does the staging directory of a builder that died (this pid is ours: it stays)
    dead = subprocess.Popen(["true"])
    dead.wait()
    died = store_settings.staging_dir / f"hook-unit-gone.{dead.pid}.0"
    alive = store_settings.staging_dir / f"hook-unit-busy.{os.getpid()}.0"
    for path in (died, alive):
        (path / "rootfs").mkdir(parents=True)
    assert sorted(i.key for i in store.prune()) == sorted([KEY, "hook-unit-other"])
    assert store.list() == [] and not other.path.exists()
    assert not stale.exists()
    assert not died.exists() and alive.exists()


def test_shifted_copy_made_once(store_settings: Settings) -> None:
    store = ImageStore(store_settings, build_hook=Builder())
    image = store.get(NAME)
    shifted = store.shifted(image, 1_000_000)
    assert shifted.base == KEY and shifted.key == f"{KEY}.shift1000000"
    hostname = shifted.rootfs / "etc" / "hostname"
    assert hostname.read_text() == "unit/thing\n"
    assert (hostname.stat().st_uid, hostname.stat().st_gid) == (1_000_000, 1_000_000)
    assert ImageStore(store_settings).shifted(image, 1_000_000) == shifted
    assert [b["key"] for b in store.builds()] == [KEY, shifted.key]
    # pruning the image removes its shifted copy too
    assert sorted(i.key for i in store.prune(NAME)) == [KEY, shifted.key]
