"""Choosing QEMU's accelerator: KVM when it really runs a Linux guest, else TCG.

``/dev/kvm`` existing, ``KVM_CREATE_VM`` succeeding, even a real-mode boot sector running to its
end, does not mean Linux guests run: on some hosts a vCPU that a Linux kernel drives fails with
"KVM internal error. Suberror: 1" (an emulation failure), and QEMU then pauses the guest forever
instead of exiting. So ``auto`` boots what every VM boots: the VM image's own Linux kernel,
under KVM, on the same machine type and CPU model as a VM, with a tiny initramfs whose ``/init``
writes a token on the console and powers off (``initramfs.probe``). Only that token, with
QEMU's clean exit, proves that KVM works; an internal error (read from QEMU's stderr as it is
written), any other exit, or no end within ``PROBE_DEADLINE`` means it does not.

The verdict is kept per host boot and QEMU version in ``<cache>/kvm-verdict.json`` (made under a lock,
so xdist workers probe once), with what it rests on (``Verdict``), and is made at most once per
process. A VM that later meets a KVM internal error all the same (a host where KVM fails only
sometimes) marks the verdict broken (``mark_broken``), and boots again under TCG.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import filelock

from pytest_incus import fsutil
from pytest_incus.errors import ImageError, UnavailableError
from pytest_incus.images import initramfs
from pytest_incus.runtimes import qemu
from pytest_incus.values import AccelMode

log = logging.getLogger("pytest_incus")

QEMU = qemu.QEMU
QEMU_IMG = "qemu-img"
# A healthy KVM brings the probe's kernel to its /init in well under a second, TCG in about
# 2 s. A KVM that needs more than PROBE_DEADLINE is no use even if it would get there (on one
# host seen here, the vCPU crawled for 17 s and then failed with an internal error), so a slow
# end and a hang give the same verdict: the verdict never depends on a race with the deadline.
PROBE_DEADLINE = 5.0
PROBE_POLL = 0.02
PROBE_MEMORY = "256M"
PROBE_VERSION = 2  # bump when the probe changes: older verdicts are then probed again
CACHE_FILE = "kvm-verdict.json"

_lock = threading.Lock()
_chosen: dict[Path, Accel] = {}


TCG_CPU = "Nehalem,+rdrand"  # the emulated CPU under TCG: see Accel.qemu_args


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen for this host, and why."""

    name: AccelMode  # KVM or TCG
    reason: str  # why: what the verdict rests on, or that it was forced

    @property
    def qemu_args(self) -> list[str]:
        """QEMU's ``-accel`` option for it."""
        if self.name is AccelMode.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        # one host thread per vCPU, and a bigger translation cache than the default. The CPU
        # has RDRAND, so the guest kernel's RNG is ready at once (without it, it waited about
        # 1.5 s for jitter entropy, and Python, the agent, waits for it); a Nehalem rather
        # than "max": with max's AVX and friends the kernel and glibc pick code paths that TCG
        # emulates slowly (0.4-0.5 s more to the first exec, measured)
        return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", TCG_CPU]


@dataclass(frozen=True)
class Verdict:
    """Whether KVM runs Linux guests here, and what that rests on."""

    works: bool
    detail: str  # what was seen: "a Linux guest ... under KVM reached its init in 0.41s"
    source: str  # "probe" (the probe guest), or "guest" (a VM that met an internal error)
    when: float  # time.time() of the observation
    cached: bool = False  # read from the cache file rather than seen by this process

    def describe(self) -> str:
        """One line for messages and ``doctor``: the detail, where it comes from and when."""
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.when))
        by = "the KVM probe" if self.source == "probe" else "a VM of this host"
        return f"{self.detail} (seen by {by} at {seen}{', cached' if self.cached else ''})"


def qemu_missing() -> str | None:
    """Why QEMU cannot run here (a missing program), or None."""
    missing = [p for p in (QEMU, QEMU_IMG) if shutil.which(p) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not found on PATH; virtual machines need them: "
            "apt-get install qemu-system-x86 qemu-utils"
        )
    return None


@functools.cache
def qemu_version() -> str:
    """The first line of ``qemu-system-x86_64 --version``."""
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or ["unknown"])[0].strip()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cache_key() -> dict[str, object]:
    return {"boot_id": _boot_id(), "qemu": qemu_version(), "probe": PROBE_VERSION}


def probe_kvm(workdir: Path, kernel: Path, deadline: float = PROBE_DEADLINE) -> Verdict:
    """Boot ``kernel`` with the probe's initramfs under KVM (see the module docstring), killing
    its QEMU at an internal error or past ``deadline`` seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Verdict(False, "/dev/kvm is missing or not accessible", "probe", time.time())
    return boot_probe(workdir, kernel, Accel(AccelMode.KVM, "the probe"), deadline)


def boot_probe(workdir: Path, kernel: Path, accel: Accel, deadline: float) -> Verdict:
    """Boot the probe guest on ``kernel`` under ``accel``: whether it reached its init."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / f"kvm-probe.{os.getpid()}.{threading.get_ident()}"
    run.mkdir(exist_ok=True)
    try:
        return _run_probe(run, kernel, accel, deadline)
    finally:
        fsutil.remove_tree(run)


def _run_probe(run: Path, kernel: Path, accel: Accel, deadline: float) -> Verdict:
    try:
        fsutil.write_atomic(run / "initrd", initramfs.probe())
    except ImageError as exc:
        return Verdict(False, f"the KVM probe cannot run: {exc}", "probe", time.time())
    console = run / "console.log"
    argv = [
        QEMU,
        *("-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"),
        *("-no-reboot", "-machine", qemu.MACHINE, *accel.qemu_args),
        *qemu.firmware_args(),
        *("-m", PROBE_MEMORY, "-kernel", str(kernel), "-initrd", str(run / "initrd")),
        *("-append", "console=ttyS0 quiet panic=-1 rdinit=/init tsc=reliable no_timer_check"),
        *("-serial", f"file:{console}"),
    ]
    what = f"a Linux guest (kernel {kernel.parent.name}/{kernel.name}) under {accel.name.upper()}"
    started = time.monotonic()
    process = qemu.QemuProcess.launch(argv, run)
    try:
        while process.alive():
            if (reason := process.stop_reason()) is not None:
                return Verdict(False, f"{what} stopped: {reason}", "probe", time.time())
            if time.monotonic() - started > deadline:
                said = _last_line(process.stderr())
                return Verdict(
                    False,
                    f"{what} did not reach its init within {deadline:.0f}s (TCG takes about 2s;"
                    " its vCPU hangs or crawls" + (f"; QEMU said: {said}" if said else "") + ")",
                    "probe",
                    time.time(),
                )
            time.sleep(PROBE_POLL)
    finally:
        process.kill()  # our own child, by pid (nothing if it ended)
        process.close()
    took = time.monotonic() - started
    code = process.child.returncode
    if (
        code == 0
        and console.is_file()
        and initramfs.PROBE_TOKEN in console.read_text(errors="replace")
    ):
        return Verdict(True, f"{what} reached its init in {took:.2f}s", "probe", time.time())
    said = _last_line(process.stderr())
    return Verdict(
        False,
        f"{what} failed (QEMU exit code {code}"
        + (f": {said}" if said else ", and its init never ran")
        + ")",
        "probe",
        time.time(),
    )


def _last_line(text: str) -> str:
    """QEMU's last line that is not a mere warning."""
    lines = [line for line in text.strip().splitlines() if "warning:" not in line]
    return lines[-1] if lines else ""


def _write(cache_dir: Path, verdict: Verdict, kernel: Path | None) -> None:
    record = {**asdict(verdict), "kernel": str(kernel) if kernel else None}
    del record["cached"]
    fsutil.write_atomic(cache_dir / CACHE_FILE, json.dumps({"key": _cache_key(), **record}))


def cached_verdict(cache_dir: Path) -> Verdict | None:
    """The verdict recorded for this host boot, QEMU version and probe, if any."""
    data = fsutil.read_json(cache_dir / CACHE_FILE)
    if not isinstance(data, dict) or data.get("key") != _cache_key():
        return None
    try:
        return Verdict(
            bool(data["works"]),
            str(data["detail"]),
            str(data["source"]),
            float(data["when"]),
            cached=True,
        )
    except (KeyError, TypeError, ValueError):
        return None


def _lock_file(cache_dir: Path) -> filelock.FileLock:
    cache_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(cache_dir / f"{CACHE_FILE}.lock"))


def _settled(cache_dir: Path, seen: Callable[[], Verdict], kernel: Path | None) -> Verdict:
    """The verdict recorded for this host, else ``seen()``, recorded; under the verdict's lock,
    so that of processes deciding at once only the first observes (probes) and records."""
    with _lock_file(cache_dir):
        found = cached_verdict(cache_dir)
        if found is not None:
            return found
        fresh = seen()
        _write(cache_dir, fresh, kernel)
        log.info("KVM verdict: %s", fresh.describe())
        return fresh


def verdict(cache_dir: Path, kernel: Path) -> Verdict:
    """The verdict for this host: the recorded one, else the probe's on ``kernel``."""
    return _settled(cache_dir, lambda: probe_kvm(cache_dir / "probe", kernel), kernel)


def record(cache_dir: Path, seen: Verdict, kernel: Path | None) -> Verdict:
    """Record ``seen`` as this host's verdict, unless one was recorded meanwhile; the
    verdict that holds."""
    return _settled(cache_dir, lambda: seen, kernel)


def _as_accel(found: Verdict) -> Accel:
    if found.works:
        return Accel(AccelMode.KVM, found.describe())
    return Accel(AccelMode.TCG, f"KVM does not work here: {found.describe()}")


def choose(requested: AccelMode, cache_dir: Path, kernel: Path) -> Accel:
    """The accelerator for ``requested`` (AUTO, KVM or TCG), probing KVM with ``kernel``
    (a VM image's) if this host has no verdict yet.

    A forced "kvm" that does not work raises UnavailableError. The choice is made once per
    process and cache directory (``mark_broken`` changes it).
    """
    if requested is AccelMode.TCG:
        return Accel(AccelMode.TCG, "--incus-accel=tcg")
    with _lock:
        if cache_dir not in _chosen:
            _chosen[cache_dir] = _as_accel(verdict(cache_dir, kernel))
        accel = _chosen[cache_dir]
    if requested is AccelMode.KVM and accel.name is not AccelMode.KVM:
        raise UnavailableError(
            f"--incus-accel=kvm was asked, but {accel.reason}; "
            "use --incus-accel=auto or tcg to run VMs without KVM (much slower), or fix KVM "
            "on this host"
        )
    return accel


def mark_broken(cache_dir: Path, detail: str) -> Accel:
    """Record that a VM met a KVM failure (``detail``): from now on ``auto`` chooses TCG, in
    this process and, until the host reboots, in every other. Returns the TCG choice."""
    broken = Verdict(False, detail, "guest", time.time())
    with _lock, _lock_file(cache_dir):
        _write(cache_dir, broken, None)
        _chosen[cache_dir] = _as_accel(broken)
        return _chosen[cache_dir]


def forget() -> None:
    """Drop this process's memory of the choice (tests of the probe)."""
    with _lock:
        _chosen.clear()
