"""The pytest_incus_* hooks, and build progress on the terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cache_args

from pytest_incus import registry
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

HOOKS_CONFTEST = """
from pytest_incus.images import busybox

def pytest_incus_build_image(config, ref, rootfs):
    if ref not in ("mine/tiny", "mine/other"):
        return None
    busybox.build(rootfs)
    (rootfs / "etc" / "built-by").write_text(f"hook {ref}\\n")
    return True

def pytest_incus_instance_ready(instance):
    instance.write_file("/etc/ready-marker", f"ready {instance.name}\\n")
"""

HOOKS_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.instance(image="mine/tiny")
def test_one(instance):
    record(instance)
    assert instance.read_text("/etc/built-by") == "hook mine/tiny\\n"
    assert instance.read_text("/etc/ready-marker") == f"ready {instance.name}\\n"

@pytest.mark.instance(image="mine/tiny")
def test_two(instance):
    record(instance)
    assert instance.read_text("/etc/built-by") == "hook mine/tiny\\n"

@pytest.mark.instance(image="busybox")
def test_other_images_are_not_the_hook_s(instance):
    record(instance)
    assert not instance.file("/etc/built-by").exists
    assert instance.read_text("/etc/ready-marker") == f"ready {instance.name}\\n"

def test_factory_launches_are_ready_too(instance_factory):
    inst = instance_factory.launch(kind="container", image="mine/tiny", privileged=True)
    record(inst)
    assert inst.read_text("/etc/ready-marker") == f"ready {inst.name}\\n"
    inst.delete()
"""
)


def build_counts(cache: Path) -> dict[str, int]:
    """How many times each cache key was built, from the store's build record."""
    counts: dict[str, int] = {}
    for build in ImageStore(Settings(cache_dir=cache)).builds():
        counts[str(build["key"])] = counts.get(str(build["key"]), 0) + 1
    return counts


def test_build_and_ready_hooks(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    pytester.makeconftest(HOOKS_CONFTEST)
    pytester.makepyfile(test_hooks=HOOKS_MODULE)
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), timeout=180)
    result.assert_outcomes(passed=4)
    counts = build_counts(scratch_cache)
    assert counts["hook-mine-tiny"] == 1  # one build for three instances
    assert counts["hook-mine-tiny.shift1000000"] == 1
    images = {image.ref for image in ImageStore(Settings(cache_dir=scratch_cache)).list()}
    assert {"mine/tiny", "busybox"} <= images
    settings = Settings(cache_dir=scratch_cache)
    assert len(inner_instances.names()) == 4
    for name in inner_instances.names():
        assert registry.leftovers(settings, name) == []


def test_image_nobody_builds_is_an_error_naming_the_hook(
    pytester: pytest.Pytester, scratch_cache: Path
) -> None:
    pytester.makeconftest(HOOKS_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.instance(image="mine/unknown")
        def test_it(instance):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["E   *ImageError: no builder knows image 'mine/unknown'*pytest_incus_build_image*"]
    )


SLOW_CONFTEST = """
import time

def pytest_incus_build_image(config, ref, rootfs):
    if ref != "mine/slow":
        return None
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "built-by").write_text("slow hook\\n")
    time.sleep(0.5)  # a build that takes a while, so the workers overlap on it
    return True
"""

SLOW_MODULE = """
import pytest

@pytest.mark.parametrize("n", range(2))
def test_get(image_store, n):
    image = image_store.get("mine/slow")
    assert (image.rootfs / "etc" / "built-by").read_text() == "slow hook\\n"
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_build_progress_shows_with_output_captured(
    pytester: pytest.Pytester, scratch_cache: Path, workers: list[str]
) -> None:
    pytester.makeconftest(SLOW_CONFTEST)
    pytester.makepyfile(test_slow=SLOW_MODULE)
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), *workers, timeout=120)
    result.assert_outcomes(passed=2)
    output = result.outlines + result.errlines
    building = [line for line in output if "pytest-incus: building image mine/slow" in line]
    built = [line for line in output if "pytest-incus: image mine/slow built in" in line]
    assert len(building) == 1 and len(built) == 1, "\n".join(output)
    assert build_counts(scratch_cache) == {"hook-mine-slow": 1}
