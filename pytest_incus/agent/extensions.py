"""Exec and files through our agent's ``pti-*`` extensions: one round trip per operation
(``guest_agent/commands.py`` implements them)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_incus.agent.client import AgentClient
    from pytest_incus.values import ExecRequest

# what Extensions uses; an agent that lacks one (blocked with --block-rpcs, say) is driven
# as a stock agent instead
COMMANDS = frozenset(
    {
        "pti-exec",
        "pti-read-file",
        "pti-write-file",
        "pti-stat",
        "pti-sha256",
        "pti-put",
        "pti-get",
        "pti-remove",
        "pti-add-entropy",
    }
)
EXEC_GRACE = 30.0  # seconds past an exec's own timeout before we stop waiting for the agent


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Extensions:
    """The ``Peer`` of our own agent."""

    extended = True

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    def run(self, request: ExecRequest) -> tuple[int, bytes, bytes, bool]:
        """pti-exec: the agent waits for the command and sends everything back at once."""
        arguments: dict[str, Any] = {
            "argv": list(request.argv),
            "env": dict(request.env),
            "cwd": request.cwd,
            "user": request.user,
            "timeout": request.timeout,
        }
        if request.input:
            arguments["input-data"] = _b64(request.input)
        wait = None if request.timeout is None else request.timeout + EXEC_GRACE
        reply = self.client.request("pti-exec", arguments, timeout=wait)
        return (
            int(reply["exitcode"]),
            base64.b64decode(reply["out-data"]),
            base64.b64decode(reply["err-data"]),
            bool(reply["timed-out"]),
        )

    def read_file(self, path: str) -> bytes:
        """pti-read-file."""
        reply = self.client.request("pti-read-file", {"path": path}, path=path)
        return base64.b64decode(reply["data"])

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """pti-write-file."""
        arguments = {"path": path, "data": _b64(data), "mode": mode}
        self.client.request("pti-write-file", arguments, path=path)

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
        """pti-put."""
        arguments = {"dest": dest, "tree": is_tree, "data": _b64(archive)}
        self.client.request("pti-put", arguments, path=dest)

    def get_archive(self, path: str) -> bytes:
        """pti-get."""
        return base64.b64decode(self.client.request("pti-get", {"path": path}, path=path)["data"])

    def remove(self, path: str) -> None:
        """pti-remove."""
        self.client.request("pti-remove", {"path": path}, path=path)

    def add_entropy(self, data: bytes) -> None:
        """pti-add-entropy."""
        self.client.request("pti-add-entropy", {"data": _b64(data)})
