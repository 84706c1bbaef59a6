"""Talking to a child process over pipes with a deadline, and killing what it started.

Used for the commands run inside containers: we feed stdin, collect stdout and stderr, and
notice the child's end through its own channel, so a daemon that keeps the output pipes open
cannot make us hang. Past the deadline the child, its process group and every descendant are
killed, by pid.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol

_CHUNK = 1 << 16
KILL_ROUNDS = 50


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


class Child(Protocol):
    """What ``Pipes.communicate`` needs of the process at the other end of the pipes."""

    def fileno(self) -> int:
        """An fd that becomes readable when there is news of the child."""
        ...

    def news(self) -> bool:
        """Take the news; True once the child has ended (its outcome is then known)."""
        ...

    def kill(self) -> None:
        """Kill the child and everything it started."""
        ...


class Pipes:
    """The stdin, stdout and stderr pipes of one child."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()
        self._open = {
            self.stdin_r,
            self.stdin_w,
            self.stdout_r,
            self.stdout_w,
            self.stderr_r,
            self.stderr_w,
        }

    @property
    def child_ends(self) -> list[int]:
        """The ends the child uses: stdin's read end, stdout's and stderr's write ends."""
        return [self.stdin_r, self.stdout_w, self.stderr_w]

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

    def communicate(
        self, child: Child, data: bytes | None, timeout: float | None
    ) -> tuple[bytes, bytes, bool]:
        """Feed ``data`` and collect output until ``child`` ends, killing it at ``timeout``.

        Returns stdout, stderr and whether it was killed at the timeout. The child's end is
        noticed through ``child``, not through end of file: a daemon it started may hold the
        output pipes open forever."""
        for fd in self.child_ends:
            self._close(fd)  # the child holds its own copies
        chunks: dict[int, list[bytes]] = {self.stdout_r: [], self.stderr_r: []}
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        sel = selectors.DefaultSelector()
        try:
            for fd in chunks:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            sel.register(child.fileno(), selectors.EVENT_READ)
            pending = memoryview(data or b"")
            if pending:
                os.set_blocking(self.stdin_w, False)
                sel.register(self.stdin_w, selectors.EVENT_WRITE)
            else:
                self._close(self.stdin_w)
            ended = False
            while not ended:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = sel.select(wait)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    timed_out, deadline = True, None
                    child.kill()  # then wait for the news of its end, as for any other
                for key, _ in events:
                    fd = int(key.fd)
                    if fd == child.fileno():
                        ended = child.news()
                    elif fd == self.stdin_w:
                        try:
                            pending = pending[os.write(fd, pending) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(fd)
                            self._close(fd)
                    elif not self._read(fd, chunks):
                        sel.unregister(fd)
        finally:
            sel.close()
        # the child is gone: take what it wrote, without waiting on pipes that a background
        # process it started may still hold open
        for fd in chunks:
            self._read_available(fd, chunks)
        return b"".join(chunks[self.stdout_r]), b"".join(chunks[self.stderr_r]), timed_out

    def _read(self, fd: int, chunks: dict[int, list[bytes]]) -> bool:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return True
        if chunk:
            chunks[fd].append(chunk)
            return True
        return False

    def _read_available(self, fd: int, chunks: dict[int, list[bytes]]) -> None:
        while fd in self._open:
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError:  # EAGAIN: nothing more for now
                return
            if not chunk:
                return
            chunks[fd].append(chunk)
