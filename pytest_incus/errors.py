"""The errors pytest-incus raises, all under one root.

::

    IncusError
     +-- ConfigError            (also a pytest.UsageError) a marker, option or launch() argument
     |                          that cannot work; raised at collection or launch
     +-- ImageError             an image that cannot be built, fetched, found or read
     +-- InstanceStartError     an instance that did not start or did not become ready
     +-- ExecError              a command that failed under check=True
     |    +-- ExecTimeoutError  a command that ran past its timeout (it has been killed)
     +-- AgentError             the guest agent of a VM failed or cannot do what was asked
     +-- UnavailableError       this host cannot run the asked kind of instance

Each message says what was asked, what happened and what to do. Errors raised because of a
library or subprocess error keep it as ``__cause__`` and on ``.exc``; start and timeout errors
carry the tail of the console log as a note.
"""

from __future__ import annotations

import pytest


class IncusError(Exception):
    """Root of every error pytest-incus raises."""

    def __init__(self, message: str, *, exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.exc = exc


class ConfigError(IncusError, pytest.UsageError):  # type: ignore[misc]
    """A marker, command line option or ``launch()`` argument that cannot work."""


class ImageError(IncusError):
    """An image could not be built, fetched, found or read."""


class InstanceStartError(IncusError):
    """An instance did not start, or did not become ready within its deadline."""


class UnavailableError(IncusError):
    """This host cannot run the asked kind of instance (what ``pytest-incus doctor`` says)."""


class AgentError(IncusError):
    """The guest agent failed, or cannot do what was asked."""


class ExecError(IncusError):
    """A command run with ``check=True`` exited non-zero.

    It carries the command and everything of its result.
    """

    def __init__(
        self,
        message: str,
        *,
        cmd: str | list[str],
        exit_code: int,
        stdout_bytes: bytes,
        stderr_bytes: bytes,
        duration: float,
    ) -> None:
        super().__init__(message)
        self.cmd = cmd
        self.exit_code = exit_code
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes
        self.duration = duration

    @property
    def stdout(self) -> str:
        """Standard output, decoded as UTF-8 with errors replaced."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error, decoded as UTF-8 with errors replaced."""
        return self.stderr_bytes.decode("utf-8", "replace")


class ExecTimeoutError(ExecError):
    """A command ran past its timeout; it was killed with all its descendants."""


def tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of ``text``, for notes on start and timeout errors."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])
