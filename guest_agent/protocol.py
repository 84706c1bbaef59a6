"""QEMU guest-agent framing: JSON objects streamed over a byte channel, and the channels.

The host sends JSON objects one after another (no delimiter is required between them); a
0xFF byte, which can never occur in UTF-8 JSON, resets the parser (clients send one before
``guest-sync-delimited`` to flush a half-sent message). Each reply is one JSON object followed
by a newline.

Two channels carry the stream: the virtio-serial port ``org.qemu.guest_agent.0`` of a VM (it
stays open while the host connects and disconnects; with no host connected, poll reports a
hang-up and reads return end of file) and, for tests, a listening unix socket (one client at a
time).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import signal
import time
from collections.abc import Iterator

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    import socket
    from typing import Any

MAX_MESSAGE = 64 << 20  # bytes per request; larger ones get an error reply and are skipped
# Levels of nesting per request; deeper ones get an error reply and are skipped. qemu-ga allows
# 1024, but Python's json module recurses once per level and the interpreter stops at 1000
# frames: a RecursionError there would be a crash, not a reply. Our requests nest 3 deep.
MAX_NESTING = 512
PORT_NAME = "org.qemu.guest_agent.0"
RESET = 0xFF
_IDLE_WAIT = 1.0  # seconds between looks at a port with no host; SIGIO wakes us sooner


class FramingError(Exception):
    """A message that cannot be a request (malformed, oversized): it gets an error reply."""


if TYPE_CHECKING:
    Request = dict[str, Any] | FramingError


_IN_STRING = re.compile(rb'[\\"\xff]')  # what ends or matters inside a string
_STRUCTURE = re.compile(rb'[{}\[\]"\xff]')  # what matters inside an object, outside strings
_TOP = re.compile(rb"[^ \t\r\n]")  # between messages: anything but blanks starts one
_JUNK_END = re.compile(rb"[\n{\xff]")


class Decoder:
    """Splits a byte stream into JSON texts: tracks nesting and strings, not full syntax.

    Scans with regular expressions, not byte by byte: a request may carry tens of MiB of
    base64, and the agent may run under TCG."""

    def __init__(self, limit: int = MAX_MESSAGE, nesting: int = MAX_NESTING) -> None:
        self.limit = limit
        self.nesting = nesting
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()  # the message so far (dropped once it is oversized)
        self._size = 0
        self._depth = 0
        self._max_depth = 0
        self._in_string = False
        self._escape = False
        self._junk = False

    def feed(self, data: bytes) -> list[Request]:
        """The requests (dicts) and framing errors completed by ``data``."""
        out: list[Request] = []
        pos = 0
        while pos < len(data):
            if self._junk:
                pos = self._skip_junk(data, pos, out)
            elif self._depth == 0:
                match = _TOP.search(data, pos)
                if match is None:
                    break
                pos = match.start()
                byte = data[pos]
                if byte == RESET:
                    pos += 1
                elif byte in (0x7B, 0x5B):
                    self._depth = 1
                    self._take(data, pos, pos + 1)
                    pos += 1
                else:
                    self._junk = True
            else:
                pos = self._scan(data, pos, out)
        return out

    def _skip_junk(self, data: bytes, pos: int, out: list[Request]) -> int:
        match = _JUNK_END.search(data, pos)
        end = len(data) if match is None else match.start()
        if len(self._buf) < 60:
            self._buf += data[pos : min(end, pos + 60)]
        if match is None:
            return end
        text = bytes(self._buf[:60]).decode("utf-8", "replace")
        self._reset()
        out.append(FramingError(f"expected a JSON object, got {text!r}"))
        return end + 1 if data[end] == 0x0A else end

    def _scan(self, data: bytes, pos: int, out: list[Request]) -> int:
        """Consume ``data`` from ``pos`` inside a message; returns where it stopped."""
        while pos < len(data):
            if self._escape:
                if data[pos] == RESET:  # never part of a message, not even escaped
                    self._reset()
                    return pos + 1
                self._escape = False
                self._take(data, pos, pos + 1)
                pos += 1
                continue
            pattern = _IN_STRING if self._in_string else _STRUCTURE
            match = pattern.search(data, pos)
            if match is None:
                self._take(data, pos, len(data))
                return len(data)
            at = match.start()
            byte = data[at]
            if byte == RESET:
                self._reset()
                return at + 1
            self._take(data, pos, at + 1)
            pos = at + 1
            if self._in_string:
                if byte == 0x5C:
                    self._escape = True
                else:
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in (0x7B, 0x5B):
                self._depth += 1
                if self._depth > self._max_depth:
                    self._max_depth = self._depth
                    if self._depth > self.nesting:
                        self._buf = bytearray()  # skipped like an oversized one: keep nothing
            else:
                self._depth -= 1
                if self._depth == 0:
                    out.append(self._complete())
                    return pos
        return pos

    def _take(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size <= self.limit and self._max_depth <= self.nesting:
            self._buf += data[start:end]
        elif self._buf:
            self._buf = bytearray()

    def _complete(self) -> Request:
        size, depth = self._size, self._max_depth
        text = bytes(self._buf)
        self._reset()
        if size > self.limit:
            return FramingError(
                f"message of {size} bytes is larger than the agent's limit of "
                f"{self.limit} bytes; skipped"
            )
        if depth > self.nesting:
            return FramingError(
                f"message nested {depth} levels deep, deeper than the agent's limit of "
                f"{self.nesting}; skipped"
            )
        return parse(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"duplicate key {key!r}")
        found[key] = value
    return found


def parse(text: bytes) -> Request:
    """One complete JSON text as a request (a dict), or the FramingError that says why not.

    Stricter than ``json.loads``, as qemu-ga's parser is: UTF-8 only, no NaN or Infinity, no
    number that overflows a double, no duplicate keys; and it never raises (a RecursionError
    or MemoryError is a reply too)."""
    try:
        message = json.loads(
            text.decode("utf-8"),
            parse_constant=_no_constant,
            parse_float=_finite,
            object_pairs_hook=_unique_keys,
        )
    except UnicodeDecodeError as exc:
        return FramingError(f"malformed JSON: not UTF-8: {exc}")
    except ValueError as exc:  # also int() of more than sys.get_int_max_str_digits() digits
        return FramingError(f"malformed JSON: {exc}")
    except (RecursionError, MemoryError) as exc:
        return FramingError(f"malformed JSON: {type(exc).__name__}: {exc}")
    if not isinstance(message, dict):
        return FramingError("expected a JSON object")
    return message


def encode(reply: Any, delimited: bool = False) -> bytes:
    """A reply as the wire carries it: JSON and a newline, after 0xFF for sync-delimited.
    Strict JSON: a NaN or Infinity raises ValueError rather than reach the host."""
    data = json.dumps(reply, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    return b"\xff" + data if delimited else data


class Channel:
    """Where requests come from: ``read`` blocks for data, None when the host went away."""

    def read(self) -> bytes | None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def wait_for_host(self) -> None:
        """Block until a host may be connected (after ``read`` said it went away)."""
        raise NotImplementedError


def _write_all(fd: int, data: bytes, patience: float = 10.0) -> None:
    """Write all of ``data``; give up (OSError) after ``patience`` seconds without progress:
    a port with no host connected never takes data."""
    view = memoryview(data)
    last = time.monotonic()
    while view:
        try:
            view = view[os.write(fd, view) :]
            last = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - last > patience:
                raise
            select.select([], [fd], [], 0.1)


class SerialChannel(Channel):
    """A virtio-serial port (``/dev/vportNpM``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._sigio = self._ask_for_sigio()

    def _ask_for_sigio(self) -> int | None:
        """virtio_console raises SIGIO when the host connects or disconnects: wait on it
        (through a wakeup pipe) instead of polling a hung-up port. A handled signal, not a
        blocked one: commands we spawn would inherit a blocked mask, but exec resets
        handlers. Returns the pipe's read end, None if the port cannot signal."""
        try:
            import fcntl

            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.signal(signal.SIGIO, lambda signum, frame: None)
            signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_ASYNC)
            return wake_r
        except (OSError, ValueError, AttributeError):
            return None

    def read(self) -> bytes | None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            events = poller.poll()
            if not events:
                continue
            mask = events[0][1]
            if mask & select.POLLIN:
                try:
                    data = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.EAGAIN):
                        continue
                    return None
                return data or None
            if mask & (select.POLLHUP | select.POLLERR):
                return None

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # no host connected: nobody to read the reply
            _write_all(self.fd, data)

    def wait_for_host(self) -> None:
        if self._sigio is None:
            time.sleep(_IDLE_WAIT)
            return
        select.select([self._sigio], [], [], _IDLE_WAIT)
        with contextlib.suppress(BlockingIOError):
            os.read(self._sigio, 4096)


class UnixChannel(Channel):
    """A listening unix socket, one client at a time (for tests on the host)."""

    def __init__(self, path: str) -> None:
        import socket  # only tests listen on a unix socket

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conn: socket.socket | None = None

    def read(self) -> bytes | None:
        if self.conn is None:
            self.conn, _ = self.listener.accept()
        try:
            data = self.conn.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self.conn.close()
            self.conn = None
            return None
        return data

    def write(self, data: bytes) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(OSError):  # the client went away; the next one starts afresh
            self.conn.sendall(data)

    def wait_for_host(self) -> None:
        pass  # accept() in read() waits


def find_port(name: str = PORT_NAME) -> str:
    """The /dev path of the virtio-serial port called ``name`` (no udev: read sysfs)."""
    base = "/sys/class/virtio-ports"
    deadline = time.monotonic() + 30
    while True:
        try:
            entries = sorted(os.listdir(base))
        except OSError:
            entries = []
        for entry in entries:
            try:
                with open(os.path.join(base, entry, "name")) as f:
                    if f.read().strip() == name:
                        return os.path.join("/dev", entry)
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise SystemExit(f"guest_agent: no virtio-serial port named {name} in {base}")
        time.sleep(0.02)  # the driver may still be probing the device


def requests(channel: Channel, decoder: Decoder) -> Iterator[Request]:
    """Every request from ``channel``, across host disconnects, forever."""
    while True:
        data = channel.read()
        if data is None:
            decoder.feed(b"\xff")  # a half-sent message dies with its connection
            channel.wait_for_host()
            continue
        yield from decoder.feed(data)
