"""The pytest-incus command: doctor, images list|build|prune, ls, shell, rm."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cache_args, run_cli

from pytest_incus import network
from pytest_incus.images.store import ImageStore
from pytest_incus.network import links, services
from pytest_incus.settings import Settings


def test_doctor_says_containers_work(settings: Settings) -> None:
    result = run_cli(settings.cache_dir, "doctor", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"cache directory: {settings.cache_dir}" in lines
    assert "container: ok (a busybox container started and ran a command)" in lines
    assert any(line.startswith("vm: ") for line in lines)
    # the run's cache has a VM image: the probe boots the kernel of the newest one (debian/12,
    # or one derived from it) now, and the verdict says what it rests on
    probe = [line for line in lines if line.startswith("kvm probe now: ")]
    assert len(probe) == 1, lines
    assert re.search(r"a Linux guest \(kernel [\w.-]+\.vm/vmlinux\)", probe[0]), lines
    assert any(line.startswith("kvm verdict VMs use: KVM ") for line in lines), lines
    # networks: a bridge, its firewall table and DNS server really made, and removed again
    assert any(line.startswith("network: ok") for line in lines), lines
    probed = network.bridge_name(settings, network.PROBE_NETWORK)
    assert not links.exists(probed)
    assert probed not in services.firewall_tables()


def images(cache: Path) -> list[str]:
    """The image names that ``images list`` shows."""
    result = run_cli(cache, "images", "list")
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()]


def test_images_build_list_prune(scratch_cache: Path) -> None:
    assert images(scratch_cache) == []
    built = run_cli(scratch_cache, "images", "build", "busybox")
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith(f"busybox (container): {scratch_cache}/images/busybox ")
    assert "pytest-incus: building image busybox" in built.stderr
    assert images(scratch_cache) == ["busybox"]
    again = run_cli(scratch_cache, "images", "build", "busybox")
    assert again.returncode == 0 and "building" not in again.stderr
    assert len(ImageStore(Settings(cache_dir=scratch_cache)).builds()) == 1

    pruned = run_cli(scratch_cache, "images", "prune", "busybox")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("removed busybox ")
    assert images(scratch_cache) == []
    assert not (scratch_cache / "images" / "busybox").exists()


def test_images_build_packages_makes_a_derived_image(settings: Settings) -> None:
    built = run_cli(settings.cache_dir, "images", "build", "debian/12", "--packages", "hello")
    assert built.returncode == 0, built.stderr
    ref = built.stdout.split()[0]
    assert ref.startswith("derived:") and ref.endswith(":debian/12")
    image = ImageStore(settings).get(ref)
    assert (image.rootfs / "usr/bin/hello").is_file()
    listed = run_cli(settings.cache_dir, "images", "list").stdout.splitlines()
    assert any(line.startswith(ref) and "(derived from debian-bookworm)" in line for line in listed)


def test_images_list_shows_the_shared_cache(settings: Settings) -> None:
    assert run_cli(settings.cache_dir, "images", "build", "busybox").returncode == 0
    assert "busybox" in images(settings.cache_dir)


def test_prune_keeps_images_of_existing_instances(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    pytester.makepyfile(
        INNER_HEADER
        + """
@pytest.mark.instance(image="busybox")
def test_keep_me(instance):
    record(instance)
"""
    )
    result = pytester.runpytest_subprocess(
        *cache_args(scratch_cache), "--incus-keep=always", timeout=120
    )
    result.assert_outcomes(passed=1)
    [name] = inner_instances.names()
    listed = run_cli(scratch_cache, "ls").stdout.split()
    assert listed[:3] == [name, "container", "busybox"] and listed[-1] == "kept"

    pruned = run_cli(scratch_cache, "images", "prune")
    assert pruned.stdout == "kept images in use by existing instances: busybox\n"
    assert images(scratch_cache) == ["busybox", "busybox"]  # the image and its shifted copy

    assert run_cli(scratch_cache, "rm", name).returncode == 0
    assert run_cli(scratch_cache, "ls").stdout == ""
    pruned = run_cli(scratch_cache, "images", "prune")
    assert pruned.stdout.count("removed busybox") == 2
    assert images(scratch_cache) == []


def test_mistakes_are_one_clear_line(scratch_cache: Path) -> None:
    bad_image = run_cli(scratch_cache, "images", "build", "debian/99")
    assert bad_image.returncode == 1
    assert bad_image.stderr.startswith("pytest-incus: unknown Debian release in image 'debian/99'")
    for args in (["shell", "pti-nothere"], ["rm", "pti-nothere"]):
        result = run_cli(scratch_cache, *args)
        assert result.returncode == 1
        assert "no instance named 'pti-nothere'" in result.stderr
