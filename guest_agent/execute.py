"""Running commands: QEMU's asynchronous ``guest-exec`` / ``guest-exec-status``, and our
one-round-trip ``pti-exec`` that waits for the command and returns everything.

Commands are spawned with ``subprocess`` (it uses vfork when it can, which stays fast under
TCG) in a session of their own, so a timeout can kill their whole process group, and every
descendant found under ``/proc`` too.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import signal
import stat
import subprocess
import threading
import time

from guest_agent.errors import CommandError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_GRACE = 5.0  # seconds to collect output after killing a command
MAX_CAPTURE = 16 << 20  # bytes of stdout/stderr kept per guest-exec stream (as qemu-ga)


class User:
    """A user as the guest's /etc/passwd and /etc/group describe it."""

    def __init__(self, name: str, uid: int, gid: int, home: str, shell: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home
        self.shell = shell
        self._groups: list[int] | None = None

    @property
    def groups(self) -> list[int]:
        """Supplementary groups from /etc/group (read only when switching to this user)."""
        if self._groups is None:
            self._groups = _groups_of(self.name, self.gid)
        return self._groups

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """What a login gives this user, with ``extra`` over it."""
        base = {
            "PATH": DEFAULT_PATH,
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell or "/bin/sh",
        }
        base.update(extra)
        return base


def lookup_user(user: str | int | None) -> User:
    """The user named (or numbered) ``user``, this process's own for None."""
    wanted: str | int = os.getuid() if user is None else user
    if isinstance(wanted, str) and wanted.isdigit():
        wanted = int(wanted)
    try:
        with open("/etc/passwd") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 7 and (parts[0] == wanted or parts[2] == str(wanted)):
                    return User(parts[0], int(parts[2]), int(parts[3]), parts[5], parts[6])
    except OSError:
        pass
    if isinstance(wanted, int):
        return User(str(wanted), wanted, wanted, "/", "/bin/sh")
    raise CommandError(f"no user {wanted!r} in /etc/passwd", user=str(wanted))


def _groups_of(name: str, gid: int) -> list[int]:
    groups = {gid}
    try:
        with open("/etc/group") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and name in fields[3].split(","):
                    groups.add(int(fields[2]))
    except (OSError, ValueError):
        pass
    return sorted(groups)


def working_dir(user: User, cwd: str | None) -> str:
    """``cwd``, or the user's home (``/`` if it has none); CommandError with the errno that
    chdir would give (ENOENT, ENOTDIR) if ``cwd`` is not a directory."""
    if cwd is not None:
        if not isinstance(cwd, str):  # os.stat would take an int for a file descriptor
            raise CommandError(f"cwd must be a string, not {cwd!r}")
        try:
            is_dir = stat.S_ISDIR(os.stat(cwd).st_mode)
        except OSError as exc:
            code = exc.errno or errno.ENOENT
        else:
            if is_dir:
                return cwd
            code = errno.ENOTDIR
        raise CommandError(f"cannot enter cwd {cwd!r}: {os.strerror(code)}", code, path=cwd)
    return user.home if os.path.isdir(user.home) else "/"


def not_runnable(program: str, exc: OSError) -> tuple[int, bytes]:
    """Exit code and message for a program that cannot run, as a shell gives them."""
    missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
    message = "not found" if missing else (exc.strerror or str(exc))
    return (127 if missing else 126), f"{program}: {message}\n".encode()


def processes() -> list[tuple[int, bytes, int]]:
    """(pid, state letter, parent pid) of every process, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ")"
        fields = stat[stat.rfind(b")") + 2 :].split()
        found.append((int(entry), fields[0], int(fields[1])))
    return found


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid, _, parent in processes():
        tree.setdefault(parent, []).append(pid)
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant. Stopped first, so nothing
    forks away while we look."""
    seen: set[int] = set()
    for _ in range(5):
        tree = _children()
        todo, found = [pid], []
        while todo:
            p = todo.pop()
            found.append(p)
            todo.extend(tree.get(p, []))
        new = [p for p in found if p not in seen]
        if not new:
            break
        for p in new:
            seen.add(p)
            _signal(p, signal.SIGSTOP)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for p in seen:
        _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, sig)


def _popen(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    who: User | None,
    stdin: int,
    merge: bool = False,
) -> subprocess.Popen[bytes]:
    switch = who is not None and (who.uid != os.getuid() or who.gid != os.getgid())
    if not argv:
        raise CommandError("an empty argv")
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        user=who.uid if switch and who else None,
        group=who.gid if switch and who else None,
        extra_groups=who.groups if switch and who else None,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Running:
    """Processes spawned and not yet waited for, so the init-mode reaper leaves them alone."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.lock = threading.Lock()

    def add(self, pid: int) -> None:
        with self.lock:
            self.pids.add(pid)

    def discard(self, pid: int) -> None:
        with self.lock:
            self.pids.discard(pid)

    def snapshot(self) -> set[int]:
        with self.lock:
            return set(self.pids)


RUNNING = Running()


def pti_exec(args: dict[str, Any]) -> dict[str, Any]:
    """Run ``argv`` and wait: {exitcode, out-data, err-data, timed-out, duration}."""
    argv = args["argv"]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise CommandError("argv must be a non-empty list of strings")
    env = args.get("env") or {}
    if not isinstance(env, dict):
        raise CommandError("env must be an object of strings")
    timeout = args.get("timeout")
    stdin_data = base64.b64decode(args.get("input-data") or "")
    who = lookup_user(args.get("user"))
    workdir = working_dir(who, args.get("cwd"))
    started = time.monotonic()
    stdin = subprocess.PIPE if stdin_data else subprocess.DEVNULL
    try:
        proc = _popen(argv, who.environment(env), workdir, who, stdin)
    except OSError as exc:
        code, message = not_runnable(argv[0], exc)
        return _exec_reply(code, b"", message, False, started)
    RUNNING.add(proc.pid)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(stdin_data or None, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc.pid)
            try:
                out, err = proc.communicate(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = b"", b""
                proc.wait()
    finally:
        RUNNING.discard(proc.pid)
    code = proc.returncode
    return _exec_reply(128 - code if code < 0 else code, out, err, timed_out, started)


def _exec_reply(
    code: int, out: bytes, err: bytes, timed_out: bool, started: float
) -> dict[str, Any]:
    return {
        "exitcode": code,
        "out-data": _b64(out),
        "err-data": _b64(err),
        "timed-out": timed_out,
        "duration": time.monotonic() - started,
    }


class _Job:
    """One guest-exec command: its output is collected by a thread until it ends."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin_data: bytes, capture: bool) -> None:
        self.proc = proc
        self.capture = capture
        self.out = b""
        self.err = b""
        self.thread = threading.Thread(target=self._collect, args=(stdin_data,), daemon=True)
        self.thread.start()

    def _collect(self, stdin_data: bytes) -> None:
        try:
            out, err = self.proc.communicate(stdin_data or None)
        except Exception:  # a vanished pipe: the exit status still tells
            out, err = b"", b""
            self.proc.wait()
        self.out, self.err = out or b"", err or b""

    def status(self) -> dict[str, Any]:
        if self.thread.is_alive():
            return {"exited": False}
        code = self.proc.returncode
        reply: dict[str, Any] = {"exited": True}
        if code < 0:
            reply["signal"] = -code
        else:
            reply["exitcode"] = code
        if self.capture:
            for key, data in (("out", self.out), ("err", self.err)):
                reply[key + "-data"] = _b64(data[:MAX_CAPTURE])
                if len(data) > MAX_CAPTURE:
                    reply[key + "-truncated"] = True
        return reply


class Jobs:
    """The guest-exec table: pid -> job, until guest-exec-status reports it ended."""

    def __init__(self) -> None:
        self.jobs: dict[int, _Job] = {}

    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        path = args["path"]
        if not isinstance(path, str):
            raise CommandError("path must be a string")
        argv = [path] + [str(a) for a in args.get("arg") or []]
        env_list = args.get("env")
        env = dict(os.environ)
        if env_list is not None:
            env = dict(item.split("=", 1) for item in env_list if "=" in item)
        capture = args.get("capture-output", False)
        merge = capture == "merged"
        capture = capture not in (False, "none")
        stdin_data = base64.b64decode(args.get("input-data") or "")
        stdin = subprocess.PIPE if stdin_data else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL
                if not capture
                else (subprocess.STDOUT if merge else subprocess.PIPE),
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise CommandError(
                "Guest agent command failed, error was 'Failed to execute child process "
                f"\u201c{path}\u201d ({exc.strerror})'"
            ) from exc
        RUNNING.add(proc.pid)
        self.jobs[proc.pid] = _Job(proc, stdin_data, capture)
        return {"pid": proc.pid}

    def status(self, args: dict[str, Any]) -> dict[str, Any]:
        pid = args["pid"]
        job = self.jobs.get(pid) if isinstance(pid, int) else None
        if job is None:
            raise CommandError("Invalid parameter 'pid'")
        reply = job.status()
        if reply["exited"]:
            del self.jobs[pid]
            RUNNING.discard(pid)
        return reply
