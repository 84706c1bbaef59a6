"""Running as the guest's first process (``--init``): mount the basic filesystems, reap
orphans, and power the machine off with reboot(2)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    from typing import Any

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 2, 4, 8, 32
_MOUNTS = (
    # (source, target, type, flags, data)
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)
_REBOOT = {"powerdown": 0x4321FEDC, "reboot": 0x01234567, "halt": 0xCDEF0123}

_libc_handle: Any = None


def _libc() -> Any:
    """libc through ctypes, loaded on first use (ctypes is slow to import under TCG); the
    interpreter's own symbols include it, so no find_library (which spawns ldconfig)."""
    global _libc_handle
    if _libc_handle is None:
        import ctypes

        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    os.makedirs(target, exist_ok=True)
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()):
        import ctypes

        err = ctypes.get_errno()
        if err != 16:  # EBUSY: already mounted (by the initramfs)
            os.write(2, f"guest_agent: mount {target}: {os.strerror(err)}\n".encode())


def _mounted() -> set[str]:
    try:
        with open("/proc/self/mounts") as f:
            return {line.split()[1] for line in f if len(line.split()) > 1}
    except OSError:
        return set()


def setup() -> None:
    """What the first process does before serving: filesystems, PATH, hostname."""
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ.setdefault("HOME", "/root")
    _libc().mount(b"", b"/", b"", MS_REMOUNT, b"")  # rw, if the kernel mounted it ro
    for source, target, fstype, flags, data in _MOUNTS:
        if target not in _mounted():
            _mount(source, target, fstype, flags, data)
    try:
        with open("/etc/hostname") as f:
            name = f.read().strip()
        if name:
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write(name)
    except OSError:
        pass
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")


def reap_orphans(keep: Callable[[], set[int]]) -> None:
    """Wait for dead children that no Popen will wait for (orphans adopted by PID 1).

    Runs after every request, so it must be cheap: one waitid() that peeks without reaping
    says whether any child is dead; only if a dead one is a command we still wait for (it may
    hide orphans behind it) do we walk /proc, which costs tens of ms under TCG."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        if info.si_pid in keep():
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, os.WNOHANG)
    _reap_by_proc(keep)


def _reap_by_proc(keep: Callable[[], set[int]]) -> None:
    from guest_agent.execute import processes

    mine = os.getpid()
    for pid, state, parent in processes():
        if state == b"Z" and parent == mine and pid not in keep():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def power(mode: str) -> None:
    """End every process, flush the disks and power off / reboot / halt with reboot(2)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            os.kill(-1, sig)
    os.sync()
    _libc().mount(b"", b"/", b"", MS_REMOUNT | 1, b"")  # MS_RDONLY
    os.sync()
    import ctypes

    _libc().reboot(ctypes.c_int(_REBOOT[mode]))  # c_int wraps the high magic numbers
    raise OSError(ctypes.get_errno(), "reboot(2) failed")
