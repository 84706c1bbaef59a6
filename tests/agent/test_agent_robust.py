"""Malformed messages written raw onto the agent's channel, and the real handlers fuzzed
with arguments of every type: each gets an error reply, and the agent (PID 1 of the
init="agent" VM) is the same process afterwards and still runs commands.

Our agent only: qemu-ga answers some of these differently (one error per stray token of a
nested message). Where commands act for real (exec, writes, the clock) they run in the
guest, or on the host as uid 65534 inside the target's private directory with
guest-shutdown blocked; guest-shutdown itself only ever gets a mode it must refuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from agent_helpers import AgentTarget, RawWire, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_incus.agent import AgentClient

NESTED = b'{"execute":"guest-ping","arguments":{"x":' + b"[" * 200000 + b"]" * 200000 + b"}}"

# (raw frame, a pattern of the error's desc): each gets exactly one error reply
MALFORMED = [
    (NESTED, "nested 200002 levels deep"),
    (b'{"execute": "guest-ping", "id": NaN}', "NaN is not JSON"),
    (b'{"execute": "guest-ping", "id": 1e999}', "out of range"),
    (b'{"execute": "guest-ping", "id": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"execute": "guest-ping", "execute": "guest-info"}', "duplicate key"),
    (b'{"execute": "guest-ping", "id": "\xc3\x28"}', "not UTF-8"),
    (b"junk that is no message\n", "expected a JSON object"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"execute": 1}', "'execute' must be a string"),
    (b'{"execute": "guest-ping", "arguments": [1]}', "'arguments' must be an object"),
    (b'{"execute": "guest-ping", "oob": true}', "'oob' is unexpected"),
    (b'{"execute": "guest-set-time", "arguments": {"time": "soon"}}', "time"),
    (b'{"execute": "guest-set-time", "arguments": {"time": 1e300}}', "time"),
    (b'{"execute": "guest-shutdown", "arguments": {"mode": 1}}', "mode|disabled"),
    (b'{"execute": "guest-exec", "arguments": {"path": ["sh"]}}', "path"),
    (b'{"execute": "pti-exec-start", "arguments": {"argv": "sh"}}', "argv"),
    (
        b'{"execute": "pti-exec-start", "arguments": {"argv": ["true"], "cwd": 5}}',
        "cwd must be a string",
    ),
    (b'{"execute": "pti-exec-poll", "arguments": {"job": "x"}}', "no exec job"),
    (b'{"execute": "pti-write-file", "arguments": {"path": 5, "data": ""}}', "path"),
    (b'{"execute": "pti-add-entropy", "arguments": {"data": ["x"]}}', "pti-add-entropy"),
    (b'{"execute": "guest-file-seek", "arguments": {"handle": 1000, "offset": {}}}', "handle"),
]


@pytest.fixture
def wire(agent_target: AgentTarget, agent_client: AgentClient, workdir: str) -> Iterator[RawWire]:
    """A raw connection to one of our agents (the client lets go of its own first, after
    making ``workdir``; it takes the connection back to remove it)."""
    if not agent_target.extensions:
        pytest.skip("our agent's answers to malformed input; qemu-ga differs")
    agent_client.close()
    w = RawWire(agent_target.socket_path)
    w.send(b"\xff")  # whatever came before, start between messages
    yield w
    w.close()


def agent_process(client: AgentClient) -> tuple[str, str]:
    """(pid, start time) of the agent process, seen from a command it runs."""
    code, out, err = run(client, ["sh", "-c", 'echo "$PPID $(cut -d" " -f22 /proc/$PPID/stat)"'])
    assert code == 0, err
    pid, started = out.split()
    return pid, started


def test_malformed_frames_get_one_error_each_and_the_agent_lives_on(
    agent_target: AgentTarget, agent_client: AgentClient
) -> None:
    if not agent_target.extensions:
        pytest.skip("our agent's answers to malformed input; qemu-ga differs")
    before = agent_process(agent_client)
    if agent_target.root:
        assert before[0] == "1"  # the VM's agent is its init: its death would end the VM
    agent_client.close()
    wire = RawWire(agent_target.socket_path)
    try:
        wire.send(b"\xff")
        for frame, desc in MALFORMED:
            wire.send(frame)
            reply = wire.reply()
            assert re.search(desc, reply.get("error", {}).get("desc", "")), (frame[:80], reply)
        # a nested message that never closes, cut off by 0xFF: only the sync is answered
        wire.send(b'{"execute":"guest-ping","arguments":{"x":' + b"[" * 200000)
        wire.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":4242}}')
        assert wire.line() == b'\xff{"return":4242}'
    finally:
        wire.close()
    assert agent_process(agent_client) == before  # the same process, not a restarted one
    assert run(agent_client, ["echo", "still serving"])[1] == "still serving\n"


# -- the real handlers, every argument of every type ---------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["", "r", "w+", "merged", "set", "end", "MTIz", "root", "/"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
# command -> the arguments it reads (other names are drawn too)
ARGUMENTS = {
    "guest-sync": ["id"],
    "guest-sync-delimited": ["id"],
    "guest-ping": [],
    "guest-info": [],
    "guest-exec": ["arg", "env", "input-data", "capture-output"],
    "guest-exec-status": ["pid"],
    "guest-file-open": ["mode"],
    "guest-file-read": ["handle", "count"],
    "guest-file-write": ["handle", "buf-b64", "count"],
    "guest-file-seek": ["handle", "offset", "whence"],
    "guest-file-flush": ["handle"],
    "guest-file-close": ["handle"],
    "guest-shutdown": ["mode"],
    "guest-set-time": ["time"],
    "pti-exec-start": ["env", "timeout", "stdin", "user", "cwd"],
    "pti-exec-poll": ["job", "input", "eof", "wait", "max", "kill"],
    "pti-spool": [],
    "pti-stat": [],
    "pti-sha256": [],
    "pti-read-file": ["offset", "count"],
    "pti-write-file": ["mode", "data", "offset"],
    "pti-put": ["data", "tree", "source"],
    "pti-get": ["max"],
    "pti-remove": [],
    "pti-add-entropy": ["data"],
    "pti-net-config": ["mac", "address", "prefix", "resolv-conf", "hostname"],
}


def harmless(name: str, key: str, value: Any) -> bool:
    """Whether ``value`` for ``key`` of ``name`` cannot power off the guest, move its clock or
    change its network."""
    if name == "guest-shutdown" and key == "mode":
        return value not in ("powerdown", "reboot", "halt")
    if name == "guest-set-time" and key == "time":
        return not (isinstance(value, int) and 0 < value < 2**63)
    if name == "pti-net-config" and key == "mac":
        return not isinstance(value, str)  # refused before anything changes
    return True


@st.composite
def real_requests(draw: st.DrawFn, workdir: str) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(ARGUMENTS)))
    keys = st.sampled_from(ARGUMENTS[name]) if ARGUMENTS[name] else st.text(max_size=4)
    arguments = draw(st.dictionaries(keys | st.text(max_size=4), json_values, max_size=4))
    # the argument that says what to act on is valid, so the handler gets past its first check
    fixed = {"path": f"{workdir}/f{draw(st.integers(0, 2))}", "dest": f"{workdir}/d"}
    if name == "guest-exec":
        fixed["path"] = "/bin/true"
    if name == "pti-exec-start":
        fixed["argv"] = ["true"]
    if "handle" in ARGUMENTS[name] and draw(st.booleans()):
        fixed["handle"] = draw(st.integers(1000, 1004))
    arguments.update(fixed)
    arguments = {k: v for k, v in arguments.items() if harmless(name, k, v)}
    if name == "guest-shutdown":
        arguments.setdefault("mode", "sideways")  # the default mode would power off
    return {"execute": name, "arguments": arguments, "id": draw(st.integers(0, 2**40))}


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run (see tests/unit/test_agent_fuzz.py)
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_real_handlers_answer_any_arguments(
    wire: RawWire, workdir: str, data: st.DataObject
) -> None:
    request = data.draw(real_requests(workdir))
    wire.send(json.dumps(request).encode())
    reply = wire.reply()
    assert set(reply) in ({"return", "id"}, {"error", "id"}), (request, reply)
    assert reply["id"] == request["id"], (request, reply)
    wire.send(b'{"execute":"guest-ping","id":"after"}')
    assert wire.reply() == {"return": {}, "id": "after"}
