"""The subprocess boundary: a failing host tool is an error of ours, its cause kept."""

from __future__ import annotations

import subprocess

import pytest

from pytest_incus import tools
from pytest_incus.errors import ImageError, IncusError


def test_a_tool_that_fails_says_what_was_asked_and_what_it_said() -> None:
    with pytest.raises(ImageError) as info:
        tools.run(
            ["sh", "-c", "echo working; echo 'no space left' >&2; exit 3"],
            what="copying the rootfs",
            error=ImageError,
            fix="free some space",
        )
    assert str(info.value) == "copying the rootfs failed (exit 3): no space left; free some space"
    assert isinstance(info.value.exc, subprocess.CalledProcessError)
    assert info.value.__cause__ is info.value.exc


def test_a_tool_past_its_timeout() -> None:
    with pytest.raises(IncusError, match=r"^sleeping did not finish within 0s$") as info:
        tools.run(["sleep", "5"], what="sleeping", error=IncusError, timeout=0.2)
    assert isinstance(info.value.exc, subprocess.TimeoutExpired)


def test_a_tool_that_is_not_installed() -> None:
    with pytest.raises(ImageError, match="cannot run pti-no-such-tool: No such file") as info:
        tools.run(["pti-no-such-tool"], what="unpacking", error=ImageError)
    assert isinstance(info.value.exc, FileNotFoundError)


def test_input_and_output() -> None:
    done = tools.run(["tr", "a-z", "A-Z"], input=b"shout", what="tr", error=IncusError)
    assert done.stdout == b"SHOUT"
