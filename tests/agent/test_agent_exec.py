"""exec through the agent client: environment, cwd, user, stdin, exit codes, timeouts."""

from __future__ import annotations

import hashlib
import os
import secrets
import time

import pytest
from agent_helpers import AgentTarget, run, wait_until

from pytest_incus import ExecTimeoutError, UnknownUserError
from pytest_incus.agent import AgentClient
from pytest_incus.values import ExecRequest


def test_output_and_exit_code(agent_client: AgentClient) -> None:
    code, out, err = run(agent_client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out, err) == (3, "out\n", "err\n")


def test_binary_output_survives(agent_client: AgentClient) -> None:
    result = agent_client.exec(
        ExecRequest(("printf", "\\377\\000\\001"), {}, None, None, None, 30.0)
    )
    assert result.exit_code == 0
    assert result.stdout_bytes == b"\xff\x00\x01"


def test_env_is_added_over_the_users_default(agent_client: AgentClient) -> None:
    script = 'echo "$PTI_X|$HOME|$USER|$LOGNAME|$SHELL"; echo "$PATH"'
    code, out, _ = run(agent_client, ["sh", "-c", script], env={"PTI_X": "a b", "SHELL": "/x"})
    first, path = out.splitlines()
    pti_x, home, user, logname, shell = first.split("|")
    assert code == 0
    assert pti_x == "a b"
    assert shell == "/x"  # the caller's env wins over the default
    assert home.startswith("/") and user and user == logname
    assert "/usr/bin" in path.split(":")


def test_env_does_not_leak_the_agents_environment(agent_client: AgentClient) -> None:
    code, out, _ = run(agent_client, ["env"])
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert code == 0
    assert names <= {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "SHLVL", "_"}


def test_cwd(agent_client: AgentClient, workdir: str) -> None:
    code, out, _ = run(agent_client, ["pwd"], cwd=workdir)
    assert (code, out) == (0, workdir + "\n")


def test_cwd_defaults_to_the_users_home_or_root(agent_client: AgentClient) -> None:
    _, home, _ = run(agent_client, ["sh", "-c", 'echo "$HOME"'])
    code, out, _ = run(agent_client, ["pwd"])
    expected = home.strip() if run(agent_client, ["test", "-d", home.strip()])[0] == 0 else "/"
    assert (code, out.strip()) == (0, expected)


def test_a_cwd_that_is_no_directory_is_the_os_error_chdir_gives(
    agent_client: AgentClient, workdir: str
) -> None:
    # as in containers: not the agent failing, but the guest's filesystem
    with pytest.raises(FileNotFoundError) as missing:
        run(agent_client, ["true"], cwd="/no-such-dir")
    assert missing.value.filename == "/no-such-dir"
    run(agent_client, ["touch", f"{workdir}/file"])
    for cwd, blocker in ((f"{workdir}/file", "file"), (f"{workdir}/file/sub", "file under")):
        with pytest.raises(NotADirectoryError) as info:
            run(agent_client, ["true"], cwd=cwd)
        assert info.value.filename == cwd, blocker


def test_input_goes_to_stdin(agent_client: AgentClient) -> None:
    data = b"line one\n\x00binary\xff" * 1000
    result = agent_client.exec(ExecRequest(("cat",), {}, None, None, data, 30.0))
    assert result.exit_code == 0
    assert result.stdout_bytes == data


def test_no_input_means_empty_stdin(agent_client: AgentClient) -> None:
    code, out, _ = run(agent_client, ["wc", "-c"])
    assert (code, out.strip()) == (0, "0")


def test_missing_program_is_127(agent_client: AgentClient) -> None:
    code, _, err = run(agent_client, ["no-such-program-pti"])
    assert code == 127
    assert "no-such-program-pti" in err


def test_unrunnable_program_is_126(agent_client: AgentClient, workdir: str) -> None:
    agent_client.write_file(f"{workdir}/plain", b"not a program\n", 0o644)
    code, _, err = run(agent_client, [f"{workdir}/plain"])
    assert code == 126
    assert "plain" in err


def test_killed_by_signal_is_128_plus(agent_client: AgentClient) -> None:
    code, _, _ = run(agent_client, ["sh", "-c", "kill -TERM $$"])
    assert code == 128 + 15


def test_timeout_kills_the_process_tree(
    agent_client: AgentClient, agent_target: AgentTarget, workdir: str
) -> None:
    marker = f"{workdir}/pids"
    script = f"sleep 300 & echo $! > {marker}; sh -c 'sleep 301' & echo $! >> {marker}; wait"
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as info:
        run(agent_client, ["sh", "-c", script], timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 15
    assert "timeout" in str(info.value)
    pids = agent_client.read_file(marker).decode().split()
    assert len(pids) == 2

    # gone or a zombie (killed; whoever inherited it may not have reaped it yet)
    alive = 'for p; do s=$(cut -d" " -f3 /proc/$p/stat 2>/dev/null) && [ "$s" != Z ] && echo $p; done; true'

    def all_gone() -> bool:
        code, out, _ = run(agent_client, ["sh", "-c", alive, "sh", *pids])
        return code == 0 and out.strip() == ""

    wait_until(all_gone, 10, f"descendants {pids} of a timed-out command to be killed")


def test_no_timeout_runs_to_the_end(agent_client: AgentClient) -> None:
    code, out, _ = run(agent_client, ["sh", "-c", "sleep 0.3; echo done"], timeout=None)
    assert (code, out) == (0, "done\n")


@pytest.mark.agent_root
def test_user_by_name_and_uid(agent_client: AgentClient) -> None:
    code, out, _ = run(
        agent_client, ["sh", "-c", 'id -u; id -g; echo "$HOME $USER"'], user="nobody"
    )
    assert code == 0
    assert out.splitlines()[:2] == ["65534", "65534"]
    assert out.splitlines()[2].endswith(" nobody")
    code, out, _ = run(agent_client, ["id", "-un"], user=65534)
    assert (code, out.strip()) == (0, "nobody")


@pytest.mark.agent_root
def test_unknown_user_raises_unknown_user_error(agent_client: AgentClient) -> None:
    with pytest.raises(UnknownUserError, match="'no-such-user-pti'") as info:
        run(agent_client, ["true"], user="no-such-user-pti")
    assert info.value.user == "no-such-user-pti"


def test_parallel_threads_share_the_client(agent_client: AgentClient) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run(agent_client, ["echo", str(i)]), range(20)))
    assert [r[1] for r in results] == [f"{i}\n" for i in range(20)]


def test_exec_returns_when_the_command_exits_not_when_its_pipes_close(
    agent_client: AgentClient,
) -> None:
    # a daemon that keeps stdout and stderr open must not hold the result back, nor lose
    # what the command wrote before it exited
    token = str(100_000 + secrets.randbelow(100_000))
    started = time.monotonic()
    code, out, err = run(
        agent_client,
        ["sh", "-c", f"setsid nohup sleep {token} & echo started; echo bye >&2"],
        timeout=30,
    )
    elapsed = time.monotonic() - started
    try:
        assert (code, out, err) == (0, "started\n", "bye\n")
        assert elapsed < 3, f"exec took {elapsed:.2f}s"
        # the daemon runs on, as in a container, and the next exec is not disturbed by it
        assert _pids(agent_client, f"sleep {token}"), "the background process was killed"
        assert run(agent_client, ["echo", "next"])[1] == "next\n"
    finally:
        run(agent_client, ["kill", *_pids(agent_client, f"sleep {token}")])


# the pids of the processes whose command line starts with $1 (VM images have no procps)
PIDS_OF = (
    'for p in /proc/[0-9]*; do tr "\\0" " " < $p/cmdline 2>/dev/null | grep -q "^$1 " '
    '&& echo "${p#/proc/}"; done; true'
)


def _pids(agent_client: AgentClient, command: str) -> list[str]:
    return run(agent_client, ["sh", "-c", PIDS_OF, "sh", command])[1].split()


def test_output_larger_than_a_message_streams_intact(
    agent_client: AgentClient, agent_target: AgentTarget
) -> None:
    if not agent_target.extensions:
        pytest.skip("a stock qemu-ga captures at most 16 MiB of output (see the README)")
    size = 80 << 20  # past the agent's 64 MiB message limit, in base64 too
    result = agent_client.exec(
        ExecRequest(
            ("sh", "-c", f"head -c {size} /dev/zero; echo tail >&2"), {}, None, None, None, 120
        )
    )
    assert result.exit_code == 0
    assert len(result.stdout_bytes) == size
    assert result.stdout_bytes.count(0) == size
    assert result.stderr_bytes == b"tail\n"


def test_input_larger_than_a_message_streams_intact(agent_client: AgentClient) -> None:
    data = os.urandom(50 << 20)
    result = agent_client.exec(ExecRequest(("sha256sum",), {}, None, None, data, 120))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_input_and_output_at_once_do_not_deadlock(agent_client: AgentClient) -> None:
    data = os.urandom(6 << 20)  # more than the pipes, both ways, hold
    result = agent_client.exec(ExecRequest(("cat",), {}, None, None, data, 60))
    assert result.exit_code == 0
    assert result.stdout_bytes == data


def test_a_command_that_ignores_signals_is_killed_with_its_tree_at_the_timeout(
    agent_client: AgentClient, agent_target: AgentTarget, workdir: str
) -> None:
    marker = f"{workdir}/pids"
    script = (
        f"trap '' TERM INT HUP; sh -c \"trap '' TERM INT HUP; sleep 300\" & echo $! > {marker}; "
    )
    if agent_target.extensions:  # qemu-ga's timeout kills the process group (see the README)
        script += f"setsid sleep 301 & echo $! >> {marker}; "
    script += "while :; do sleep 1; done"
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError):
        run(agent_client, ["sh", "-c", script], timeout=1.5)
    assert time.monotonic() - started < 1.5 + 5
    pids = agent_client.read_file(marker).decode().split()
    assert len(pids) == (2 if agent_target.extensions else 1)
    alive = 'for p; do s=$(cut -d" " -f3 /proc/$p/stat 2>/dev/null) && [ "$s" != Z ] && echo $p; done; true'

    def all_gone() -> bool:
        code, out, _ = run(agent_client, ["sh", "-c", alive, "sh", *pids])
        return code == 0 and out.strip() == ""

    wait_until(all_gone, 10, f"descendants {pids} of a timed-out command to be killed")
    assert run(agent_client, ["echo", "alive"])[1] == "alive\n"
