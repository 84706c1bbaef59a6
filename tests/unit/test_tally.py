"""The run's tally and the terminal summary's lines (pytest_incus/summary.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pytest_incus.images import vm
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.settings import Settings
from pytest_incus.summary import Tally


def worker(kind: str, *times: float) -> Tally:
    tally = Tally()
    for seconds in times:
        tally.launched(kind, seconds)
    return tally


def test_an_empty_tally_has_no_summary() -> None:
    tally = Tally()
    assert not tally
    assert tally.lines() == []
    assert tally.lines(-1) == []
    assert tally.lines(2) == []


def test_counts_median_and_slowest_per_kind() -> None:
    tally = worker("container", 0.3, 0.1, 0.2, 0.9)
    tally.launched("vm", 3.1)
    assert tally.lines() == [
        "pytest-incus: 5 instances: 4 container (median 0.25 s, slowest 0.9 s), "
        "1 vm (median 3.1 s, slowest 3.1 s)"
    ]


def test_images_by_how_they_were_made_and_snapshots() -> None:
    tally = Tally()
    tally.image_made("debian/12", "built", 38.24)
    tally.image_made("images:alpine/3.20", "downloaded", 1.2)
    tally.image_made("busybox", "built", 0.12)
    tally.snapshot_saved("debian/12")
    assert tally.lines() == [
        "pytest-incus: images built: debian/12 (38.2 s), busybox (0.12 s); "
        "downloaded: images:alpine/3.20 (1.2 s); boot snapshots saved: 1"
    ]


def test_the_steps_of_one_image_add_up() -> None:
    tally = Tally()
    tally.image_made("debian/12 (vm)", "built", 30.0)
    tally.image_made("debian/12 (vm)", "built", 5.5)
    assert tally.lines() == ["pytest-incus: images built: debian/12 (vm) (35.5 s)"]
    assert tally.build_seconds == 35.5


def test_quiet_is_one_line() -> None:
    tally = worker("container", 0.2, 0.4)
    tally.launched("vm", 3.0)
    tally.image_made("debian/12 (vm)", "built", 40.0)
    tally.image_made("derived:0123456789abcdef:debian/12", "derived", 12.0)
    tally.snapshot_saved("debian/12")
    assert tally.lines(-1) == [
        "pytest-incus: 3 instances (2 container, 1 vm); 1 image built (40.0 s); "
        "1 image derived (12.0 s); 1 boot snapshot saved"
    ]
    assert len(tally.lines(-2)) == 1
    assert len(tally.lines(0)) == 2


def test_one_instance_is_singular() -> None:
    assert worker("app", 0.05).lines(-1) == ["pytest-incus: 1 instance (1 app)"]
    assert worker("app", 0.05).lines() == [
        "pytest-incus: 1 instance: 1 app (median 0.05 s, slowest 0.05 s)"
    ]


def test_workers_merge_into_the_controller_through_json() -> None:
    one = worker("container", 0.1, 0.2)
    one.image_made("busybox", "built", 0.5)
    two = worker("container", 0.3, 0.4)
    two.launched("vm", 2.0)
    two.snapshot_saved("debian/12")
    controller = Tally()
    for tally in (one, two):
        controller.merge(json.loads(json.dumps(tally.to_data())))
    assert controller.lines() == [
        "pytest-incus: 5 instances: 4 container (median 0.25 s, slowest 0.4 s), "
        "1 vm (median 2.0 s, slowest 2.0 s)",
        "pytest-incus: images built: busybox (0.5 s); boot snapshots saved: 1",
    ]
    # what the controller merged is not time it spent building itself
    assert controller.build_seconds == 0.0


def test_merging_nothing_leaves_it_empty() -> None:
    controller = Tally()
    controller.merge(Tally().to_data())
    controller.merge({})
    assert not controller and controller.lines() == []


# -- what the image store tallies (a build hook's images: no containers needed) ----------


def hook(ref: str, rootfs: Path) -> bool | None:
    if ref != "unit/thing":
        return None
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hostname").write_text("thing\n")
    return True


def made(tally: Tally) -> list[tuple[str, str]]:
    """(image, how) of every image the tally lists, in order."""
    return [(str(ref), str(how)) for ref, how, _ in tally.to_data()["images"]]


def test_the_store_tallies_what_it_builds_once(scratch_cache: Path) -> None:
    tally = Tally()
    store = ImageStore(Settings(cache_dir=scratch_cache), build_hook=hook, tally=tally)
    image = store.get("unit/thing")
    store.shifted(image, 1_000_000)  # what an unprivileged container runs on: not an image
    assert made(tally) == [("unit/thing", "built")]
    assert tally.build_seconds > 0
    # cached: another store (a later run) makes nothing
    later = Tally()
    other = ImageStore(Settings(cache_dir=scratch_cache), build_hook=hook, tally=later)
    other.shifted(other.get("unit/thing"), 1_000_000)
    assert not later


def test_a_local_rootfs_is_copied(scratch_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin" / "init").write_text("#!/bin/sh\n")
    tally = Tally()
    ImageStore(Settings(cache_dir=scratch_cache), tally=tally).get(str(tmp_path))
    assert made(tally) == [(str(tmp_path), "copied")]


def test_a_boot_snapshot_is_counted_as_saved(scratch_cache: Path) -> None:
    tally = Tally()
    store = ImageStore(Settings(cache_dir=scratch_cache), tally=tally)
    image = Image(
        ref="debian/12",
        kind="vm",
        key="debian-bookworm.vm",
        path=scratch_cache / "images" / "debian-bookworm.vm",
        size=0,
        created=time.time(),
        init="systemd",
    )

    def save(directory: Path) -> None:  # stands in for a VM's saved boot
        for name in (vm.DISK, vm.BOOT_STATE, vm.BOOT_RECORD):
            (directory / name).write_text("{}")

    store.boot_snapshot(image, "shape", save)
    store.boot_snapshot(image, "shape", save)  # cached: saved once
    assert tally.to_data()["snapshots"] == ["debian/12"]
    assert made(tally) == []
    assert tally.lines() == ["pytest-incus: boot snapshots saved: 1"]
