"""Property tests of the guest agent's protocol layer: random frames, JSON documents and
arguments go through the decoder and the dispatcher, in process.

What must hold for any input: no exception escapes, each request gets exactly one reply
(a successful guest-shutdown none, as in qemu-ga), every reply is one line of strict JSON in
qemu-ga's shape, the request's id comes back, and the agent still answers guest-ping after.

Nothing here may touch the host (HOST.md: never run a guest agent's dangerous commands on
it). The stream properties run the dispatcher over a command table of harmless handlers,
some of which fail on purpose the ways a handler can fail; the real handlers are given
arguments that are wrong where their first check looks (a path that is not a string, a
handle that is not open, ...), so they refuse before they act. The real handlers with
well-typed paths and random other arguments run inside a VM (tests/integration/
test_vm_agent_robust.py).

Reproducible in CI: ``derandomize=True`` draws the same examples on every run (from the
test's own source, not a random seed) and ``database=None`` keeps no examples from earlier
runs, so a run neither depends on nor writes a ``.hypothesis`` directory. Set
PTI_TEST_FUZZ_EXAMPLES to a larger count to explore further (randomized then).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_agent import __main__ as agent_main
from guest_agent import protocol
from guest_agent.commands import Agent
from guest_agent.errors import CommandError

SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")
_WHERE = re.compile(rb" \(at [^)]*\)")
LIMIT = 1 << 14  # the decoder's size limit in these tests, so oversized frames stay cheap
DEEP_EXAMPLES = int(os.environ.get("PTI_TEST_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    """``examples`` per test, the same ones on every run (see the module docstring)."""
    return settings(
        max_examples=DEEP_EXAMPLES or examples,
        deadline=None,  # a slow shared CI machine must not turn into a flaky failure
        derandomize=not DEEP_EXAMPLES,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- values ---------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.text('{}[]"\\:, ', max_size=8)  # what the decoder must not take for structure
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


# -- a command table that cannot touch the host ---------------------------------------------


class Faults:
    """Handlers that fail the ways a handler can, and a guest-shutdown that only counts."""

    def __init__(self) -> None:
        self.shutdowns = 0

    def shutdown(self, args: dict[str, Any]) -> None:
        self.shutdowns += 1

    def table(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        def recurse(args: dict[str, Any]) -> Any:
            return recurse(args)

        def raises(exc: BaseException) -> Callable[[dict[str, Any]], Any]:
            def handler(args: dict[str, Any]) -> Any:
                raise exc

            return handler

        return {
            "guest-shutdown": self.shutdown,
            "echo": lambda args: args,  # the arguments back: any JSON must encode again
            "returns-nan": lambda args: float("nan"),
            "returns-object": lambda args: object(),
            "returns-bytes": lambda args: b"\xff",
            "missing": lambda args: args["no-such-key"],
            "recurses": recurse,
            "type-error": lambda args: sorted([1, "1"]),
            "overflow": lambda args: float(10**400),
            "os-error": raises(OSError(5, "I/O error", 12)),
            "command-error": raises(CommandError("refused", 2, path="/x")),
            "memory-error": raises(MemoryError()),
            "exits": raises(SystemExit(3)),
            "blocked": lambda args: {},
        }


FAULT_NAMES = sorted(Faults().table())


def harmless_agent() -> tuple[Agent, Faults]:
    """The real dispatcher over a table of harmless handlers (real sync, ping and info)."""
    agent = Agent()
    faults = Faults()
    real = {name: agent.commands[name] for name in ("guest-sync", "guest-sync-delimited")}
    real["guest-ping"] = agent.commands["guest-ping"]
    real["guest-info"] = agent.commands["guest-info"]
    agent.commands = {**real, **faults.table()}
    agent.blocked = {"blocked"}
    return agent, faults


# -- frames: one unit of the stream each, and how many replies it must get -------------------


@dataclass(frozen=True)
class Frame:
    """Bytes that leave the decoder between messages again; ``replies`` it must get (None:
    one, or none if it was a guest-shutdown that succeeded); ``request`` if it is one."""

    data: bytes
    replies: int | None
    request: dict[str, Any] | None = None


names = st.sampled_from([*FAULT_NAMES, "guest-ping", "guest-sync", "guest-sync-delimited"]) | (
    st.sampled_from(["guest-info", "guest-exec", "no-such"]) | st.text(max_size=10)
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        request["execute"] = draw(names) if draw(st.integers(0, 4)) else draw(json_values)
    if draw(st.booleans()):
        arguments = st.dictionaries(
            st.sampled_from(["id", "x", "path"]) | st.text(max_size=5), json_values, max_size=4
        )
        request["arguments"] = draw(arguments if draw(st.integers(0, 4)) else json_values)
    if draw(st.booleans()):
        request["id"] = draw(json_values)
    if not draw(st.integers(0, 9)):
        request[draw(st.text(max_size=8))] = draw(json_values)  # unexpected, or a duplicate
    return request


@st.composite
def request_frames(draw: st.DrawFn) -> Frame:
    request = draw(requests())
    indent = draw(st.sampled_from([None, 0, 2]))
    data = json.dumps(request, indent=indent).encode()
    return Frame(data, None, request)


_STRUCTURE = b'{}[]"\\\xff'


def _without(forbidden: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in forbidden))


# an object whose inside is not JSON at all (also invalid UTF-8): one error
malformed = _without(_STRUCTURE).map(lambda inside: Frame(b"{" + inside + b"}", 1))
nested = st.integers(0, 1500).map(
    lambda n: Frame(b'{"execute":"echo","arguments":{"x":' + b"[" * n + b"]" * n + b"}}", 1)
)
arrays = st.lists(scalars, max_size=3).map(lambda v: Frame(json.dumps(v).encode(), 1))
oversized = st.integers(LIMIT, 2 * LIMIT).map(
    lambda n: Frame(json.dumps({"execute": "echo", "arguments": {"x": "A" * n}}).encode(), 1)
)
# text between messages that cannot start one: one error, up to the newline
junk = st.tuples(
    st.integers(0, 255).filter(lambda c: c not in b" \t\r\n{[\xff"), _without(b"\n{\xff")
).map(lambda t: Frame(bytes([t[0]]) + t[1] + b"\n", 1))
blanks = st.text(" \t\r\n", max_size=4).map(lambda s: Frame(s.encode(), 0))
numbers = st.sampled_from(
    [b"NaN", b"-Infinity", b"1e999", b"-1e400", b"9" * 5000, b"1" * 4300, b'"\\ud800"', b"1.5e-999"]
).map(lambda n: Frame(b'{"execute":"echo","arguments":{"x":' + n + b"}}", 1))
duplicates = st.just(Frame(b'{"execute":"guest-ping","execute":"guest-ping"}', 1))


@st.composite
def partial_frames(draw: st.DrawFn) -> Frame:
    """The start of a message, then 0xFF (what a client sends before guest-sync-delimited):
    no reply, the half-sent message is dropped."""
    whole = draw(request_frames() | malformed | nested | oversized)
    # where the decoder's state is richest: just after an escaping backslash, or anywhere
    escapes = [i + 1 for i, byte in enumerate(whole.data[:-1]) if byte == 0x5C]
    cuts = (
        st.sampled_from(escapes)
        if escapes and draw(st.booleans())
        else st.integers(0, len(whole.data) - 1)
    )
    cut = draw(cuts)
    return Frame(whole.data[:cut] + b"\xff", 0)


@st.composite
def sync_frames(draw: st.DrawFn) -> Frame:
    request = {"execute": "guest-sync-delimited", "arguments": {"id": draw(json_values)}}
    return Frame(b"\xff" + json.dumps(request).encode(), 1, request)


frames = st.one_of(
    request_frames(),
    malformed,
    nested,
    arrays,
    oversized,
    junk,
    blanks,
    numbers,
    duplicates,
    partial_frames(),
    sync_frames(),
)


# -- what a reply must look like ---------------------------------------------------------------


def parsed(line: bytes, request: dict[str, Any] | None) -> dict[str, Any]:
    """A reply line checked for qemu-ga's shape (and the id of ``request``), parsed."""
    if request is not None and request.get("execute") == "guest-sync-delimited":
        assert line.startswith(b"\xff"), line
        line = line[1:]
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    reply = protocol.parse(line[:-1])
    assert isinstance(reply, dict), (line, reply)
    assert set(reply) - {"id"} in ({"return"}, {"error"}), reply
    if "error" in reply:
        error = reply["error"]
        assert isinstance(error["class"], str) and isinstance(error["desc"], str), reply
    if request is not None:
        if "id" in request:
            assert reply["id"] == request["id"], (request, reply)
        else:
            assert "id" not in reply, (request, reply)
    return reply


def answers(agent: Agent, decoder: protocol.Decoder, data: bytes) -> list[bytes]:
    """What the agent writes back for ``data``, as the main loop does it."""
    return [out for request in decoder.feed(data) if (out := agent.answer(request)) is not None]


def assert_serving(agent: Agent, decoder: protocol.Decoder) -> None:
    """The agent (and its decoder, whatever state it is in) still answers guest-ping, after
    at most an error for junk that the 0xFF ended."""
    out = answers(agent, decoder, b'\xff{"execute":"guest-ping","id":"still here"}')
    assert out and json.loads(out[-1]) == {"return": {}, "id": "still here"}, out
    assert all("error" in json.loads(line) for line in out[:-1]), out


# -- the properties ------------------------------------------------------------------------------


@fuzz_settings(examples=300)
@given(stream=st.lists(frames, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 1 << 16)))
def test_each_frame_gets_its_replies_however_the_stream_is_split(
    stream: list[Frame], cuts: list[int]
) -> None:
    agent, faults = harmless_agent()
    decoder = protocol.Decoder(limit=LIMIT)
    replies: list[bytes] = []
    for frame in stream:
        before = faults.shutdowns
        out = answers(agent, decoder, frame.data)
        expected = frame.replies if frame.replies is not None else 1 - (faults.shutdowns - before)
        assert len(out) == expected, (frame, out)
        for line in out:
            parsed(line, frame.request)
        replies += out
    # every frame ended between messages: a request with no 0xFF before it is answered
    out = answers(agent, decoder, b'{"execute":"guest-ping","id":"still here"}')
    assert [json.loads(line) for line in out] == [{"return": {}, "id": "still here"}]

    # the same stream cut anywhere else: the same replies
    data = b"".join(frame.data for frame in stream)
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    again, _ = harmless_agent()
    decoder = protocol.Decoder(limit=LIMIT)
    split: list[bytes] = []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        split += answers(again, decoder, data[start:end])
    # (where a RecursionError strikes, a call or a line, varies: not where it is reported)
    assert [_WHERE.sub(b"", line) for line in split] == [_WHERE.sub(b"", line) for line in replies]


@fuzz_settings(examples=200)
@given(data=st.binary(max_size=300), more=st.lists(st.binary(max_size=50), max_size=3))
def test_random_bytes_never_break_the_agent(data: bytes, more: list[bytes]) -> None:
    agent, _ = harmless_agent()
    decoder = protocol.Decoder(limit=LIMIT)
    for chunk in [data, *more]:
        for line in answers(agent, decoder, chunk):
            parsed(line, None)
    assert_serving(agent, decoder)


@fuzz_settings(examples=100)
@given(
    name=st.sampled_from(FAULT_NAMES),
    arguments=st.dictionaries(st.text(max_size=4), json_values, max_size=3),
    request_id=json_values,
)
def test_a_failing_handler_is_an_error_reply_naming_what_failed(
    name: str, arguments: dict[str, Any], request_id: Any
) -> None:
    agent, faults = harmless_agent()
    request = {"execute": name, "arguments": arguments, "id": request_id}
    out = agent.answer(request)
    if name == "guest-shutdown":
        assert out is None and faults.shutdowns == 1
        return
    assert out is not None
    reply = parsed(out, request)
    if name == "echo":
        assert reply["return"] == arguments
    elif name == "blocked":
        assert reply["error"]["class"] == "CommandNotFound"
    else:
        assert "error" in reply, reply
    if name in ("returns-object", "returns-bytes", "returns-nan", "recurses", "exits"):
        # a bug of ours: its type and where it happened are in the desc
        assert ".py:" in reply["error"]["desc"], reply


# -- the real handlers, with arguments they must refuse before acting --------------------------


def not_a_path(value: Any) -> bool:
    return not (isinstance(value, str) and value)


# command -> (the argument its first check looks at, values that check must refuse)
GUARDED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "guest-exec": ("path", lambda v: not isinstance(v, str)),
    "pti-exec-start": (
        "argv",
        lambda v: not (isinstance(v, list) and v and all(isinstance(a, str) for a in v)),
    ),
    "guest-file-open": ("path", not_a_path),
    "pti-stat": ("path", not_a_path),
    "pti-sha256": ("path", not_a_path),
    "pti-read-file": ("path", not_a_path),
    "pti-write-file": ("path", not_a_path),
    "pti-get": ("path", not_a_path),
    "pti-remove": ("path", not_a_path),
    "pti-put": ("dest", not_a_path),
}
# commands that act on nothing the agent has not opened or started (none is, here)
UNOPENED = [
    "guest-exec-status",
    "pti-exec-poll",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-file-close",
]
# never on the host, whatever the arguments: they are fuzzed inside a VM (pti-spool makes a
# file in the host's /var/tmp at each call; pti-net-config would reconfigure a NIC)
HOST_UNSAFE = {
    "guest-shutdown",
    "guest-set-time",
    "pti-add-entropy",
    "pti-spool",
    "pti-net-config",
}


def test_the_host_safe_lists_cover_every_command() -> None:
    answered = {"guest-sync", "guest-sync-delimited", "guest-ping", "guest-info"}
    assert set(Agent().commands) == set(GUARDED) | set(UNOPENED) | HOST_UNSAFE | answered


@st.composite
def guarded_requests(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(GUARDED)))
    key, refused = GUARDED[name]
    arguments = draw(
        st.dictionaries(
            st.sampled_from(["mode", "data", "arg", "env", "count", "tree"]) | st.text(max_size=5),
            json_values,
            max_size=4,
        )
    )
    if draw(st.integers(0, 5)):
        arguments[key] = draw(json_values.filter(refused))
    else:
        arguments.pop(key, None)
    return {"execute": name, "arguments": arguments, "id": draw(st.integers())}


@fuzz_settings(examples=200)
@given(request=guarded_requests())
def test_real_handlers_refuse_what_their_first_check_refuses(request: dict[str, Any]) -> None:
    agent = Agent(blocked=HOST_UNSAFE)
    out = agent.answer(request)
    assert out is not None
    reply = parsed(out, request)
    assert "error" in reply, reply
    assert not agent.jobs.jobs and not agent.handles.files  # nothing started, nothing opened
    assert_serving(agent, protocol.Decoder())


@pytest.fixture(scope="module")
def readable_file() -> Iterator[str]:
    """A small file that the handle commands may open read-only."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    path = SCRATCH_ROOT / f"fuzz-{secrets.token_hex(4)}.txt"
    path.write_bytes(b"0123456789" * 10)
    yield str(path)
    path.unlink()


handle_arguments = st.dictionaries(
    st.sampled_from(["count", "offset", "whence", "buf-b64", "handle"]) | st.text(max_size=4),
    json_values | st.sampled_from(["set", "cur", "end", "MTIz", ""]),
    max_size=4,
)


@fuzz_settings(examples=150)
@given(
    calls=st.lists(
        st.tuples(st.sampled_from(UNOPENED), handle_arguments, st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_real_handle_commands_with_random_arguments(
    readable_file: str, calls: list[tuple[str, dict[str, Any], bool]]
) -> None:
    """Handle commands on a read-only handle (or none): a write fails with EBADF, so nothing
    on the host changes whatever the arguments."""
    agent = Agent(blocked=HOST_UNSAFE)
    opened = agent.answer({"execute": "guest-file-open", "arguments": {"path": readable_file}})
    assert opened is not None
    handle = json.loads(opened)["return"]
    try:
        for name, arguments, real_handle in calls:
            if real_handle:
                arguments = {**arguments, "handle": handle}
            request = {"execute": name, "arguments": arguments}
            out = agent.answer(request)
            assert out is not None
            parsed(out, request)
        assert_serving(agent, protocol.Decoder())
    finally:
        for fd in agent.handles.files.values():
            os.close(fd)


# -- the main loop ----------------------------------------------------------------------------------


class _EndOfScript(BaseException):
    """Ends serve(), which nothing that an Exception is can end."""


class ScriptedChannel(protocol.Channel):
    """Reads what ``script`` says (bytes, None for a host that went away, or an exception to
    raise), then ends the loop; keeps what is written."""

    def __init__(self, script: list[bytes | Exception | None], failing_writes: int = 0) -> None:
        self.script = list(script)
        self.failing_writes = failing_writes
        self.written: list[bytes] = []

    def read(self) -> bytes | None:
        if not self.script:
            raise _EndOfScript
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    def write(self, data: bytes) -> None:
        if self.failing_writes:
            self.failing_writes -= 1
            raise RuntimeError("a channel that fails")
        self.written.append(data)

    def wait_for_host(self) -> None:
        pass


def test_the_main_loop_survives_its_own_exceptions() -> None:
    channel = ScriptedChannel(
        [
            b'{"execute":"guest-ping","id":1}{"execute":"guest-sync","arguments":{"id"',
            OSError(5, "the port failed"),
            b'{"execute":"guest-ping","id":2}',
            None,
            b'{"execute":"guest-ping","id":3}{"execute":"guest-ping","id":4}',
        ],
        failing_writes=0,
    )
    with pytest.raises(_EndOfScript):
        agent_main.serve(channel, Agent())
    # the half-read message died with the failure; everything else was answered
    assert [json.loads(line)["id"] for line in channel.written] == [1, 2, 3, 4]


def test_the_main_loop_survives_a_failing_write() -> None:
    channel = ScriptedChannel(
        [b'{"execute":"guest-ping","id":1}', b'{"execute":"guest-ping","id":2}'], failing_writes=1
    )
    with pytest.raises(_EndOfScript):
        agent_main.serve(channel, Agent())
    assert [json.loads(line)["id"] for line in channel.written] == [2]
