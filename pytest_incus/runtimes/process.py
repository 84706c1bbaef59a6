"""Talking to a child process over pipes with a deadline, and killing what it started.

Used for the children that liblxc attach forks into a container: we feed stdin, collect stdout
and stderr and a status pipe, and notice the child's exit through a pidfd, so a daemon that
keeps the output pipes open cannot make us hang. Past the deadline the child, its process group
and every descendant are killed, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

_CHUNK = 1 << 16
KILL_ROUNDS = 50


@dataclass
class Outcome:
    """What a child did."""

    exit_code: int = -1
    stdout: bytes = b""
    stderr: bytes = b""
    status: dict[str, Any] | None = None
    timed_out: bool = False
    _chunks: dict[int, list[bytes]] = field(default_factory=dict)


def _process_table() -> dict[int, tuple[int, int]]:
    """Every process on the host: pid -> (parent pid, process group), in one pass of /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name may hold spaces and parentheses: split after its last ')'
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(entry)] = (int(fields[1]), int(fields[3]))
            except (OSError, IndexError, ValueError):
                continue
    return table


def cmdlines() -> Iterator[tuple[int, str]]:
    """(pid, command line with its arguments joined by spaces) of every host process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            yield int(entry), raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every live descendant of ``pid`` (host pids)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in (table or _process_table()).items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and all its descendants, until none is left."""
    for _ in range(KILL_ROUNDS):
        table = _process_table()
        group = {member for member, (_, pgid) in table.items() if pgid == pid}
        targets = set(descendants(pid, table)) | group
        if not targets:
            break
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Pipes:
    """The stdin, stdout, stderr and status pipes of one child."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()
        self.status_r, self.status_w = os.pipe()
        self._open = {
            self.stdin_r,
            self.stdin_w,
            self.stdout_r,
            self.stdout_w,
            self.stderr_r,
            self.stderr_w,
            self.status_r,
            self.status_w,
        }

    def __enter__(self) -> Pipes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for fd in self._open:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def communicate(self, pid: int, data: bytes | None, timeout: float | None) -> Outcome:
        """Feed ``data``, collect output until ``pid`` exits (or is killed at ``timeout``)."""
        for fd in (self.stdin_r, self.stdout_w, self.stderr_w, self.status_w):
            self._close(fd)  # the child holds its own copies
        outcome = Outcome()
        deadline = None if timeout is None else time.monotonic() + timeout
        pidfd = os.pidfd_open(pid)
        sel = selectors.DefaultSelector()
        try:
            readers = (self.stdout_r, self.stderr_r, self.status_r)
            for fd in readers:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
                outcome._chunks[fd] = []
            sel.register(pidfd, selectors.EVENT_READ)
            pending = memoryview(data or b"")
            if pending:
                os.set_blocking(self.stdin_w, False)
                sel.register(self.stdin_w, selectors.EVENT_WRITE)
            else:
                self._close(self.stdin_w)
            exited = False
            while not exited:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = sel.select(wait)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    outcome.timed_out = True
                    kill_tree(pid)
                    break
                for key, _ in events:
                    fd = int(key.fd)
                    if fd == pidfd:
                        exited = True
                    elif fd == self.stdin_w:
                        try:
                            pending = pending[os.write(fd, pending) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(fd)
                            self._close(fd)
                    elif not self._read(fd, outcome):
                        sel.unregister(fd)
            # the child is gone: take what it wrote, without waiting on pipes that a
            # background process it started may still hold open
            for fd in readers:
                self._read_available(fd, outcome)
            _, status = os.waitpid(pid, 0)
        finally:
            sel.close()
            os.close(pidfd)
        if outcome.timed_out:
            # a killed child's descendants are gone too: their output is complete now
            for fd in readers:
                self._read_available(fd, outcome)
        outcome.stdout = b"".join(outcome._chunks[self.stdout_r])
        outcome.stderr = b"".join(outcome._chunks[self.stderr_r])
        raw_status = b"".join(outcome._chunks[self.status_r])
        outcome.status = json.loads(raw_status) if raw_status else None
        outcome.exit_code = (
            128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        )
        return outcome

    def _read(self, fd: int, outcome: Outcome) -> bool:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return True
        if chunk:
            outcome._chunks[fd].append(chunk)
            return True
        return False

    def _read_available(self, fd: int, outcome: Outcome) -> None:
        while fd in self._open:
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError:  # EAGAIN: nothing more for now
                return
            if not chunk:
                return
            outcome._chunks[fd].append(chunk)
