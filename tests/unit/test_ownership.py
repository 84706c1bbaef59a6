"""Owner: a process named by pid and start time."""

from __future__ import annotations

import subprocess
import sys

from pytest_incus.ownership import Owner, process_start_time


def test_this_process_is_alive() -> None:
    assert Owner.current().alive()


def test_a_child_is_alive_until_it_exits() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        start = process_start_time(child.pid)
        assert start is not None
        owner = Owner(child.pid, start)
        assert owner.alive()
        # the same pid with another start time is another process
        assert not Owner(child.pid, start + 1).alive()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    assert process_start_time(child.pid) is None
    assert not owner.alive()


def test_records_round_trip() -> None:
    owner = Owner.current()
    assert Owner.from_dict(owner.to_dict()) == owner
    assert Owner.from_dict(None) is None
    assert Owner.from_dict({"pid": "x", "start_time": 1}) is None
    assert Owner.from_dict({"pid": 1}) is None
