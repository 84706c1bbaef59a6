"""Fixtures of the plugin tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from plugin_helpers import QUIET_PLUGINS, InnerInstances

from pytest_incus.settings import Settings


@pytest.fixture
def inner_instances(pytester: pytest.Pytester, settings: Settings) -> Iterator[InnerInstances]:
    """Names of the instances inner runs launched; removed at the end if still there."""
    instances = InnerInstances(pytester.path)
    instances.caches.add(settings.cache_dir)
    yield instances
    instances.cleanup()


@pytest.fixture
def args(inner_args: list[str]) -> list[str]:
    """Arguments of an inner run on the shared image cache."""
    return [*inner_args, *QUIET_PLUGINS]
