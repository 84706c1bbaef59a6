"""How the client does exec and files with the agent that answered: the ``Peer`` protocol.

``AgentClient.connect`` chooses one peer after ``guest-info``, once: ``Extensions`` when the
agent is ours (its ``pti-*`` commands, one round trip per operation), ``StockAgent`` for a stock
``qemu-ga`` (``guest-exec`` and the guest's shell tools). Both speak through the client's
``request``; the client keeps what is the same for both (timing, ``ExecTimeoutError``, ``Stat``
values).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from pytest_incus.errors import AgentError

if TYPE_CHECKING:
    from pytest_incus.values import ExecRequest


SILENCE = 60.0  # seconds an agent may take to answer one request of an exec


def answer_by(deadline: float | None, wait: float = 0.0) -> float:
    """When a request of an exec (that may wait ``wait`` seconds in the agent) must have been
    answered: after ``wait`` and SILENCE, and by the exec's own ``deadline``."""
    limit = time.monotonic() + wait + SILENCE
    return limit if deadline is None else min(limit, deadline)


class NoReply(AgentError):
    """The agent did not answer a request by its deadline (stopped, killed, or a hung
    guest). An exec that meets it carries what the command had written until then."""

    def __init__(self, message: str, *, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class Peer(Protocol):
    """Exec and file operations with one kind of agent."""

    extended: bool  # True for our agent (the pti-* extensions)

    def run(self, request: ExecRequest) -> tuple[int, bytes, bytes, bool]:
        """Run ``request``: (exit code, stdout, stderr, killed at its timeout)."""
        ...

    def read_file(self, path: str) -> bytes:
        """The content of ``path`` (symlinks followed)."""
        ...

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace ``path`` (parents created), owned by root."""
        ...

    def stat(self, path: str) -> dict[str, Any] | None:
        """{lstat, stat} records of ``path`` (stat None for a dangling link); None if it is
        missing."""
        ...

    def sha256(self, path: str) -> str:
        """The hex sha256 of the file at ``path``."""
        ...

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack a tar made by ``Instance.push`` at ``dest`` (see ``Machine.put_archive``)."""
        ...

    def get_archive(self, path: str) -> bytes:
        """A tar of ``path`` (see ``Machine.get_archive``)."""
        ...

    def remove(self, path: str) -> None:
        """Remove ``path`` (a tree too); nothing if it does not exist."""
        ...

    def add_entropy(self, data: bytes) -> None:
        """Credit ``data`` to the guest kernel's random pool and reseed it."""
        ...

    def configure_network(self, arguments: dict[str, Any]) -> str:
        """Configure the guest's one ethernet interface, DNS and host name as
        ``pti-net-config`` does with ``arguments`` (guest_agent/network.py); the interface's
        name."""
        ...
