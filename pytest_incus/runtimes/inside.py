"""Code that runs INSIDE a container, in processes that liblxc attach forks into it.

A process attached to a container has entered all of its namespaces, so its ``/`` is the
container's root: every path it opens, and every symlink on the way, resolves inside the
container, never on the host. Two entry points run there:

- ``serve``: the exec server, attached once per container (``server.py`` is its host side).
  It spawns commands and runs file operations on request, over a socket, with the stdio pipes
  of each request passed as file descriptors. One attach per container instead of one per
  command: attaching forks the whole calling process, which costs far more than a command.
- ``run_command``: one command in place of the attached process, for the interactive shell
  (it needs the terminal as its controlling tty).

Both end their process themselves (exec or ``os._exit``); they never return into the forked
copy of pytest. Everything they use is imported at the top of this module: once attached, an
import would search the container's filesystem. The user lookup and the file operations are the
guest agent's own (``guest_agent``, standard library only), so they mean the same in a VM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import hashlib  # noqa: F401  (used lazily by guest_agent.files: imported before attaching)
import io  # noqa: F401  (the same)
import json
import os
import selectors
import shutil  # noqa: F401  (the same)
import signal
import socket
import subprocess
import tarfile  # noqa: F401  (the same)
import time
from collections.abc import Callable
from typing import Any, NoReturn

from guest_agent import files
from guest_agent.errors import CommandError
from guest_agent.execute import lookup_user, not_runnable, working_dir

MAX_FDS = 4  # per request: the reply socket and up to three stdio pipes
PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: once attached, no library is found
MAX_REQUEST = 1 << 20
_CHUNK = 1 << 16


def _clean_process(keep: int) -> None:
    """Give this process what a fresh one has, not what the forked pytest had: no fds but
    0, 1, 2 and ``keep`` (we hold copies of all of the caller's fds, the write end of our own
    stdin and other instances' pipes among them), default signal dispositions (Python ignores
    SIGPIPE, and ``yes | head`` would then never end) and an empty signal mask."""
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    _default_signals()


def _default_signals() -> None:
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _neuter_inherited_fds(keep: int) -> None:
    """For a process that goes on running the forked copy of pytest: point every inherited fd
    but 0, 1, 2 and ``keep`` at /dev/null instead of closing it. The copied Python objects that
    own those fds (files, sockets) still exist, and one that is finalized later closes its fd
    number: closed now, that number could by then belong to a pipe of ours."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in (keep, null):
            with contextlib.suppress(OSError):  # the listing's own fd, gone by now
                os.dup2(null, fd)
    os.close(null)


def _fail(status_fd: int, message: str) -> NoReturn:
    try:
        os.write(status_fd, json.dumps({"kind": "setup", "message": message}).encode())
    finally:
        os._exit(1)


def run_command(
    payload: tuple[list[str], dict[str, str], str | None, str | int | None, int],
) -> int:
    """Become the user, enter the directory, and exec the command in a new session. Errors
    before exec go to ``status_fd`` (close-on-exec, so a successful exec leaves it empty)."""
    argv, env, cwd, user, status_fd = payload
    try:
        _clean_process(status_fd)
        os.setsid()
        who = lookup_user(user)
        workdir = working_dir(who, cwd)
        os.setgroups(who.groups)
        os.setgid(who.gid)
        os.setuid(who.uid)
        os.chdir(workdir)
    except CommandError as exc:
        _fail(status_fd, str(exc))
    except BaseException as exc:
        _fail(status_fd, f"{type(exc).__name__}: {exc}")
    try:
        os.execvpe(argv[0], argv, who.environment(env))
    except OSError as exc:
        code, message = not_runnable(argv[0], exc)
        os.write(2, message)
        os._exit(code)
    os._exit(126)


# -- file operations (the guest agent's, so they mean the same in containers and VMs) -------


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def op_read(src: int, dst: int, path: str) -> None:
    """Write the content of ``path`` to ``dst``."""
    _write_all(dst, files.read_bytes(path))


def op_write(src: int, dst: int, path: str, mode: int) -> None:
    """Replace ``path`` with the data from ``src``, owned by root, parents created."""
    files.write_bytes(path, _read_all(src), mode)


def op_stat(src: int, dst: int, path: str) -> None:
    """Write {lstat, stat} of ``path`` as JSON (stat null for a dangling link)."""
    _write_all(dst, json.dumps(files.stat_pair(path)).encode())


def op_sha256(src: int, dst: int, path: str) -> None:
    """Write the hex sha256 of the file at ``path``."""
    _write_all(dst, files.sha256_hex(path).encode())


def op_put(src: int, dst: int, dest: str, is_tree: bool) -> None:
    """Unpack the tar from ``src`` at ``dest`` (see ``guest_agent.files.unpack``)."""
    with os.fdopen(src, "rb", closefd=False) as stream:
        files.unpack(stream, dest, is_tree)


def op_get(src: int, dst: int, path: str) -> None:
    """Write a tar of ``path`` to ``dst`` (see ``guest_agent.files.pack``)."""
    with os.fdopen(dst, "wb", closefd=False) as stream:
        files.pack(path, stream)


def op_remove(src: int, dst: int, path: str) -> None:
    """Remove ``path`` (a tree too); nothing if it does not exist."""
    files.remove_path(path)


OPERATIONS: dict[str, Callable[..., None]] = {
    "read": op_read,
    "write": op_write,
    "stat": op_stat,
    "sha256": op_sha256,
    "put": op_put,
    "get": op_get,
    "remove": op_remove,
}


# -- the exec server ------------------------------------------------------------------------
#
# Requests arrive on the server's socket (SOCK_SEQPACKET: one message each) as JSON, with file
# descriptors: first a socket for the reply, then the request's stdio pipes. Replies on that
# socket: for "exec", {"spawning": true} just before the command is spawned (it may stop the
# container, or kill this server, before the next message), {"pid": true} with a pidfd of the
# command (the host reads its host pid from the pidfd and can kill its tree at a timeout),
# then {"exit": code} when it ends; for a file operation, {"exit": 0} when done. Errors:
# {"error": {"kind", "errno", "message"}}.


def _send(reply: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    with contextlib.suppress(OSError):  # the host gave up on this request: nothing to tell
        if fds:
            socket.send_fds(reply, [data], fds)
        else:
            reply.send(data)


FORK_PATIENCE = 2.0  # seconds a spawn is retried while the container is at its process limit
FORK_RETRY = 0.002


def _spawn(argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen``, retried for FORK_PATIENCE while the kernel refuses a new process
    (EAGAIN): a container at its process limit (a build at its peak, what a fork bomb left
    running) frees a slot now and then, and the command should get it rather than fail."""
    deadline = time.monotonic() + FORK_PATIENCE
    while True:
        try:
            return subprocess.Popen(argv, **options)
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise
        time.sleep(FORK_RETRY)


def _error(kind: str, message: str, err: int = 0, **details: Any) -> dict[str, Any]:
    return {"error": {"kind": kind, "errno": err, "message": message, **details}}


class _Server:
    """Spawns commands and runs file operations inside, until the host closes the socket."""

    def __init__(self, sock: socket.socket, reap_orphans: bool) -> None:
        self.sock = sock
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.running: dict[int, tuple[subprocess.Popen[bytes], socket.socket]] = {}
        self.wakeup: int | None = None
        if reap_orphans:
            self._become_subreaper()

    def _become_subreaper(self) -> None:
        """Adopt what our commands leave behind (their orphans) and collect each as it ends,
        for an init that collects them late (busybox init: once a second, so a stream of
        background commands keeps a crowd of zombies, which count against a pids limit)."""
        if _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return  # then the container's init collects them, as before
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, _wake)  # a handler, so that SIGCHLD is delivered
        signal.set_wakeup_fd(write_end)
        self.selector.register(read_end, selectors.EVENT_READ)
        self.wakeup = read_end

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.sock:
                    if not self._receive():
                        return
                elif key.fd == self.wakeup:
                    self._reap_orphans()
                else:
                    self._finished(int(key.fd))

    def _reap_orphans(self) -> None:
        """Collect our ended children that are not commands (whose ends ``_finished``
        reports): the orphans we adopted."""
        assert self.wakeup is not None
        with contextlib.suppress(OSError):  # EAGAIN: drained
            while os.read(self.wakeup, 512):
                pass
        me = os.getpid()
        commands = {proc.pid for proc, _ in self.running.values()}
        for entry in os.listdir("/proc"):  # the container's: our pid namespace's pids
            if not entry.isdigit() or int(entry) in commands:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry), os.WNOHANG)

    def _receive(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_REQUEST, MAX_FDS)
        except InterruptedError:
            return True
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        if not fds:
            return True
        reply = socket.socket(fileno=fds[0])
        stdio = fds[1:]
        try:
            request = json.loads(data)
            if request["op"] == "exec":
                self._exec(request, reply, stdio)
            else:
                self._operation(request, reply, stdio)
        except Exception as exc:
            _send(reply, _error("error", f"{type(exc).__name__}: {exc}"))
            reply.close()
        finally:
            for fd in stdio:
                os.close(fd)
        return True

    def _exec(self, request: dict[str, Any], reply: socket.socket, stdio: list[int]) -> None:
        argv = request["argv"]
        try:
            who = lookup_user(request["user"])
            workdir = working_dir(who, request["cwd"])
        except CommandError as exc:
            details = exc.details()
            _send(reply, _error("setup", str(exc), details.pop("errno", 0), **details))
            reply.close()
            return
        # as root with no other groups, spawn without switching ids: subprocess then uses
        # vfork, which does not copy this (forked pytest's) address space
        switch = who.uid != 0 or who.gid != 0 or who.groups != [0]
        _send(reply, {"spawning": True})
        try:
            proc = _spawn(
                argv,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                cwd=workdir,
                env=who.environment(request["env"]),
                start_new_session=True,
                user=who.uid if switch else None,
                group=who.gid if switch else None,
                extra_groups=who.groups if switch else None,
            )
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # no new process allowed: the host says why
                _send(reply, _error("fork", exc.strerror or str(exc), exc.errno))
                reply.close()
                return
            code, message = not_runnable(argv[0], exc)
            with contextlib.suppress(OSError):
                os.write(stdio[2], message)
            _send(reply, {"exit": code})
            reply.close()
            return
        pidfd = os.pidfd_open(proc.pid)
        _send(reply, {"pid": True}, [pidfd])
        self.running[pidfd] = (proc, reply)
        self.selector.register(pidfd, selectors.EVENT_READ)

    def _finished(self, pidfd: int) -> None:
        self.selector.unregister(pidfd)
        os.close(pidfd)
        proc, reply = self.running.pop(pidfd)
        code = proc.wait()
        _send(reply, {"exit": 128 - code if code < 0 else code})
        reply.close()

    def _operation(self, request: dict[str, Any], reply: socket.socket, stdio: list[int]) -> None:
        src, dst = stdio[0], stdio[1]
        try:
            OPERATIONS[request["op"]](src, dst, *request["args"])
        except OSError as exc:
            path = exc.filename if isinstance(exc.filename, str) else None
            message = _error("os", exc.strerror or str(exc), exc.errno or 0, path=path)
        except Exception as exc:
            message = _error("error", f"{type(exc).__name__}: {exc}")
        else:
            message = {"exit": 0}
        # the host reads until end of file: our copies must be closed before we answer
        for fd in stdio:
            os.close(fd)
        stdio.clear()
        _send(reply, message)
        reply.close()


def _wake(signum: int, frame: object) -> None:
    """SIGCHLD's handler: nothing; the signal's arrival wakes the server's loop."""


def serve(payload: tuple[int, bool]) -> int:
    """The exec server's process: serve requests on socket ``payload[0]`` until the host
    closes it, then exit; ``payload[1]``: collect the orphans of commands ourselves."""
    sock_fd, reap_orphans = payload
    try:
        gc.disable()  # no finalizer of a copied object runs at a time we do not choose
        _neuter_inherited_fds(sock_fd)
        _default_signals()
        # a host that went away must not kill us with SIGPIPE mid-reply; commands get the
        # default back (subprocess restores it)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir("/")
        _Server(socket.socket(fileno=sock_fd), reap_orphans).run()
    finally:
        os._exit(0)
