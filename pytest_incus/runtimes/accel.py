"""Choosing QEMU's accelerator: KVM when it really runs a guest, else TCG.

``/dev/kvm`` existing, or even ``KVM_CREATE_VM`` succeeding, does not mean guests run: on some
hosts the first vCPU fails ("KVM internal error") and spins forever. So ``auto`` boots a tiny
guest under KVM with a deadline: SeaBIOS loads a 512-byte boot sector that writes to the
``isa-debug-exit`` port, which makes QEMU exit with a known code. Only that code proves a vCPU
ran through firmware and into the guest; anything else (an error, a hang past the deadline, when
the probe's QEMU is killed) means no KVM. The answer is cached per host boot and QEMU version in
``<cache>/accel.json``, and the probe runs at most once per process.
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
from dataclasses import dataclass
from pathlib import Path

from pytest_incus import fsutil
from pytest_incus.errors import UnavailableError

log = logging.getLogger("pytest_incus")

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
PROBE_DEADLINE = 2.5  # seconds; a working KVM finishes in about 0.2 s
CACHE_FILE = "accel.json"

_EXIT_PORT = 0xF4
_EXIT_VALUE = 0x2A
_EXIT_CODE = (_EXIT_VALUE << 1) | 1  # what isa-debug-exit makes QEMU exit with
# mov al, 0x2a; out 0xf4, al; hlt; jmp $-1
_BOOT_CODE = bytes([0xB0, _EXIT_VALUE, 0xE6, _EXIT_PORT, 0xF4, 0xEB, 0xFD])

_lock = threading.Lock()
_chosen: dict[Path, Accel] = {}


TCG_CPU = "Nehalem,+rdrand"  # the emulated CPU under TCG: see Accel.qemu_args


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen for this host, and why."""

    name: str  # "kvm" or "tcg"
    reason: str  # why: what the probe found, or that it was forced

    @property
    def qemu_args(self) -> list[str]:
        """QEMU's ``-accel`` option for it."""
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # one host thread per vCPU, and a bigger translation cache than the default. The CPU
        # has RDRAND, so the guest kernel's RNG is ready at once (without it, it waited about
        # 1.5 s for jitter entropy, and Python, the agent, waits for it); a Nehalem rather
        # than "max": with max's AVX and friends the kernel and glibc pick code paths that TCG
        # emulates slowly (0.4-0.5 s more to the first exec, measured)
        return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", TCG_CPU]


@dataclass(frozen=True)
class Probe:
    """What booting the probe guest under KVM showed."""

    works: bool
    detail: str


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


def probe_kvm(workdir: Path, deadline: float = PROBE_DEADLINE) -> Probe:
    """Boot the probe guest under KVM, killing its QEMU past ``deadline`` seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Probe(False, "/dev/kvm is missing or not accessible")
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "kvm-probe.img"
    sector = bytearray(512)
    sector[: len(_BOOT_CODE)] = _BOOT_CODE
    sector[510:] = b"\x55\xaa"
    fsutil.write_atomic(disk, bytes(sector) + bytes(512 * 63))
    argv = [
        QEMU,
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-machine",
        "pc",
        "-accel",
        "kvm",
        "-m",
        "16",
        "-drive",
        f"file={disk},format=raw,if=ide",
        "-device",
        f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=1",
        "-no-reboot",
    ]
    started = time.monotonic()
    child = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = child.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        child.kill()  # our own child, by pid
        _, err = child.communicate()
        tail = _last_error(err)
        return Probe(
            False,
            f"a tiny guest under KVM did not finish within {deadline}s (its vCPU hangs"
            + (f"; QEMU said: {tail[0]}" if tail else "")
            + ")",
        )
    finally:
        disk.unlink(missing_ok=True)
    took = time.monotonic() - started
    if child.returncode == _EXIT_CODE:
        return Probe(True, f"a tiny guest ran under KVM in {took:.2f}s")
    said = _last_error(err)
    return Probe(
        False,
        f"a tiny guest under KVM failed (QEMU exit code {child.returncode}"
        + (f": {said[0]}" if said else "")
        + ")",
    )


def _last_error(stderr: bytes) -> list[str]:
    """QEMU's last line on stderr that is not a mere warning, as a list of zero or one."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    return [line for line in lines if "warning:" not in line][-1:]


def _cached_probe(cache_dir: Path) -> Probe:
    """The KVM probe's result for this host boot and QEMU version, probing if unknown."""
    key = {"boot_id": _boot_id(), "qemu": qemu_version()}
    path = cache_dir / CACHE_FILE
    data = fsutil.read_json(path)
    if isinstance(data, dict) and data.get("key") == key:
        return Probe(bool(data["works"]), str(data["detail"]) + " (cached)")
    probe = probe_kvm(cache_dir / "probe")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(
        path, json.dumps({"key": key, "works": probe.works, "detail": probe.detail})
    )
    return probe


def choose(requested: str, cache_dir: Path) -> Accel:
    """The accelerator for ``requested`` ("auto", "kvm" or "tcg"), probing KVM if needed.

    A forced "kvm" that does not work raises UnavailableError. The choice is made once per
    process and cache directory.
    """
    if requested == "tcg":
        return Accel("tcg", "--incus-accel=tcg")
    with _lock:
        if cache_dir not in _chosen:
            probe = _cached_probe(cache_dir)
            _chosen[cache_dir] = (
                Accel("kvm", probe.detail)
                if probe.works
                else Accel("tcg", f"KVM does not work here: {probe.detail}")
            )
        accel = _chosen[cache_dir]
    if requested == "kvm" and accel.name != "kvm":
        raise UnavailableError(
            f"--incus-accel=kvm was asked, but {accel.reason}; "
            "use --incus-accel=auto or tcg to run VMs without KVM (much slower), or fix KVM "
            "on this host"
        )
    return accel


def forget() -> None:
    """Drop this process's memory of the choice (tests of the probe)."""
    with _lock:
        _chosen.clear()
