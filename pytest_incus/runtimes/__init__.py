"""One runtime per kind of instance, behind the ``Runtime`` protocol."""

from __future__ import annotations

from pytest_incus.errors import UnavailableError
from pytest_incus.runtimes.app import AppRuntime
from pytest_incus.runtimes.container import ContainerRuntime
from pytest_incus.runtimes.protocol import Runtime
from pytest_incus.runtimes.vm import VmRuntime

RUNTIMES: dict[str, Runtime] = {
    "container": ContainerRuntime(),
    "vm": VmRuntime(),
    "app": AppRuntime(),
}


def get_runtime(kind: str) -> Runtime:
    """The runtime for ``kind``."""
    if kind in RUNTIMES:
        return RUNTIMES[kind]
    raise UnavailableError(f"kind={kind!r} is not a kind pytest-incus knows")
