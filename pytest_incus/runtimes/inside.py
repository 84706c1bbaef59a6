"""Code that runs INSIDE a container, in the child that liblxc attach forks.

The child has entered all of the container's namespaces, so its ``/`` is the container's root:
every path it opens, and every symlink on the way, resolves inside the container, never on the
host. Each entry point ends the process itself (exec or ``os._exit``); it never returns into the
forked copy of pytest. Errors before exec are written as JSON to ``status_fd`` (close-on-exec, so
a successful exec leaves it empty); file data flows over fds 0 and 1.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import tarfile
from collections.abc import Callable
from typing import Any, NoReturn

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHUNK = 1 << 16


class SetupError(Exception):
    """A request that cannot be carried out inside (unknown user, missing cwd)."""


def _fail(status_fd: int, kind: str, message: str, err: int = 0, code: int = 1) -> NoReturn:
    try:
        os.write(status_fd, json.dumps({"kind": kind, "errno": err, "message": message}).encode())
    finally:
        os._exit(code)


def _passwd_entry(user: str | int) -> list[str]:
    with open("/etc/passwd") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if len(fields) >= 7 and (fields[0] == user or fields[2] == str(user)):
                return fields
    if isinstance(user, int):
        return [str(user), "x", str(user), str(user), "", "/", "/bin/sh"]
    raise SetupError(f"no user {user!r} in the instance's /etc/passwd")


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


def _close_inherited_fds(status_fd: int) -> None:
    """Close every fd but 0, 1, 2 and ``status_fd``: we are a fork of the caller and hold
    copies of all its fds, our own stdin's write end among them (stdin would never reach end
    of file) and the pipes of other instances."""
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, os.sysconf("SC_OPEN_MAX"))


def _clean_process(status_fd: int) -> None:
    """Give the command what a fresh process has, not what the forked pytest had: no fds but
    0, 1, 2 (and the close-on-exec status fd), default signal dispositions (Python ignores
    SIGPIPE, and ``yes | head`` would then never end) and an empty signal mask."""
    _close_inherited_fds(status_fd)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def run_command(
    payload: tuple[list[str], dict[str, str], str | None, str | int | None, int],
) -> int:
    """Become the user, enter the directory, and exec the command (a new session leader, so
    a timeout can kill its process group)."""
    argv, env, cwd, user, status_fd = payload
    try:
        _clean_process(status_fd)
        os.setsid()
        fields = _passwd_entry(0 if user is None else user)
        name, uid, gid, home, shell = (
            fields[0],
            int(fields[2]),
            int(fields[3]),
            fields[5],
            fields[6],
        )
        os.setgroups(_groups_of(name, gid))
        os.setgid(gid)
        os.setuid(uid)
        full_env = {
            "PATH": DEFAULT_PATH,
            "HOME": home,
            "USER": name,
            "LOGNAME": name,
            "SHELL": shell or "/bin/sh",
            **env,
        }
        if cwd is not None:
            try:
                os.chdir(cwd)
            except OSError as exc:
                raise SetupError(f"cannot enter cwd {cwd!r}: {exc.strerror}") from None
        else:
            try:
                os.chdir(home)
            except OSError:
                os.chdir("/")
    except SetupError as exc:
        _fail(status_fd, "setup", str(exc))
    except BaseException as exc:
        _fail(status_fd, "setup", f"{type(exc).__name__}: {exc}")
    try:
        os.execvpe(argv[0], argv, full_env)
    except OSError as exc:
        # as a shell does: 127 for a program that does not exist, 126 for one that cannot run
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        message = "not found" if missing else exc.strerror
        os.write(2, f"{argv[0]}: {message}\n".encode())
        os._exit(127 if missing else 126)
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


def op_read(path: str) -> None:
    """Write the content of ``path`` to stdout."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        _copy(fd, 1)
    finally:
        os.close(fd)


def op_write(path: str, mode: int) -> None:
    """Replace ``path`` with stdin's data, owned by root, parents created."""
    _makedirs(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        _copy(0, fd)
    finally:
        os.close(fd)


def _stat_record(st: os.stat_result) -> dict[str, int]:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size}


def op_stat(path: str) -> None:
    """Write {lstat, stat} of ``path`` as JSON (stat null for a dangling link)."""
    lst = os.lstat(path)
    try:
        st: dict[str, int] | None = _stat_record(os.stat(path))
    except FileNotFoundError:
        st = None
    os.write(1, json.dumps({"lstat": _stat_record(lst), "stat": st}).encode())


def op_sha256(path: str) -> None:
    """Write the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    os.write(1, digest.hexdigest().encode())


def _keep_mode(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "tar" filter (nothing outside ``dest``), but with the mode as pushed: that
    filter drops setuid, setgid, sticky and group/other write bits, which ``mode=`` may set."""
    return tarfile.tar_filter(member, dest).replace(mode=member.mode, deep=False)


def op_put(dest: str, is_tree: bool) -> None:
    """Unpack the tar on stdin: a tree into directory ``dest`` (merged), or its one file as
    ``dest`` (into ``dest`` if that is a directory)."""
    with (
        os.fdopen(0, "rb", closefd=False) as stream,
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


def op_get(path: str) -> None:
    """Write a tar of ``path`` to stdout: a directory as ``.`` with its contents, anything
    else as one member named after it."""
    st = os.lstat(path)
    arcname = "." if stat.S_ISDIR(st.st_mode) else os.path.basename(path.rstrip("/")) or "file"
    with (
        os.fdopen(1, "wb", closefd=False) as stream,
        tarfile.open(fileobj=stream, mode="w|") as tar,
    ):
        tar.add(path, arcname=arcname, recursive=True)


def op_remove(path: str) -> None:
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


def run_operation(payload: tuple[str, tuple[Any, ...], int]) -> int:
    """Run one file operation as root inside; errors go to the status fd as JSON."""
    name, args, status_fd = payload
    _close_inherited_fds(status_fd)
    try:
        OPERATIONS[name](*args)
    except OSError as exc:
        _fail(status_fd, "os", exc.strerror or str(exc), exc.errno or 0)
    except BaseException as exc:
        _fail(status_fd, "error", f"{type(exc).__name__}: {exc}")
    os._exit(0)
