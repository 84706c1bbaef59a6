"""``debian/<release>`` images: debootstrap minbase with systemd as init."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_incus.errors import ImageError

PACKAGES = ("systemd-sysv", "python3-minimal")
RECIPE = "2"  # bump when the build changes: cached entries of another recipe are rebuilt
PROGRESS_EVERY = 5.0  # seconds between progress lines
BUILD_TIMEOUT = 1800.0

# Units that cannot work in a container (kernel modules, kernel filesystems, consoles) and
# only slow down boot or, failing in an unprivileged container, make it "degraded".
_MASKED_UNITS = (
    "systemd-remount-fs.service",
    "systemd-journald-audit.socket",
    "getty-static.service",
    "console-getty.service",
    "systemd-networkd-wait-online.service",
    "systemd-modules-load.service",
    "modprobe@.service",
    "e2scrub_reap.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)


def build(release: str, rootfs: Path, mirror: str, progress: Callable[[str], None]) -> str:
    """Debootstrap Debian ``release`` (a codename) into ``rootfs``; returns its init flavour."""
    debootstrap(release, rootfs, mirror, PACKAGES, progress, what=f"debian/{release}")
    _tune(rootfs)
    return "systemd"


def debootstrap(
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


def _tune(rootfs: Path) -> None:
    """Make the rootfs boot quickly and cleanly as a container."""
    for unit in _MASKED_UNITS:
        link = rootfs / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (rootfs / "etc/hostname").write_text("debian\n")
    # apt's package lists and caches are not needed to run tests and make the image bigger
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*.deb"):
            entry.unlink()
