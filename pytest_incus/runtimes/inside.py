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
import would search the container's filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_FDS = 4  # per request: the reply socket and up to three stdio pipes
MAX_REQUEST = 1 << 20
_CHUNK = 1 << 16


class SetupError(Exception):
    """A request that cannot be carried out inside (unknown user, missing cwd)."""


@dataclass(frozen=True)
class User:
    """A user as the container's /etc/passwd and /etc/group describe it."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: list[int]

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """What a login gives this user, with ``extra`` over it."""
        base = {
            "PATH": DEFAULT_PATH,
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell or "/bin/sh",
        }
        return {**base, **extra}


def lookup_user(user: str | int | None) -> User:
    """The user named (or numbered) ``user``, root for None; SetupError if unknown."""
    wanted = 0 if user is None else user
    fields = None
    with open("/etc/passwd") as f:
        for line in f:
            parts = line.rstrip("\n").split(":")
            if len(parts) >= 7 and (parts[0] == wanted or parts[2] == str(wanted)):
                fields = parts
                break
    if fields is None:
        if not isinstance(wanted, int):
            raise SetupError(f"no user {wanted!r} in the instance's /etc/passwd")
        fields = [str(wanted), "x", str(wanted), str(wanted), "", "/", "/bin/sh"]
    name, uid, gid = fields[0], int(fields[2]), int(fields[3])
    return User(name, uid, gid, fields[5], fields[6], _groups_of(name, gid))


def _groups_of(name: str, gid: int) -> list[int]:
    groups = {gid}
    try:
        with open("/etc/group") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and name in fields[3].split(","):
                    groups.add(int(fields[2]))
    except OSError:
        pass
    return sorted(groups)


def _working_dir(user: User, cwd: str | None) -> str:
    if cwd is not None:
        if not os.path.isdir(cwd):
            raise SetupError(f"cannot enter cwd {cwd!r}: no such directory")
        return cwd
    return user.home if os.path.isdir(user.home) else "/"


def _clean_process(keep: int) -> None:
    """Give this process what a fresh one has, not what the forked pytest had: no fds but
    0, 1, 2 and ``keep`` (we hold copies of all of the caller's fds, the write end of our own
    stdin and other instances' pipes among them), default signal dispositions (Python ignores
    SIGPIPE, and ``yes | head`` would then never end) and an empty signal mask."""
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _not_runnable(program: str, exc: OSError) -> tuple[int, bytes]:
    """Exit code and message for a program that cannot be executed, as a shell gives them:
    127 for one that does not exist, 126 for one that cannot run."""
    missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
    message = "not found" if missing else (exc.strerror or str(exc))
    return (127 if missing else 126), f"{program}: {message}\n".encode()


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
        workdir = _working_dir(who, cwd)
        os.setgroups(who.groups)
        os.setgid(who.gid)
        os.setuid(who.uid)
        os.chdir(workdir)
    except SetupError as exc:
        _fail(status_fd, str(exc))
    except BaseException as exc:
        _fail(status_fd, f"{type(exc).__name__}: {exc}")
    try:
        os.execvpe(argv[0], argv, who.environment(env))
    except OSError as exc:
        code, message = _not_runnable(argv[0], exc)
        os.write(2, message)
        os._exit(code)
    os._exit(126)


# -- file operations ----------------------------------------------------------------------


def _copy(src: int, dst: int) -> None:
    while chunk := os.read(src, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def _makedirs(path: str) -> None:
    if path and not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)


def op_read(src: int, dst: int, path: str) -> None:
    """Write the content of ``path`` to ``dst``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        _copy(fd, dst)
    finally:
        os.close(fd)


def op_write(src: int, dst: int, path: str, mode: int) -> None:
    """Replace ``path`` with the data from ``src``, owned by root, parents created."""
    _makedirs(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        _copy(src, fd)
    finally:
        os.close(fd)


def _stat_record(st: os.stat_result) -> dict[str, int]:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size}


def op_stat(src: int, dst: int, path: str) -> None:
    """Write {lstat, stat} of ``path`` as JSON (stat null for a dangling link)."""
    lst = os.lstat(path)
    try:
        st: dict[str, int] | None = _stat_record(os.stat(path))
    except FileNotFoundError:
        st = None
    os.write(dst, json.dumps({"lstat": _stat_record(lst), "stat": st}).encode())


def op_sha256(src: int, dst: int, path: str) -> None:
    """Write the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    os.write(dst, digest.hexdigest().encode())


def _keep_mode(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "tar" filter (nothing outside ``dest``), but with the mode as pushed: that
    filter drops setuid, setgid, sticky and group/other write bits, which ``mode=`` may set."""
    return tarfile.tar_filter(member, dest).replace(mode=member.mode, deep=False)


def op_put(src: int, dst: int, dest: str, is_tree: bool) -> None:
    """Unpack the tar from ``src``: a tree into directory ``dest`` (merged), or its one file as
    ``dest`` (into ``dest`` if that is a directory)."""
    with (
        os.fdopen(src, "rb", closefd=False) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        for member in tar:
            if is_tree:
                _makedirs(dest)
                target_dir = dest
            elif os.path.isdir(dest):
                target_dir = dest
            else:
                target_dir, member.name = os.path.dirname(dest) or "/", os.path.basename(dest)
                _makedirs(target_dir)
                if os.path.lexists(dest) and not os.path.isdir(dest):
                    os.unlink(dest)
            tar.extract(member, target_dir, numeric_owner=True, filter=_keep_mode)


def op_get(src: int, dst: int, path: str) -> None:
    """Write a tar of ``path`` to ``dst``: a directory as ``.`` with its contents, anything
    else as one member named after it."""
    st = os.lstat(path)
    arcname = "." if stat.S_ISDIR(st.st_mode) else os.path.basename(path.rstrip("/")) or "file"
    with (
        os.fdopen(dst, "wb", closefd=False) as stream,
        tarfile.open(fileobj=stream, mode="w|") as tar,
    ):
        tar.add(path, arcname=arcname, recursive=True)


def op_remove(src: int, dst: int, path: str) -> None:
    """Remove ``path`` (a tree too); nothing if it does not exist."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


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
# socket: for "exec", {"pid": true} with a pidfd of the command (the host reads its host pid
# from the pidfd and can kill its tree at a timeout), then {"exit": code} when it ends; for a
# file operation, {"exit": 0} when done. Errors: {"error": {"kind", "errno", "message"}}.


def _send(reply: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    with contextlib.suppress(OSError):  # the host gave up on this request: nothing to tell
        if fds:
            socket.send_fds(reply, [data], fds)
        else:
            reply.send(data)


def _error(kind: str, message: str, err: int = 0) -> dict[str, Any]:
    return {"error": {"kind": kind, "errno": err, "message": message}}


class _Server:
    """Spawns commands and runs file operations inside, until the host closes the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.running: dict[int, tuple[subprocess.Popen[bytes], socket.socket]] = {}

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.sock:
                    if not self._receive():
                        return
                else:
                    self._finished(int(key.fd))

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
            workdir = _working_dir(who, request["cwd"])
        except SetupError as exc:
            _send(reply, _error("setup", str(exc)))
            reply.close()
            return
        # as root with no other groups, spawn without switching ids: subprocess then uses
        # vfork, which does not copy this (forked pytest's) address space
        switch = who.uid != 0 or who.gid != 0 or who.groups != [0]
        try:
            proc = subprocess.Popen(
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
            code, message = _not_runnable(argv[0], exc)
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
            message = _error("os", exc.strerror or str(exc), exc.errno or 0)
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


def serve(payload: tuple[int]) -> int:
    """The exec server's process: serve requests on socket ``payload[0]`` until the host
    closes it, then exit."""
    (sock_fd,) = payload
    try:
        _clean_process(sock_fd)
        # Become a child of the container's init: the attached process is the host caller's
        # child, and its zombie, which only the caller could reap, would keep the container's
        # pid namespace (and so the container) from ever ending.
        if os.fork():
            os._exit(0)
        # a host that went away must not kill us with SIGPIPE mid-reply; commands get the
        # default back (subprocess restores it)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir("/")
        _Server(socket.socket(fileno=sock_fd)).run()
    finally:
        os._exit(0)
