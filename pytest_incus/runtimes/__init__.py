"""One runtime per kind of instance, behind the ``Runtime`` protocol."""

from __future__ import annotations

from pytest_incus.errors import UnavailableError
from pytest_incus.runtimes.container import ContainerRuntime
from pytest_incus.runtimes.protocol import Runtime
from pytest_incus.runtimes.vm import VmRuntime

RUNTIMES: dict[str, Runtime] = {"container": ContainerRuntime(), "vm": VmRuntime()}

_PLANNED = {"app": "OCI application containers"}


def get_runtime(kind: str) -> Runtime:
    """The runtime for ``kind``; UnavailableError for a kind this version cannot run yet."""
    if kind in RUNTIMES:
        return RUNTIMES[kind]
    raise UnavailableError(
        f"kind={kind!r} ({_PLANNED.get(kind, kind)}) is not implemented yet in "
        "this version of pytest-incus; only kind='container' and kind='vm' run today"
    )
