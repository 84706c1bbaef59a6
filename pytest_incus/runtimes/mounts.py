"""Host paths mounted into containers and apps (the ``mounts`` option), staged by the host.

liblxc binds an ``lxc.mount.entry`` inside the container's user namespace, as the container's
root (a high uid on the host): a host path under a directory that uid cannot search (pytest's
``tmp_path`` is under ``/tmp/pytest-of-root``, mode 0700) fails with "Permission denied", and
a plain read-only bind can be made writable again by root inside with ``mount -o
remount,bind,rw``. So before the container starts, the host (real root, host mount namespace)
mounts each host path read-only on a staging path of the instance, ``<instance>/mounts/<n>``
(a directory or an empty file), and the mount entry binds that staging path instead:

- liblxc reaches the staging path through directories its uid may search;
- the staging mount is read-only when liblxc copies the host's mount namespace into one owned
  by the container's user namespace, so the kernel locks it read-only (``MNT_LOCK_READONLY``:
  fs/namespace.c, ``lock_mnt_tree``), and the bind of it keeps the lock: a remount read-write
  inside fails with EPERM (a privileged container has no user namespace of its own: its root
  is the host's, and nothing locks a mount against it);
- for an unprivileged container the staging mount is idmapped with the container's own
  mapping (host uid k is seen as uid k inside), where the filesystem supports it, so the
  host's files keep their owners as the container sees them (host root's are root's inside).
  Where the filesystem refuses idmapping, it is a plain read-only bind, and the host path must
  then be readable by the container's root as a stranger to it.

The staging mounts are detached when the instance stops, is deleted or is reaped.

There are no Python bindings for ``open_tree``, ``mount_setattr`` and ``move_mount``: they are
called through ctypes here, in the few lines they need.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_incus import fsutil
from pytest_incus.errors import InstanceStartError

STAGING = "mounts"  # below the instance directory
USERNS_DEADLINE = 5.0  # seconds for the helper process to enter its user namespace

# syscall numbers: the same on every architecture with the unified table (x86_64, arm64,
# riscv64, ...): the new syscalls (424 and up) were numbered alike everywhere
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_IDMAP = 0x100000
_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
# what mount_setattr says when a filesystem (or kernel) cannot idmap a mount
_NO_IDMAP = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [  # struct mount_attr, MOUNT_ATTR_SIZE_VER0
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


@dataclass(frozen=True)
class StagedMount:
    """One host path to mount: where it is staged, and where the instance sees it."""

    source: Path  # the host path, symlinks resolved
    staging: Path  # <instance>/mounts/<n>
    target: str  # absolute, inside the instance
    is_dir: bool

    def config_line(self) -> str:
        """The LXC mount entry that binds the staging path at the target."""
        kind = "dir" if self.is_dir else "file"
        return (
            f"lxc.mount.entry = {self.staging} {self.target.lstrip('/')} none "
            f"bind,ro,create={kind} 0 0"
        )


def plan(requested: Mapping[str, str], directory: Path) -> list[StagedMount]:
    """The staged mounts of an instance in ``directory``, their staging paths made (an empty
    directory or file each, reachable by the container's root)."""
    planned = []
    for n, (host, target) in enumerate(requested.items()):
        source = Path(host).resolve()
        staged = StagedMount(source, directory / STAGING / str(n), target, source.is_dir())
        staged.staging.parent.mkdir(mode=0o755, exist_ok=True)
        if staged.is_dir:
            staged.staging.mkdir(mode=0o755, exist_ok=True)
        else:
            staged.staging.touch(mode=0o644, exist_ok=True)
        planned.append(staged)
    return planned


def stage(planned: list[StagedMount], idmap: tuple[int, int] | None) -> None:
    """Mount every planned host path read-only on its staging path, idmapped (host uid k seen
    as k by a container whose uid 0 is host uid ``idmap[0]``, ``idmap[1]`` ids mapped) where the
    filesystem allows it. Raises InstanceStartError naming the path and the fix."""
    if not planned:
        return
    unstage(planned[0].staging.parent.parent)  # what a previous start left, if it was killed
    try:
        for staged in planned:
            _stage_one(staged, idmap)
    except BaseException:
        unstage(planned[0].staging.parent.parent)
        raise


def unstage(directory: Path) -> None:
    """Detach the staging mounts of the instance in ``directory`` (none is fine)."""
    fsutil.unmount_below(directory / STAGING)


def _stage_one(staged: StagedMount, idmap: tuple[int, int] | None) -> None:
    source = staged.source

    def fail(why: str, fix: str) -> InstanceStartError:
        return InstanceStartError(
            f"cannot mount host path {source} at {staged.target}: {why}; {fix}"
        )

    if not os.access(source, os.R_OK | (os.X_OK if staged.is_dir else 0)):
        raise fail(
            "root on this host cannot read it (a network or FUSE filesystem that denies root?)",
            "mount a path that root can read, or copy it somewhere local first",
        )
    if staged.is_dir != source.is_dir():
        raise fail("it changed from a file to a directory or back", "launch again")
    if idmap is not None:
        try:
            _idmapped_bind(source, staged.staging, idmap)
            return
        except OSError as exc:
            if exc.errno not in _NO_IDMAP:
                fix = "check that the path is an ordinary file or directory"
                raise fail(str(exc), fix) from exc
        # the filesystem cannot idmap: a plain bind, seen by the container's root as a stranger
        if not _stranger_may_read(source, staged.is_dir, idmap):
            raise fail(
                f"its filesystem ({_fstype(source)}) does not support idmapped mounts, and "
                f"the container's root (uid {idmap[0]} on this host) may not "
                f"{'list' if staged.is_dir else 'read'} it",
                f"make it readable by others (chmod o+r{'x' if staged.is_dir else ''}), or "
                "mount a copy of it on a local filesystem",
            )
    try:
        _read_only_bind(source, staged.staging)
    except OSError as exc:
        raise fail(str(exc), "check that the path is an ordinary file or directory") from exc


def _read_only_bind(source: Path, staging: Path) -> None:
    """A plain bind of ``source`` on ``staging``, then made read-only."""
    _check(_libc.mount(bytes(source), bytes(staging), None, _MS_BIND, None), f"bind {source}")
    try:
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        _check(_libc.mount(None, bytes(staging), None, flags, None), f"read-only {staging}")
    except OSError:
        fsutil.unmount_below(staging)
        raise


def _idmapped_bind(source: Path, staging: Path, idmap: tuple[int, int]) -> None:
    """A read-only, idmapped clone of the mount at ``source``, attached on ``staging``; it is
    never attached writable or un-mapped (a failure leaves the detached clone to the kernel)."""
    tree = _check(
        _libc.syscall(
            _SYS_OPEN_TREE,
            -100,  # AT_FDCWD
            bytes(source),
            _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_SYMLINK_NOFOLLOW,
        ),
        f"open_tree {source}",
    )
    try:
        attr = _MountAttr(
            attr_set=_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY, userns_fd=_userns_fd(*idmap)
        )
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                tree,
                b"",
                _AT_EMPTY_PATH,
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            f"idmap {source}",
        )
        _check(
            _libc.syscall(
                _SYS_MOVE_MOUNT, tree, b"", -100, bytes(staging), _MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"attach {staging}",
        )
    finally:
        os.close(tree)


@functools.cache
def _userns_fd(base: int, count: int) -> int:
    """A user namespace mapping ids 0..count-1 to host ids base.., as a file descriptor kept
    for the life of this process (the mapping of every unprivileged container is the same).

    A multi-threaded process cannot unshare a user namespace itself: a helper process does,
    the host's root writes its maps, and the namespace outlives it through the descriptor."""
    own = os.readlink("/proc/self/ns/user")
    helper = subprocess.Popen(["unshare", "--user", "--", "cat"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + USERNS_DEADLINE
        while _namespace(helper.pid) in (own, None):
            if helper.poll() is not None or time.monotonic() > deadline:
                raise OSError(errno.ESRCH, "unshare --user did not make a user namespace")
            time.sleep(0.001)
        for table in ("uid_map", "gid_map"):
            Path(f"/proc/{helper.pid}/{table}").write_text(f"0 {base} {count}\n")
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        assert helper.stdin is not None
        helper.stdin.close()
        helper.wait()


def _namespace(pid: int) -> str | None:
    """The user namespace of ``pid`` ("user:[inode]"), or None if it cannot be read (yet)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return None


def _stranger_may_read(source: Path, is_dir: bool, idmap: tuple[int, int]) -> bool:
    """Whether the container's root may read ``source`` through a plain bind: its host uid is
    ``idmap[0]``, and the mode bits that apply to it are the owner's, group's or others'."""
    st = os.stat(source)
    base, count = idmap
    if base <= st.st_uid < base + count:
        bits = (st.st_mode >> 6) & 7
    elif base <= st.st_gid < base + count:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    need = 5 if is_dir else 4
    return stat.S_ISDIR(st.st_mode) == is_dir and bits & need == need


def _fstype(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from this namespace's mount table."""
    best, fstype = "", "unknown"
    target = str(path)
    for point, kind in fsutil.mount_table():
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    return fstype
