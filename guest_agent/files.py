"""Files: QEMU's ``guest-file-*`` handles, and our whole-file and tree extensions (``pti-*``).

The operations themselves (``read_bytes``, ``write_bytes``, ``stat_pair``, ``sha256_hex``,
``remove_path``, ``unpack``, ``pack``) are also what pytest-incus runs inside containers, so a
file operation means the same in every kind of instance."""

from __future__ import annotations

import base64
import errno
import os
import stat

from guest_agent.errors import CommandError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    import tarfile
    from typing import IO, Any

MAX_READ = 48 << 20  # bytes per guest-file-read (as qemu-ga)
_CHUNK = 1 << 16
_MODES = {
    "r": os.O_RDONLY,
    "rb": os.O_RDONLY,
    "r+": os.O_RDWR,
    "r+b": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "w+b": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "a+b": os.O_RDWR | os.O_CREAT | os.O_APPEND,
}


def _path(args: dict[str, Any], key: str = "path") -> str:
    value = args[key]
    if not isinstance(value, str) or not value:
        raise CommandError(f"{key} must be a non-empty string")
    return value


class Handles:
    """Open files of guest-file-open, by handle number."""

    def __init__(self) -> None:
        self.files: dict[int, int] = {}
        self.next = 1000

    def _fd(self, args: dict[str, Any]) -> int:
        handle = args["handle"]
        if not isinstance(handle, int) or handle not in self.files:
            raise CommandError(f"handle '{handle}' has not been found")
        return self.files[handle]

    def open(self, args: dict[str, Any]) -> int:
        path = _path(args)
        mode = args.get("mode") or "r"
        if mode not in _MODES:
            raise CommandError(f"invalid file open mode '{mode}'")
        fd = os.open(path, _MODES[mode] | os.O_CLOEXEC, 0o666)
        handle = self.next
        self.next += 1
        self.files[handle] = fd
        return handle

    def read(self, args: dict[str, Any]) -> dict[str, Any]:
        fd = self._fd(args)
        count = args.get("count", 4096)
        if not isinstance(count, int) or count < 0 or count > MAX_READ:
            raise CommandError(f"value '{count}' is invalid for argument count")
        data = b""
        while len(data) < count:
            chunk = os.read(fd, count - len(data))
            if not chunk:
                break
            data += chunk
        return {
            "count": len(data),
            "buf-b64": base64.b64encode(data).decode("ascii"),
            "eof": len(data) < count or count == 0,
        }

    def write(self, args: dict[str, Any]) -> dict[str, Any]:
        fd = self._fd(args)
        data = base64.b64decode(args["buf-b64"])
        count = args.get("count", len(data))
        if not isinstance(count, int) or count < 0 or count > len(data):
            raise CommandError(f"value '{count}' is invalid for argument count")
        view = memoryview(data)[:count]
        while view:
            view = view[os.write(fd, view) :]
        return {"count": count, "eof": False}

    def seek(self, args: dict[str, Any]) -> dict[str, Any]:
        fd = self._fd(args)
        whence = args.get("whence", 0)
        whence = {"set": 0, "cur": 1, "end": 2}.get(whence, whence)
        position = os.lseek(fd, int(args["offset"]), int(whence))
        return {"position": position, "eof": False}

    def flush(self, args: dict[str, Any]) -> dict[str, Any]:
        os.fsync(self._fd(args))
        return {}

    def close(self, args: dict[str, Any]) -> dict[str, Any]:
        fd = self._fd(args)
        del self.files[args["handle"]]
        os.close(fd)
        return {}


# -- whole files ---------------------------------------------------------------------------


def _makedirs(path: str) -> None:
    """Make directory ``path`` and its missing parents; NotADirectoryError naming what is in
    the way when ``path`` or one of its parents is not a directory (a file, a dangling link)."""
    if not path or os.path.isdir(path):
        return
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
    os.makedirs(path, mode=0o755, exist_ok=True)


def read_bytes(path: str) -> bytes:
    """The content of the file at ``path`` (IsADirectoryError for a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(21, os.strerror(21), path)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_file(args: dict[str, Any]) -> dict[str, Any]:
    """{data: base64, eof} of up to ``count`` bytes of the file at ``path`` from ``offset``:
    the host reads a file of any size in pieces."""
    path = _path(args)
    offset = int(args.get("offset", 0))
    count = int(args.get("count", MAX_READ))
    if offset < 0 or not 0 < count <= MAX_READ:
        raise CommandError(f"offset must be >= 0 and count 1 to {MAX_READ}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, os.strerror(21), path)
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        chunks = []
        size = 0
        while size < count:
            chunk = os.read(fd, count - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    # a regular file ends at its size; what /proc and devices give ends at a short read
    eof = size < count or (stat.S_ISREG(st.st_mode) and offset + size >= st.st_size)
    return {"data": base64.b64encode(b"".join(chunks)).decode("ascii"), "eof": eof}


def write_bytes(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``, mode ``mode``, owned by root (when we are root),
    parents created."""
    _makedirs(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode & 0o7777)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, mode & 0o7777)
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_file(args: dict[str, Any]) -> dict[str, Any]:
    """Replace ``path`` with ``data`` (base64), mode ``mode``, owned by root, parents made;
    with ``offset`` > 0, write ``data`` there into the file a first piece made (the host
    writes a file of any size in pieces)."""
    path = _path(args)
    data = base64.b64decode(args.get("data") or "")
    offset = int(args.get("offset", 0))
    if offset <= 0:
        write_bytes(path, data, int(args.get("mode", 0o644)))
        return {}
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        _write_all(fd, data)
    finally:
        os.close(fd)
    return {}


def spool(args: dict[str, Any]) -> dict[str, Any]:
    """{path} of a new empty file (mode 0600) in the guest's spool directory: where the host
    puts an archive in pieces before ``pti-put`` unpacks it, and ``pti-get`` leaves a large
    one for the host to read in pieces."""
    return {"path": _spool_file()}


def _spool_file() -> str:
    last: OSError | None = None
    for directory in (os.environ.get("TMPDIR") or "/var/tmp", "/var/tmp", "/tmp"):
        path = os.path.join(directory, "pti-spool-" + os.urandom(8).hex())
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            last = exc
            continue
        return path
    assert last is not None
    raise last


def _record(st: os.stat_result) -> dict[str, int]:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size}


def stat_pair(path: str) -> dict[str, Any]:
    """{lstat, stat} of ``path`` (stat null for a dangling link); ENOENT if missing."""
    lst = os.lstat(path)
    try:
        st: dict[str, int] | None = _record(os.stat(path))
    except FileNotFoundError:
        st = None
    return {"lstat": _record(lst), "stat": st}


def stat_path(args: dict[str, Any]) -> dict[str, Any]:
    """{lstat, stat} of ``path`` (stat null for a dangling link); ENOENT if missing."""
    return stat_pair(_path(args))


def sha256_hex(path: str) -> str:
    """The hex sha256 of the file at ``path``."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def sha256(args: dict[str, Any]) -> dict[str, Any]:
    """{sha256: hex} of the file at ``path``."""
    return {"sha256": sha256_hex(_path(args))}


def remove_path(path: str) -> None:
    """Remove ``path`` (a tree too); nothing if it does not exist."""
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil

        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def remove(args: dict[str, Any]) -> dict[str, Any]:
    """Remove ``path`` (a tree too); nothing if it does not exist."""
    remove_path(_path(args))
    return {}


# -- trees ----------------------------------------------------------------------------------


def _inside(dest: str, name: str) -> bool:
    target = os.path.realpath(os.path.join(dest, name))
    root = os.path.realpath(dest)
    return target == root or target.startswith(root.rstrip("/") + "/")


def _checked(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """What tarfile's "tar" filter allows (nothing outside ``dest``), mode kept as pushed.
    Python 3.9 before 3.9.17 has no filters: the same checks by hand."""
    import tarfile

    tar_filter = getattr(tarfile, "tar_filter", None)
    if tar_filter is not None:
        checked: tarfile.TarInfo = tar_filter(member, dest).replace(mode=member.mode, deep=False)
        return checked
    name = member.name.lstrip("/")
    if not _inside(dest, name):
        raise CommandError(f"{member.name!r} would be extracted outside {dest!r}")
    if member.islnk() or member.issym():
        target = member.linkname
        base = dest if member.islnk() else os.path.join(dest, os.path.dirname(name))
        if os.path.isabs(target) or not _inside(dest, os.path.join(base, target)):
            raise CommandError(f"{member.name!r} links outside {dest!r}")
    member.name = name
    return member


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target_dir: str) -> None:
    import tarfile

    member = _checked(member, target_dir)
    if hasattr(tarfile, "tar_filter"):
        tar.extract(member, target_dir, numeric_owner=True, filter=lambda m, _p: m)
    else:
        tar.extract(member, target_dir, numeric_owner=True)


def unpack(stream: IO[bytes], dest: str, is_tree: bool) -> None:
    """Unpack the tar read from ``stream``: a tree into directory ``dest`` (merged), or its one
    member as ``dest`` (into ``dest`` if that is a directory). Missing parents are created."""
    import tarfile

    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if is_tree:
                _makedirs(dest)
                target_dir = dest
            elif os.path.isdir(dest):
                target_dir = dest
            else:
                target_dir = os.path.dirname(dest) or "/"
                member.name = os.path.basename(dest)
                _makedirs(target_dir)
                if os.path.lexists(dest) and not os.path.isdir(dest):
                    os.unlink(dest)
            _extract(tar, member, target_dir)


def put(args: dict[str, Any]) -> dict[str, Any]:
    """Unpack the tar in ``data`` (base64), or in the spool file ``source`` (removed after),
    at ``dest``, as ``unpack`` does."""
    dest = _path(args, "dest")
    tree = bool(args.get("tree"))
    source = args.get("source")
    if source is None:
        import io

        unpack(io.BytesIO(base64.b64decode(args.get("data") or "")), dest, tree)
        return {}
    source = _spooled(source)
    try:
        with open(source, "rb") as stream:
            unpack(stream, dest, tree)
    finally:
        os.unlink(source)
    return {}


def _spooled(path: Any) -> str:
    if not isinstance(path, str) or not os.path.basename(path).startswith("pti-spool-"):
        raise CommandError(f"{path!r} is not a spool file of pti-spool")
    return path


def pack(path: str, stream: IO[bytes]) -> None:
    """Write a tar of ``path`` to ``stream``: a directory as ``.`` with its contents, anything
    else as one member named after it."""
    import tarfile

    st = os.lstat(path)
    arcname = "." if stat.S_ISDIR(st.st_mode) else os.path.basename(path.rstrip("/")) or "file"
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        tar.add(path, arcname=arcname, recursive=True)


def get(args: dict[str, Any]) -> dict[str, Any]:
    """{data: base64 tar} of ``path``, as ``pack`` makes it, when it is at most ``max`` bytes;
    else {source, size}: a spool file that holds it, for the host to read and remove."""
    path = _path(args)
    most = int(args.get("max", MAX_READ))
    source = _spool_file()
    try:
        with open(source, "wb") as stream:
            pack(path, stream)
            size = stream.tell()
        if size > most:
            return {"source": source, "size": size}
        with open(source, "rb") as stream:
            data = stream.read()
    except BaseException:
        os.unlink(source)
        raise
    os.unlink(source)
    return {"data": base64.b64encode(data).decode("ascii")}
