"""The errors pytest-incus raises, all under one root.

::

    IncusError
     +-- ConfigError            (also a pytest.UsageError) a marker, option or argument that
     |                          cannot work; raised at collection, at launch or by the call
     +-- ImageError             an image that cannot be built, fetched, found or read
     +-- InstanceStartError     an instance that did not start or did not become ready
     +-- NotRunningError        the instance is stopped or deleted; what was asked needs it
     |                          running
     +-- ExecError              a command that failed under check=True
     |    +-- ExecTimeoutError  a command that ran past its timeout (it has been killed)
     +-- UnknownUserError       exec(user=...) names a user the instance does not have
     +-- AgentError             the guest agent of a VM failed or cannot do what was asked
     +-- UnavailableError       this host (or the Incus server) cannot run the asked kind
     |                          of instance, or the Incus server cannot be used at all
     +-- ServerError            the Incus server (--incus-backend=incus) failed a request
     +-- WaitTimeoutError       (also a TimeoutError) what was waited for did not happen in time

Besides these, only the built-in ``OSError`` subclasses escape, as pathlib raises them, for a
path inside the instance (``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``,
``PermissionError``, ...): their ``filename`` is that path (for ``exec``, its ``cwd``). The same
mistake raises the same class on every kind.

Each message says what was asked, what happened and what to do. Errors raised because of a
library or subprocess error keep it as ``__cause__`` and on ``.exc``; start and timeout errors
carry the tail of the console log as a note.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest


class IncusError(Exception):
    """Root of every error pytest-incus raises."""

    def __init__(self, message: str, *, exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.exc = exc


class ConfigError(IncusError, pytest.UsageError):  # type: ignore[misc]
    """A marker, command line option, ``launch()`` argument or method argument (say
    ``exec(timeout=-1)``) that cannot work."""


class ImageError(IncusError):
    """An image could not be built, fetched, found or read."""


class InstanceStartError(IncusError):
    """An instance did not start, or did not become ready within its deadline."""


class UnavailableError(IncusError):
    """This host cannot run the asked kind of instance (what ``pytest-incus doctor`` says)."""


class ServerError(IncusError):
    """The Incus server of ``--incus-backend=incus`` refused or failed a request.

    ``status`` is the HTTP status (or Incus's error code) of the answer, 0 when there was none.
    """

    def __init__(self, message: str, *, status: int = 0, exc: BaseException | None = None) -> None:
        super().__init__(message, exc=exc)
        self.status = status


class NotRunningError(IncusError):
    """The instance is stopped (``start()`` it) or deleted, and what was asked needs it
    running."""


class UnknownUserError(IncusError):
    """``exec(user=...)`` names a user that the instance's ``/etc/passwd`` does not have."""

    def __init__(self, message: str, *, user: str, exc: BaseException | None = None) -> None:
        super().__init__(message, exc=exc)
        self.user = user


class WaitTimeoutError(IncusError, TimeoutError):
    """What was waited for (an app's end, a port, a log line) did not happen in time."""


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


def setup_error(
    where: str,
    argv: Sequence[str],
    *,
    errno: int | None = None,
    path: str | None = None,
    user: str | None = None,
) -> OSError | UnknownUserError | None:
    """The error for a command that could not be started in instance ``where`` (say
    "container NAME"), the same on every kind: a cwd that is not a directory is the OSError
    chdir gives (``errno``, carrying ``path``), a user the instance lacks UnknownUserError;
    None for any other reason (the caller says what happened)."""
    if user is not None:
        return UnknownUserError(
            f"{where}: cannot run {list(argv)!r} as user {user!r}: the instance's /etc/passwd "
            "has no such user; create it first (useradd), or give a user name or uid it has",
            user=user,
        )
    if errno and path is not None:
        what = f"{os.strerror(errno)} (the cwd of {list(argv)!r} in {where}; give a directory "
        return OSError(errno, what + "that exists in the instance, or make it first)", path)
    return None
