"""The kind-neutral values that instances, runtimes and the agent client exchange.

A leaf module: it imports nothing of pytest-incus, so every other module can import it, in any
order, without making an import cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class InstanceState(enum.Enum):
    """Where an instance is in its life."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class ExecResult:
    """What a command did: its exit code, output and duration (seconds)."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float

    @property
    def stdout(self) -> str:
        """Standard output, decoded as UTF-8 with errors replaced."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error, decoded as UTF-8 with errors replaced."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """True when the exit code is 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class Stat:
    """What ``stat`` says of a path inside an instance, ids as the instance sees them."""

    mode: int  # full st_mode
    uid: int
    gid: int
    size: int
    is_symlink: bool  # of the path itself, not followed


@dataclass(frozen=True)
class ExecRequest:
    """One command to run inside an instance, fully resolved by ``Instance.exec``."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    user: str | int | None
    input: bytes | None
    timeout: float | None  # seconds; None for no limit
