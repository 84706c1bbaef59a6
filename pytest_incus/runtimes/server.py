"""The host side of the exec server that runs inside each container (``inside.serve``).

The server is attached once, at the first request, and lives as long as the container runs.
It is our child (liblxc makes the attached process a child of the caller): its exit must be
collected before anything waits for the container to end, since a zombie in the container's
pid namespace keeps the container from ending (``reap``).
Each request gets its own socket pair for the reply and its own stdio pipes, all passed to the
server as file descriptors, so requests from several threads never share a channel. A server
that is gone (the container stopped or restarted) is started again on the next request.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from pytest_incus.errors import IncusError
from pytest_incus.runtimes import inside, process
from pytest_incus.runtimes.liblxc import lxc_errors

REPLY_SIZE = 1 << 16
CLOSE_GRACE = 2.0  # seconds for the server to exit once its socket is closed
COLLECT_GRACE = 1.0  # seconds for a server we killed to become collectable
COLLECT_POLL = 0.001
ATTACH_RETRY = 0.005  # seconds between attaches refused for the process limit
# How long an attach refused for the process limit is tried again (never past the exec's own
# timeout, which the attach's time counts against). A container at its limit frees processes
# as its init reaps those killed at a timeout, or as background processes end: what is left of
# a fork bomb whose shell gave up let an attach through after 3 to 8 s, on a loaded 2-core host.
ATTACH_PATIENCE = 10.0
INIT_END_GRACE = 0.5  # seconds for an app's init to end after the last other process
_STOPPED = ("T", "t")


@dataclass(frozen=True)
class Outcome:
    """What a request did: the command's exit code and output, or the server's error."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    error: dict[str, Any] | None
    timed_out: bool


def _pid_of(pidfd: int) -> int | None:
    """The host pid of the process a pidfd refers to (its fdinfo, read through our /proc)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    return None


def _readable(fd: int, wait: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], wait)[0])


@dataclass(eq=False)
class _Attached:
    """One exec server process (our child, inside the container) and the container's init
    of the time it was attached: its pid, a pidfd of it and its pid namespace."""

    sock: socket.socket
    pid: int
    init_pid: int
    init_pidfd: int
    pidns: int
    status: int | None = None  # its wait status, once collected
    killed_because: str | None = None  # why the host killed it, if it did

    def __post_init__(self) -> None:
        # closed with the last reference, never before: a request may still ask of the init
        # after the server was collected, and a closed fd's number may by then be another's
        weakref.finalize(self, os.close, self.init_pidfd)

    def silent(self) -> bool:
        """True if it can answer no more: stopped (SIGSTOP), or ended."""
        found = process.stat(self.pid)
        return self.status is not None or found is None or found.state in (*_STOPPED, "Z", "X")

    def container_ending(self) -> bool:
        """True if the container's init has ended or begun to: the container is stopping,
        and it kills every other process of the container, this server among them, before
        it ends itself."""
        if _readable(self.init_pidfd):
            return True
        found = process.stat(self.init_pid)
        return found is None or found.state in ("Z", "X") or bool(found.flags & process.PF_EXITING)

    def death(self) -> str:
        """How the server ended, as a user can act on it."""
        if self.killed_because:
            return f"was killed by the host: {self.killed_because}"
        if self.status is not None and os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
            why = (
                "by the command itself (kill -9 -1, say) or by the kernel's out-of-memory killer"
                if sig == signal.SIGKILL
                else "by the command itself (kill -1, say) or by the container's shutdown"
            )
            return f"was killed by {name}, {why}"
        code = "unknown" if self.status is None else os.waitstatus_to_exitcode(self.status)
        return f"ended (exit status {code})"


class _Reply:
    """One request's reply channel, as ``process.Pipes.communicate`` waits on it."""

    def __init__(
        self, sock: socket.socket, server: ExecServer, attached: _Attached, pipes: list[int]
    ) -> None:
        self.sock = sock
        self.pipes = [os.fstat(fd).st_ino for fd in pipes]  # the command's stdout and stderr
        self.server = server
        self.attached = attached
        self.pidfd: int | None = None
        self.host_pid: int | None = None
        self.killed = False  # at the timeout
        self.spawning = False  # the command was about to start: it may have run
        self.exit_code = -1
        self.error: dict[str, Any] | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def news(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, REPLY_SIZE, 1)
        except ConnectionResetError:
            data, fds = b"", []
        for fd in fds:
            if self.pidfd is None:  # kept: the command's pid stays ours to kill while open
                self.pidfd, self.host_pid = fd, _pid_of(fd)
            else:
                os.close(fd)
        if not data:  # the server ended
            self._server_ended()
            return True
        message = json.loads(data)
        if "spawning" in message:
            self.spawning = True
            return False
        if "pid" in message:
            return False
        if "error" in message:
            self.error = message["error"]
        else:
            self.exit_code = int(message["exit"])
        return True

    def _server_ended(self) -> None:
        """The server ended with no word of the command's end: with its container (the
        command was killed with it), or alone, and then the command's end is unknown."""
        self.server.collect(self.attached, COLLECT_GRACE)
        if self.killed:  # at the timeout: killed anyway
            self.exit_code = 128 + signal.SIGKILL
            return
        ending = self.attached.container_ending()
        if not ending:
            self._kill_command()
            # an app's init ends once its program and every other process are gone: the
            # command that killed them all (kill -9 -1) was the last one
            ending = _readable(self.attached.init_pidfd, INIT_END_GRACE)
        if not ending:
            self._lost(self.attached.death())
        elif not self.spawning:
            self.error = {"kind": "gone", "errno": 0, "message": "the container stopped"}
        else:  # the command was running: it was killed with its container
            self.exit_code = 128 + signal.SIGKILL

    def _lost(self, how: str) -> None:
        self._kill_command()
        what = "the command ran" if self.spawning else "the request was on its way"
        self.error = {
            "kind": "server",
            "errno": 0,
            "message": (
                f"the exec server inside the container {how}, while {what}: the command's "
                "result is unknown, and what it started has been killed. The next exec "
                "starts a new exec server; if the container ran out of memory, give it more "
                "(memory=)"
            ),
        }

    def _kill_command(self) -> None:
        roots = [self.host_pid] if self.host_pid is not None else []
        if not roots:
            # the server ended before it could send the command's pid (the command may kill
            # it at once): the command and what it started hold the request's pipes
            holding = process.holders(self.pipes, self.attached.pidns)
            holding = [pid for pid in holding if pid != self.attached.pid]
            sessions = {entry.session for pid in holding if (entry := process.stat(pid))}
            roots = [*holding, *sessions]
        spare = {self.attached.init_pid, self.attached.pid}  # the server: see abandon()
        for root in roots:
            process.kill_tree(root, namespace=self.attached.pidns, spare=spare)

    def kill(self) -> None:
        self.killed = True
        self._kill_command()

    def mute(self) -> bool:
        return self.attached.silent()

    def abandon(self) -> None:
        stopped = process.stat(self.attached.pid)
        how = "stopped (SIGSTOP)" if stopped and stopped.state in _STOPPED else "silent"
        self.server.kill(self.attached, f"it was {how} and could no longer answer")
        if self.killed:
            self.exit_code = 128 + signal.SIGKILL
        else:
            self._lost(self.attached.death())

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class ExecServer:
    """Requests to the exec server inside one container."""

    def __init__(
        self, container: Any, name: str, env_policy: int, *, reap_orphans: bool = False
    ) -> None:
        self._container = container
        self._name = name
        self._env_policy = env_policy
        self._reap_orphans = reap_orphans  # see inside._Server._become_subreaper
        self._lock = threading.Lock()
        self._attached: _Attached | None = None
        self._dying: list[_Attached] = []  # killed, not yet collected

    def request(
        self, message: dict[str, Any], data: bytes | None = None, timeout: float | None = None
    ) -> Outcome:
        """Send ``message`` with fresh stdio pipes, feed ``data``, and wait for the outcome
        (killing the command with its descendants at ``timeout``, and the server too if it
        can no longer answer)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, process.Pipes() as pipes:
            try:
                attached = self._send(
                    json.dumps(message).encode(), [theirs.fileno(), *pipes.child_ends], deadline
                )
            finally:
                theirs.close()
            reply = _Reply(ours, self, attached, [pipes.stdout_r, pipes.stderr_r])
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                stdout, stderr, timed_out = pipes.communicate(reply, data, left)
            finally:
                reply.close()
        return Outcome(reply.exit_code, stdout, stderr, reply.error, timed_out)

    def reap(self) -> bool:
        """Collect the server's exit if it has ended (the container stopped); True if it is
        gone. Call before waiting for the container to end."""
        with self._lock:
            servers = [*self._dying, *([self._attached] if self._attached else [])]
        return all([self.collect(attached, 0) for attached in servers])

    def collect(self, attached: _Attached, wait: float) -> bool:
        """Collect the exit of server ``attached`` if it ends within ``wait`` seconds; True
        once collected. A collected server is forgotten: the next request starts a new one."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                if attached.status is None:
                    try:
                        done, status = os.waitpid(attached.pid, os.WNOHANG)
                    except ChildProcessError:
                        done, status = attached.pid, 0
                    if done:
                        attached.status = status
                if attached.status is not None:
                    self._forget(attached)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(COLLECT_POLL)

    def _forget(self, attached: _Attached) -> None:
        if self._attached is attached:
            self._attached = None
        if attached in self._dying:
            self._dying.remove(attached)
        attached.sock.close()

    def kill(self, attached: _Attached, because: str) -> None:
        """SIGKILL server ``attached`` (it is our child, not yet collected: its pid is still
        its own) and collect it; the next request starts a new one."""
        with self._lock:
            if attached.status is not None:
                return
            attached.killed_because = because
            with contextlib.suppress(ProcessLookupError):
                os.kill(attached.pid, signal.SIGKILL)
            if self._attached is attached:  # no new request goes to it
                self._attached = None
                self._dying.append(attached)
        self.collect(attached, COLLECT_GRACE)

    def _send(self, data: bytes, fds: list[int], deadline: float | None) -> _Attached:
        """Send ``data`` and ``fds`` to the server, attaching one (until the exec's
        ``deadline``, if any) when there is none."""
        for attempt in range(3):
            attached = self._connected(deadline)
            if attached.silent():
                # stopped (or ended) since the last request: it would never answer
                self.kill(attached, "it had been stopped (SIGSTOP) since the last request")
                continue
            try:
                socket.send_fds(attached.sock, [data], fds)
                return attached
            except OSError as exc:
                if not isinstance(exc, (BrokenPipeError, ConnectionResetError)) and (
                    attached.status is None
                ):
                    raise
                # the server ended with its container (a restart), or was killed since the
                # last request: start a new one
                self.close()
                if attempt:
                    raise IncusError(
                        f"container {self._name}: its exec server ended at once; "
                        "is the container still running?"
                    ) from None
        raise IncusError(
            f"container {self._name}: each new exec server was stopped at once; "
            "is something in the container stopping every process (kill -STOP -1)?"
        )

    def _connected(self, deadline: float | None) -> _Attached:
        with self._lock:
            if self._attached is None:
                self._attached = self._start(deadline)
            return self._attached

    def _start(self, until: float | None) -> _Attached:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            # a container at its process limit (what a fork bomb left running) refuses the
            # attach's fork now and then: try again while it runs, as the server does a spawn
            deadline = time.monotonic() + ATTACH_PATIENCE
            if until is not None:
                deadline = min(deadline, until)
            while True:
                with lxc_errors(f"container {self._name}: attaching its exec server"):
                    pid = self._container.attach(
                        inside.serve,
                        (theirs.fileno(), self._reap_orphans),
                        env_policy=self._env_policy,
                        stdin=devnull,
                        stdout=devnull,
                        stderr=devnull,
                    )
                if pid >= 0 or time.monotonic() > deadline or not self._container.running:
                    break
                time.sleep(ATTACH_RETRY)
        finally:
            os.close(devnull)
            theirs.close()
        # the attach's pid is signalled below and at every kill: it must be our own child.
        # kill(0) would end this whole process group (the test run), and liblxc's attach into
        # a container whose init is dying has been seen to end the run that way
        if pid <= 0 or not process.own_child(pid):
            ours.close()
            raise IncusError(
                f"container {self._name}: liblxc could not attach its exec server; "
                "is the container running?"
            )
        try:
            with lxc_errors(f"container {self._name}: reading its init's pid"):
                init_pid = int(self._container.init_pid)
            init_pidfd = os.pidfd_open(init_pid)
            pidns = process.pid_namespace(init_pid)
            if pidns is None:
                os.close(init_pidfd)
                raise ProcessLookupError(init_pid)
        except (OSError, ValueError, IncusError) as exc:
            # the container ended while its server was attached
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            ours.close()
            raise IncusError(
                f"container {self._name}: its init is gone; is the container running?", exc=exc
            ) from exc
        return _Attached(ours, pid, init_pid, init_pidfd, pidns)

    def close(self) -> None:
        """Close the server's socket, wait for the server to exit (it does when it sees
        that; past CLOSE_GRACE, or at once if it is stopped, it is killed) and collect its exit."""
        with self._lock:
            attached, self._attached = self._attached, None
            if attached is not None:
                self._dying.append(attached)
                attached.sock.close()
        if attached is not None:
            if attached.silent():  # stopped: it would not see the closed socket in time
                self.kill(attached, "it was stopped (SIGSTOP) when it was closed")
            elif not self.collect(attached, CLOSE_GRACE):
                self.kill(attached, "it did not exit when its socket was closed")
        for dying in list(self._dying):
            self.collect(dying, COLLECT_GRACE)
