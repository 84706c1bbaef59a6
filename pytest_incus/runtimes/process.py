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
from collections.abc import Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Protocol

_CHUNK = 1 << 16
KILL_DEADLINE = 2.0  # seconds kill_tree goes on stopping (then killing) what keeps appearing
KILL_POLL = 0.005
NEWS_GRACE = 1.0  # seconds to wait for news of a child's end once it is killed
MUTE_POLL = 0.5  # seconds between looks at whether news of the child can still come
PF_EXITING = 0x4  # in /proc/<pid>/stat's flags: the process has begun to exit
_DEAD = ("Z", "X")  # zombies and the dying: nothing to signal, and they fork no more


class Entry(NamedTuple):
    """One process of the host's process table, as /proc/<pid>/stat says."""

    parent: int
    group: int
    session: int
    state: str
    flags: int


def stat(pid: int) -> Entry | None:
    """What /proc/<pid>/stat says of process ``pid``; None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name may hold spaces and parentheses: split after its last ')'
            fields = f.read().rsplit(")", 1)[1].split()
        return Entry(int(fields[1]), int(fields[2]), int(fields[3]), fields[0], int(fields[6]))
    except (OSError, IndexError, ValueError):
        return None


def own_child(pid: int) -> bool:
    """True if ``pid`` is a child of this process (not yet collected)."""
    entry = stat(pid)
    return pid > 0 and entry is not None and entry.parent == os.getpid()


def _process_table() -> dict[int, Entry]:
    """Every process on the host, in one pass of /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := stat(int(entry))) is not None:
            table[int(entry)] = found
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


def descendants(pid: int, table: dict[int, Entry] | None = None) -> list[int]:
    """Every live descendant of ``pid`` (host pids)."""
    children: dict[int, list[int]] = {}
    for child, entry in (table or _process_table()).items():
        children.setdefault(entry.parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def pid_namespace(pid: int) -> int | None:
    """The inode of the pid namespace process ``pid`` lives in (None once it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def holders(inodes: Collection[int], namespace: int) -> list[int]:
    """The processes of pid namespace ``namespace`` that hold an fd of a pipe of ``inodes``."""
    links = {f"pipe:[{inode}]" for inode in inodes}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(int(entry)) == namespace:
            with contextlib.suppress(OSError):
                fds = os.listdir(f"/proc/{entry}/fd")
                if any(_link(f"/proc/{entry}/fd/{fd}") in links for fd in fds):
                    found.append(int(entry))
    return found


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _tree(pid: int, namespace: int | None, spare: Collection[int]) -> set[int]:
    """``pid``, its descendants and the members of its process group and of its session that
    can still be signalled: in ``namespace`` if given, never those in ``spare``."""
    table = _process_table()
    root = table.get(pid)
    live = root is not None and root.state not in _DEAD
    if namespace is not None and live and pid_namespace(pid) != namespace:
        return set()  # a live process of another namespace: its tree is not ours
    found = {member for member, e in table.items() if pid in (e.group, e.session)}
    if root is not None:
        found |= {pid, *descendants(pid, table)}
    return {
        member
        for member in found
        if member in table
        and table[member].state not in _DEAD
        and member not in spare
        and (namespace is None or pid_namespace(member) == namespace)
    }


def _signal_all(pids: Collection[int], sig: signal.Signals) -> None:
    for target in pids:
        if target <= 0:  # kill(0) or kill(-1): a whole process group, or every process
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def kill_tree(pid: int, *, namespace: int | None = None, spare: Collection[int] = ()) -> None:
    """SIGKILL ``pid``, its process group, its session and all its descendants, until none
    is left (or KILL_DEADLINE has passed).

    The tree is frozen first: every member is sent SIGSTOP until no new one turns up. A
    stopped process forks no more, and its children stay its descendants instead of going to
    an init when it dies, so a tree that keeps forking cannot outrun us. ``namespace`` (a
    pid namespace's inode) limits it to the processes of one container, ``spare`` never
    touches those pids (a container's init)."""
    # each phase has a deadline of its own, and the kill at least one pass: on a loaded host a
    # listing of a thousand-process tree takes long, and a stopped tree that is never killed
    # would stay, stopped, until its container ends
    deadline = time.monotonic() + KILL_DEADLINE
    stopped: set[int] = set()
    while new := _tree(pid, namespace, spare) - stopped:
        _signal_all(new, signal.SIGSTOP)
        stopped |= new
        if time.monotonic() > deadline:
            break
    # signalled afresh from a new listing, never from ``stopped``: a pid there may have been
    # killed by someone else, reaped, and reused since
    deadline = time.monotonic() + KILL_DEADLINE
    while targets := _tree(pid, namespace, spare):
        _signal_all(targets, signal.SIGKILL)
        if time.monotonic() > deadline:
            break
        time.sleep(KILL_POLL)


class Child(Protocol):
    """What ``Pipes.communicate`` needs of the process at the other end of the pipes."""

    def fileno(self) -> int:
        """An fd that becomes readable when there is news of the child."""
        ...

    def news(self) -> bool:
        """Take the news; True once the child has ended (its outcome is then known)."""
        ...

    def kill(self) -> None:
        """Kill the child and everything it started (at its timeout)."""
        ...

    def mute(self) -> bool:
        """True if no news can come any more (whoever would bring it is stopped or gone)."""
        ...

    def abandon(self) -> None:
        """Stop waiting for news that will not come: kill whoever would have brought it, so
        that it cannot bring it to anyone else either."""
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
        output pipes open forever. Whatever the child does, this returns within ``timeout``
        and a bounded grace: past the timeout the child is killed and its news awaited for
        NEWS_GRACE at most, and news that cannot come (``child.mute()``) is never awaited."""
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
                # wake at the deadline, and now and then to see that news can still come
                wait = MUTE_POLL
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                events = sel.select(wait)
                # the clock is read whatever came: a command that writes without pause must
                # time out too
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    if timed_out:  # killed, and no news since: nobody will bring it
                        child.abandon()
                        break
                    timed_out, deadline = True, now + NEWS_GRACE
                    child.kill()  # then wait for the news of its end, as for any other
                # news that cannot come is awaited no longer: at once when killed at the
                # timeout, else (no timeout) when next looked at
                if (deadline is None or timed_out) and not events and child.mute():
                    child.abandon()
                    break
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
