"""The host's tools (cp, rm, tar, qemu-img, mkfs.ext4, zstd, ...): the one place where a
failing ``subprocess`` becomes an error of ours.

:func:`subprocess_errors` maps what ``subprocess`` raises inside its block (a non-zero exit
under ``check=True``, a timeout, a program that cannot be started) to an ``IncusError`` class
of the caller's choice, the cause kept as ``__cause__`` and ``.exc``, as httpx's
``map_httpcore_exceptions`` does for its transport. :func:`run` runs one tool under it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence

from pytest_incus.errors import IncusError

ErrorFactory = Callable[..., IncusError]  # an IncusError class: (message, *, exc=...)
SAID_LINES = 15  # lines of the tool's stderr quoted in the error


def _said(output: bytes | str | None) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-SAID_LINES:]) or "(nothing on stderr)"


@contextlib.contextmanager
def subprocess_errors(what: str, error: ErrorFactory, fix: str = "") -> Iterator[None]:
    """Turn the ``subprocess`` failures of the block into ``error``: "``what`` failed (exit
    N): <its stderr>; ``fix``", "did not finish within T s", or "cannot run". ``what`` says
    what was asked (the tool and why); ``fix``, what to do."""
    advice = f"; {fix}" if fix else ""
    try:
        yield
    except subprocess.CalledProcessError as exc:
        raise error(
            f"{what} failed (exit {exc.returncode}): {_said(exc.stderr)}{advice}", exc=exc
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what} did not finish within {exc.timeout:.0f}s{advice}", exc=exc) from exc
    except OSError as exc:  # the program is missing or cannot be started
        raise error(
            f"{what}: cannot run {exc.filename or 'it'}: {exc.strerror}{advice}", exc=exc
        ) from exc


def run(
    argv: Sequence[str],
    *,
    what: str,
    error: ErrorFactory,
    fix: str = "",
    timeout: float | None = None,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to its end (stdin empty or ``input``, output captured); ``error`` (see
    :func:`subprocess_errors`) unless it exits 0."""
    with subprocess_errors(what, error, fix):
        return subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=True,
        )
