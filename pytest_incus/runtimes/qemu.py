"""A QEMU process we started, and its QMP monitor.

QEMU runs as our child in a session of its own (so a Ctrl-C at the terminal reaches pytest, not
the VM), with its pid and start time recorded in ``<instance>/qemu.json``: whoever reaps the
instance later kills that pid only while it is still that very process (a pid alone is reused by
the kernel), and only if its command line names the instance directory.

QMP goes through ``qemu.qmp``'s asyncio client, run in an event loop of our own on a thread of
our own: the caller may be inside an event loop of its own (an async test), which a loop run in
the calling thread would clash with, and nothing of ours is left behind after ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pytest_incus import fsutil
from pytest_incus.errors import IncusError
from pytest_incus.ownership import process_start_time

log = logging.getLogger("pytest_incus")

QEMU = "qemu-system-x86_64"
# the PC without the devices a test VM never uses (PS/2 controller, SMBus, HPET: the kernel
# probes each at boot; TSC is the clock); -0.1 to -0.2 s of boot under TCG, measured
MACHINE = "pc,i8042=off,smbus=off,hpet=off"
QBOOT = Path("/usr/share/qemu/qboot.rom")  # boots a kernel much faster than SeaBIOS
KVM_ERROR = "KVM internal error"
# QMP run states of a guest that will never run again by itself (QEMU pauses it and waits)
DEAD_STATES = ("internal-error", "guest-panicked", "io-error", "watchdog")
WATCH_INTERVAL = 0.2  # seconds between two looks of a GuestWatch
RECORD = "qemu.json"
QMP_SOCKET = "qmp.sock"
STDERR_LOG = "qemu.log"
POLL = 0.01
UNIX_PATH_MAX = 107

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

_T = TypeVar("_T")


def _qmp_errors() -> tuple[type[BaseException], ...]:
    """What a failing QMP exchange raises (qemu.qmp is imported late: VM runs only)."""
    from qemu.qmp import QMPError

    return (QMPError, OSError, TimeoutError)


def firmware_args() -> list[str]:
    """QEMU's firmware option: qboot where QEMU ships it, else its default (SeaBIOS)."""
    return ["-bios", str(QBOOT)] if QBOOT.exists() else []


def kvm_error(stderr: str) -> str | None:
    """A one-line summary of the KVM internal error QEMU reported in ``stderr`` (its first
    line and the reason line, "emulation failure", that follows the register dump's extra
    data); None if it reported none."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if KVM_ERROR in line), None)
    if first is None:
        return None
    reason = next(
        (
            line.strip()
            for line in lines[first + 1 :]
            if line.strip() and not line.startswith(("extra data", " "))
        ),
        "",
    )
    return lines[first].strip() + (f" ({reason})" if reason and "=" not in reason else "")


class QmpConnection:
    """A QMP client on an event loop and thread of its own; ``close()`` ends both."""

    def __init__(self, name: str) -> None:
        import asyncio  # late, as qemu.qmp: only runs with VMs pay for importing them

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client = self._run(self._make_client(name), 5.0)

    @staticmethod
    async def _make_client(name: str) -> QMPClient:
        from qemu.qmp import QMPClient

        return QMPClient(name)

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        result: _T = future.result()
        return result

    def connect(self, path: Path, timeout: float) -> None:
        """Connect to QEMU's QMP socket and negotiate."""
        self._run(self._client.connect(str(path)), timeout)

    def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Run one QMP command; its return value."""
        return self._run(self._client.execute(command, arguments or None), timeout)

    def close(self) -> None:
        """Disconnect, stop the loop, join the thread and close the loop."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class QemuProcess:
    """One QEMU process started by this process for an instance directory."""

    def __init__(self, directory: Path, child: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.child = child
        self.qmp: QmpConnection | None = None

    @property
    def pid(self) -> int:
        """QEMU's pid."""
        return self.child.pid

    @classmethod
    def launch(cls, argv: Sequence[str], directory: Path) -> QemuProcess:
        """Start QEMU with ``argv`` (its cwd the instance directory) and record its pid."""
        with open(directory / STDERR_LOG, "wb") as stderr:
            child = subprocess.Popen(
                list(argv),
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        start = process_start_time(child.pid)
        fsutil.write_atomic(directory / RECORD, json.dumps({"pid": child.pid, "start_time": start}))
        return cls(directory, child)

    def alive(self) -> bool:
        """True while QEMU runs."""
        return self.child.poll() is None

    def stderr(self) -> str:
        """What QEMU wrote on stdout and stderr."""
        try:
            return (self.directory / STDERR_LOG).read_text(errors="replace").strip()
        except OSError:
            return ""

    def stop_reason(self) -> str | None:
        """Why the guest can no longer run although QEMU lives on, or None: a KVM internal
        error on QEMU's stderr, or a QMP run state of ``DEAD_STATES``. (A QEMU that exited
        is told by ``alive()``.)"""
        if (error := kvm_error(self.stderr())) is not None:
            return error
        if self.qmp is not None and self.alive():
            try:
                status = self.command("query-status", timeout=5.0).get("status")
            except IncusError:
                return None  # QEMU is going away: alive() tells
            if status in DEAD_STATES:
                return f"the guest stopped: QEMU run state {status!r}"
        return None

    def connect_qmp(self, deadline: float) -> None:
        """Connect to QMP once QEMU has made its socket; IncusError if QEMU dies or past
        ``deadline`` (monotonic)."""
        path = self.directory / QMP_SOCKET
        while not path.exists():
            if not self.alive():
                raise IncusError(f"QEMU exited with code {self.child.returncode}")
            if time.monotonic() > deadline:
                raise IncusError("QEMU made no QMP socket in time")
            time.sleep(POLL)
        qmp = QmpConnection(self.directory.name)
        try:
            qmp.connect(path, max(0.5, deadline - time.monotonic()))
        except _qmp_errors() as exc:
            qmp.close()
            raise IncusError(f"cannot talk QMP to QEMU: {exc!r}", exc=exc) from exc
        self.qmp = qmp

    def command(self, name: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Run a QMP command; IncusError if QMP is not connected or fails."""
        if self.qmp is None:
            raise IncusError(f"QMP {name}: not connected")
        try:
            return self.qmp.execute(name, timeout, **arguments)
        except _qmp_errors() as exc:
            raise IncusError(f"QMP {name} failed: {exc!r}", exc=exc) from exc

    def wait(self, deadline: float) -> bool:
        """Wait until QEMU exits or the monotonic ``deadline``; True if it exited."""
        try:
            self.child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def quit(self, deadline: float) -> bool:
        """Ask QEMU to quit over QMP; True if it exited by ``deadline``."""
        if self.qmp is None:  # not connected yet (a launch cut short): nothing will ask it
            return not self.alive()
        if self.alive():
            with contextlib.suppress(IncusError):
                self.command("quit", timeout=max(0.1, deadline - time.monotonic()))
        return self.wait(deadline)

    def kill(self) -> None:
        """SIGKILL our QEMU (this very child) and wait for it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGKILL)
        self.child.wait()

    def close(self) -> None:
        """Close the QMP connection and forget the pid record (QEMU must be gone)."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        (self.directory / RECORD).unlink(missing_ok=True)


def recorded_pid(directory: Path) -> int | None:
    """The pid of the QEMU recorded in ``directory`` if that very process still runs it."""
    data = fsutil.read_json(directory / RECORD)
    if not isinstance(data, dict):
        return None
    try:
        pid, start = int(data["pid"]), int(data["start_time"])
    except (KeyError, TypeError, ValueError):
        return None
    if process_start_time(pid) != start:
        return None  # gone, or the pid now belongs to another process
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # our QEMU runs in the instance directory, and its socket and disk paths name it
    if b"qemu" not in cmdline or QMP_SOCKET.encode() not in cmdline:
        return None
    try:
        if os.readlink(f"/proc/{pid}/cwd") != str(directory):
            return None
    except OSError:
        return None
    return pid


def kill_recorded(directory: Path, grace: float = 10.0) -> None:
    """Kill the QEMU recorded in ``directory`` (if still that process) and wait for its end."""
    pid = recorded_pid(directory)
    if pid is None:
        return
    start = process_start_time(pid)
    log.info("killing QEMU %d of instance %s", pid, directory.name)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    # not our child (a dead run started it): wait for it to be gone from /proc
    while process_start_time(pid) == start and _state(pid) != "Z":
        if time.monotonic() > deadline:
            log.warning("QEMU %d of %s survived SIGKILL for %ss", pid, directory.name, grace)
            return
        time.sleep(POLL)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def socket_path_ok(path: Path) -> bool:
    """True if ``path`` fits in a unix socket address."""
    return len(os.fsencode(path)) <= UNIX_PATH_MAX


class GuestWatch:
    """Watches a booting guest from a thread of its own, every ``WATCH_INTERVAL`` seconds.

    A guest that stopped for good while QEMU lives on (``QemuProcess.stop_reason``: say a
    KVM internal error, after which QEMU pauses the guest and waits) would otherwise be waited
    for until the boot deadline, since nothing it would answer ever comes. The watch records
    the reason and kills QEMU (our own child, by pid), so every wait on the guest ends at
    once; the booting code then reads ``reason``.
    """

    def __init__(self, process: QemuProcess) -> None:
        self.process = process
        self.reason: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qemu-watch", daemon=True)

    @property
    def kvm_error(self) -> bool:
        """True when the guest stopped with a KVM internal error."""
        return self.reason is not None and KVM_ERROR in self.reason

    def __enter__(self) -> GuestWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_INTERVAL):
            if not self.process.alive():
                return
            reason = self.process.stop_reason()
            if reason is not None:
                self.reason = reason
                log.info("QEMU %d: %s; killing it", self.process.pid, reason)
                with contextlib.suppress(ProcessLookupError):
                    self.process.child.send_signal(signal.SIGKILL)
                return
