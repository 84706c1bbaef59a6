"""The incus backend's runtimes (placeholder until the backend lands)."""

from __future__ import annotations

from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.protocol import Runtime


def incus_runtimes(context: RuntimeContext) -> list[Runtime]:
    """The incus backend's runtimes, one per kind."""
    return []
