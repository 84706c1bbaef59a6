"""Running commands: QEMU's asynchronous ``guest-exec`` / ``guest-exec-status``, and our
streamed ``pti-exec-start`` / ``pti-exec-poll`` (bounded buffers, any size of output).

Commands are spawned with ``subprocess`` (it uses vfork when it can, which stays fast under
TCG) in a session of their own, so a timeout can kill their whole process group, and every
descendant found under ``/proc`` too.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import select
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


def passwd_entry(text: str, user: str | int) -> User | None:
    """The entry of ``user`` (a name, a uid, or a uid as a str) in passwd file ``text``; a uid
    with no entry is that uid with home ``/``; None for a name with no entry."""
    wanted: str | int = int(user) if isinstance(user, str) and user.isdigit() else user
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and (parts[0] == wanted or parts[2] == str(wanted)):
            try:
                return User(parts[0], int(parts[2]), int(parts[3]), parts[5], parts[6])
            except ValueError:
                continue
    if isinstance(wanted, int):
        return User(str(wanted), wanted, wanted, "/", "/bin/sh")
    return None


def group_ids(text: str, name: str, gid: int) -> list[int]:
    """``gid`` and the gids of the groups in group file ``text`` that list ``name`` as a
    member, sorted."""
    groups = {gid}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and name in fields[3].split(","):
            try:
                groups.add(int(fields[2]))
            except ValueError:
                continue
    return sorted(groups)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def lookup_user(user: str | int | None) -> User:
    """The user named (or numbered) ``user``, this process's own for None."""
    wanted: str | int = os.getuid() if user is None else user
    found = passwd_entry(_read("/etc/passwd"), wanted)
    if found is None:
        raise CommandError(f"no user {wanted!r} in /etc/passwd", user=str(wanted))
    return found


def _groups_of(name: str, gid: int) -> list[int]:
    return group_ids(_read("/etc/group"), name, gid)


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


# -- our exec: a job the host streams through ------------------------------------------------
#
# pti-exec-start spawns the command and returns a job number; pti-exec-poll, called by the host
# again and again, feeds stdin, hands back what the command wrote since, and at last its exit
# status. The agent keeps no output of its own: between polls the command stalls on its full
# pipes, so its memory stays bounded whatever the command writes. The command's end is noticed
# through a pidfd, not through end of file on its pipes: a process it started in the background
# may hold them open forever. What the pipes hold at that moment is the rest of its output.

CHUNK = 1 << 20  # bytes of output (and pipe capacity) per stream and poll, at most
MAX_WAIT = 5.0  # seconds one pti-exec-poll may wait for news
LINGER = 0.02  # seconds a poll that has output goes on collecting before it answers
ABANDONED = 60.0  # seconds without a poll after which the host is taken to be gone
_F_SETPIPE_SZ = 1031
_FIONREAD = 0x541B


def _pipe_size(fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK)


def _pending(fd: int) -> int:
    """Bytes waiting in the pipe ``fd``."""
    import fcntl

    try:
        return int.from_bytes(fcntl.ioctl(fd, _FIONREAD, b"\0\0\0\0"), "little")
    except OSError:
        return 0


class ExecJob:
    """One command of pti-exec-start: its pipes (our ends, non-blocking), its process and
    what is left of its output once it ended."""

    def __init__(
        self, proc: subprocess.Popen[bytes] | None, timeout: float | None, started: float
    ) -> None:
        self.proc = proc
        self.timeout = timeout
        self.started = started
        self.polled = started
        self.timed_out = False
        self.code: int | None = None
        self.streams: dict[str, int] = {}  # "out"/"err" -> our read end, while open
        self.stdin: int | None = None
        self.rest = {"out": bytearray(), "err": bytearray()}  # read after the end
        self.pidfd: int | None = None
        self._files: dict[int, Any] = {}  # fd -> Popen's file object, which closes it
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                self._files[stream.fileno()] = stream
        assert proc.stdout is not None and proc.stderr is not None
        self.streams = {"out": proc.stdout.fileno(), "err": proc.stderr.fileno()}
        if proc.stdin is not None:
            self.stdin = proc.stdin.fileno()
        for fd in [*self.streams.values(), self.stdin]:
            if fd is not None:
                os.set_blocking(fd, False)
        for fd in self.streams.values():
            _pipe_size(fd)
        with contextlib.suppress(AttributeError, OSError):  # Linux 5.3 and Python 3.9 on
            self.pidfd = os.pidfd_open(proc.pid)

    def exchange(
        self, data: bytes, eof: bool, wait: float, limit: int, kill: bool
    ) -> dict[str, Any]:
        """Feed ``data`` to stdin (closing it after, with ``eof``) and collect up to ``limit``
        bytes per stream, for at most ``wait`` seconds: back as soon as there is news."""
        now = time.monotonic()
        self.polled = now
        if kill:
            self._kill()
        deadline = now + wait
        got: dict[str, list[bytes]] = {"out": [], "err": []}
        sizes = {"out": 0, "err": 0}
        view = memoryview(data)
        if self.stdin is None:
            view = view[:0]  # nobody to take it: as a closed pipe would
        first: float | None = None
        while self.code is None:
            if not view and eof:
                self._close_stdin()
            self._check_timeout()
            readers = [fd for key, fd in self.streams.items() if sizes[key] < limit]
            writers = [self.stdin] if view and self.stdin is not None else []
            watched = readers + ([self.pidfd] if self.pidfd is not None else [])
            until = deadline if first is None else min(deadline, first + LINGER)
            if self.timeout is not None and not self.timed_out:
                until = min(until, self.started + self.timeout)
            pause = max(0.0, until - time.monotonic())
            if self.pidfd is None:
                pause = min(pause, 0.02)
            ready, writable, _ = select.select(watched, writers, [], pause)
            for key, fd in list(self.streams.items()):
                if fd in ready:
                    chunk = self._read(key, limit - sizes[key])
                    if chunk:
                        got[key].append(chunk)
                        sizes[key] += len(chunk)
                        first = first or time.monotonic()
            if writable:
                view = self._write(view)
                if not view:
                    if eof:
                        self._close_stdin()
                    break  # all taken: the host has more to send
            if self._ended(ready):
                self._end()
            now = time.monotonic()
            if now >= deadline or (first is not None and now >= first + LINGER):
                break
            if any(size >= limit for size in sizes.values()):
                break
        for key in ("out", "err"):
            rest = self.rest[key]
            if rest and sizes[key] < limit:
                take = rest[: limit - sizes[key]]
                del rest[: len(take)]
                got[key].append(bytes(take))
        reply: dict[str, Any] = {
            "out": _b64(b"".join(got["out"])),
            "err": _b64(b"".join(got["err"])),
            "taken": len(data) - len(view),
            "exited": self.code is not None and not any(self.rest.values()),
        }
        if reply["exited"]:
            reply["exitcode"] = self.code
            reply["timed-out"] = self.timed_out
            reply["duration"] = time.monotonic() - self.started
        return reply

    def _read(self, key: str, most: int) -> bytes:
        fd = self.streams[key]
        try:
            chunk = os.read(fd, min(most, CHUNK))
        except BlockingIOError:
            return b""
        except OSError:
            chunk = b""
        if not chunk:  # end of file: nobody holds it open any more
            del self.streams[key]
            self._files.pop(fd).close()
        return chunk

    def _write(self, view: memoryview) -> memoryview:
        assert self.stdin is not None
        try:
            return view[os.write(self.stdin, view) :]
        except BlockingIOError:
            return view
        except OSError:  # the command closed its stdin: what it did not read is dropped
            self._close_stdin()
            return view[:0]

    def _close_stdin(self) -> None:
        if self.stdin is not None:
            self._files.pop(self.stdin).close()
            self.stdin = None

    def _check_timeout(self) -> None:
        if self.timeout is None or self.timed_out or self.proc is None:
            return
        if time.monotonic() >= self.started + self.timeout:
            self.timed_out = True
            self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.code is None:
            kill_tree(self.proc.pid)

    def _ended(self, ready: list[int]) -> bool:
        if self.proc is None:
            return False
        if self.pidfd is not None:
            return self.pidfd in ready
        return self.proc.poll() is not None

    def _end(self) -> None:
        """The command ended: reap it, take what its pipes hold now, and let them go."""
        assert self.proc is not None
        code = self.proc.wait()
        RUNNING.discard(self.proc.pid)
        self.code = 128 - code if code < 0 else code
        for key, fd in self.streams.items():
            count = _pending(fd)
            while count > 0:
                try:
                    chunk = os.read(fd, count)
                except OSError:
                    break
                if not chunk:
                    break
                self.rest[key] += chunk
                count -= len(chunk)
        self.release()

    def release(self) -> None:
        """Close our ends of its pipes and its pidfd."""
        for fd in [*self.streams.values(), self.stdin]:
            if fd is not None:
                self._files.pop(fd).close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.streams = {}
        self.stdin = self.pidfd = None


class Execs:
    """The pti-exec table: job number -> ExecJob, until a poll reported its end."""

    def __init__(self) -> None:
        self.jobs: dict[int, ExecJob] = {}
        self.next = 1

    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        """pti-exec-start: spawn ``argv`` (with ``env`` over the user's defaults, in ``cwd``,
        as ``user``, killed with its tree after ``timeout`` seconds, stdin a pipe if
        ``stdin``): {job}. A program that cannot run is a job that ended with 127 or 126."""
        self._forget_abandoned()
        argv = args["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise CommandError("argv must be a non-empty list of strings")
        env = args.get("env") or {}
        if not isinstance(env, dict):
            raise CommandError("env must be an object of strings")
        timeout = args.get("timeout")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise CommandError("timeout must be a number of seconds or null")
        who = lookup_user(args.get("user"))
        workdir = working_dir(who, args.get("cwd"))
        started = time.monotonic()
        stdin = subprocess.PIPE if args.get("stdin") else subprocess.DEVNULL
        try:
            proc = _popen(argv, who.environment(env), workdir, who, stdin)
        except OSError as exc:
            job = ExecJob(None, timeout, started)
            job.code, message = not_runnable(argv[0], exc)
            job.rest["err"] += message
        else:
            RUNNING.add(proc.pid)
            job = ExecJob(proc, timeout, started)
        number = self.next
        self.next += 1
        self.jobs[number] = job
        return {"job": number}

    def poll(self, args: dict[str, Any]) -> dict[str, Any]:
        """pti-exec-poll: give stdin ``input`` (base64; ``eof`` closes it after), take up to
        ``max`` bytes of stdout and of stderr, waiting at most ``wait`` seconds for news
        (``kill``: kill the command's tree first): {out, err, taken, exited} and, once it
        ended and all its output is out, its exitcode, timed-out and duration."""
        number = args["job"]
        job = self.jobs.get(number) if isinstance(number, int) else None
        if job is None:
            raise CommandError(
                f"no exec job {number!r} (it ended and was reported, or the "
                "agent restarted since it began)"
            )
        wait = min(max(float(args.get("wait", 0)), 0.0), MAX_WAIT)
        limit = min(max(int(args.get("max", CHUNK)), 1), CHUNK)
        data = base64.b64decode(args.get("input") or "")
        reply = job.exchange(data, bool(args.get("eof")), wait, limit, bool(args.get("kill")))
        if reply["exited"]:
            del self.jobs[number]
        return reply

    def _forget_abandoned(self) -> None:
        """Kill and drop the jobs no host has polled for a long time (the host went away)."""
        now = time.monotonic()
        for number, job in list(self.jobs.items()):
            if now - job.polled > ABANDONED:
                job._kill()
                if job.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        job.proc.wait(timeout=5)  # else the init-mode reaper takes it later
                    RUNNING.discard(job.proc.pid)
                job.release()
                del self.jobs[number]


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
