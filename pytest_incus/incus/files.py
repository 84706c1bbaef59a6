"""The file methods of an Incus instance, over the files API
(``/1.0/instances/NAME/files?path=...``, owner and mode in ``X-Incus-*`` headers).

Incus serves these from inside the instance (an SFTP server in its mount namespace), so every
path is resolved inside: a symlink to ``/etc`` leads to the instance's ``/etc``, and ids are as
the instance sees them. What the API does not do is computed here:

- it never follows a symlink in the LAST component (HEAD and GET describe the link itself, GET
  gives its target): ``stat``, ``read_file``, ``sha256`` and ``write_file`` follow the chain of
  links themselves, asking the server again for each target (at most MAX_HOPS hops), so each
  hop is still resolved inside;
- it does not make missing parents: ``write_file`` and ``put_archive`` make them, directory by
  directory;
- writing an existing file keeps its old mode: a file to be replaced is deleted first, so the
  new one gets the asked mode and belongs to root (as the local backend's O_TRUNC + fchmod);
- there are no archives: ``put_archive`` walks the tar and makes each member, ``get_archive``
  walks the tree and builds the tar, so nothing inside (no tar, no shell) is needed.

What the API gets wrong is done by ``inside`` (a callable that runs argv as root in the
instance through the exec wrapper and returns its ExecResult; the machine gives it when the
instance has a shell), when it is given:

- ``stat``: the API's X-Incus-Mode carries only the permission bits (``/tmp`` is 0777, a setuid
  program loses its 4000) and calls a device a file, so one exec of ``stat -c`` (coreutils and
  busybox alike) gives lstat and stat in one round trip;
- pseudo files (under /proc, /sys, /dev): the API reads a file by its size, which is 0 or 4096
  there (a cgroup file reads empty, sysfs breaks off mid-body), and resolves ``/proc/self`` as
  its own SFTP server; ``read_file`` and ``sha256`` read them with ``cat`` inside;
- setuid/setgid/sticky bits of a written file (``chmod`` inside: the API applies only the
  permission bits) and the text of a relative symlink (``readlink`` inside: the API answers with
  the target made absolute, fine to follow, wrong to copy).

Without ``inside`` (an instance without a shell) the API's answers stand: those bits are
dropped, links come out absolute, pseudo files read as the API reads them.

Server answers become the OSError that pathlib would raise (FileNotFoundError, ...), carrying
the path; other failures stay ServerError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import posixpath
import stat as stat_module
import tarfile
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import requests

from pytest_incus.errors import ServerError
from pytest_incus.values import ExecResult, Stat

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient

Inside = Callable[[Sequence[str]], ExecResult]  # argv run as root inside -> its result
PSEUDO = ("/proc", "/sys", "/dev")  # file systems whose files' sizes say nothing of their content
# lstat then (for a symlink) stat of $1, as "hexmode uid gid size" lines ("-": a dangling link);
# exit 3: nothing there
STAT_SCRIPT = r"""p=$1
[ -e "$p" ] || [ -L "$p" ] || exit 3
stat -c '%f %u %g %s' -- "$p" || exit 4
if [ -L "$p" ]; then stat -L -c '%f %u %g %s' -- "$p" 2>/dev/null || echo -; fi
"""
MAX_HOPS = 40  # symlinks followed in a row, as Linux's own limit
CHUNK = 1 << 20  # bytes per read of a streamed file

_TYPES = {
    "file": stat_module.S_IFREG,
    "directory": stat_module.S_IFDIR,
    "symlink": stat_module.S_IFLNK,
}
# what the SFTP server's messages say, and the OSError each means
_MESSAGES = (
    ("no such file", errno.ENOENT),
    ("not found", errno.ENOENT),
    ("not a directory", errno.ENOTDIR),
    ("is a directory", errno.EISDIR),
    ("permission denied", errno.EACCES),
    ("operation not permitted", errno.EPERM),
    ("file exists", errno.EEXIST),
    ("too many levels of symbolic links", errno.ELOOP),
    ("read-only file system", errno.EROFS),
    ("no space left", errno.ENOSPC),
)


def _url(instance: str) -> str:
    return f"/1.0/instances/{instance}/files"


def _os_error(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


@contextlib.contextmanager
def _translated(path: str) -> Iterator[None]:
    """Turn the server's answer for ``path`` into the OSError pathlib would raise, once for
    every request of this module; what is no file system error stays a ServerError."""
    try:
        yield
    except ServerError as exc:
        if exc.status == 404:
            raise _os_error(errno.ENOENT, path) from exc
        text = str(exc).lower()
        for message, code in _MESSAGES:
            if message in text:
                raise _os_error(code, path) from exc
        raise


class _NoTool(Exception):
    """The command run inside is not there (exit 127): the files API answers instead."""


def _os_error_of(stderr: bytes, path: str) -> OSError | None:
    """The OSError that a tool's message on ``stderr`` names (strerror's words), if any."""
    text = stderr.decode("utf-8", "replace").lower()
    for message, code in _MESSAGES:
        if message in text:
            return _os_error(code, path)
    return None


def _run(inside: Inside, argv: Sequence[str], path: str) -> bytes:
    """stdout of ``argv`` run as root inside (about ``path``); a failure becomes the OSError
    its message names, else ServerError; _NoTool if the tool is missing."""
    result = inside(argv)
    if result.exit_code == 0:
        return result.stdout_bytes
    if result.exit_code == 127 and b"not found" in result.stderr_bytes:
        raise _NoTool(argv[0])
    error = _os_error_of(result.stderr_bytes, path)
    if error is not None:
        raise error
    raise ServerError(
        f"{path}: {list(argv)!r} inside failed (exit {result.exit_code}): "
        f"{result.stderr.strip() or '(no message)'}"
    )


def _pseudo(path: str) -> bool:
    """True for a path on /proc, /sys or /dev (as written: /proc/self means the caller)."""
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return any(normal == top or normal.startswith(top + "/") for top in PSEUDO)


def _parse_stat(line: str) -> Stat:
    """A Stat of one "hexmode uid gid size" line of STAT_SCRIPT."""
    mode, uid, gid, size = line.split()
    full = int(mode, 16)
    return Stat(full, int(uid), int(gid), int(size), stat_module.S_ISLNK(full))


def _stat_inside(inside: Inside, path: str) -> tuple[Stat, Stat] | None:
    """(lstat, stat) of ``path`` from one ``stat -c`` inside; None if nothing is there."""
    result = inside(["sh", "-c", STAT_SCRIPT, "pytest-incus-stat", path])
    if result.exit_code == 3:
        return None
    if result.exit_code != 0:
        if result.exit_code == 127:  # no stat (or no sh) in the instance
            raise _NoTool("stat")
        raise _os_error_of(result.stderr_bytes, path) or ServerError(
            f"{path}: stat inside failed (exit {result.exit_code}): {result.stderr.strip()}"
        )
    lines = result.stdout.splitlines()
    try:
        lstat = _parse_stat(lines[0])
        if not lstat.is_symlink:
            return lstat, lstat
        return lstat, (lstat if lines[1].strip() == "-" else _parse_stat(lines[1]))
    except (IndexError, ValueError) as exc:
        raise ServerError(
            f"{path}: stat inside said something unreadable: {result.stdout!r}", exc=exc
        ) from exc


def _stat_of(headers: requests.structures.CaseInsensitiveDict[str], size: int) -> Stat:
    kind = _TYPES.get(headers.get("X-Incus-Type", "file"), stat_module.S_IFREG)
    return Stat(
        mode=kind | int(headers.get("X-Incus-Mode", "0"), 8),
        uid=int(headers.get("X-Incus-Uid", "0")),
        gid=int(headers.get("X-Incus-Gid", "0")),
        size=size,
        is_symlink=kind == stat_module.S_IFLNK,
    )


def _head(client: IncusClient, instance: str, path: str) -> Stat | None:
    """lstat of ``path`` (a link's size is that of its target's name, read when needed),
    None if it does not exist."""
    try:
        with _translated(path):
            try:
                response = client.request("HEAD", _url(instance), params={"path": path})
            except ServerError as exc:
                if exc.status == 404:
                    raise
                # an answer to HEAD has no body, so no message: GET says what went wrong
                with client.errors(f"GET {_url(instance)}?path={path}"):
                    client.request(
                        "GET", _url(instance), params={"path": path}, stream=True
                    ).close()
                raise
    except FileNotFoundError:
        return None
    size = int(response.headers.get("Content-Length", "0") or 0)
    if response.headers.get("X-Incus-Type") != "file":
        size = 0  # a directory's listing, not its size
    return _stat_of(response.headers, size)


def _readlink(client: IncusClient, instance: str, path: str, inside: Inside | None = None) -> str:
    """The target of symlink ``path``: as written with ``inside``, else as the server gives
    it (absolute)."""
    if inside is not None:
        with contextlib.suppress(_NoTool):
            text = _run(inside, ["readlink", "--", path], path)
            return text.decode("utf-8", "surrogateescape").removesuffix("\n")
    with _translated(path):
        response = client.request("GET", _url(instance), params={"path": path})
    return response.content.decode("utf-8", "surrogateescape")


def _target(path: str, link: str) -> str:
    """Where ``link`` (the target of the symlink ``path``) points, as a path the server
    resolves inside (relative targets from the link's directory)."""
    if link.startswith("/"):
        return link
    return posixpath.join(posixpath.dirname(path) or "/", link)


def _in_the_way(client: IncusClient, instance: str, path: str) -> str:
    """The first component of ``path`` that exists and is not a directory (``path`` itself if
    none is found): what makes a path below it "not a directory"."""
    parts = [part for part in path.split("/") if part]
    for end in range(1, len(parts)):
        prefix = "/" + "/".join(parts[:end])
        try:
            found = _head(client, instance, prefix)
        except OSError:
            break
        if found is not None and not stat_module.S_ISDIR(found.mode) and not found.is_symlink:
            return prefix
    return path


def _resolve(client: IncusClient, instance: str, path: str) -> tuple[str, Stat | None]:
    """Follow the symlinks of ``path``'s last component: the path of what it finally names
    and its stat (None: missing, or the end of a dangling link)."""
    current = path
    for _ in range(MAX_HOPS):
        try:
            found = _head(client, instance, current)
        except NotADirectoryError as exc:
            # name what is in the way, as the kernel's error does for the local backend
            raise _os_error(errno.ENOTDIR, _in_the_way(client, instance, current)) from exc
        if found is None or not found.is_symlink:
            return current, found
        current = _target(current, _readlink(client, instance, current))
    raise _os_error(errno.ELOOP, path)


def stat(
    client: IncusClient, instance: str, path: str, *, inside: Inside | None = None
) -> tuple[Stat, Stat] | None:
    """(lstat, stat) of ``path``; stat is the lstat object again for a dangling link; None if
    ``path`` does not exist."""
    if inside is not None:
        with contextlib.suppress(_NoTool):
            return _stat_inside(inside, path)
    lstat = _head(client, instance, path)
    if lstat is None:
        return None
    if not lstat.is_symlink:
        return lstat, lstat
    link = _readlink(client, instance, path, inside)
    lstat = Stat(lstat.mode, lstat.uid, lstat.gid, len(link.encode("utf-8", "surrogateescape")),
                 True)  # fmt: skip
    _, followed = _resolve(client, instance, _target(path, link))
    return (lstat, lstat) if followed is None else (lstat, followed)


def _regular(client: IncusClient, instance: str, path: str) -> str:
    """The path of the file ``path`` names (links followed): FileNotFoundError if missing,
    IsADirectoryError for a directory."""
    final, found = _resolve(client, instance, path)
    if found is None:
        raise _os_error(errno.ENOENT, path)
    if stat_module.S_ISDIR(found.mode):
        raise _os_error(errno.EISDIR, path)
    return final


def read_file(
    client: IncusClient, instance: str, path: str, *, inside: Inside | None = None
) -> bytes:
    """The content of ``path`` (symlinks followed inside); a pseudo file's with ``cat``
    inside when ``inside`` is given."""
    if inside is not None and _pseudo(path):
        with contextlib.suppress(_NoTool):
            return _run(inside, ["cat", "--", path], path)
    final = _regular(client, instance, path)
    with _translated(path):
        return client.request("GET", _url(instance), params={"path": final}).content


def sha256(client: IncusClient, instance: str, path: str, *, inside: Inside | None = None) -> str:
    """The hex sha256 of the file at ``path``, streamed: memory bounded by CHUNK (a pseudo
    file read with ``cat`` inside when ``inside`` is given)."""
    if inside is not None and _pseudo(path):
        with contextlib.suppress(_NoTool):
            return hashlib.sha256(_run(inside, ["cat", "--", path], path)).hexdigest()
    final = _regular(client, instance, path)
    digest = hashlib.sha256()
    with _translated(path):
        response = client.request("GET", _url(instance), params={"path": final}, stream=True)
        with contextlib.closing(response), client.errors(f"GET {_url(instance)}?path={final}"):
            for chunk in response.iter_content(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _post(client: IncusClient, instance: str, path: str, kind: str, data: bytes, mode: int) -> None:
    headers = {
        "X-Incus-Type": kind,
        "X-Incus-Uid": "0",
        "X-Incus-Gid": "0",
        # Incus parses the mode with base 0: a leading 0 makes it octal
        "X-Incus-Mode": f"0{mode & 0o777:o}",
        "X-Incus-Write": "overwrite",
    }
    with _translated(path):
        client.request("POST", _url(instance), params={"path": path}, data=data, headers=headers)


def _delete(client: IncusClient, instance: str, path: str) -> None:
    with _translated(path):
        client.request("DELETE", _url(instance), params={"path": path})


def _makedirs(client: IncusClient, instance: str, path: str) -> None:
    """Make directory ``path`` and its missing parents (0755, root's); NotADirectoryError
    naming what is in the way when something on the way is not a directory."""
    missing: list[str] = []
    current = posixpath.normpath(path) if path else "/"
    while True:
        _, found = _resolve(client, instance, current)
        if found is not None:
            if not stat_module.S_ISDIR(found.mode):
                raise _os_error(errno.ENOTDIR, current)
            break
        missing.append(current)
        parent = posixpath.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        _post(client, instance, directory, "directory", b"", 0o755)


def _special_bits(inside: Inside | None, path: str, mode: int) -> None:
    if mode & 0o7000 and inside is not None:
        with contextlib.suppress(_NoTool):
            _run(inside, ["chmod", f"{mode & 0o7777:o}", "--", path], path)


def write_file(
    client: IncusClient,
    instance: str,
    path: str,
    data: bytes,
    mode: int,
    *,
    inside: Inside | None = None,
) -> None:
    """Create or replace ``path`` (through a symlink, as open() would), mode ``mode``, owned
    by root inside; parents created."""
    final, found = _resolve(client, instance, path)
    if found is not None and stat_module.S_ISDIR(found.mode):
        raise _os_error(errno.EISDIR, path)
    if found is not None:
        _delete(client, instance, final)  # else the server keeps the old mode and owner
    else:
        _makedirs(client, instance, posixpath.dirname(final))
    _post(client, instance, final, "file", data, mode)
    _special_bits(inside, final, mode)


def _is_dir(client: IncusClient, instance: str, path: str) -> bool:
    _, found = _resolve(client, instance, path)
    return found is not None and stat_module.S_ISDIR(found.mode)


def _member_path(dest: str, name: str) -> str:
    """Where tar member ``name`` goes below ``dest``; ValueError for a name that leaves it."""
    relative = posixpath.normpath(name.lstrip("/"))
    if relative == ".":
        return dest
    if relative.startswith("../") or relative == "..":
        raise ValueError(f"tar member {name!r} would land outside {dest!r}")
    return posixpath.join(dest, relative)


def _put_member(
    client: IncusClient,
    instance: str,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    path: str,
    inside: Inside | None,
) -> None:
    """Make ``member`` at ``path``: a directory (merged if it exists), a file or a symlink
    (replacing what is there); a hard link becomes a copy of its target's content."""
    if member.isdir():
        if not _is_dir(client, instance, path):
            _post(client, instance, path, "directory", b"", member.mode)
        return
    existing = _head(client, instance, path)
    if existing is not None and stat_module.S_ISDIR(existing.mode):
        raise _os_error(errno.EISDIR, path)
    if existing is not None:
        _delete(client, instance, path)
    if member.issym():
        _post(client, instance, path, "symlink", member.linkname.encode(), 0o777)
    elif member.isfile() or member.islnk():
        source = tar.extractfile(member)
        data = b"" if source is None else source.read()
        _post(client, instance, path, "file", data, member.mode)
        _special_bits(inside, path, member.mode)
    else:
        raise ServerError(
            f"{path}: Incus's files API cannot make {member.name!r} (a device or fifo); "
            "create it with exec (mknod, mkfifo) instead"
        )


def put_archive(
    client: IncusClient,
    instance: str,
    archive: bytes,
    dest: str,
    is_tree: bool,
    *,
    inside: Inside | None = None,
) -> None:
    """Unpack a tar made by ``Instance.push``: a tree (members under ``.``) into directory
    ``dest``, created or merged; or its one member as ``dest`` (into ``dest`` if that is a
    directory). Missing parents are created."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        members = tar.getmembers()
        if is_tree:
            _makedirs(client, instance, dest)
            for member in members:
                path = _member_path(dest, member.name)
                _put_member(client, instance, tar, member, path, inside)
            return
        for member in members[:1]:
            if _is_dir(client, instance, dest):
                target = posixpath.join(dest, posixpath.basename(member.name))
            else:
                target = dest
                _makedirs(client, instance, posixpath.dirname(dest) or "/")
            _put_member(client, instance, tar, member, target, inside)


def _modified(value: str | None) -> float:
    """X-Incus-Modified ("2026-12-01 10:31:16 +0000 UTC") as a timestamp; 0 if unreadable."""
    if not value:
        return 0.0
    try:
        return datetime.strptime(value[:25], "%Y-%m-%d %H:%M:%S %z").timestamp()
    except ValueError:
        return 0.0


def _add(
    client: IncusClient,
    instance: str,
    tar: tarfile.TarFile,
    path: str,
    name: str,
    inside: Inside | None,
) -> None:
    """Add ``path`` (not followed) to ``tar`` as ``name``, a directory with its contents."""
    with _translated(path):
        response = client.request("GET", _url(instance), params={"path": path}, stream=True)
    with contextlib.closing(response), client.errors(f"GET {_url(instance)}?path={path}"):
        headers = response.headers
        kind = headers.get("X-Incus-Type", "file")
        info = tarfile.TarInfo(name)
        found = _stat_of(headers, 0)
        info.mode = stat_module.S_IMODE(found.mode)
        info.uid, info.gid = found.uid, found.gid
        info.mtime = _modified(headers.get("X-Incus-Modified"))
        if kind == "directory":
            info.type = tarfile.DIRTYPE
            entries = response.json().get("metadata") or []
            tar.addfile(info)
            for entry in sorted(entries):
                child = posixpath.join(path, entry)
                _add(client, instance, tar, child, posixpath.join(name, entry), inside)
        elif kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = (
                response.content.decode("utf-8", "surrogateescape")
                if inside is None
                else _readlink(client, instance, path, inside)
            )
            tar.addfile(info)
        else:
            data = response.content
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def get_archive(
    client: IncusClient, instance: str, path: str, *, inside: Inside | None = None
) -> bytes:
    """A tar archive of ``path``: a directory as ``.`` with its contents, anything else as
    one member named after it."""
    found = _head(client, instance, path)
    if found is None:
        raise _os_error(errno.ENOENT, path)
    buffer = io.BytesIO()
    name = "." if stat_module.S_ISDIR(found.mode) else posixpath.basename(path.rstrip("/"))
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(client, instance, tar, path, name or "file", inside)
    return buffer.getvalue()
