"""The host side of the guest agent: QEMU's guest-agent protocol over a unix socket.

``AgentClient`` talks to whatever agent answers on the VM's ``org.qemu.guest_agent.0`` port
(QEMU's chardev socket ``qga.sock``): our ``guest_agent`` or Debian's stock ``qemu-ga``. It asks
``guest-info`` which commands exist and chooses its ``Peer`` once (``peer.py``): our ``pti-*``
extensions when it finds them (exec streamed in chunks, files by offset, ``extensions.py``),
else the same done through ``guest-exec`` and the guest's shell tools (``fallback.py``).

One request at a time goes over the socket (a lock); every send and every wait for a reply has
a deadline. A reply that never came leaves the stream out of step, so the next request first
resynchronises with ``guest-sync-delimited``; after an agent went silent (``NoReply``: a
command stopped or killed it, or the guest hangs) that takes at most ``SILENT_SYNC``, so the
next request fails fast with an error that says so, or goes on if the agent came back. Protocol errors become ``AgentError`` or, for file operations that
failed in the guest's filesystem, the matching ``OSError``, and for a command that could not
start (a missing cwd, an unknown user) the error every kind raises for it (``_raise_error``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import stat as stat_module
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from pytest_incus.agent import extensions, fallback
from pytest_incus.agent.peer import NoReply, Peer
from pytest_incus.errors import AgentError, ExecTimeoutError, IncusError, setup_error
from pytest_incus.values import ExecRequest, ExecResult, NetworkAttachment, Stat

log = logging.getLogger("pytest_incus")

CONNECT_RETRY = 0.01  # seconds between attempts while QEMU's socket does not exist yet
SYNC_RETRY = 0.25  # seconds before a guest-sync that got no answer is sent again
REPLY_TIMEOUT = 300.0  # seconds for any reply but exec's (big files under TCG are slow)
STALE_SYNC = 10.0  # seconds to resynchronise after a reply that came late or broken
SILENT_SYNC = 3.0  # the same after the agent did not answer at all
MAX_REPLY = 256 << 20  # bytes of one reply line


class AgentClient:
    """A connection to a guest agent over ``socket_path`` (see the module docstring)."""

    def __init__(
        self, socket_path: str | os.PathLike[str], name: str = "guest", *, extensions: bool = True
    ) -> None:
        self.socket_path = Path(socket_path)
        self.name = name
        self.extensions = extensions  # False: use only what a stock qemu-ga offers (tests)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._lock = threading.RLock()
        self._stale = False
        self._silent: str | None = None  # the request the agent last left unanswered
        self._commands: dict[str, bool] = {}
        # until connect() has asked guest-info: what every agent offers
        self._peer: Peer = fallback.StockAgent(self)

    # -- connection --------------------------------------------------------------------------

    def connect(self, deadline: float) -> None:
        """Connect and synchronise, retrying until ``deadline`` (``time.monotonic()``): QEMU's
        socket may not exist yet, and the agent may not be up yet. AgentError past it."""
        with self._lock:
            last: Exception | None = None
            while time.monotonic() < deadline:
                try:
                    self._open()
                    self._sync(deadline)
                    break
                except (OSError, AgentError) as exc:
                    last = exc
                    self._drop()
                    time.sleep(CONNECT_RETRY)
            else:
                raise AgentError(
                    f"{self.name}: the guest agent did not answer on {self.socket_path} in "
                    f"time (last problem: {last}); is the agent running in the guest? Look at "
                    "its console log",
                    exc=last,
                )
            info = self._request("guest-info", {}, deadline=time.monotonic() + REPLY_TIMEOUT)
            self._commands = {
                c["name"]: bool(c["enabled"])
                for c in info["supported_commands"]
                if self.extensions or not c["name"].startswith("pti-")
            }
            ours = all(self.has(command) for command in extensions.COMMANDS)
            self._peer = extensions.Extensions(self) if ours else fallback.StockAgent(self)

    def _open(self, deadline: float | None = None) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:  # a host path: never to be taken for one in the guest
            sock.close()
            raise AgentError(
                f"{self.name}: cannot connect to the guest agent's socket {self.socket_path} "
                f"({exc.strerror}); did the VM stop?",
                exc=exc,
            ) from exc
        self._sock = sock
        self._buffer.clear()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buffer.clear()

    def close(self) -> None:
        """Close the connection (the agent stays; ``connect`` again to reuse it)."""
        with self._lock:
            self._drop()

    def _sync(self, deadline: float) -> None:
        """guest-sync-delimited until the agent answers our id: everything before is stale.
        Sent again every SYNC_RETRY: a guest whose port was closed may have lost it."""
        while True:
            # a fresh id each time: the agent answers every copy it got, and the answer to an
            # earlier copy must not be taken for the reply to the next request
            sync_id = random.randrange(1, 1 << 31)
            retry = min(deadline, time.monotonic() + SYNC_RETRY)
            try:
                self._send(b"\xff" + _encode("guest-sync-delimited", {"id": sync_id}), deadline)
                while True:
                    self._skip_to_delimiter(retry)
                    reply = self._read_reply(retry)
                    if reply.get("return") == sync_id:
                        self._stale = False
                        return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise AgentError(
                        f"{self.name}: the guest agent did not answer guest-sync"
                    ) from None

    # -- framing -----------------------------------------------------------------------------

    def _send(self, data: bytes, deadline: float | None = None) -> None:
        if self._sock is None:
            self._open()
        assert self._sock is not None
        remaining = REPLY_TIMEOUT if deadline is None else deadline - time.monotonic()
        self._sock.settimeout(max(remaining, 0.001))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            # an agent that does not read: part of the message may be out (the next sync's
            # 0xFF makes the agent drop it)
            self._stale = True
            raise
        except OSError as exc:
            self._drop()
            raise AgentError(
                f"{self.name}: cannot send to the guest agent ({exc}); did the VM stop?", exc=exc
            ) from exc

    def _fill(self, deadline: float | None) -> None:
        assert self._sock is not None
        if deadline is None:
            self._sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(1 << 20)
        except TimeoutError:
            raise
        except OSError as exc:
            self._drop()
            raise AgentError(f"{self.name}: lost the guest agent connection ({exc})") from exc
        if not data:
            self._drop()
            raise AgentError(
                f"{self.name}: the guest agent connection closed (did the VM stop or reboot?)"
            )
        self._buffer += data

    def _skip_to_delimiter(self, deadline: float) -> None:
        while (index := self._buffer.find(b"\xff")) < 0:
            self._buffer.clear()
            self._fill(deadline)
        del self._buffer[: index + 1]

    def _read_reply(self, deadline: float | None) -> dict[str, Any]:
        while True:
            while (index := self._buffer.find(b"\n")) < 0:
                if len(self._buffer) > MAX_REPLY:
                    self._drop()
                    raise AgentError(f"{self.name}: a reply of the guest agent was too large")
                self._fill(deadline)
            line = bytes(self._buffer[:index])
            del self._buffer[: index + 1]
            # a late answer to an earlier guest-sync-delimited is never the reply we wait for
            # (_sync strips the 0xFF of the one it waits for before reading it)
            if not line.startswith(b"\xff"):
                break
        try:
            reply = json.loads(line)
        except ValueError as exc:
            self._stale = True
            raise AgentError(f"{self.name}: the guest agent sent malformed JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise AgentError(f"{self.name}: the guest agent sent {reply!r}, not an object")
        return reply

    # -- requests ----------------------------------------------------------------------------

    def request(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = REPLY_TIMEOUT,
        deadline: float | None = None,
        path: str | None = None,
    ) -> Any:
        """Run one agent command and return its "return" value, answered within ``timeout``
        seconds (or by ``deadline``, monotonic, when given); protocol errors raise (OSError for
        ``path`` when the guest's filesystem said no, NoReply when no answer came in time,
        AgentError otherwise)."""
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        with self._lock:
            return self._request(command, arguments or {}, deadline, path)

    def _request(
        self,
        command: str,
        arguments: dict[str, Any],
        deadline: float | None,
        path: str | None = None,
    ) -> Any:
        self._resync()
        try:
            self._send(_encode(command, arguments), deadline)
            reply = self._read_reply(deadline)
        except TimeoutError:
            self._stale = True  # its reply may still come: resync before the next request
            self._silent = command
            raise NoReply(
                f"{self.name}: the guest agent did not answer {command} in time"
            ) from None
        if "error" in reply:
            _raise_error(self.name, command, arguments, reply["error"], path)
        return reply.get("return")

    def _resync(self) -> None:
        """Before a request: resynchronise a stream that is out of step; fail fast, saying
        why, when the agent has not answered since it went silent."""
        if self._sock is not None and not self._stale:
            return
        self._open()
        if self._silent is None:
            self._sync(time.monotonic() + STALE_SYNC)
            return
        try:
            self._sync(time.monotonic() + SILENT_SYNC)
        except AgentError as exc:
            raise AgentError(
                f"{self.name}: the guest agent has not answered since {self._silent} went "
                "unanswered: something stopped or killed it (a command such as `kill -STOP -1` "
                'stops it under init="systemd"), or the guest hangs; restart() the instance',
                exc=exc,
            ) from exc
        log.info("%s: the guest agent answers again after %s", self.name, self._silent)
        self._silent = None

    def has(self, command: str) -> bool:
        """True if the agent offers ``command`` and has it enabled."""
        return self._commands.get(command, False)

    @property
    def extended(self) -> bool:
        """True when the agent is ours (it offers the ``pti-*`` extensions)."""
        return self._peer.extended

    def info(self) -> dict[str, Any]:
        """What guest-info says: version and supported commands."""
        result: dict[str, Any] = self.request("guest-info")
        return result

    def ping(self) -> None:
        """guest-ping: raises AgentError if the agent does not answer."""
        self.request("guest-ping", timeout=30)

    def set_time(self, ns: int) -> None:
        """guest-set-time: set the guest's wall clock to ``ns`` nanoseconds since the epoch."""
        self.request("guest-set-time", {"time": ns})

    def add_entropy(self, data: bytes) -> None:
        """pti-add-entropy (our agent only): credit ``data`` to the guest kernel's random pool
        and reseed it, so a guest restored from a snapshot stops sharing its random state."""
        self._peer.add_entropy(data)

    def configure_network(self, attachment: NetworkAttachment, hostname: str) -> str:
        """Put the guest on its network: its one ethernet interface gets ``attachment``'s MAC
        and address, up, no default route; /etc/resolv.conf names the network's DNS server;
        the host name becomes ``hostname``. One request to our agent (``pti-net-config``),
        one guest-exec of our agent's code with a stock qemu-ga. Returns the interface's name;
        AgentError saying what failed."""
        arguments = {
            "mac": attachment.mac,
            "address": attachment.address,
            "prefix": attachment.prefix,
            "resolv-conf": attachment.resolv_conf,
            "hostname": hostname,
        }
        return self._peer.configure_network(arguments)

    def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to power down, reboot or halt. A successful guest-shutdown sends
        no reply, so nothing is awaited; the next request resynchronises."""
        if mode not in ("powerdown", "reboot", "halt"):
            raise AgentError(f"shutdown mode must be powerdown, reboot or halt, not {mode!r}")
        if self._commands and not self.has("guest-shutdown"):
            raise AgentError(f"{self.name}: the guest agent has guest-shutdown disabled")
        with self._lock:
            self._resync()
            try:
                self._send(_encode("guest-shutdown", {"mode": mode}), time.monotonic() + 10)
            except TimeoutError:
                raise NoReply(f"{self.name}: the guest agent did not take guest-shutdown") from None
            self._stale = True

    # -- the Machine methods -----------------------------------------------------------------

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command in the guest; ExecTimeoutError after killing its tree past timeout."""
        started = time.monotonic()
        try:
            code, out, err, timed_out = self._peer.run(request)
        except NoReply as exc:
            raise self._silent_exec(request, exc, time.monotonic() - started) from exc
        duration = time.monotonic() - started
        if timed_out:
            raise ExecTimeoutError(
                f"{list(request.argv)!r} in {self.name} ran past its timeout of "
                f"{request.timeout}s and was killed with its descendants; raise timeout= "
                "(or incus_exec_timeout) if it needs longer",
                cmd=list(request.argv),
                exit_code=code,
                stdout_bytes=out,
                stderr_bytes=err,
                duration=duration,
            )
        return ExecResult(code, out, err, duration)

    def _silent_exec(self, request: ExecRequest, exc: NoReply, duration: float) -> IncusError:
        """The error for an exec whose agent stopped answering: ExecTimeoutError if that
        lasted past the command's timeout, else AgentError; both say what happened."""
        argv = list(request.argv)
        what = (
            "the guest agent stopped answering: the command may have stopped or killed it (as "
            '`kill -STOP -1` does under init="systemd"), or the guest hangs; whether the '
            "command still runs is unknown"
        )
        if request.timeout is None or duration < request.timeout:
            return AgentError(
                f"{argv!r} in {self.name}: {what} (no reply for {duration:.1f}s)", exc=exc
            )
        error = ExecTimeoutError(
            f"{argv!r} in {self.name} ran past its timeout of {request.timeout}s, and {what} "
            "(exit code -1: none is known). The next exec says whether the agent came back",
            cmd=argv,
            exit_code=-1,
            stdout_bytes=exc.stdout,
            stderr_bytes=exc.stderr,
            duration=duration,
        )
        error.exc = exc
        return error

    def read_file(self, path: str) -> bytes:
        """The content of ``path`` in the guest (symlinks followed)."""
        return self._peer.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace ``path`` (parents created), owned by root."""
        self._peer.write_file(path, data, mode)

    def stat(self, path: str) -> tuple[Stat, Stat] | None:
        """(lstat, stat) of ``path``; stat is the lstat for a dangling link; None if missing."""
        raw = self._peer.stat(path)
        if raw is None:
            return None
        lst = Stat(is_symlink=stat_module.S_ISLNK(raw["lstat"]["mode"]), **raw["lstat"])
        st = lst if raw["stat"] is None else Stat(is_symlink=False, **raw["stat"])
        return lst, st

    def sha256(self, path: str) -> str:
        """The hex sha256 of the file at ``path``."""
        return self._peer.sha256(path)

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack a tar made by ``Instance.push`` at ``dest`` (see ``Machine.put_archive``)."""
        self._peer.put_archive(archive, dest, is_tree)

    def get_archive(self, path: str) -> bytes:
        """A tar of ``path``: a directory as ``.`` with its contents, else one member."""
        return self._peer.get_archive(path)

    def remove(self, path: str) -> None:
        """Remove ``path`` in the guest (a tree too); nothing if it does not exist."""
        self._peer.remove(path)


def _encode(command: str, arguments: dict[str, Any]) -> bytes:
    return json.dumps({"execute": command, "arguments": arguments}).encode()


def _raise_error(
    name: str, command: str, arguments: dict[str, Any], error: Any, path: str | None
) -> NoReturn:
    """The one place where the agent's error replies become exceptions: for a request about
    ``path`` that the guest's filesystem refused, the matching OSError (of the path the reply
    names, else ``path``); for an exec that could not start, what ``setup_error`` says;
    AgentError otherwise."""
    info = error if isinstance(error, dict) else {}
    desc = str(info.get("desc", error))
    code = info.get("errno")
    if "argv" in arguments and (
        found := setup_error(
            name, arguments["argv"], errno=code, path=info.get("path"), user=info.get("user")
        )
    ):
        raise found
    if path is not None:
        if not isinstance(code, int):
            code = fallback.errno_from_text(desc)
        if code is not None:
            raise OSError(code, os.strerror(code), info.get("path") or path)
    if "has been disabled" in desc or "has not been found" in desc:
        raise AgentError(
            f"{name}: the guest agent cannot run {command}: {desc} (a stock qemu-ga lacks our "
            "pti-* extensions, and --block-rpcs disables commands)"
        )
    raise AgentError(f"{name}: {command} failed in the guest: {desc}")
