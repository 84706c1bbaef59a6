"""The command table: QEMU's guest-agent commands and our extensions, and the dispatcher
that turns every request into exactly one reply (or none, for guest-shutdown)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable

from guest_agent import VERSION, execute, files, system
from guest_agent.errors import CommandError
from guest_agent.protocol import FramingError

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
)
NO_REPLY = {"guest-shutdown"}  # as qemu-ga: success sends nothing (the guest goes away)


def _error(desc: str, errno: int | None = None, **details: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"class": "GenericError", "desc": desc}
    if errno is not None:
        error["errno"] = errno
    error.update(details)
    return {"error": error}


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
        }
        unknown = self.blocked - set(self.commands)
        if unknown:
            raise SystemExit(
                "guest_agent: --block-rpcs names unknown commands: {}".format(
                    ", ".join(sorted(unknown))
                )
            )

    def handle(self, request: Any) -> dict[str, Any] | None:
        """The reply to ``request`` (a parsed message or a FramingError), None for none."""
        if isinstance(request, FramingError):
            return _error(str(request))
        name = request.get("execute")
        reply_id = request.get("id")
        reply = self._dispatch(name, request.get("arguments", {}))
        if reply is not None and reply_id is not None:
            reply["id"] = reply_id
        return reply

    def _dispatch(self, name: Any, args: Any) -> dict[str, Any] | None:
        if not isinstance(name, str):
            return _error('a request needs an "execute" member naming a command')
        handler = self.commands.get(name)
        if handler is None:
            return _error(f"The command {name} has not been found")
        if name in self.blocked:
            return _error(f"Command {name} has been disabled")
        if not isinstance(args, dict):
            return _error(f'"arguments" of {name} must be an object')
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
        except (TypeError, ValueError) as exc:
            return _error(f"{name}: bad arguments: {exc}")
        except Exception as exc:  # a bug of ours must not take the agent down
            return _error(f"{name} failed: {type(exc).__name__}: {exc}")
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
