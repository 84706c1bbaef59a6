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
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pytest_incus.errors import IncusError
from pytest_incus.runtimes import inside, process
from pytest_incus.runtimes.liblxc import lxc_errors

REPLY_SIZE = 1 << 16
CLOSE_GRACE = 2.0  # seconds for the server to exit once its socket is closed


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


class _Reply:
    """One request's reply channel, as ``process.Pipes.communicate`` waits on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.host_pid: int | None = None
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
            self.host_pid = _pid_of(fd)
            os.close(fd)
        if not data:  # the server ended: the container stopped
            if self.host_pid is None:
                self.error = {"kind": "gone", "errno": 0, "message": "the container stopped"}
            else:  # the command was running: it was killed with its container
                self.exit_code = 128 + signal.SIGKILL
            return True
        message = json.loads(data)
        if "pid" in message:
            return False
        if "error" in message:
            self.error = message["error"]
        else:
            self.exit_code = int(message["exit"])
        return True

    def kill(self) -> None:
        if self.host_pid is not None:
            process.kill_tree(self.host_pid)


class ExecServer:
    """Requests to the exec server inside one container."""

    def __init__(self, container: Any, name: str, env_policy: int) -> None:
        self._container = container
        self._name = name
        self._env_policy = env_policy
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid: int | None = None

    def request(
        self, message: dict[str, Any], data: bytes | None = None, timeout: float | None = None
    ) -> Outcome:
        """Send ``message`` with fresh stdio pipes, feed ``data``, and wait for the outcome
        (killing the command with its descendants at ``timeout``)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, process.Pipes() as pipes:
            try:
                self._send(json.dumps(message).encode(), [theirs.fileno(), *pipes.child_ends])
            finally:
                theirs.close()
            reply = _Reply(ours)
            stdout, stderr, timed_out = pipes.communicate(reply, data, timeout)
        if reply.error and reply.error["kind"] == "gone":
            self.reap()
        return Outcome(reply.exit_code, stdout, stderr, reply.error, timed_out)

    def reap(self) -> bool:
        """Collect the server's exit if it has ended (the container stopped); True if it is
        gone. Call before waiting for the container to end."""
        with self._lock:
            if self._pid is None:
                return True
            try:
                done, _ = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                done = self._pid
            if not done:
                return False
            self._pid = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            return True

    def _send(self, data: bytes, fds: list[int]) -> None:
        for attempt in range(2):
            sock = self._connected()
            try:
                socket.send_fds(sock, [data], fds)
                return
            except (BrokenPipeError, ConnectionResetError):
                # the server ended with its container (a restart): start a new one, once
                self.close()
                if attempt:
                    raise IncusError(
                        f"container {self._name}: its exec server ended at once; "
                        "is the container still running?"
                    ) from None

    def _connected(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                self._sock, self._pid = self._start()
            return self._sock

    def _start(self) -> tuple[socket.socket, int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            with lxc_errors(f"container {self._name}: attaching its exec server"):
                pid = self._container.attach(
                    inside.serve,
                    (theirs.fileno(),),
                    env_policy=self._env_policy,
                    stdin=devnull,
                    stdout=devnull,
                    stderr=devnull,
                )
        finally:
            os.close(devnull)
            theirs.close()
        if pid < 0:
            ours.close()
            raise IncusError(
                f"container {self._name}: liblxc could not attach its exec server; "
                "is the container running?"
            )
        return ours, pid

    def close(self) -> None:
        """Close the server's socket, wait for the server to exit (it does when it sees
        that; past CLOSE_GRACE it is killed) and collect its exit."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        deadline = time.monotonic() + CLOSE_GRACE
        while not self.reap():
            if time.monotonic() > deadline:
                with self._lock:
                    pid = self._pid
                if pid is not None:
                    process.kill_tree(pid)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                    self._pid = None
                return
            time.sleep(0.001)
