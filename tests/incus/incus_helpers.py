"""Helpers of the incus backend's tests: a busybox image and containers on the real incusd,
named ``pti-ex-<hex>`` and deleted afterwards."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SCRATCH = Path("/var/lib/pti-exec")
# the suite's project on this machine's Incus, made by scripts/incus-setup.sh (its default
# profile's root disk is on a btrfs pool of its own)
TEST_PROJECT = "pytest-incus"
CACHE = Path(os.environ.get("PYTEST_INCUS_CACHE_DIR", "/var/cache/pytest-incus"))


def incus(*args: str, timeout: float = 120) -> str:
    """Run the incus command; its stdout (CalledProcessError if it fails)."""
    return subprocess.run(
        ["incus", *args], capture_output=True, text=True, check=True, timeout=timeout
    ).stdout


def _rootfs_tarball(rootfs: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as tar:
        tar.add(rootfs, arcname=".")


@contextmanager
def busybox_image() -> Iterator[str]:
    """The cached busybox rootfs imported into Incus under a fresh alias; deleted after."""
    rootfs = CACHE / "images" / "busybox" / "rootfs"
    if shutil.which("incus") is None or not (rootfs / "bin" / "busybox").exists():
        pytest.skip("needs the incus command and the cached busybox image")
    alias = f"pti-ex-{secrets.token_hex(4)}"
    work = SCRATCH / alias
    work.mkdir(parents=True)
    try:
        (work / "metadata.yaml").write_text(
            f"architecture: x86_64\ncreation_date: {int(time.time())}\n"
            f"properties:\n  description: {alias} (pytest-incus tests)\n"
        )
        with tarfile.open(work / "meta.tar", "w") as tar:
            tar.add(work / "metadata.yaml", arcname="metadata.yaml")
        _rootfs_tarball(rootfs, work / "rootfs.tar")
        incus("image", "import", str(work / "meta.tar"), str(work / "rootfs.tar"), "--alias", alias)
        yield alias
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["incus", "image", "delete", alias], capture_output=True, check=False)


@contextmanager
def container(image: str) -> Iterator[str]:
    """A running container of ``image`` named ``pti-ex-<hex>``; deleted after."""
    name = f"pti-ex-{secrets.token_hex(4)}"
    incus("launch", image, name)
    try:
        yield name
    finally:
        subprocess.run(["incus", "delete", "--force", name], capture_output=True, check=False)
