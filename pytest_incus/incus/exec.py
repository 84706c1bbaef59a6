"""``exec`` on an Incus instance, over the exec API's websockets.

One command is one ``POST /1.0/instances/NAME/exec`` with ``wait-for-websocket``: four
websockets (control, stdin, stdout, stderr) are connected, stdin is streamed in chunks and
closed, stdout and stderr are read by one thread each, and the operation's ``return`` is the
exit code. Measured here: 17 ms for ``true`` against 47 ms for ``record-output`` (whose log
files are slow to fetch and delete), so websockets it is.

The command runs under a small POSIX ``sh`` wrapper when the instance has a shell (``shell``):

- it writes its pid to ``/run/pytest-incus/TOKEN`` (``/tmp/pytest-incus-TOKEN`` when that cannot
  be written), so that a timeout can find the command's tree; stale pid files (of processes that
  are gone) are removed by the next wrapper;
- it enters the cwd, and reports a cwd it cannot enter with a marker that becomes the OSError
  chdir gives (FileNotFoundError, NotADirectoryError, PermissionError, ``filename`` = cwd);
- for root (the default user) it reads HOME and SHELL from the instance's ``/etc/passwd`` itself,
  which saves a request per exec;
- it gives a missing program exit 127 with ``PROG: not found`` on stderr, as a shell does;
- it ``exec``s the command through ``setsid`` when the instance has one, so that the command
  leads a session and a process group of its own (as it does on the local backend), and a
  timeout can kill what it left in that group after leaving its tree.

Without a shell (``shell=None``) argv is given to Incus as is, with fewer guarantees: Incus's
"Command not found" becomes exit 127, a cwd that cannot be entered is not reported (Incus runs
the command in ``/`` then), and a timeout kills only the command itself (the control
websocket's SIGKILL), not what it started.

Incus's exec API takes one uid and one gid, and liblxc drops every other group. A user other
than root who is a member of groups in the instance's ``/etc/group`` is therefore switched to by
``setpriv`` (util-linux) inside, run as root, with those supplementary groups, as the local
backend gives them; in an instance without ``setpriv`` (busybox) the user gets Incus's uid and
gid only. Incus adds ``LANG=C.UTF-8`` unless asked otherwise (the wrapper unsets it again when
the request did not set it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import websocket

from guest_agent.execute import DEFAULT_PATH, User, group_ids, passwd_entry
from pytest_incus.errors import (
    ExecTimeoutError,
    IncusError,
    ServerError,
    UnknownUserError,
    setup_error,
)
from pytest_incus.values import ExecRequest, ExecResult

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient

CHUNK = 1 << 16  # bytes of stdin per websocket message
READ_POLL = 0.5  # seconds each websocket read may block before the reader looks at its stop flag
KILL_GRACE = 2.0  # seconds after the kill for the operation to end and its streams to close
DRAIN = 3.0  # seconds the streams may take to close after the command ended (Incus: ~1 s when
# a background process holds stdout)
CONNECT_TIMEOUT = 10.0  # seconds for each websocket to connect
CWD_FAILED = 125  # the wrapper's exit code for a cwd it could not enter (with the marker)

# The wrapper: $1 token, $2 cwd, $3 how to take the cwd ("strict": the caller's, an error if it
# cannot be entered; "home": a home, "/" if missing; "root": root's home from /etc/passwd),
# $4 the variables to fill from root's passwd entry ("HOME SHELL" minus what the request gives),
# $5 "1" to unset LANG (Incus's default, which the request did not ask for); then argv.
# Everything is a positional parameter: nothing of the request is interpolated into the script.
WRAPPER = r"""t=$1 c=$2 m=$3 f=$4 l=$5
shift 5
d=/run/pytest-incus
if [ ! -d "$d" ] && [ -d /run ]; then mkdir "$d" 2>/dev/null && chmod 1777 "$d"; fi
for p in "$d"/* /tmp/pytest-incus-*; do
  [ -f "$p" ] || continue
  q=
  read -r q < "$p" 2>/dev/null
  [ -d "/proc/$q" ] || rm -f "$p" 2>/dev/null
done
{ echo $$ > "$d/$t"; } 2>/dev/null || { echo $$ > "/tmp/pytest-incus-$t"; } 2>/dev/null
if [ "$m" = root ]; then
  h=/ s=/bin/sh
  if [ -r /etc/passwd ]; then
    while IFS=: read -r n x u g r hh ss; do
      if [ "$u" = 0 ]; then h=$hh s=${ss:-/bin/sh}; break; fi
    done < /etc/passwd
  fi
  case " $f " in *" HOME "*) export HOME="$h";; esac
  case " $f " in *" SHELL "*) export SHELL="$s";; esac
  c=$h m=home
fi
if [ "$m" = strict ]; then
  if ! cd "$c" 2>/dev/null; then
    e=EACCES
    if [ ! -e "$c" ]; then
      e=ENOENT p=$c
      while :; do
        case $p in */*) p=${p%/*};; *) break;; esac
        [ -n "$p" ] || break
        if [ -e "$p" ]; then [ -d "$p" ] || e=ENOTDIR; break; fi
      done
    elif [ ! -d "$c" ]; then
      e=ENOTDIR
    fi
    printf 'pti-cwd-%s:%s\n' "$t" "$e" >&2
    exit 125
  fi
else
  cd "$c" 2>/dev/null || cd /
fi
[ "$l" = 1 ] && unset LANG
case $1 in
  */*) if [ ! -e "$1" ]; then printf '%s: not found\n' "$1" >&2; exit 127; fi;;
  *) if ! command -v "$1" >/dev/null 2>&1; then printf '%s: not found\n' "$1" >&2; exit 127; fi;;
esac
if command -v setsid >/dev/null 2>&1; then exec setsid "$@"; fi
exec "$@"
"""

# The kill script, run as root in a second exec: $1 the token of the command's pid file. It
# stops the tree rooted at that pid (children by their parent pid in /proc/*/stat, again and
# again until nothing new appears: a tree that forks cannot outrun it), plus every process of
# the pid's group when it leads one, then kills them all. Never pid 1, never itself.
KILLER = r"""t=$1 root=
i=0
while [ $i -lt 50 ]; do
  for f in "/run/pytest-incus/$t" "/tmp/pytest-incus-$t"; do
    [ -r "$f" ] && read -r root < "$f" && break
  done
  [ -n "$root" ] && break
  i=$((i + 1))
  sleep 0.01
done
case $root in ''|*[!0-9]*) exit 3;; esac
[ "$root" -gt 1 ] || exit 4
lead=0
if read -r l < "/proc/$root/stat" 2>/dev/null; then
  set -- ${l##*) }
  [ "$3" = "$root" ] && lead=1
fi
seen=" $root "
kill -STOP "$root" 2>/dev/null
round=0
while [ $round -lt 20 ]; do
  new=
  for s in /proc/[0-9]*/stat; do
    l=
    read -r l < "$s" 2>/dev/null || continue
    p=${l%% *}
    [ "$p" = 1 ] || [ "$p" = $$ ] && continue
    case $seen in *" $p "*) continue;; esac
    set -- ${l##*) }
    case $seen in *" $2 "*) new="$new $p"; continue;; esac
    [ $lead = 1 ] && [ "$3" = "$root" ] && new="$new $p"
  done
  [ -n "$new" ] || break
  for p in $new; do kill -STOP "$p" 2>/dev/null; seen="$seen$p "; done
  round=$((round + 1))
done
[ $lead = 1 ] && kill -KILL -- "-$root" 2>/dev/null
for p in $seen; do kill -KILL "$p" 2>/dev/null; done
rm -f "/run/pytest-incus/$t" "/tmp/pytest-incus-$t"
exit 0
"""


def _text(read_file: Callable[[str], bytes], path: str) -> str:
    try:
        return read_file(path).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def lookup_user(user: str | int, read_file: Callable[[str], bytes]) -> User | None:
    """``user`` as the instance's /etc/passwd (read with ``read_file``) gives it (the guest
    agent's rule), None if it has no such name; a missing passwd has no users but the
    numeric ones."""
    return passwd_entry(_text(read_file, "/etc/passwd"), user)


@contextlib.contextmanager
def websocket_errors(what: str) -> Iterator[None]:
    """Translate websocket-client's failures (and the socket errors under them) into
    ServerError, once, for everything exec does on its websockets."""
    try:
        yield
    except websocket.WebSocketException as exc:
        raise ServerError(
            f"{what}: the exec websocket failed: {exc}; is the Incus server still running?",
            exc=exc,
        ) from exc
    except OSError as exc:
        raise ServerError(
            f"{what}: the exec websocket's connection failed: {exc}; is the Incus server "
            "still running?",
            exc=exc,
        ) from exc


class _Reader(threading.Thread):
    """Reads one output websocket until the server closes it, or until told to stop; every
    read has a deadline (READ_POLL), so a reader never hangs."""

    def __init__(self, ws: websocket.WebSocket, name: str) -> None:
        super().__init__(name=f"pytest-incus-exec-{name}", daemon=True)
        self.ws = ws
        self.chunks: list[bytes] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.ws.settimeout(READ_POLL)
        while not self.stop.is_set():
            try:
                # frames, not recv_data(): that one answers a ping itself, and when the server
                # has sent its ping, the output and its end and closed the connection, the
                # answer fails (EPIPE) before the output already received is returned (seen
                # once in 400 short commands)
                frame = self.ws.recv_frame()  # type: ignore[no-untyped-call]
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                return  # closed without a close frame: the end, all the same
            except (websocket.WebSocketException, OSError) as exc:
                self.error = exc
                return
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                return
            if frame.opcode == websocket.ABNF.OPCODE_PING:
                # Incus's keep-alive: answered if the connection still takes it
                with contextlib.suppress(websocket.WebSocketException, OSError):
                    self.ws.pong(frame.data)
                continue
            if frame.opcode in (
                websocket.ABNF.OPCODE_BINARY,
                websocket.ABNF.OPCODE_TEXT,
                websocket.ABNF.OPCODE_CONT,
            ):
                if not frame.data and frame.opcode != websocket.ABNF.OPCODE_CONT:
                    return  # an empty message: how the server says end of file
                self.chunks.append(frame.data)

    def output(self) -> bytes:
        """What was read (all of it once the thread has ended)."""
        return b"".join(self.chunks)


class _Writer(threading.Thread):
    """Streams stdin in CHUNK messages, then a close frame for end of file. A command that
    closes its stdin early makes the server close the socket: the rest is dropped, as a pipe
    would."""

    def __init__(self, ws: websocket.WebSocket, data: bytes | None) -> None:
        super().__init__(name="pytest-incus-exec-stdin", daemon=True)
        self.ws = ws
        self.data = data or b""

    def run(self) -> None:
        view = memoryview(self.data)
        with contextlib.suppress(websocket.WebSocketException, OSError):
            for start in range(0, len(view), CHUNK):
                self.ws.send_bytes(bytes(view[start : start + CHUNK]))
            self.ws.send_close()


def _environment(request: ExecRequest, user: User | None) -> tuple[dict[str, str], list[str]]:
    """The command's environment (Incus's ``environment``) and which of HOME and SHELL the
    wrapper must fill from root's passwd entry (for ``user`` None: root, not looked up)."""
    if user is None:
        base = {"PATH": DEFAULT_PATH, "USER": "root", "LOGNAME": "root", "HOME": "/root"}
        fill = [key for key in ("HOME", "SHELL") if key not in request.env]
        return {**base, **request.env}, fill
    return user.environment(dict(request.env)), []


def run(
    client: IncusClient,
    instance: str,
    request: ExecRequest,
    *,
    shell: str | None,
    read_file: Callable[[str], bytes],
) -> ExecResult:
    """Run ``request`` in Incus instance ``instance``; its result.

    ``shell`` is a POSIX sh inside the instance for the wrapper (None: run argv directly, see
    the module's docstring); ``read_file`` reads a file inside (the user lookup needs
    /etc/passwd). Raises ExecTimeoutError after killing the command and its tree past
    ``request.timeout``, UnknownUserError, the OSError of a cwd that cannot be entered, and
    ServerError when Incus fails.
    """
    argv = list(request.argv)
    where = f"Incus instance {instance}"
    user = None
    if request.user is not None:
        user = lookup_user(request.user, read_file)
        if user is None:
            raise UnknownUserError(
                f"{where}: cannot run {argv!r} as user {request.user!r}: the instance's "
                "/etc/passwd has no such user; create it first (useradd), or give a user "
                "name or uid it has",
                user=str(request.user),
            )
    env, fill = _environment(request, user)
    token = secrets.token_hex(8)
    body: dict[str, Any] = {
        "environment": env,
        "wait-for-websocket": True,
        "interactive": False,
        "record-output": False,
        "user": 0 if user is None else user.uid,
        "group": 0 if user is None else user.gid,
    }
    if shell is not None:
        if request.cwd is not None:
            cwd, mode = request.cwd, "strict"
        elif user is None:
            cwd, mode = "/", "root"
        else:
            cwd, mode = user.home, "home"
        unset_lang = "0" if "LANG" in request.env else "1"
        body["command"] = [
            shell, "-c", WRAPPER, "pytest-incus-exec",
            token, cwd, mode, " ".join(fill), unset_lang, *argv,
        ]  # fmt: skip
        body["cwd"] = "/"
    else:
        body["command"] = argv
        body["cwd"] = request.cwd or ("/root" if user is None else user.home)
    if (
        shell is not None
        and user is not None
        and len(gids := group_ids(_text(read_file, "/etc/group"), user.name, user.gid)) > 1
    ):
        switched = {
            **body,
            "user": 0,
            "group": 0,
            "command": [
                "setpriv",
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--groups=" + ",".join(map(str, gids)),
                "--",
                *body["command"],
            ],
        }
        result = _Exec(client, instance, request, switched, token, shell).run()
        if not (result.exit_code == 127 and not result.stderr_bytes):
            return result
        # Incus found no setpriv (the wrapper says "not found" itself): Incus's uid and gid
    return _Exec(client, instance, request, body, token, shell).run()


class _Exec:
    """One command's websockets, threads and operation."""

    def __init__(
        self,
        client: IncusClient,
        instance: str,
        request: ExecRequest,
        body: dict[str, Any],
        token: str,
        shell: str | None,
    ) -> None:
        self.client = client
        self.instance = instance
        self.request = request
        self.body = body
        self.token = token
        self.shell = shell
        self.what = f"exec({list(request.argv)!r}) in Incus instance {instance}"
        self.sockets: dict[str, websocket.WebSocket] = {}

    def run(self) -> ExecResult:
        started = time.monotonic()
        try:
            operation = self.client.start(
                "POST", f"/1.0/instances/{self.instance}/exec", json=self.body
            )
        except ServerError as exc:
            raise self._refused(exc) from exc
        op_id = operation["id"]
        fds = operation["metadata"]["fds"]
        try:
            with websocket_errors(self.what):
                # the control socket first: Incus kills the command when it closes, so it is
                # closed (last) only once the command has ended or must die
                for key in ("control", "0", "1", "2"):
                    self.sockets[key] = self.client.websocket(op_id, fds[key])
            return self._communicate(op_id, started)
        finally:
            for key in ("0", "1", "2", "control"):
                if key in self.sockets:
                    with contextlib.suppress(Exception):
                        self.sockets[key].close(timeout=0.2)

    def _communicate(self, op_id: str, started: float) -> ExecResult:
        writer = _Writer(self.sockets["0"], self.request.input)
        readers = [_Reader(self.sockets["1"], "stdout"), _Reader(self.sockets["2"], "stderr")]
        writer.start()
        for reader in readers:
            reader.start()
        timeout = self.request.timeout
        deadline = None if timeout is None else started + timeout
        timed_out = not _join_all(readers, deadline)
        if timed_out:
            self._kill()
            _join_all(readers, time.monotonic() + KILL_GRACE)
        duration = time.monotonic() - started
        for reader in readers:  # whatever happens next, no reader outlives this call
            reader.stop.set()
        operation = self._finished(op_id, KILL_GRACE if timed_out else DRAIN)
        for reader in readers:
            reader.join(READ_POLL + 0.5)
            if reader.error is not None and not timed_out:
                raise ServerError(
                    f"{self.what}: reading its output failed: {reader.error}",
                    exc=reader.error,
                ) from reader.error
        stdout, stderr = readers[0].output(), readers[1].output()
        if operation is None:
            exit_code = 128 + 9
        else:
            exit_code = int((operation.get("metadata") or {}).get("return", -1))
        if timed_out:
            raise ExecTimeoutError(
                f"{list(self.request.argv)!r} in {self.instance} ran past its timeout of "
                f"{timeout}s and was killed with its descendants; raise timeout= "
                "(or incus_exec_timeout) if it needs longer",
                cmd=list(self.request.argv),
                exit_code=128 + 9,
                stdout_bytes=stdout,
                stderr_bytes=stderr,
                duration=duration,
            )
        if self.shell is not None and exit_code == CWD_FAILED:
            self._cwd_error(stderr)
        if self.shell is None and exit_code in (126, 127) and not stderr:
            # Incus ran nothing and said so only in the operation's error: say it as sh would
            problem = "not found" if exit_code == 127 else "Permission denied"
            stderr = f"{self.request.argv[0]}: {problem}\n".encode()
        return ExecResult(exit_code, stdout, stderr, duration)

    def _finished(self, op_id: str, patience: float) -> dict[str, Any] | None:
        """The ended operation (None if it still runs after ``patience`` seconds: killed, it
        will end). ServerError when it failed."""
        try:
            operation = self.client.wait(op_id, timeout=patience)
        except ServerError as exc:
            # Incus reports the exit codes 127 and 126 as failures of the operation
            for message, code in (("command not found", 127), ("command not executable", 126)):
                if message in str(exc).lower():
                    return {"metadata": {"return": code}}
            raise
        if operation.get("status") == "Running":
            return None
        return dict(operation)

    def _refused(self, exc: ServerError) -> IncusError:
        return ServerError(
            f"{self.what}: Incus refused the command: {exc}", status=exc.status, exc=exc
        )

    def _kill(self) -> None:
        """Kill the command and its tree: the kill script (a second exec, as root), then
        Incus's own SIGKILL of the command through the control websocket."""
        if self.shell is not None:
            with contextlib.suppress(IncusError):
                _kill_tree(self.client, self.instance, self.shell, self.token)
        with contextlib.suppress(websocket.WebSocketException, OSError):
            self.sockets["control"].send(json.dumps({"command": "signal", "signal": 9}))

    def _cwd_error(self, stderr: bytes) -> None:
        marker = f"pti-cwd-{self.token}:".encode()
        if not stderr.startswith(marker):
            return
        name = stderr[len(marker) :].split(b"\n", 1)[0].decode("ascii", "replace")
        code = getattr(errno, name, errno.EACCES)
        error = setup_error(
            f"Incus instance {self.instance}",
            self.request.argv,
            errno=code,
            path=self.request.cwd,
        )
        if error is not None:
            raise error


def _join_all(threads: list[_Reader], deadline: float | None) -> bool:
    """Wait for every thread to end, until ``deadline`` (monotonic; None: no limit): True if
    they all ended."""
    for thread in threads:
        if deadline is None:
            while thread.is_alive():
                thread.join(1.0)
        else:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
    return True


def _kill_tree(client: IncusClient, instance: str, shell: str, token: str) -> None:
    """Run the kill script for the command whose pid file is ``token``, as root, and wait for
    it (bounded)."""
    operation = client.start(
        "POST",
        f"/1.0/instances/{instance}/exec",
        json={
            "command": [shell, "-c", KILLER, "pytest-incus-kill", token],
            "environment": {"PATH": DEFAULT_PATH},
            "wait-for-websocket": False,
            "interactive": False,
            "record-output": False,
            "cwd": "/",
        },
    )
    client.wait(operation["id"], timeout=KILL_GRACE)
