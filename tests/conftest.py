"""Shared fixtures of the pytest-incus test suite."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_incus import fsutil, network
from pytest_incus.fixtures import SETTINGS
from pytest_incus.settings import Settings

pytest_plugins = ["pytester"]

# Scratch caches for tests that need an empty or private one. Never under /tmp: a misconfigured
# container could empty it, and pytester's directories live there.
SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--incus-backend=incus``, skip the tests that look at what only the local
    backend has, with their reason (the README lists them)."""
    if config.stash[SETTINGS].backend == "local":
        return
    for item in items:
        marker = item.get_closest_marker("local_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"local backend only: {reason}"))


@pytest.fixture(scope="session")
def settings(pytestconfig: pytest.Config) -> Settings:
    """The settings of this run (its shared image cache)."""
    return pytestconfig.stash[SETTINGS]


@pytest.fixture
def inner_args(settings: Settings) -> list[str]:
    """Arguments that point an inner (pytester) run at this run's shared image cache:
    pytester moves HOME, and an inner run on an empty cache would rebuild every image."""
    # one "--opt=value" word: pytest picks its rootdir before plugin options are known, and
    # would take a separate value word for a path argument (rootdir = the cache)
    return [f"--incus-cache-dir={settings.cache_dir}", "-p", "no:cacheprovider"]


@pytest.fixture
def scratch_cache() -> Iterator[Path]:
    """An empty cache directory of this test's own, removed afterwards."""
    path = SCRATCH_ROOT / secrets.token_hex(4)
    path.mkdir(parents=True)
    SCRATCH_ROOT.chmod(0o755)
    yield path
    # what a failed test left of the cache's networks lives outside it (bridges, dnsmasq)
    network.sweep(Settings(cache_dir=path))
    fsutil.remove_tree(path)
