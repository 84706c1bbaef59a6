"""Fixtures of the incus backend's tests: a client of this machine's real incusd."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from incus_helpers import TEST_PROJECT

from pytest_incus import fsutil
from pytest_incus.errors import UnavailableError
from pytest_incus.incus.client import IncusClient

# scratch files (certificates, incus configurations): not under /tmp, as in tests/conftest.py
SCRATCH = Path("/var/cache/pytest-incus-tests")


@pytest.fixture(scope="session")
def incus_client() -> Iterator[IncusClient]:
    """A checked client of this machine's Incus: its unix socket, the suite's project.

    A daemon that does not answer is an error, not a skip: `make test` installs and starts
    incusd, so its absence means the setup failed."""
    client = IncusClient(project=TEST_PROJECT)
    try:
        client.check()
    except UnavailableError as exc:
        client.close()
        pytest.fail(
            f"the incus backend's tests need a running incusd: {exc}\nrun `bash "
            "scripts/incus-setup.sh` (as root; `make test` does it)",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory of this test's own (not under /tmp), removed afterwards."""
    path = SCRATCH / f"pti-cl-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    yield path
    fsutil.remove_tree(path)
