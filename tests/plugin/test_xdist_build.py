"""Issue 2, done when: `-n 4` on an empty cache builds debian/12 exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cache_args

from pytest_incus import registry
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

DEBIAN_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.parametrize("n", range(40))
@pytest.mark.instance(kind="container", image="debian/12")
def test_debian(instance, n):
    record(instance)
    assert "bookworm" in instance.read_text("/etc/os-release")
"""
)


@pytest.mark.slow
def test_four_workers_build_debian_once(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    settings = Settings(cache_dir=scratch_cache)
    pytester.makepyfile(test_debian=DEBIAN_MODULE)
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), "-n", "4", "-q", timeout=900)
    result.assert_outcomes(passed=40)

    builds = Counter(str(build["key"]) for build in ImageStore(settings).builds())
    assert builds == {"debian-bookworm": 1, "debian-bookworm.shift1000000": 1}
    output = result.outlines + result.errlines
    assert sum("pytest-incus: building image debian/12" in line for line in output) == 1

    workers = inner_instances.workers()
    assert len(workers) == 40
    assert set(workers.values()) == {"gw0", "gw1", "gw2", "gw3"}  # every worker used the one build
    for name in workers:
        assert registry.leftovers(settings, name) == []
