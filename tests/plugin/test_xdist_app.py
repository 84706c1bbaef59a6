"""Issue 4, done when: `-n 4`, 20 tests on one app image, pulled and unpacked exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cache_args
from registry_helpers import Registry, manifest, pushed_busybox

from pytest_incus import registry
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

APP_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.parametrize("n", range(20))
@pytest.mark.instance(kind="app", image="{ref}", command=["sh", "-c", "echo ran; exit 7"])
def test_app(instance, n):
    record(instance)
    assert instance.wait(timeout=30) == 7
    assert instance.logs() == "ran\\n"
"""
)


@pytest.fixture(scope="module")
def pushed() -> Iterator[tuple[Registry, str, list[str]]]:
    """A busybox app image in a loopback registry: (registry, reference, layer digests)."""
    with pushed_busybox("xdist/app:1") as (registry, ref, layout):
        layers = [str(layer["digest"]) for layer in manifest(layout, "app")["layers"]]
        yield registry, ref, layers


def test_four_workers_pull_and_unpack_once(
    pytester: pytest.Pytester,
    scratch_cache: Path,
    inner_instances: InnerInstances,
    pushed: tuple[Registry, str, list[str]],
) -> None:
    reg, ref, layers = pushed
    inner_instances.caches.add(scratch_cache)
    settings = Settings(cache_dir=scratch_cache)
    pytester.makepyfile(test_app=APP_MODULE.replace("{ref}", ref))
    result = pytester.runpytest_subprocess(
        *cache_args(scratch_cache),
        f"--incus-insecure-registry={reg.host}",
        "-n",
        "4",
        "-q",
        timeout=300,
    )
    result.assert_outcomes(passed=20)

    builds = Counter(
        str(build["key"]).removesuffix(".shift1000000") for build in ImageStore(settings).builds()
    )
    assert len(builds) == 1 and list(builds.values()) == [2]  # the unpack and its shifted copy
    assert all(reg.blob_fetches(layer) == 1 for layer in layers)  # each layer pulled once

    workers = inner_instances.workers()
    assert len(workers) == 20
    assert len(set(workers.values())) > 1  # several workers shared the one pull
    for name in workers:
        assert registry.leftovers(settings, name) == []
