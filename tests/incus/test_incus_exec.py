"""``pytest_incus.incus.exec`` against the real incusd: argv, exit codes, output, stdin,
environment, cwd, users, 127, timeouts and background processes, in a busybox container."""

from __future__ import annotations

import hashlib
import os
import secrets
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from incus_helpers import busybox_image, container

from pytest_incus.errors import ExecTimeoutError, UnknownUserError
from pytest_incus.incus import exec as incus_exec
from pytest_incus.incus import files
from pytest_incus.incus.client import IncusClient
from pytest_incus.values import ExecRequest, ExecResult


@pytest.fixture(scope="module")
def client() -> Iterator[IncusClient]:
    """A client of this machine's incusd (its unix socket)."""
    c = IncusClient()
    yield c
    c.close()


@pytest.fixture(scope="module")
def name() -> Iterator[str]:
    """A busybox container on Incus, with a user ``pti`` added by ``adduser -D``."""
    with busybox_image() as image, container(image) as inst:
        yield inst


class Runner:
    """``exec.run`` on one instance, with ExecRequest's fields as keywords."""

    def __init__(self, client: IncusClient, name: str, shell: str | None = "/bin/sh") -> None:
        self.client, self.name, self.shell = client, name, shell

    def __call__(self, argv: list[str] | str, **fields: Any) -> ExecResult:
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        request: dict[str, Any] = {"env": {}, "cwd": None, "user": None, "input": None}
        request["timeout"] = None
        request.update(fields)
        return incus_exec.run(
            self.client,
            self.name,
            ExecRequest(argv=tuple(argv), **request),
            shell=self.shell,
            read_file=lambda path: files.read_file(self.client, self.name, path),
        )


@pytest.fixture
def run(client: IncusClient, name: str) -> Runner:
    return Runner(client, name)


def test_argv_as_is_and_exit_codes(run: Runner) -> None:
    assert run(["echo", "$HOME", "a b", "*", "x;y"]).stdout == "$HOME a b * x;y\n"
    assert run("exit 3").exit_code == 3
    assert run("kill -9 $$").exit_code == 128 + 9
    r = run("echo out; echo err >&2; printf 'a\\0b'")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "out\na\0b", "err\n")


def test_rtt_of_true(run: Runner) -> None:
    times = []
    for _ in range(20):
        started = time.perf_counter()
        assert run(["true"]).ok
        times.append(time.perf_counter() - started)
    median = statistics.median(times) * 1000
    print(f"\nincus exec round trip of true: median of 20 = {median:.1f} ms")
    assert median < 200


def test_short_commands_never_lose_their_output(run: Runner) -> None:
    # the server pings, sends the output and its end, and closes at once: a reader that
    # answered the ping before reading on lost the output (about 1 in 400 here)
    lost = [n for n in range(600) if run(["echo", str(n)]).stdout != f"{n}\n"]
    assert not lost, f"{len(lost)} of 600 lost their output: {lost[:10]}"


def test_big_output_intact(run: Runner) -> None:
    size = 50 << 20
    line = b"0123456789abcdef\n"
    r = run(f"yes 0123456789abcdef | head -c {size}; yes e | head -c 1000000 >&2")
    assert len(r.stdout_bytes) == size
    assert r.stdout_bytes == (line * (size // len(line) + 1))[:size]
    assert r.stderr_bytes == b"e\n" * 500000


def test_stdin_intact(run: Runner) -> None:
    data = os.urandom(1 << 20)
    assert run(["cat"], input=data).stdout_bytes == data
    assert run("sha256sum", input=data).stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert run("cat; echo end", timeout=10).stdout == "end\n"  # no input: EOF at once


def test_env_cwd_and_root_defaults(run: Runner) -> None:
    r = run('echo "$PATH|$HOME|$USER|$SHELL|${LANG-unset}|$PTI_A"; pwd', env={"PTI_A": "v"})
    first, cwd = r.stdout.splitlines()
    path, home, user, shell, lang, value = first.split("|")
    assert "/bin" in path.split(":") and (home, user, shell) == ("/root", "root", "/bin/sh")
    assert (lang, value, cwd) == ("unset", "v", "/root")
    assert run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert run("echo $HOME", env={"HOME": "/srv"}).stdout == "/srv\n"


def test_users(run: Runner) -> None:
    user = f"p{secrets.token_hex(3)}"
    # the host's static busybox has no adduser: what adduser -D would write
    uid = str(2000 + secrets.randbelow(1000))
    add = f"echo '{user}:x:{uid}:{uid}::/home/{user}:/bin/sh' >> /etc/passwd"
    add += f" && mkdir -p /home/{user} && chown {uid}:{uid} /home/{user}"
    assert run(add).ok
    r = run('id -u; echo "$HOME|$USER"; pwd', user=user)
    assert r.stdout.splitlines() == [uid, f"/home/{user}|{user}", f"/home/{user}"]
    assert run("id -un", user=int(uid)).stdout == f"{user}\n"
    nobody = run('id -u; echo "$HOME"; pwd', user="nobody").stdout.splitlines()
    assert nobody == ["65534", "/nonexistent", "/"]
    assert run("id -u", user=4242).stdout == "4242\n"
    with pytest.raises(UnknownUserError, match="'pti-nobody-here'"):
        run(["true"], user="pti-nobody-here")
    denied = run("echo x > /etc/pti-denied", user=user)
    assert denied.exit_code != 0 and "denied" in denied.stderr.lower()


@pytest.mark.parametrize("cmd", [["pti-no-such", "arg"], ["/pti/no/such"], "pti-no-such arg"])
def test_missing_program_is_127(run: Runner, cmd: list[str] | str) -> None:
    r = run(cmd)
    program = cmd.split()[0] if isinstance(cmd, str) else cmd[0]
    assert r.exit_code == 127 and program in r.stderr and "not found" in r.stderr


def test_missing_program_without_a_wrapper(client: IncusClient, name: str) -> None:
    r = Runner(client, name, shell=None)(["pti-no-such"])
    assert r.exit_code == 127 and "pti-no-such: not found" in r.stderr
    assert Runner(client, name, shell=None)(["echo", "hi"]).stdout == "hi\n"


def test_bad_cwd_errors(run: Runner) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        run("pwd", cwd="/pti-no-such-dir")
    assert missing.value.filename == "/pti-no-such-dir"
    with pytest.raises(NotADirectoryError) as a_file:
        run("pwd", cwd="/etc/passwd/sub")
    assert a_file.value.filename == "/etc/passwd/sub"
    run("mkdir -p /srv/closed && chmod 700 /srv/closed")
    with pytest.raises(PermissionError) as closed:
        run("pwd", cwd="/srv/closed", user="nobody")
    assert closed.value.filename == "/srv/closed"


@pytest.mark.parametrize(
    "shape", ["sleep {n} & sleep {n}", "setsid sleep {n} & sleep {n}", "(sleep {n} &); sleep {n}"]
)
def test_timeout_kills_the_tree(run: Runner, shape: str) -> None:
    n = 100_000 + secrets.randbelow(100_000)
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as excinfo:
        run(shape.format(n=n), timeout=1)
    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 4, elapsed
    assert excinfo.value.exit_code == 128 + 9 and "timeout" in str(excinfo.value)
    assert f"sleep {n}" not in run(["ps", "-o", "args"]).stdout
    assert run("echo alive").stdout == "alive\n"


def test_timeout_keeps_the_output_so_far(run: Runner) -> None:
    with pytest.raises(ExecTimeoutError) as excinfo:
        run("echo before; sleep 100", timeout=1)
    assert excinfo.value.stdout == "before\n"


def test_background_stdout_holder_returns(run: Runner) -> None:
    n = 100_000 + secrets.randbelow(100_000)
    started = time.monotonic()
    r = run(f"sleep {n} & echo started; echo bye >&2", timeout=30)
    assert time.monotonic() - started < 2.5
    assert (r.exit_code, r.stdout, r.stderr) == (0, "started\n", "bye\n")
    assert f"sleep {n}" in run(["ps", "-o", "args"]).stdout
    run(f"pkill -f 'sleep {n}'")
