"""The runtime table: which ``Runtime`` makes an instance of a kind on a backend.

The factory, the fixtures, the reaper and the CLI are handed one ``RuntimeTable`` and look
runtimes up by (backend, kind); nothing reads a module-level registry, so a test can build a
table of fakes, and a backend is one more set of entries.
"""

from __future__ import annotations

from collections.abc import Iterable

from pytest_incus.errors import UnavailableError
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.protocol import Runtime
from pytest_incus.spec import KINDS


class RuntimeTable:
    """Runtimes by (backend, kind)."""

    def __init__(self, runtimes: Iterable[Runtime]) -> None:
        self._runtimes = {(r.backend, r.kind): r for r in runtimes}

    @classmethod
    def default(cls, context: RuntimeContext) -> RuntimeTable:
        """Every backend's runtimes: the plugin's own (liblxc, QEMU) and an Incus server's.
        Making them contacts nothing: a backend's runtimes reach out when first used."""
        from pytest_incus.incus.runtime import incus_runtimes
        from pytest_incus.runtimes.app import AppRuntime
        from pytest_incus.runtimes.container import ContainerRuntime
        from pytest_incus.runtimes.vm import VmRuntime

        local: list[Runtime] = [ContainerRuntime(context), AppRuntime(context), VmRuntime(context)]
        return cls([*local, *incus_runtimes(context)])

    def get(self, backend: str, kind: str) -> Runtime:
        """The runtime of ``kind`` on ``backend``; UnavailableError for a kind (or backend)
        there is none for."""
        runtime = self._runtimes.get((backend, kind))
        if runtime is None:
            if kind not in KINDS:
                raise UnavailableError(f"kind={kind!r} is not a kind pytest-incus knows")
            raise UnavailableError(f"backend {backend!r} has no runtime for kind={kind!r}")
        return runtime

    def of_backend(self, backend: str) -> list[Runtime]:
        """The runtimes of ``backend``, one per kind it has."""
        return [r for (b, _), r in self._runtimes.items() if b == backend]
