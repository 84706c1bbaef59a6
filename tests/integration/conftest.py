"""Fixtures of the integration tests (real containers)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import SCRATCH_ROOT

from pytest_incus import fsutil


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A fresh host directory outside /tmp that an unprivileged container's root can reach
    (for mounts and local images); removed afterwards."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    SCRATCH_ROOT.chmod(0o755)
    path = SCRATCH_ROOT / f"it-{secrets.token_hex(4)}"
    path.mkdir(mode=0o755)
    yield path
    fsutil.remove_tree(path)


@pytest.fixture
def token() -> str:
    """A unique token, to make names and contents of this test recognisable."""
    return secrets.token_hex(6)
