"""Exec and files through a stock QEMU guest agent (Debian's ``qemu-ga``), which has none of
our ``pti-*`` extensions: everything it lacks is done by the guest's own tools, run with
``guest-exec`` and awaited by polling ``guest-exec-status``.

Every command runs as ``/bin/sh -c WRAPPER sh USER CWD SWITCH ARGV...`` with the caller's
``env`` (over a default PATH) as guest-exec's whole environment: the wrapper looks the user up
in /etc/passwd, enters the directory, adds the user's HOME, USER, LOGNAME and SHELL where the
caller gave none, and runs ``[setpriv ...] [timeout -s KILL T] ARGV`` (``timeout`` kills its
whole process group) with its output in files of the guest's ``/tmp``, which it then copies
to its own: qemu-ga says a command ended only once its output pipes close, which a process
started in the background may never let happen. The tools are all in a Debian minbase: coreutils, util-linux
(``setpriv``), tar. A VM's network is configured by our agent's own code, which the VM image
holds even when qemu-ga answers (``python3 -m guest_agent.network``, one guest-exec).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import os
import posixpath
import re
import secrets
import tarfile
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pytest_incus.agent.peer import answer_by
from pytest_incus.errors import AgentError, setup_error
from pytest_incus.images.vm import AGENT_DIR
from pytest_incus.values import ExecRequest

if TYPE_CHECKING:
    from pytest_incus.agent.client import AgentClient

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLL_FIRST = 0.001  # seconds before the first guest-exec-status; doubles up to POLL_MAX
POLL_MAX = 0.05
KILL_GRACE = 5.0  # seconds past the timeout for `timeout` to have killed the command
SETUP_FAILED = 125  # with SETUP_MARK on stdout: the wrapper could not prepare the command
SETUP_MARK = "pti-setup-error:"  # then "cwd ERRNO" or "user", a newline and the cwd or user
OSERROR_MARK = re.compile(r"^pti-oserror:(\d+):(.*)$", re.MULTILINE)  # errno, path
_STAT_FORMAT = "%f %u %g %s"
INLINE = 16 << 20  # bytes of stdin sent with guest-exec itself (qemu-ga takes 64 MiB of JSON)
FILE_CHUNK = 4 << 20  # bytes per guest-file-read or guest-file-write
NET_CONFIG_TIMEOUT = 60.0  # seconds for the guest's python to configure its network
# $1 a file that becomes stdin (and is removed), then the command
FROM_FILE = 'pti_in=$1; shift; exec <"$pti_in" && rm -f -- "$pti_in" && exec "$@"'

# $1 user ("" for the agent's own), $2 cwd ("" for the user's home), $3 "1" to switch to the
# user, then the command. Builtins only (no getent, id or env): under TCG every program
# started costs tens of milliseconds. The caller's environment comes in through guest-exec's
# env; only what it lacks of the user's defaults is added here.
WRAPPER = r"""
pti_user=$1 pti_cwd=$2 pti_switch=$3; shift 3
pti_fail() { printf 'pti-setup-error:%s\n%s' "$1" "$2"; exit 125; }
if [ -z "$pti_user" ]; then
  while read -r pti_key pti_value _; do
    if [ "$pti_key" = Uid: ]; then pti_user=$pti_value; fi
  done < /proc/self/status
fi
pti_found=
while IFS=: read -r pti_name _ pti_uid pti_gid _ pti_home pti_shell; do
  if [ "$pti_name" = "$pti_user" ] || [ "$pti_uid" = "$pti_user" ]; then pti_found=1; break; fi
done < /etc/passwd
if [ -z "$pti_found" ]; then
  case $pti_user in *[!0-9]*|'') pti_fail user "$pti_user";; esac
  pti_name=$pti_user pti_uid=$pti_user pti_gid=$pti_user pti_home=/ pti_shell=/bin/sh
fi
if [ -n "$pti_cwd" ]; then
  if ! cd "$pti_cwd" 2>/dev/null; then
    # the errno chdir gave: ENOTDIR if it or the nearest parent that exists is no directory
    pti_errno=13 pti_p=$pti_cwd
    if [ ! -d "$pti_p" ]; then
      pti_errno=2
      while [ -n "$pti_p" ]; do
        if [ -e "$pti_p" ]; then [ -d "$pti_p" ] || pti_errno=20; break; fi
        case $pti_p in */*) pti_p=${pti_p%/*};; *) pti_p=;; esac
      done
    fi
    pti_fail "cwd $pti_errno" "$pti_cwd"
  fi
else cd "$pti_home" 2>/dev/null || cd /; fi
unset OLDPWD
[ -n "${HOME+x}" ] || export HOME="$pti_home"
[ -n "${USER+x}" ] || export USER="$pti_name"
[ -n "${LOGNAME+x}" ] || export LOGNAME="$pti_name"
[ -n "${SHELL+x}" ] || export SHELL="${pti_shell:-/bin/sh}"
if [ "$pti_switch" = 1 ]; then
  pti_groups=--clear-groups
  if [ -n "$pti_found" ]; then pti_groups=--init-groups; fi
  set -- /usr/bin/setpriv --reuid="$pti_uid" --regid="$pti_gid" $pti_groups -- "$@"
fi
# the command writes into files, not into qemu-ga's pipes: qemu-ga reports a command ended
# only once its pipes close, which a process it started in the background may never do
pti_t=${TMPDIR:-/tmp}/pti-exec.$$
if ! { : >"$pti_t.1" && : >"$pti_t.2"; } 2>/dev/null; then exec "$@"; fi
"$@" >"$pti_t.1" 2>"$pti_t.2"
pti_code=$?
cat -- "$pti_t.1"
if [ -s "$pti_t.2" ]; then cat -- "$pti_t.2" >&2; fi
rm -f -- "$pti_t.1" "$pti_t.2"
exit $pti_code
"""


# mkdir -p, but something in the way that is not a directory (a file, a dangling link) is
# ENOTDIR naming it, as in the other kinds, rather than mkdir's "File exists" for the new path
MKDIRS = r"""
pti_mkdirs() {
  [ -d "$1" ] && return 0
  pti_d=$1
  until [ -e "$pti_d" ] || [ -L "$pti_d" ]; do
    case $pti_d in */*) pti_d=${pti_d%/*}; pti_d=${pti_d:-/};; *) pti_d=.;; esac
  done
  [ -d "$pti_d" ] || { printf 'pti-oserror:20:%s\n' "$pti_d" >&2; return 1; }
  mkdir -p -- "$1"
}
"""


def _strerror_table() -> dict[str, int]:
    wanted = (
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ELOOP,
        errno.ENOSPC,
        errno.EROFS,
        errno.ENAMETOOLONG,
    )
    return {os.strerror(code): code for code in wanted}


_STRERRORS = _strerror_table()


def errno_from_text(text: str) -> int | None:
    """The errno whose strerror appears in ``text`` (a message of qemu-ga or a guest tool)."""
    for message, code in _STRERRORS.items():
        if message in text:
            return code
    return None


def _command_line(request: ExecRequest) -> list[str]:
    """The wrapper's arguments after the user and cwd: the switch flag, then the command."""
    switch = "0" if request.user in (None, 0, "0", "root") else "1"
    argv = [switch]
    if request.timeout is not None:
        argv += ["/usr/bin/timeout", "-s", "KILL", f"{request.timeout:.3f}"]
    return argv + list(request.argv)


def spawn(
    client: AgentClient,
    argv: list[str],
    data: bytes | None,
    env: Mapping[str, str] | None = None,
    deadline: float | None = None,
) -> int:
    """Start ``argv`` with guest-exec, output captured, ``env`` over a default PATH as its
    whole environment; its pid."""
    environment = {"PATH": DEFAULT_PATH, **(env or {})}
    if data and len(data) > INLINE:
        # past qemu-ga's limit for one message: into a file of the guest, in chunks, which
        # becomes the command's stdin
        argv = ["/bin/sh", "-c", FROM_FILE, "sh", upload(client, data), *argv]
        data = None
    arguments: dict[str, Any] = {
        "path": argv[0],
        "arg": argv[1:],
        "env": [f"{key}={value}" for key, value in environment.items()],
        "capture-output": True,
    }
    if data:
        arguments["input-data"] = base64.b64encode(data).decode("ascii")
    return int(client.request("guest-exec", arguments, deadline=answer_by(deadline))["pid"])


def upload(client: AgentClient, data: bytes) -> str:
    """Write ``data`` into a new file of the guest's /tmp with guest-file-write, a chunk at a
    time; its path."""
    path = f"/tmp/pti-upload.{secrets.token_hex(8)}"
    handle = client.request("guest-file-open", {"path": path, "mode": "w"}, path=path)
    try:
        view = memoryview(data)
        for start in range(0, len(view), FILE_CHUNK):
            chunk = base64.b64encode(view[start : start + FILE_CHUNK]).decode("ascii")
            client.request("guest-file-write", {"handle": handle, "buf-b64": chunk}, path=path)
    finally:
        client.request("guest-file-close", {"handle": handle}, path=path)
    return path


def wait(client: AgentClient, pid: int, deadline: float | None) -> dict[str, Any] | None:
    """Poll guest-exec-status (quickly at first) until the command ends; None past deadline."""
    interval = POLL_FIRST
    while True:
        status: dict[str, Any] = client.request(
            "guest-exec-status", {"pid": pid}, deadline=answer_by(deadline)
        )
        if status.get("exited"):
            return status
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(interval)  # the protocol offers no notification: polling is all there is
        interval = min(interval * 2, POLL_MAX)


def _outcome(status: dict[str, Any]) -> tuple[int, bytes, bytes]:
    if status.get("out-truncated") or status.get("err-truncated"):
        raise AgentError(
            "the guest agent truncated the command's output (qemu-ga keeps at most 16 MiB); "
            "write large output to a file and read_file() it"
        )
    code = status["exitcode"] if "exitcode" in status else 128 + int(status.get("signal", 0))
    out = base64.b64decode(status.get("out-data", ""))
    err = base64.b64decode(status.get("err-data", ""))
    return int(code), out, err


def _setup_failure(name: str, argv: Sequence[str], said: bytes) -> Exception:
    """The error for what the wrapper said (after SETUP_MARK) when it could not prepare a
    command: the same as every kind raises for that mistake."""
    what, _, subject = said.decode("utf-8", "replace").partition("\n")
    kind, _, number = what.partition(" ")
    if kind == "user":
        found = setup_error(name, argv, user=subject)
    else:
        found = setup_error(name, argv, errno=int(number or 0), path=subject)
    return found or AgentError(f"{name}: cannot run {list(argv)!r}: {what} {subject}")


def tool(client: AgentClient, script: str, args: list[str], data: bytes | None = None) -> bytes:
    """Run a shell ``script`` with ``args`` as root; its stdout, or the OSError its stderr
    names (for ``args[0]``), or AgentError."""
    pid = spawn(client, ["/bin/sh", "-c", script, "sh", *args], data)
    status = wait(client, pid, None)
    assert status is not None
    code, out, err = _outcome(status)
    if code != 0:
        text = err.decode("utf-8", "replace").strip()
        if marked := OSERROR_MARK.search(text):
            raise OSError(int(marked[1]), os.strerror(int(marked[1])), marked[2])
        number = errno_from_text(text)
        if number is not None:
            raise OSError(number, os.strerror(number), args[0] if args else None)
        raise AgentError(
            f"{client.name}: {script.removeprefix(MKDIRS).split()[0]} {args!r} failed: {text}"
        )
    return out


def _is_dir(mode: int) -> bool:
    return mode & 0o170000 == 0o040000


def _renamed(archive: bytes, name: str) -> bytes:
    """``archive`` with its one member renamed to ``name``."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r") as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        for member in src.getmembers():
            data = src.extractfile(member) if member.isfile() else None
            member.name = name
            dst.addfile(member, data)
    return out.getvalue()


class StockAgent:
    """The ``Peer`` of a stock qemu-ga (or any agent without our extensions): exec through
    the wrapper, files through guest-file-* and the guest's tools."""

    extended = False

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    def run(self, request: ExecRequest) -> tuple[int, bytes, bytes, bool]:
        """Run ``request`` through the wrapper: (exit code, stdout, stderr, timed out)."""
        client = self.client
        started = time.monotonic()
        user = "" if request.user is None else str(request.user)
        argv = ["/bin/sh", "-c", WRAPPER, "sh", user, request.cwd or "", *_command_line(request)]
        deadline = None if request.timeout is None else started + request.timeout + KILL_GRACE
        pid = spawn(client, argv, request.input, request.env, deadline)
        status = wait(client, pid, deadline)
        if status is None:
            # `timeout` should have killed it: kill its group ourselves, and say so
            with contextlib.suppress(AgentError):
                spawn(client, ["kill", "-KILL", "--", f"-{pid}"], None, None, time.monotonic() + 5)
            return 137, b"", b"", True
        code, out, err = _outcome(status)
        elapsed = time.monotonic() - started
        if code == SETUP_FAILED and out.startswith(SETUP_MARK.encode()):
            raise _setup_failure(client.name, request.argv, out[len(SETUP_MARK) :])
        timed_out = (
            request.timeout is not None and code == 137 and elapsed >= request.timeout * 0.99
        )
        return code, out, err, timed_out

    def read_file(self, path: str) -> bytes:
        """The content of ``path``, through guest-file-open/read/close."""
        client = self.client
        handle = client.request("guest-file-open", {"path": path, "mode": "r"}, path=path)
        chunks = []
        try:
            while True:
                reply = client.request(
                    "guest-file-read", {"handle": handle, "count": FILE_CHUNK}, path=path
                )
                chunks.append(base64.b64decode(reply["buf-b64"]))
                if reply["eof"] or not reply["count"]:
                    break
        finally:
            client.request("guest-file-close", {"handle": handle}, path=path)
        return b"".join(chunks)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Replace ``path`` with ``data`` (stdin of one command), owned by root, parents made."""
        script = MKDIRS + (
            'pti_mkdirs "$(dirname -- "$1")" && cat > "$1" && '
            '{ [ "$(id -u)" != 0 ] || chown 0:0 -- "$1"; } && chmod "$2" -- "$1"'
        )
        tool(self.client, script, [path, f"{mode & 0o7777:o}"], data)

    def stat(self, path: str) -> dict[str, Any] | None:
        """{lstat, stat} as the extension gives it, from ``stat -c``; None if missing."""
        script = (
            f"stat -c '{_STAT_FORMAT}' -- \"$1\" && "
            f"{{ stat -L -c '{_STAT_FORMAT}' -- \"$1\" 2>/dev/null || echo dangling; }}"
        )
        try:
            lines = tool(self.client, script, [path]).decode().split("\n")
        except (FileNotFoundError, NotADirectoryError):  # missing, as pathlib says
            return None

        def record(line: str) -> dict[str, int]:
            mode, uid, gid, size = line.split()
            return {"mode": int(mode, 16), "uid": int(uid), "gid": int(gid), "size": int(size)}

        return {
            "lstat": record(lines[0]),
            "stat": None if lines[1].strip() == "dangling" else record(lines[1]),
        }

    def sha256(self, path: str) -> str:
        """The sha256 of ``path``, from sha256sum."""
        out = tool(self.client, 'sha256sum -- "$1"', [path]).decode()
        return out.split()[0].lstrip("\\")

    def remove(self, path: str) -> None:
        """rm -rf ``path``."""
        tool(self.client, 'rm -rf -- "$1"', [path])

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack ``archive`` with the guest's tar (see ``Machine.put_archive``)."""
        untar = 'tar -x --numeric-owner -p -f - -C "$1"'
        found = self.stat(dest)
        into_dir = found is not None and _is_dir((found["stat"] or found["lstat"])["mode"])
        if is_tree or into_dir:
            tool(self.client, f'{MKDIRS}pti_mkdirs "$1" && {untar}', [dest], archive)
            return
        parent = posixpath.dirname(dest) or "/"
        data = _renamed(archive, posixpath.basename(dest))
        script = f'{MKDIRS}pti_mkdirs "$1" && rm -f -- "$2" && {untar}'
        tool(self.client, script, [parent, dest], data)

    def get_archive(self, path: str) -> bytes:
        """A tar of ``path`` from the guest's tar (see ``Machine.get_archive``)."""
        found = self.stat(path)
        if found is None:
            raise FileNotFoundError(2, os.strerror(2), path)
        # into a file, read in chunks: qemu-ga captures at most 16 MiB of a command's output
        spool = f"/tmp/pti-archive.{secrets.token_hex(8)}"
        if _is_dir(found["lstat"]["mode"]):
            args = [path, ".", spool]
        else:
            args = [posixpath.dirname(path.rstrip("/")) or "/", posixpath.basename(path), spool]
        try:
            tool(self.client, 'tar -c -f "$3" -C "$1" -- "$2"', args)
            return self.read_file(spool)
        finally:
            tool(self.client, 'rm -f -- "$1"', [spool])

    def add_entropy(self, data: bytes) -> None:
        """Not for a stock agent: it has no command for the guest's random pool."""
        raise AgentError(f"{self.client.name}: only the pytest-incus agent has pti-add-entropy")

    def configure_network(self, arguments: dict[str, Any]) -> str:
        """What pti-net-config does, by our agent's own code installed in the VM image
        (guest_agent/network.py, run by the guest's python3): one guest-exec."""
        client = self.client
        argv = ["/usr/bin/python3", "-S", "-m", "guest_agent.network", json.dumps(arguments)]
        deadline = time.monotonic() + NET_CONFIG_TIMEOUT
        pid = spawn(client, argv, None, {"PYTHONPATH": AGENT_DIR}, deadline)
        status = wait(client, pid, deadline)
        if status is None:
            raise AgentError(
                f"{client.name}: configuring the guest's network (python3 -m "
                f"guest_agent.network) did not end within {NET_CONFIG_TIMEOUT}s"
            )
        code, out, err = _outcome(status)
        if code != 0:
            said = (err or out).decode("utf-8", "replace").strip() or f"exit status {code}"
            raise AgentError(
                f"{client.name}: configuring the guest's network (python3 -m "
                f"guest_agent.network, through qemu-ga) failed: {said}"
            )
        try:
            return str(json.loads(out)["interface"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(
                f"{client.name}: python3 -m guest_agent.network answered {out[:200]!r}, not "
                "the interface it configured"
            ) from exc
