"""debootstrap: a minbase Debian root filesystem, with progress and a deadline."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_incus.errors import ImageError

PROGRESS_EVERY = 5.0  # seconds between progress lines
BUILD_TIMEOUT = 1800.0


def run(
    release: str,
    rootfs: Path,
    mirror: str,
    packages: Sequence[str],
    progress: Callable[[str], None],
    *,
    what: str,
) -> None:
    """Debootstrap a minbase Debian ``release`` with ``packages`` into ``rootfs``, showing
    progress every few seconds; ImageError with its last lines if it fails. ``what`` names
    the image in messages."""
    if shutil.which("debootstrap") is None:
        raise ImageError(f"building {what} needs debootstrap: apt-get install debootstrap")
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        release,
        str(rootfs),
        mirror,
    ]
    started = time.monotonic()
    last_report = started
    tail: list[str] = []
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-40:], line.rstrip()]
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY and line.startswith("I: "):
                progress(f"{what}: {line[3:].strip()} ({now - started:.0f}s)")
                last_report = now
            if now - started > BUILD_TIMEOUT:
                proc.kill()
        code = proc.wait()
    if code != 0:
        raise ImageError(
            f"debootstrap of {what} from {mirror} failed (exit {code}); check the mirror "
            "(--incus-mirror) and the network. Its last lines:\n" + "\n".join(tail[-15:])
        )
