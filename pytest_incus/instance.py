"""``Instance``: what a test holds, the same for every kind.

Everything here is kind-independent: the shell-or-argv rule of ``exec``, ``check=True``, the
``docker cp``-like semantics of ``push``/``pull``, ``file()`` checks, and the waits for a port
(from the host, at the instance's network address) or a log line. The kind-specific work
is done by the instance's ``Machine``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import re
import shlex
import socket
import stat as stat_module
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeGuard, TypeVar

from pytest_incus.errors import (
    ConfigError,
    ExecError,
    ExecTimeoutError,
    IncusError,
    NotRunningError,
    WaitTimeoutError,
    tail,
)
from pytest_incus.runtimes.protocol import Machine
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import (
    CommandRecord,
    ExecRequest,
    ExecResult,
    InstanceState,
    NetworkAttachment,
    Stat,
)

if TYPE_CHECKING:
    import testinfra.host

# How often wait_for_port and wait_for_log look again: a fraction of the time a service takes
# to start, and still cheap (a refused connection or a read of the log costs microseconds).
POLL_INTERVAL = 0.02
# A connection attempt that gets no answer at all (no refusal: the instance's interface is not
# up yet, or its guest is slow) is given up after this long and tried anew, so that a listener
# that appears meanwhile is seen soon; attempts that keep timing out get twice as long each, up
# to CONNECT_LONGEST, so that a guest that answers slowly (a loaded TCG VM) is still reached.
CONNECT_FIRST = 0.25
CONNECT_LONGEST = 2.0
# The commands an instance remembers for the report of a failed test: its newest ones.
HISTORY = 20


@dataclass(frozen=True)
class FileInfo:
    """A path inside an instance, pathlib-like. Ids are as the instance sees them.

    ``mode``, ``uid``, ``gid``, ``size``, ``sha256`` follow symlinks; ``is_symlink`` does not.
    For a missing path ``exists`` is False and the other attributes raise FileNotFoundError.
    """

    path: str
    _instance: Instance
    _stats: tuple[Stat, Stat] | None

    def _followed(self) -> Stat:
        if self._stats is None or not self.exists:  # missing, or a dangling symlink
            raise FileNotFoundError(2, f"no such file in {self._instance.name}", self.path)
        return self._stats[1]

    @property
    def exists(self) -> bool:
        """True if the path exists (a dangling symlink does not)."""
        return self._stats is not None and not (
            self._stats[0].is_symlink and self._stats[1] is self._stats[0]
        )

    @property
    def is_file(self) -> bool:
        """True for a regular file (after following symlinks)."""
        return self.exists and stat_module.S_ISREG(self._followed().mode)

    @property
    def is_dir(self) -> bool:
        """True for a directory (after following symlinks)."""
        return self.exists and stat_module.S_ISDIR(self._followed().mode)

    @property
    def is_symlink(self) -> bool:
        """True if the path itself is a symlink."""
        return self._stats is not None and self._stats[0].is_symlink

    @property
    def mode(self) -> int:
        """Permission bits (``stat.S_IMODE``)."""
        return stat_module.S_IMODE(self._followed().mode)

    @property
    def uid(self) -> int:
        """Owner uid as the instance sees it."""
        return self._followed().uid

    @property
    def gid(self) -> int:
        """Group gid as the instance sees it."""
        return self._followed().gid

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._followed().size

    @property
    def sha256(self) -> str:
        """Hex sha256 of the content."""
        self._followed()
        with self._instance._running(f"file({self.path!r}).sha256"):
            return self._instance.machine.sha256(self.path)

    def contains(self, text: str | bytes) -> bool:
        """True if the content contains ``text``."""
        self._followed()
        needle = text.encode() if isinstance(text, str) else text
        return needle in self._instance.read_file(self.path)


def _tar_filter(mode: int | None) -> Callable[[tarfile.TarInfo], tarfile.TarInfo]:
    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if mode is not None and info.isfile():
            info.mode = mode
        return info

    return owned_by_root


P = ParamSpec("P")
R = TypeVar("R")


def _uses(method: Callable[Concatenate[Instance, P], R]) -> Callable[Concatenate[Instance, P], R]:
    """Mark a method as a use of the instance: whoever launched it is told, so that
    ``--incus-keep`` keeps what a failed test used even when no fixture value shows it."""

    @functools.wraps(method)
    def used(self: Instance, /, *args: P.args, **kwargs: P.kwargs) -> R:
        __tracebackhide__ = True
        self._on_use(self)
        return method(self, *args, **kwargs)

    return used


class Instance:
    """A running system container, app container or VM that a test drives.

    Commands and file methods work the same on every kind. Made by ``instance_factory.launch()``
    or the ``instance`` fixture; gone after ``delete()``.
    """

    def __init__(
        self,
        machine: Machine,
        spec: InstanceSpec,
        *,
        exec_timeout: float,
        on_delete: Callable[[Instance], None],
        on_use: Callable[[Instance], None],
    ) -> None:
        self.machine = machine
        self.spec = spec
        self._exec_timeout = exec_timeout
        self._on_delete = on_delete
        self._on_use = on_use
        self._state = InstanceState.RUNNING
        self._history: deque[CommandRecord] = deque(maxlen=HISTORY)
        self.kept = False

    def __repr__(self) -> str:
        return f"<Instance {self.name} {self.kind} {self.image} {self._state.name}>"

    @property
    def name(self) -> str:
        """The instance's name (``pytest-incus shell NAME`` opens a shell in it)."""
        return self.machine.name

    @property
    def kind(self) -> str:
        """``container``, ``app`` or ``vm``."""
        return self.spec.kind

    @property
    def image(self) -> str:
        """The image name it was launched from."""
        return self.spec.image

    @property
    def state(self) -> InstanceState:
        """RUNNING, STOPPED or DELETED."""
        if self._state is InstanceState.RUNNING and not self.machine.running():
            self._state = InstanceState.STOPPED
        return self._state

    @property
    def ipv4(self) -> str | None:
        """The instance's IPv4 address on its host-only network, which the host (the test)
        reaches; None for ``network="none"``."""
        return self.machine.ipv4

    @property
    def network(self) -> NetworkAttachment | None:
        """Its place on a host-only network of this host (local backend): bridge, address,
        MAC; None for no network, or an instance on another backend."""
        attachment = getattr(self.machine, "network", None)
        return attachment if isinstance(attachment, NetworkAttachment) else None

    @functools.cached_property
    def testinfra(self) -> testinfra.host.Host:
        """A pytest-testinfra host whose commands run through ``exec`` (as root), so all of
        testinfra's modules work on every kind: ``instance.testinfra.package("nginx")
        .is_installed``. Made once per instance; needs the extra ``pytest-incus[testinfra]``
        (a ConfigError says so when it is missing)."""
        __tracebackhide__ = True
        from pytest_incus.testinfra_host import host_for

        return host_for(self)

    @property
    def history(self) -> tuple[CommandRecord, ...]:
        """The last commands run through ``exec`` (oldest first), with their exit codes and
        durations: what the report of a failed test shows."""
        return tuple(self._history)

    @property
    def directory(self) -> Path:
        """Where the instance's files live on the host (logs, overlay upper layer)."""
        return self.machine.directory

    # -- commands --------------------------------------------------------------------------

    @_uses
    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run ``cmd`` inside: a str through ``/bin/sh -c``, a sequence as is.

        ``env`` is added over the user's default environment and the instance's ``env``;
        ``cwd`` defaults to the user's home; ``user`` (name or uid) to root. ``timeout``
        defaults to ``incus_exec_timeout`` (0: none); past it the command and everything it
        started are killed and ExecTimeoutError is raised. ``check=True`` raises ExecError on a
        non-zero exit. A cwd that is not a directory raises the OSError chdir gives (carrying
        the cwd), a user the instance lacks UnknownUserError, a wrong argument ConfigError.
        """
        __tracebackhide__ = True
        asked = f"exec({cmd!r})"
        request = ExecRequest(
            argv=_argv(asked, cmd),
            env={**self.spec.env, **_env(asked, env)},
            cwd=_optional(asked, "cwd", cwd, str, "a directory inside the instance"),
            user=_user(asked, user),
            input=None if input is None else _bytes(asked, "input", input),
            timeout=_limit(asked, self._exec_timeout if timeout is None else timeout),
        )
        shown = cmd if isinstance(cmd, str) else shlex.join(request.argv)
        started = time.monotonic()
        try:
            with self._running(asked):
                result = self.machine.exec(request)
        except BaseException as exc:
            failure = "timed out" if isinstance(exc, ExecTimeoutError) else type(exc).__name__
            self._history.append(
                CommandRecord(shown, None, time.monotonic() - started, failure=failure)
            )
            raise
        self._history.append(CommandRecord(shown, result.exit_code, result.duration))
        if check and not result.ok:
            raise ExecError(
                f"{cmd!r} in {self.name} exited with {result.exit_code}; stderr:\n"
                f"{result.stderr.strip()[-2000:]}",
                cmd=cmd if isinstance(cmd, str) else list(cmd),
                exit_code=result.exit_code,
                stdout_bytes=result.stdout_bytes,
                stderr_bytes=result.stderr_bytes,
                duration=result.duration,
            )
        return result

    @contextlib.contextmanager
    def _running(self, asked: str) -> Iterator[None]:
        """Run the block on the machine, which must be running: NotRunningError, the same on
        every kind, for an instance stopped or deleted, before the block or (stopped by
        itself) when the block failed for it."""
        __tracebackhide__ = True
        if error := self._not_running(asked):
            raise error
        try:
            yield
        except IncusError as exc:
            # a machine that stopped by itself fails in its own way (no exec server to
            # attach, no agent to talk to): say what happened, as for a stop()
            if isinstance(exc, NotRunningError) or self.machine.running():
                raise
            self._state = InstanceState.STOPPED
            raise self._stopped_by_itself(asked, exc) from exc

    def _not_running(self, asked: str) -> NotRunningError | None:
        """The error for ``asked`` of an instance that was deleted or stopped (by ``stop()``,
        or by itself, as ``state`` last saw); None if it was running."""
        if self._state is InstanceState.DELETED:
            return NotRunningError(
                f"{asked}: {self.kind} {self.name} was deleted; launch a new instance"
            )
        if self._state is InstanceState.STOPPED:
            return NotRunningError(
                f"{asked}: {self.kind} {self.name} is stopped (not running); start() it first"
            )
        return None

    def _stopped_by_itself(self, asked: str, exc: IncusError | None = None) -> NotRunningError:
        return NotRunningError(
            f"{asked}: {self.kind} {self.name} is stopped (not running: it stopped by "
            "itself, see logs()); start() it again",
            exc=exc,
        )

    def _still_running(self, asked: str) -> None:
        """Raise NotRunningError at once if the instance was deleted, stopped, or stopped by
        itself (looked at now): for waits, which have nothing to fail on their own."""
        __tracebackhide__ = True
        if error := self._not_running(asked):
            raise error
        if not self.machine.running():
            self._state = InstanceState.STOPPED
            raise self._stopped_by_itself(asked)

    # -- files -----------------------------------------------------------------------------

    @_uses
    def push(
        self, local_path: str | os.PathLike[str], remote_path: str, *, mode: int | None = None
    ) -> None:
        """Copy a local file or tree into the instance, as ``docker cp`` does.

        A file becomes ``remote_path`` (or goes into it, if it is a directory); a directory
        becomes ``remote_path`` (merged into it if it exists). Missing parents are created,
        symlinks stay links, everything belongs to root inside; ``mode`` sets the mode of the
        file (of every file, for a tree).
        """
        __tracebackhide__ = True
        asked = f"push({str(local_path)!r}, {remote_path!r})"
        _path(asked, remote_path)
        mode = _optional(asked, "mode", mode, int, "permission bits such as 0o644")
        local = Path(local_path)
        if not local.exists() and not local.is_symlink():
            raise FileNotFoundError(2, "no such local file to push", str(local))
        is_tree = local.is_dir() and not local.is_symlink()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(local, arcname="." if is_tree else local.name, filter=_tar_filter(mode))
        with self._running(asked):
            self.machine.put_archive(buffer.getvalue(), remote_path, is_tree)

    @_uses
    def pull(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        """Copy a file or tree out of the instance, as ``docker cp`` does.

        A file becomes ``local_path`` (or goes into it, if it is a directory); a directory
        becomes ``local_path`` (merged into it if it exists). Missing parents are created.
        """
        __tracebackhide__ = True
        asked = f"pull({remote_path!r}, {str(local_path)!r})"
        _path(asked, remote_path)
        local = Path(local_path)
        with self._running(asked):
            archive = self.machine.get_archive(remote_path)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
            members = tar.getmembers()
            is_tree = bool(members) and members[0].name == "." and members[0].isdir()
            if is_tree or local.is_dir():
                target_dir = local
            else:
                target_dir = local.parent
                members[0].name = local.name
                if local.is_symlink() or local.exists():
                    local.unlink()
            target_dir.mkdir(parents=True, exist_ok=True)
            for member in members:
                tar.extract(member, target_dir, filter=_host_filter)

    @_uses
    def write_file(self, path: str, data: str | bytes, *, mode: int = 0o644) -> None:
        """Create or replace the file ``path`` inside (parents created), owned by root."""
        __tracebackhide__ = True
        asked = f"write_file({path!r})"
        _path(asked, path)
        raw = _bytes(asked, "data", data)
        bits = _optional(asked, "mode", mode, int, "permission bits such as 0o644")
        with self._running(asked):
            self.machine.write_file(path, raw, 0o644 if bits is None else bits)

    @_uses
    def read_file(self, path: str) -> bytes:
        """The content of the file ``path`` inside."""
        __tracebackhide__ = True
        asked = f"read_file({path!r})"
        _path(asked, path)
        with self._running(asked):
            return self.machine.read_file(path)

    def read_text(self, path: str) -> str:
        """The content of the file ``path`` inside, as UTF-8 text."""
        return self.read_file(path).decode("utf-8", "replace")

    @_uses
    def file(self, path: str) -> FileInfo:
        """What is at ``path`` inside: ``exists``, ``is_file``, ``mode``, ``sha256``, ..."""
        __tracebackhide__ = True
        asked = f"file({path!r})"
        _path(asked, path)
        with self._running(asked):
            return FileInfo(path, self, self.machine.stat(path))

    # -- life cycle ------------------------------------------------------------------------

    @_uses
    def start(self) -> None:
        """Start a stopped instance and wait until it is ready."""
        __tracebackhide__ = True
        if self._state is InstanceState.DELETED:
            raise NotRunningError(
                f"start(): {self.kind} {self.name} was deleted and cannot start again; "
                "launch a new instance"
            )
        if not self.machine.running():
            self.machine.start()
        self._state = InstanceState.RUNNING

    @_uses
    def stop(self, timeout: float = 30, force: bool = False) -> None:
        """Shut down cleanly within ``timeout`` seconds (then kill), or kill with ``force``."""
        __tracebackhide__ = True
        _limit(f"stop(timeout={timeout!r})", timeout)
        if self._state is InstanceState.DELETED:
            return
        self.machine.stop(timeout, force)
        self._state = InstanceState.STOPPED

    def restart(self) -> None:
        """Stop cleanly, then start and wait until ready."""
        self.stop()
        self.start()

    def delete(self) -> None:
        """Kill the instance and remove everything it had. Idempotent."""
        if self._state is InstanceState.DELETED:
            return
        self._state = InstanceState.DELETED
        self._on_delete(self)

    @_uses
    def logs(self) -> str:
        """The console log (containers, VMs) or the app's output (apps)."""
        return self.machine.logs()

    @_uses
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the app's main process to end (kind="app") and return its exit code;
        WaitTimeoutError (a TimeoutError) past ``timeout`` seconds, ConfigError for other
        kinds."""
        __tracebackhide__ = True
        if timeout is not None:
            _limit(f"wait(timeout={timeout!r})", timeout)
        return self.machine.wait(timeout)

    # -- waiting for a service ---------------------------------------------------------------

    @_uses
    def wait_for_port(self, port: int, *, timeout: float = 30.0) -> None:
        """Return once a TCP connection from the host to ``ipv4:port`` succeeds (it is closed
        again at once): the service inside listens and is reachable from the test.

        WaitTimeoutError (a TimeoutError) with the tail of ``logs()`` past ``timeout``
        seconds (0: try once); NotRunningError at once if the instance stops or is deleted
        meanwhile; ConfigError for an instance with no network (launch it with
        ``network="bridged"``).
        """
        __tracebackhide__ = True
        asked = f"wait_for_port({port!r})"
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise _wrong(asked, "port", port, "a TCP port number (an int from 1 to 65535)")
        seconds = _seconds(asked, timeout)
        address = self.ipv4
        if address is None:
            raise ConfigError(
                f"{asked}: {self.kind} {self.name} has no network (network="
                f"{self.spec.network or 'none'!r}), so the host cannot reach its ports; "
                'launch it with network="bridged" (or the name of a network)'
            )
        deadline = time.monotonic() + seconds
        attempt = CONNECT_FIRST
        while True:
            self._still_running(asked)
            left = deadline - time.monotonic()
            try:
                with socket.create_connection(
                    (address, port), timeout=max(min(attempt, left), 0.001)
                ):
                    return
            except TimeoutError as exc:
                last: OSError = exc
                attempt = min(2 * attempt, CONNECT_LONGEST)
            except OSError as exc:  # refused, or no route to it yet
                last = exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(
                    f"{asked}: nothing accepted a TCP connection to {address}:{port} "
                    f"({self.kind} {self.name}) within {seconds:g} s (the last attempt: "
                    f"{last.strerror or last}); make sure the service inside listens on port "
                    f"{port} of every address (0.0.0.0), not only on 127.0.0.1 (its log is "
                    "below), or give a longer timeout"
                )
            time.sleep(min(POLL_INTERVAL, left))

    @_uses
    def wait_for_log(
        self, pattern: str | re.Pattern[str], *, timeout: float = 30.0
    ) -> re.Match[str]:
        """Return the first match of the regular expression ``pattern`` (a str or a compiled
        pattern) in ``logs()``, once there is one: the console log of every boot
        (containers, VMs) or the app's output, searched whole (``re.search``; ``(?m)`` makes
        ``^`` and ``$`` match at every line), so after a ``restart()`` look for something the
        new boot prints.

        WaitTimeoutError (a TimeoutError) with the tail of ``logs()`` past ``timeout``
        seconds (0: look once); NotRunningError at once if the instance stops or is deleted
        before the log matched; ConfigError for a pattern that is no regular expression.
        """
        __tracebackhide__ = True
        asked = f"wait_for_log({getattr(pattern, 'pattern', pattern)!r})"
        regex = _regex(asked, pattern)
        seconds = _seconds(asked, timeout)
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._still_running(asked)
            except NotRunningError:
                # what it printed before it stopped still counts (an app's last line, say):
                # the log once more, read after the stop, has all of it
                if self._state is InstanceState.STOPPED and (
                    found := regex.search(self.machine.logs())
                ):
                    return found
                raise
            if found := regex.search(self.machine.logs()):
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(
                    f"{asked}: the log of {self.kind} {self.name} did not match within "
                    f"{seconds:g} s (searched with re.search; its tail is below); check the "
                    "pattern against it, or give a longer timeout"
                )
            time.sleep(min(POLL_INTERVAL, left))

    def _timed_out(self, message: str) -> WaitTimeoutError:
        error = WaitTimeoutError(message)
        log = tail(self.machine.logs())
        error.add_note(f"log of {self.name}:\n" + (log or "(empty: nothing printed yet)"))
        return error


# -- arguments: a wrong one is a ConfigError, the same on every kind ----------------------------


def _wrong(asked: str, name: str, value: object, should: str) -> ConfigError:
    return ConfigError(f"{asked}: {name}={value!r} is not {should}")


def _argv(asked: str, cmd: object) -> tuple[str, ...]:
    if isinstance(cmd, str):
        return ("/bin/sh", "-c", cmd)
    if (
        isinstance(cmd, Sequence)
        and not isinstance(cmd, bytes)
        and cmd
        and all(isinstance(arg, str) for arg in cmd)
    ):
        return tuple(cmd)
    raise _wrong(asked, "cmd", cmd, "a str (run by /bin/sh -c) or a non-empty list of str")


def _env(asked: str, env: object) -> dict[str, str]:
    if env is None:
        return {}
    if isinstance(env, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        return dict(env)
    raise _wrong(asked, "env", env, "a dict of str to str")


def _optional(asked: str, name: str, value: Any, kind: type, should: str) -> Any:
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise _wrong(asked, name, value, f"{should} (a {kind.__name__})")


def _path(asked: str, path: object) -> None:
    if not isinstance(path, str) or not path:
        raise _wrong(asked, "path", path, "a path inside the instance (a non-empty str)")


def _user(asked: str, user: object) -> str | int | None:
    if user is None or (isinstance(user, str) and user):
        return user
    if isinstance(user, int) and not isinstance(user, bool) and user >= 0:
        return user
    raise _wrong(asked, "user", user, "a user name or a uid (an int, 0 or more)")


def _bytes(asked: str, name: str, data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise _wrong(asked, name, data, "a str or bytes")


def _is_seconds(value: object) -> TypeGuard[float]:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and value >= 0
    )


def _seconds(asked: str, timeout: object) -> float:
    """Seconds of a wait (0: look once); ConfigError for a value that is no number of
    seconds (negative, NaN, not a number)."""
    if _is_seconds(timeout):
        return float(timeout)
    raise ConfigError(f"{asked}: timeout={timeout!r} is not a number of seconds; give 0 or more")


def _limit(asked: str, timeout: object) -> float | None:
    """Seconds of a timeout (0 for no limit): None for no limit; ConfigError for a value that
    is no number of seconds (negative, NaN, not a number)."""
    if _is_seconds(timeout):
        seconds = float(timeout)
        return seconds if 0 < seconds < math.inf else None
    raise ConfigError(
        f"{asked}: timeout={timeout!r} is not a number of seconds; give 0 or more (0 for no limit)"
    )


def _regex(asked: str, pattern: object) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
        return pattern
    if isinstance(pattern, str):
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"{asked}: pattern={pattern!r} is not a regular expression ({exc}); "
                "write it as re.compile takes it (re.escape() for a literal text)"
            ) from None
    raise _wrong(
        asked, "pattern", pattern, "a regular expression (a str or a compiled str pattern)"
    )


def _host_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Extract safely on the host: nothing outside ``dest``, no ownership from the instance."""
    checked = tarfile.tar_filter(member, dest)
    # None: leave ownership to the extracting user (typeshed does not know None is allowed)
    return checked.replace(uid=None, gid=None, uname=None, gname=None, deep=False)  # type: ignore[arg-type]
