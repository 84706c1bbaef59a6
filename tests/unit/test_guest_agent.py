"""The guest agent's protocol edge cases, byte for byte, against the real agent process.

The agent runs on the host as uid 65534 (never as root: HOST.md), listening on a unix socket
in a private directory outside /tmp, with guest-shutdown blocked.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wire_helpers import RawWire, accepts

import guest_agent
from guest_agent.protocol import MAX_MESSAGE

SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")
NOBODY = 65534
HOST_PYTHON = "/usr/bin/python3"  # Debian's: uid 65534 cannot reach a python under /root


@pytest.fixture(scope="module")
def agent_socket() -> Iterator[Path]:
    """The socket of a real agent run as uid 65534 with guest-shutdown blocked."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    SCRATCH_ROOT.chmod(0o755)
    directory = SCRATCH_ROOT / f"ga-unit-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    lib = directory / "lib"
    shutil.copytree(Path(guest_agent.__file__).parent, lib / "guest_agent")
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    sock = directory / "qga.sock"
    argv = [HOST_PYTHON, "-m", "guest_agent", "--unix-listen", str(sock)]
    proc = subprocess.Popen(
        [*argv, "--block-rpcs", "guest-shutdown"],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd=directory,
        env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not accepts(sock):
            assert proc.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent did not listen on its socket"
            time.sleep(0.005)
        yield sock
        assert proc.poll() is None, "the agent died during the tests"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def wire(agent_socket: Path) -> Iterator[RawWire]:
    """A fresh raw connection (the agent serves one at a time)."""
    w = RawWire(agent_socket)
    yield w
    w.close()


def error_of(reply: dict[str, Any], error_class: str = "GenericError") -> str:
    assert reply["error"]["class"] == error_class, reply
    desc: str = reply["error"]["desc"]
    return desc


def not_found(reply: dict[str, Any]) -> str:
    """The desc of a CommandNotFound reply (qemu-ga's class for unknown and disabled)."""
    return error_of(reply, "CommandNotFound")


def test_sync_delimited_reply_starts_with_0xff(wire: RawWire) -> None:
    wire.send(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 1234}}')
    assert wire.line() == b'\xff{"return":1234}'


def test_sync_and_ping(wire: RawWire) -> None:
    assert wire.call("guest-sync", id=7) == {"return": 7}
    assert wire.call("guest-ping") == {"return": {}}


def test_requests_split_and_joined_anyhow(wire: RawWire) -> None:
    wire.send(b'{"execute": "guest-ping"}{"execute": "guest-sync", "argu')
    wire.send(b'ments": {"id": 9}}\n  {"execute": "guest-sync", "arguments": {"id": "}{\\""}}')
    assert [wire.reply() for _ in range(3)] == [
        {"return": {}},
        {"return": 9},
        {"return": '}{"'},
    ]


def test_malformed_json_gets_an_error_then_service_goes_on(wire: RawWire) -> None:
    wire.send(b'{"execute": guest-ping}')
    assert "malformed JSON" in error_of(wire.reply())
    wire.send(b"not json at all\n")
    assert "expected a JSON object" in error_of(wire.reply())
    wire.send(b"[1, 2]")
    assert "expected a JSON object" in error_of(wire.reply())
    assert wire.call("guest-ping") == {"return": {}}


def test_0xff_discards_a_half_sent_message(wire: RawWire) -> None:
    wire.send(b'{"execute": "guest-exec", "arguments": {"pa')
    wire.send(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 5}}')
    assert wire.line() == b'\xff{"return":5}'


def test_unknown_command_and_bad_arguments(wire: RawWire) -> None:
    assert "has not been found" in not_found(wire.call("guest-no-such-thing"))
    assert "execute" in error_of(wire.call_raw(b'{"arguments": {}}'))
    assert "pid" in error_of(wire.call("guest-exec-status", pid="not a pid"))
    assert "missing argument" in error_of(wire.call("guest-exec-status"))
    assert "must be an object" in error_of(
        wire.call_raw(b'{"execute": "guest-ping", "arguments": 3}')
    )
    assert "argv" in error_of(wire.call("pti-exec-start", argv=[]))
    assert "no exec job" in error_of(wire.call("pti-exec-poll", job=424242))
    assert "handle" in error_of(wire.call("guest-file-read", handle=424242))
    assert wire.call("guest-ping") == {"return": {}}


def test_oversized_message_gets_an_error_and_is_skipped(wire: RawWire) -> None:
    payload = "A" * (MAX_MESSAGE + 1024)
    message = json.dumps({"execute": "guest-sync", "arguments": {"id": payload}}).encode()
    wire.send(message + b'{"execute": "guest-sync", "arguments": {"id": 77}}')
    assert "limit" in error_of(wire.reply())
    assert wire.reply() == {"return": 77}


def test_blocked_rpcs_refuse_and_show_disabled(wire: RawWire) -> None:
    assert "disabled" in not_found(wire.call("guest-shutdown", mode="powerdown"))
    commands = {c["name"]: c for c in wire.call("guest-info")["return"]["supported_commands"]}
    assert commands["guest-shutdown"]["enabled"] is False
    assert commands["guest-exec"]["enabled"] is True
    assert commands["pti-exec-start"]["enabled"] is True


def test_reconnect_after_a_half_sent_message(agent_socket: Path) -> None:
    first = RawWire(agent_socket)
    first.send(b'{"execute": "guest-sync", "arguments": {"id": ')
    first.close()
    second = RawWire(agent_socket)
    try:
        assert second.call("guest-sync", id=2) == {"return": 2}
    finally:
        second.close()


def test_disconnect_before_the_reply_does_not_hurt(agent_socket: Path) -> None:
    first = RawWire(agent_socket)
    first.send(b'{"execute": "pti-exec-poll", "arguments": {"job": 1, "wait": 0.2}}')
    first.close()
    second = RawWire(agent_socket)
    try:
        assert second.call("guest-sync", id=3) == {"return": 3}
    finally:
        second.close()


def test_guest_exec_and_status(wire: RawWire) -> None:
    started = wire.call(
        "guest-exec",
        path="/bin/sh",
        arg=["-c", 'cat; echo "$PTI_V" >&2; exit 4'],
        env=["PTI_V=hello", "PATH=/usr/bin:/bin"],
        **{"input-data": base64.b64encode(b"from stdin").decode(), "capture-output": True},
    )
    pid = started["return"]["pid"]
    deadline = time.monotonic() + 10
    while not (status := wire.call("guest-exec-status", pid=pid)["return"])["exited"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert status["exitcode"] == 4
    assert base64.b64decode(status["out-data"]) == b"from stdin"
    assert base64.b64decode(status["err-data"]) == b"hello\n"
    assert "pid" in error_of(wire.call("guest-exec-status", pid=pid))  # reported once


def test_guest_exec_of_a_missing_program(wire: RawWire) -> None:
    assert "no-such-program" in error_of(wire.call("guest-exec", path="/no-such-program"))


def test_guest_file_handles(wire: RawWire, agent_socket: Path) -> None:
    path = str(agent_socket.parent / "handles.txt")
    handle = wire.call("guest-file-open", path=path, mode="w")["return"]
    data = base64.b64encode(b"0123456789").decode()
    assert (
        wire.call("guest-file-write", handle=handle, **{"buf-b64": data})["return"]["count"] == 10
    )
    assert wire.call("guest-file-close", handle=handle) == {"return": {}}
    handle = wire.call("guest-file-open", path=path)["return"]
    first = wire.call("guest-file-read", handle=handle, count=4)["return"]
    assert (base64.b64decode(first["buf-b64"]), first["eof"]) == (b"0123", False)
    rest = wire.call("guest-file-read", handle=handle, count=100)["return"]
    assert (base64.b64decode(rest["buf-b64"]), rest["count"], rest["eof"]) == (b"456789", 6, True)
    wire.call("guest-file-close", handle=handle)
    assert "handle" in error_of(wire.call("guest-file-read", handle=handle))
    missing = wire.call("guest-file-open", path=path + ".missing")
    assert missing["error"]["errno"] == 2


def test_pti_exec_streams_a_job(wire: RawWire) -> None:
    job = wire.call(
        "pti-exec-start",
        argv=["sh", "-c", 'cat; echo "$PTI_E:$(pwd)"; exit 5'],
        env={"PTI_E": "x"},
        cwd="/",
        stdin=True,
    )["return"]["job"]
    out = b""
    data = base64.b64encode(b"in|").decode()
    reply = wire.call("pti-exec-poll", job=job, input=data, eof=True, wait=1)["return"]
    assert reply["taken"] == 3
    deadline = time.monotonic() + 10
    while True:
        out += base64.b64decode(reply["out"])
        if reply["exited"]:
            break
        assert time.monotonic() < deadline
        reply = wire.call("pti-exec-poll", job=job, wait=1)["return"]
    assert (reply["exitcode"], out, reply["timed-out"]) == (5, b"in|x:/\n", False)
    assert "no exec job" in error_of(wire.call("pti-exec-poll", job=job))  # reported once


def test_id_is_echoed(wire: RawWire) -> None:
    wire.send(b'{"execute": "guest-ping", "id": "abc"}')
    assert wire.reply() == {"return": {}, "id": "abc"}


NESTED = b'{"execute":"guest-ping","arguments":{"x":' + b"[" * 200000 + b"]" * 200000 + b"}}"


def test_deeply_nested_json_gets_an_error_and_the_agent_lives(wire: RawWire) -> None:
    wire.send(NESTED)
    assert "nested 200002 levels deep" in error_of(wire.reply())
    wire.send(b'{"execute":"guest-ping","arguments":{"x":' + b"[" * 200000)  # never closed
    wire.send(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 6}}')
    assert wire.line() == b'\xff{"return":6}'
    assert wire.call("guest-ping") == {"return": {}}


@pytest.mark.parametrize(
    ("message", "desc"),
    [
        (b'{"execute": "guest-ping", "id": NaN}', "NaN is not JSON"),
        (b'{"execute": "guest-ping", "id": -Infinity}', "-Infinity is not JSON"),
        (b'{"execute": "guest-ping", "id": 1e999}', "out of range"),
        (b'{"execute": "guest-ping", "id": ' + b"7" * 5000 + b"}", "digits"),
        (b'{"execute": "guest-ping", "execute": "guest-info"}', "duplicate key 'execute'"),
        (b'{"execute": "guest-ping", "id": "\xc3\x28"}', "not UTF-8"),
        (b'{"execute": "guest-ping", "id": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate
    ],
    ids=["nan", "infinity", "1e999", "5000-digits", "duplicate-key", "bad-utf8", "surrogate"],
)
def test_json_that_qemu_ga_refuses_gets_an_error(wire: RawWire, message: bytes, desc: str) -> None:
    assert desc in error_of(wire.call_raw(message))
    assert wire.call("guest-ping") == {"return": {}}


@pytest.mark.parametrize(
    ("message", "desc"),
    [
        (b'{"execute": 7}', "'execute' must be a string"),
        (b'{"execute": ["guest-ping"]}', "'execute' must be a string"),
        (b'{"execute": "guest-ping", "arguments": null}', "'arguments' must be an object"),
        (b'{"execute": "guest-ping", "arguments": []}', "'arguments' must be an object"),
        (b'{"execute": "guest-ping", "argument": {}}', "'argument' is unexpected"),
        (b'{"id": 1}', "lacks member 'execute'"),
    ],
)
def test_requests_of_the_wrong_shape_get_an_error(wire: RawWire, message: bytes, desc: str) -> None:
    assert desc in error_of(wire.call_raw(message))


@pytest.mark.parametrize(
    "raw_id", [b"null", b"0", b"-1.5", b"true", b'"x"', b"[1, [2]]", b'{"a": {"b": null}}']
)
def test_an_id_of_any_type_is_echoed_on_success_and_error(wire: RawWire, raw_id: bytes) -> None:
    value = json.loads(raw_id)
    assert wire.call_raw(b'{"execute": "guest-ping", "id": ' + raw_id + b"}") == {
        "return": {},
        "id": value,
    }
    failed = wire.call_raw(b'{"execute": "guest-nothing", "id": ' + raw_id + b"}")
    assert (failed["id"], failed["error"]["class"]) == (value, "CommandNotFound")
    failed = wire.call_raw(b'{"execute": 1, "id": ' + raw_id + b"}")
    assert (failed["id"], failed["error"]["class"]) == (value, "GenericError")


def test_wrong_argument_types_name_the_command_and_where(wire: RawWire) -> None:
    desc = error_of(wire.call("guest-file-seek", handle="x", offset=[]))
    assert "handle" in desc
    desc = error_of(wire.call("pti-stat", path="\ud800"))  # a lone surrogate: not a path
    assert desc.startswith("pti-stat: bad arguments: UnicodeEncodeError") and ".py:" in desc
    assert wire.call("guest-ping") == {"return": {}}


def test_0xff_after_a_backslash_still_discards_the_half_sent_message(wire: RawWire) -> None:
    wire.send(b'{"execute": "guest-sync", "arguments": {"id": "cut after \\')
    wire.send(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 8}}')
    assert wire.line() == b'\xff{"return":8}'
