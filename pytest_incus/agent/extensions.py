"""Exec and files through our agent's ``pti-*`` extensions (``guest_agent/commands.py``
implements them).

An exec is a job: ``pti-exec-start`` spawns it, then ``pti-exec-poll`` requests, one after the
other, feed its stdin a chunk at a time and bring back what it wrote since the last one, until
one brings its exit status. Neither side holds more than a chunk per stream beyond the result:
between polls the command stalls on its full pipes. The host enforces the timeout on its own:
every poll has a deadline, and an agent that stops answering (stopped or killed by the command,
or a hung guest) ends the exec by ``timeout`` plus ``EXEC_GRACE`` all the same (``NoReply``).

Files and archives of any size move in chunks too: ``pti-read-file`` and ``pti-write-file``
take an offset, and an archive too large for one message goes through a spool file in the
guest (``pti-spool``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import time
from typing import TYPE_CHECKING, Any

from pytest_incus.agent.peer import NoReply, answer_by

if TYPE_CHECKING:
    from pytest_incus.agent.client import AgentClient
    from pytest_incus.values import ExecRequest

# what Extensions uses; an agent that lacks one (an older one, or one with it blocked by
# --block-rpcs) is driven as a stock agent instead
COMMANDS = frozenset(
    {
        "pti-exec-start",
        "pti-exec-poll",
        "pti-read-file",
        "pti-write-file",
        "pti-stat",
        "pti-sha256",
        "pti-spool",
        "pti-put",
        "pti-get",
        "pti-remove",
        "pti-add-entropy",
        "pti-net-config",
    }
)
CHUNK = 1 << 20  # bytes per message of output, input, file or archive data
POLL_WAIT = 0.5  # seconds a poll may wait in the agent for news (other threads wait as long)
EXEC_GRACE = 5.0  # seconds past an exec's timeout before we stop waiting for the agent
KILL_WAIT = 2.0  # seconds for the agent to take a kill when an exec ends badly on our side


def _b64(data: bytes | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


class Extensions:
    """The ``Peer`` of our own agent."""

    extended = True

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    def run(self, request: ExecRequest) -> tuple[int, bytes, bytes, bool]:
        """pti-exec-start, then pti-exec-poll until the command ended (see the module
        docstring); NoReply, with the output so far, if the agent stops answering."""
        started = time.monotonic()
        deadline = None if request.timeout is None else started + request.timeout + EXEC_GRACE
        arguments: dict[str, Any] = {
            "argv": list(request.argv),
            "env": dict(request.env),
            "cwd": request.cwd,
            "user": request.user,
            "timeout": request.timeout,
            "stdin": bool(request.input),
        }
        job = self.client.request("pti-exec-start", arguments, deadline=answer_by(deadline))["job"]
        out, err = io.BytesIO(), io.BytesIO()  # getvalue() hands over the buffer: no copy
        pending = memoryview(request.input or b"")
        stdin_open = bool(request.input)
        ended = False
        try:
            while True:
                poll: dict[str, Any] = {"job": job, "max": CHUNK, "wait": POLL_WAIT}
                chunk = pending[:CHUNK]
                if stdin_open:
                    poll["input"] = _b64(chunk)
                    poll["eof"] = len(chunk) == len(pending)
                reply = self.client.request(
                    "pti-exec-poll", poll, deadline=answer_by(deadline, POLL_WAIT)
                )
                out.write(base64.b64decode(reply["out"]))
                err.write(base64.b64decode(reply["err"]))
                if stdin_open:
                    taken = int(reply["taken"])
                    pending = pending[taken:]
                    stdin_open = not (poll["eof"] and taken == len(chunk))
                if reply["exited"]:
                    ended = True
                    return (
                        int(reply["exitcode"]),
                        out.getvalue(),
                        err.getvalue(),
                        bool(reply["timed-out"]),
                    )
        except NoReply as exc:
            ended = True  # nobody to ask for a kill
            raise NoReply(str(exc), stdout=out.getvalue(), stderr=err.getvalue()) from exc
        finally:
            if not ended:  # an error of ours midway: the command must not run on unattended
                with contextlib.suppress(Exception):
                    arguments = {"job": job, "kill": True, "wait": 0}
                    self.client.request("pti-exec-poll", arguments, timeout=KILL_WAIT)

    def read_file(self, path: str) -> bytes:
        """pti-read-file, a chunk at a time."""
        return self._read(path)

    def _read(self, path: str, report_as: str | None = None) -> bytes:
        data = io.BytesIO()
        while True:
            arguments = {"path": path, "offset": data.tell(), "count": CHUNK}
            reply = self.client.request("pti-read-file", arguments, path=report_as or path)
            data.write(base64.b64decode(reply["data"]))
            if reply["eof"]:
                return data.getvalue()

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """pti-write-file, a chunk at a time (the first one creates or truncates the file)."""
        self._write(path, data, mode)

    def _write(self, path: str, data: bytes, mode: int, report_as: str | None = None) -> None:
        view = memoryview(data)
        offset = 0
        while True:
            arguments = {"path": path, "data": _b64(view[offset : offset + CHUNK]), "mode": mode}
            arguments["offset"] = offset
            self.client.request("pti-write-file", arguments, path=report_as or path)
            offset += CHUNK
            if offset >= len(view):
                return

    def stat(self, path: str) -> dict[str, Any] | None:
        """pti-stat."""
        try:
            raw: dict[str, Any] = self.client.request("pti-stat", {"path": path}, path=path)
        except (FileNotFoundError, NotADirectoryError):  # missing, as pathlib says
            return None
        return raw

    def sha256(self, path: str) -> str:
        """pti-sha256."""
        return str(self.client.request("pti-sha256", {"path": path}, path=path)["sha256"])

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """pti-put of the archive in one message, or of a spool file written in chunks."""
        arguments: dict[str, Any] = {"dest": dest, "tree": is_tree}
        if len(archive) <= CHUNK:
            arguments["data"] = _b64(archive)
        else:
            source = self.client.request("pti-spool")["path"]
            try:
                self._write(source, archive, 0o600, report_as=dest)
            except BaseException:
                self.remove(source)
                raise
            arguments["source"] = source  # the agent removes it
        self.client.request("pti-put", arguments, path=dest)

    def get_archive(self, path: str) -> bytes:
        """pti-get: the archive in one message, or in a spool file read in chunks."""
        reply = self.client.request("pti-get", {"path": path, "max": CHUNK}, path=path)
        if "data" in reply:
            return base64.b64decode(reply["data"])
        try:
            return self._read(reply["source"], report_as=path)
        finally:
            self.remove(reply["source"])

    def remove(self, path: str) -> None:
        """pti-remove."""
        self.client.request("pti-remove", {"path": path}, path=path)

    def add_entropy(self, data: bytes) -> None:
        """pti-add-entropy."""
        self.client.request("pti-add-entropy", {"data": _b64(data)})

    def configure_network(self, arguments: dict[str, Any]) -> str:
        """pti-net-config: one round trip."""
        return str(self.client.request("pti-net-config", arguments)["interface"])
