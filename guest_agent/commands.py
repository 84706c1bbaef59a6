"""The command table: QEMU's guest-agent commands and our extensions, and the dispatcher
that turns every request into exactly one reply (or none, for guest-shutdown)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

from guest_agent import VERSION, execute, files, network, system
from guest_agent.errors import CommandError
from guest_agent.protocol import FramingError, encode

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    from typing import Any

    Handler = Callable[[dict[str, Any]], Any]

# Commands we answer in QEMU's own protocol, and our extensions (prefix "pti-": pytest-incus).
EXTENSIONS = (
    "pti-exec-start",
    "pti-exec-poll",
    "pti-spool",
    "pti-stat",
    "pti-sha256",
    "pti-read-file",
    "pti-write-file",
    "pti-put",
    "pti-get",
    "pti-remove",
    "pti-add-entropy",
    "pti-net-config",
)
NO_REPLY = {"guest-shutdown"}  # as qemu-ga: success sends nothing (the guest goes away)


def _error(
    desc: str, errno: int | None = None, error_class: str = "GenericError", **details: Any
) -> dict[str, Any]:
    error: dict[str, Any] = {"class": error_class, "desc": desc}
    if errno is not None:
        error["errno"] = errno
    error.update(details)
    return {"error": error}


def _described(exc: BaseException, log: bool = True) -> str:
    """An exception as an error reply's desc: its type, message and where it was raised, so
    a bug of ours shows as one instead of passing for the caller's mistake. With ``log``,
    the whole traceback also goes to stderr (a VM's console)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    if log:
        with contextlib.suppress(Exception):  # a closed stderr must not become a crash
            traceback.print_exception(exc, file=sys.stderr)
    return f"{type(exc).__name__}: {exc}{where}"


# The members a request may have, as in qemu-ga (QEMU's qmp_dispatch_check_obj).
_MEMBERS = ("execute", "arguments", "id")


class Agent:
    """Answers requests; one at a time, in order."""

    def __init__(self, blocked: Iterable[str] = (), init_mode: bool = False) -> None:
        self.blocked = set(blocked)
        self.init_mode = init_mode
        self.jobs = execute.Jobs()
        self.execs = execute.Execs()
        self.handles = files.Handles()
        self.commands: dict[str, Handler] = {
            "guest-sync-delimited": self._sync,
            "guest-sync": self._sync,
            "guest-ping": lambda args: {},
            "guest-info": self._info,
            "guest-exec": self.jobs.start,
            "guest-exec-status": self.jobs.status,
            "guest-file-open": self.handles.open,
            "guest-file-read": self.handles.read,
            "guest-file-write": self.handles.write,
            "guest-file-seek": self.handles.seek,
            "guest-file-flush": self.handles.flush,
            "guest-file-close": self.handles.close,
            "guest-shutdown": self._shutdown,
            "guest-set-time": system.set_time,
            "pti-exec-start": self.execs.start,
            "pti-exec-poll": self.execs.poll,
            "pti-spool": files.spool,
            "pti-stat": files.stat_path,
            "pti-sha256": files.sha256,
            "pti-read-file": files.read_file,
            "pti-write-file": files.write_file,
            "pti-put": files.put,
            "pti-get": files.get,
            "pti-remove": files.remove,
            "pti-add-entropy": system.add_entropy,
            "pti-net-config": network.configure,
        }
        unknown = self.blocked - set(self.commands)
        if unknown:
            raise SystemExit(
                "guest_agent: --block-rpcs names unknown commands: {}".format(
                    ", ".join(sorted(unknown))
                )
            )

    def answer(self, request: Any) -> bytes | None:
        """The reply to ``request`` as the wire carries it, None for none. Never raises: the
        agent may be the guest's PID 1, and an exception here would power the guest off."""
        try:
            reply = self.handle(request)
            if reply is None:
                return None
            delimited = isinstance(request, dict) and (
                request.get("execute") == "guest-sync-delimited"
            )
            return encode(reply, delimited)
        except Exception as exc:  # a reply that cannot be encoded, a bug in handle
            reply = _error(f"the agent could not answer: {_described(exc)}")
        with contextlib.suppress(Exception):
            if isinstance(request, dict) and "id" in request:
                return encode({**reply, "id": request["id"]})
        return encode(reply)

    def handle(self, request: Any) -> dict[str, Any] | None:
        """The reply to ``request`` (a parsed message or a FramingError), None for none.

        The request's shape is checked as qemu-ga checks it, and its ``id``, of any type, is
        echoed in the reply (errors too) whenever the request has one."""
        if isinstance(request, FramingError):
            return _error(str(request))
        if not isinstance(request, dict):
            return _error("QMP input must be a JSON object")
        reply = self._checked(request)
        if reply is None:
            reply = self._dispatch(request["execute"], request.get("arguments", {}))
        if reply is not None and "id" in request:
            reply["id"] = request["id"]
        return reply

    def _checked(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The error reply to a request of the wrong shape, None for a well-formed one."""
        for member in request:
            if member not in _MEMBERS:
                return _error(f"QMP input member {member!r} is unexpected")
        if "execute" not in request:
            return _error("QMP input lacks member 'execute'")
        if not isinstance(request["execute"], str):
            return _error("QMP input member 'execute' must be a string")
        if not isinstance(request.get("arguments", {}), dict):
            return _error("QMP input member 'arguments' must be an object")
        return None

    def _dispatch(self, name: str, args: dict[str, Any]) -> dict[str, Any] | None:
        handler = self.commands.get(name)
        if handler is None:
            return _error(f"The command {name} has not been found", error_class="CommandNotFound")
        if name in self.blocked:
            return _error(f"Command {name} has been disabled", error_class="CommandNotFound")
        try:
            result = handler(args)
        except CommandError as exc:
            return _error(exc.desc, **exc.details())
        except KeyError as exc:
            return _error(f"{name}: missing argument {exc}")
        except OSError as exc:
            desc = "{}: {}".format(exc.strerror or exc, exc.filename or "")
            if isinstance(exc.filename, str):  # the path refused: not always the request's
                return _error(desc, exc.errno, path=exc.filename)
            return _error(desc, exc.errno)
        except (TypeError, ValueError, OverflowError) as exc:
            # mostly an argument of the wrong type or range; where it was raised tells a
            # caller's mistake from a bug of ours
            return _error(f"{name}: bad arguments: {_described(exc, log=False)}")
        except (Exception, SystemExit) as exc:  # a bug of ours must not take the agent down
            return _error(f"{name} failed: {_described(exc)}")
        if name in NO_REPLY:
            return None
        return {"return": result}

    def _sync(self, args: dict[str, Any]) -> Any:
        if "id" not in args:
            raise CommandError("guest-sync needs an id")
        return args["id"]

    def _info(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": VERSION,
            "supported_commands": [
                {
                    "name": name,
                    "enabled": name not in self.blocked,
                    "success-response": name not in NO_REPLY,
                }
                for name in sorted(self.commands)
            ],
        }

    def _shutdown(self, args: dict[str, Any]) -> None:
        mode = args.get("mode", "powerdown")
        if mode not in ("powerdown", "reboot", "halt"):
            raise CommandError(f"mode must be powerdown, reboot or halt, not {mode!r}")
        if self.init_mode:
            from guest_agent import init

            init.power(mode)
        _systemd_power(mode)


def _systemd_power(mode: str) -> None:
    verb = {"powerdown": "poweroff", "reboot": "reboot", "halt": "halt"}[mode]
    for argv in (["systemctl", verb], [verb, "-f"]):
        try:
            code = subprocess.call(argv, stdin=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if code == 0:
            return
    raise CommandError(f"{mode} failed: neither systemctl nor {verb} -f worked")


def running_pids() -> set[int]:
    """Pids of commands still to be waited for (the init-mode reaper leaves them alone)."""
    return execute.RUNNING.snapshot() | {os.getpid()}
