"""Issue 12, done when: under ``-n 4``, 20 tests on one ``images:`` image download it once, and
12 tests over three Debian releases with ``packages=["nginx"]`` build each derived image once;
shown by the image server's request log and the store's build log."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cache_args
from simplestreams_helpers import SCRATCH_ROOT, ImageServer, build_tree, make_image

from pytest_incus import fsutil, registry
from pytest_incus.images import derived
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

IMAGES_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.parametrize("n", range(20))
@pytest.mark.instance(kind="container", image="images:ptios/7")
def test_remote(instance, n):
    record(instance)
    assert "ID=ptios" in instance.read_text("/etc/os-release")
"""
)

RELEASES = ("debian/11", "debian/12", "debian/13")
NGINX_MODULE = (
    INNER_HEADER
    + f"""
@pytest.mark.parametrize("n", range(4))
@pytest.mark.instance(image={list(RELEASES)!r}, packages=["nginx"])
def test_nginx(instance, n):
    record(instance)
    assert instance.exec("systemctl is-active nginx").stdout.strip() == "active"
    assert instance.exec(["nginx", "-v"]).ok
"""
)


@pytest.fixture
def tree() -> Iterator[Path]:
    work = SCRATCH_ROOT / f"ss-xdist-{secrets.token_hex(4)}"
    build_tree(work / "tree", [make_image(work, os="ptios", release="7")])
    yield work / "tree"
    fsutil.remove_tree(work)


def test_twenty_tests_on_four_workers_download_once(
    pytester: pytest.Pytester,
    scratch_cache: Path,
    inner_instances: InnerInstances,
    tree: Path,
) -> None:
    inner_instances.caches.add(scratch_cache)
    pytester.makepyfile(test_remote=IMAGES_MODULE)
    with ImageServer(tree) as server:
        result = pytester.runpytest_subprocess(
            *cache_args(scratch_cache),
            f"--incus-image-server={server.url}",
            "-n",
            "4",
            "-q",
            timeout=600,
        )
        result.assert_outcomes(passed=20)
        # the summary (-q: one line) merges the workers' tallies: one download among them
        result.stdout.re_match_lines(
            [r"pytest-incus: 20 instances \(20 container\); 1 image downloaded \(.* s\)"]
        )
        assert len(server.gets(".squashfs")) == 1
        assert len(server.gets(".incus.tar.xz")) == 1
        # the alias is resolved once per session: at most once per worker
        assert 1 <= len(server.gets("index.json")) <= 4
    workers = inner_instances.workers()
    assert len(workers) == 20 and len(set(workers.values())) > 1
    settings = Settings(cache_dir=scratch_cache)
    for name in workers:
        assert registry.leftovers(settings, name) == []


@pytest.mark.slow
def test_twelve_tests_over_three_releases_build_each_derived_image_once(
    pytester: pytest.Pytester,
    settings: Settings,
    inner_args: list[str],
    inner_instances: InnerInstances,
) -> None:
    store = ImageStore(settings)
    recipe = derived.Recipe.make(packages=["nginx"])
    names = [derived.name(release, recipe) for release in RELEASES]
    for name in names:  # built by this run, under contention, not found from an earlier one
        store.prune(name)
    started = time.time()
    pytester.makepyfile(test_nginx=NGINX_MODULE)
    result = pytester.runpytest_subprocess(*inner_args, "-n", "4", "-q", timeout=1200)
    result.assert_outcomes(passed=12)
    built = Counter(
        str(b["ref"])
        for b in store.builds()
        if float(b["started"]) >= started
        and str(b["key"]).startswith("derived-")
        and ".shift" not in str(b["key"])
    )
    assert built == dict.fromkeys(names, 1)
    workers = inner_instances.workers()
    assert len(workers) == 12 and len(set(workers.values())) > 1
