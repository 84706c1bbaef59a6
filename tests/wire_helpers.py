"""A raw connection to a guest agent's socket, for the tests of its protocol."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def accepts(path: Path) -> bool:
    """True once an agent listens on ``path``: a connection is accepted (and closed at once,
    which the agent takes as a client gone). The socket's file exists from its bind, before
    the agent listens: a connection made then is refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:  # not there yet, or not listening yet
            return False
    return True


class RawWire:
    """A raw connection to an agent's socket: bytes out, reply lines in (for malformed
    input that no client would send). The agent serves one connection at a time: close the
    AgentClient first (it reconnects at its next request)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next reply line, without its newline."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "the agent closed the connection"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def reply(self) -> dict[str, Any]:
        """The next reply, parsed (a 0xFF before it, of guest-sync-delimited, dropped)."""
        reply: dict[str, Any] = json.loads(self.line().lstrip(b"\xff"))
        return reply

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Send ``command`` with ``arguments``; its reply."""
        self.send(json.dumps({"execute": command, "arguments": arguments}).encode())
        return self.reply()

    def call_raw(self, message: bytes) -> dict[str, Any]:
        """Send ``message`` as it is; the reply."""
        self.send(message)
        return self.reply()

    def close(self) -> None:
        self.sock.close()
