"""``Instance.exec`` in real containers: shell and argv, environment, user, stdin, errors,
timeouts, large output and background processes."""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import time
from collections.abc import Iterator

import pytest
from integration_helpers import host_descendants, host_processes, wait_until

from pytest_incus import (
    ExecError,
    ExecTimeoutError,
    Instance,
    InstanceFactory,
    UnknownUserError,
)

BUSYBOX = pytest.mark.instance(image="busybox")


@BUSYBOX
def test_str_runs_through_the_shell(instance: Instance) -> None:
    r = instance.exec("echo $((6 * 7)) | tr 4 X; echo $0")
    assert r.exit_code == 0
    assert r.stdout == "X2\n/bin/sh\n"


@BUSYBOX
def test_argv_runs_without_a_shell(instance: Instance) -> None:
    r = instance.exec(["echo", "$HOME", "a b", "*", "x;y"])
    assert r.stdout == "$HOME a b * x;y\n"


@BUSYBOX
def test_default_environment_and_cwd_of_root(instance: Instance) -> None:
    r = instance.exec(["sh", "-c", 'echo "$PATH|$HOME|$USER"; pwd'])
    path, home, user = r.stdout.splitlines()[0].split("|")
    assert "/bin" in path.split(":") and "/usr/bin" in path.split(":")
    assert (home, user) == ("/root", "root")
    assert r.stdout.splitlines()[1] == "/root"


@BUSYBOX
def test_env_is_added_over_the_defaults(instance: Instance) -> None:
    r = instance.exec(["sh", "-c", 'echo "$PTI_A|$HOME|$PATH"'], env={"PTI_A": "a value"})
    value, home, path = r.stdout.rstrip("\n").split("|")
    assert value == "a value"
    assert home == "/root" and "/bin" in path.split(":")
    # nothing of pytest's own environment leaks in
    assert "PYTEST_CURRENT_TEST" not in instance.exec("env").stdout


@pytest.mark.instance(image="busybox", env={"PTI_MARK": "from-marker", "PTI_BOTH": "marker"})
def test_marker_env_applies_to_every_exec(instance: Instance) -> None:
    for _ in range(2):
        assert instance.exec("echo $PTI_MARK").stdout == "from-marker\n"
    r = instance.exec(["sh", "-c", "echo $PTI_MARK $PTI_BOTH $HOME"], env={"PTI_BOTH": "exec"})
    assert r.stdout == "from-marker exec /root\n"


@BUSYBOX
def test_explicit_cwd(instance: Instance) -> None:
    assert instance.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert instance.exec(["pwd"], cwd="/var/log").stdout == "/var/log\n"


@BUSYBOX
def test_missing_cwd_is_an_error_naming_it(instance: Instance) -> None:
    # as subprocess.Popen(cwd=...) says it
    with pytest.raises(FileNotFoundError) as missing:
        instance.exec("pwd", cwd="/pti-no-such-dir")
    assert missing.value.filename == "/pti-no-such-dir"
    with pytest.raises(NotADirectoryError) as a_file:
        instance.exec("pwd", cwd="/etc/passwd/sub")
    assert a_file.value.filename == "/etc/passwd/sub"


@BUSYBOX
def test_user_by_name_and_by_uid(instance: Instance) -> None:
    by_name = instance.exec('id -u; id -g; echo "$HOME $USER"; pwd', user="nobody")
    assert by_name.stdout.splitlines() == ["65534", "65534", "/nonexistent nobody", "/"]
    by_uid = instance.exec('id -un; echo "$HOME"', user=65534)
    assert by_uid.stdout.splitlines() == ["nobody", "/nonexistent"]
    # a uid with no passwd entry still runs, as that uid
    assert instance.exec("id -u", user=4242).stdout == "4242\n"
    # and the default is root
    assert instance.exec("id -u").stdout == "0\n"


@BUSYBOX
def test_unknown_user_is_an_error(instance: Instance) -> None:
    with pytest.raises(UnknownUserError, match="'pti-nobody-here'"):
        instance.exec("true", user="pti-nobody-here")


@BUSYBOX
def test_input_as_str_and_bytes(instance: Instance) -> None:
    assert instance.exec("cat", input="héllo\nwörld\n").stdout == "héllo\nwörld\n"
    raw = bytes(range(256)) * 4
    r = instance.exec(["cat"], input=raw)
    assert r.stdout_bytes == raw
    assert "\ufffd" in r.stdout  # undecodable bytes are replaced in the str form
    # no input: stdin is at end of file at once
    assert instance.exec("cat; echo end", timeout=10).stdout == "end\n"


@BUSYBOX
@pytest.mark.parametrize(
    "cmd", [["pti-no-such-program", "arg"], ["/pti/no/such/program"], "pti-no-such-program arg"]
)
def test_missing_program_exits_127_with_a_message(instance: Instance, cmd: str | list[str]) -> None:
    r = instance.exec(cmd)
    assert r.exit_code == 127
    assert not r.ok
    program = cmd.split()[0] if isinstance(cmd, str) else cmd[0]
    assert program in r.stderr and "not found" in r.stderr
    assert r.stdout == ""


@BUSYBOX
def test_check_raises_exec_error_with_everything(instance: Instance) -> None:
    cmd = "echo out; echo err >&2; exit 3"
    with pytest.raises(ExecError) as excinfo:
        instance.exec(cmd, check=True)
    error = excinfo.value
    assert not isinstance(error, ExecTimeoutError)
    assert (error.exit_code, error.stdout, error.stderr) == (3, "out\n", "err\n")
    assert (error.stdout_bytes, error.stderr_bytes) == (b"out\n", b"err\n")
    assert error.cmd == cmd
    assert error.duration > 0
    assert "3" in str(error) and "err" in str(error)

    with pytest.raises(ExecError) as excinfo:
        instance.exec(["sh", "-c", "exit 5"], check=True)
    assert excinfo.value.cmd == ["sh", "-c", "exit 5"]
    assert excinfo.value.exit_code == 5

    assert instance.exec("true", check=True).ok


@BUSYBOX
def test_exec_result_fields(instance: Instance) -> None:
    r = instance.exec("printf 'a\\0b'; printf 'e' >&2; sleep 0.3; exit 0")
    assert r.exit_code == 0 and r.ok
    assert r.stdout_bytes == b"a\0b" and r.stdout == "a\0b"
    assert r.stderr_bytes == b"e" and r.stderr == "e"
    assert 0.3 <= r.duration < 5
    failed = instance.exec("exit 1")
    assert (failed.exit_code, failed.ok) == (1, False)
    killed = instance.exec("kill -9 $$")
    assert killed.exit_code == 128 + 9


@BUSYBOX
def test_command_starts_clean_of_pytests_fds_and_signals(instance: Instance) -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)  # an fd of the test process that a fork would inherit
    try:
        listing = instance.exec(["ls", "-l", "/proc/self/fd/"]).stdout
    finally:
        os.close(read_end)
        os.close(write_end)
    # ls's own directory fd is gone by the time its link is read: it shows no "->"
    fds = [line.split(" -> ")[0].split()[-1] for line in listing.splitlines() if " -> " in line]
    assert sorted(fds) == ["0", "1", "2"], listing
    status = instance.exec(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]).stdout
    fields = dict(zip(status.split()[::2], status.split()[1::2], strict=True))
    assert int(fields["SigBlk:"], 16) == 0, status
    # the standard signals (1-31) are back to their defaults; glibc reserves 32 and 33 for its
    # own use, and what a parent (make, say) left on them is beyond a program's reach
    assert int(fields["SigIgn:"], 16) & 0x7FFFFFFF == 0, status
    # with SIGPIPE ignored (as Python has it) busybox's yes would run forever here
    r = instance.exec("yes abcdefgh | head -c 100 | wc -c", timeout=10)
    assert r.stdout.strip() == "100"


# A command that leaves processes of every sort behind when it is killed: background children
# in its process group, a child in a session of its own (still a descendant), and an orphan
# that left the tree (reparented to the container's init) but is still in its process group.
ESCAPES = {
    "background": "sleep {n} & sleep {n}",
    "own-session": "setsid sleep {n} & sleep {n}",
    "orphan-in-group": "(sleep {n} &); sleep {n}",
}


@BUSYBOX
@pytest.mark.parametrize("shape", list(ESCAPES))
def test_timeout_kills_the_command_and_what_it_started(instance: Instance, shape: str) -> None:
    seconds = 100_000 + secrets.randbelow(100_000)  # a unique command line to look for
    needle = f"sleep {seconds}"
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as excinfo:
        instance.exec(ESCAPES[shape].format(n=seconds), timeout=1)
    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 5, f"the timeout took {elapsed:.2f}s"
    error = excinfo.value
    assert isinstance(error, ExecError)
    assert error.exit_code == 128 + 9
    assert "timeout" in str(error)

    inside = instance.exec(["ps", "-o", "pid,args"]).stdout
    assert needle not in inside, inside
    assert host_processes(needle) == []
    assert [p for p in host_descendants(os.getpid()) if "sleep" in p] == []
    # the instance still works
    assert instance.exec("echo alive").stdout == "alive\n"


@BUSYBOX
def test_timeout_zero_or_none_means_no_limit_here(instance: Instance) -> None:
    assert instance.exec("sleep 0.2; echo done", timeout=0).stdout == "done\n"


@BUSYBOX
def test_large_output_and_input_arrive_intact(instance: Instance) -> None:
    size = 8_000_000
    line = b"0123456789abcdef\n"
    expected = (line * (size // len(line) + 1))[:size]
    r = instance.exec(f"yes 0123456789abcdef | head -c {size}; yes e | head -c {size} >&2")
    assert r.exit_code == 0
    assert len(r.stdout_bytes) == size and r.stdout_bytes == expected
    assert r.stderr_bytes == b"e\n" * (size // 2)

    data = os.urandom(6_000_000)
    echoed = instance.exec(["cat"], input=data)
    assert echoed.stdout_bytes == data
    digest = instance.exec("sha256sum", input=data).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()


@BUSYBOX
def test_a_daemon_holding_stdout_does_not_make_exec_hang(instance: Instance) -> None:
    seconds = 100_000 + secrets.randbelow(100_000)
    started = time.monotonic()
    r = instance.exec(f"sleep {seconds} & echo started; echo bye >&2", timeout=30)
    assert time.monotonic() - started < 5
    assert (r.exit_code, r.stdout, r.stderr) == (0, "started\n", "bye\n")
    # the daemon itself is left alone: it was not the command's to kill after a normal exit
    assert f"sleep {seconds}" in instance.exec(["ps", "-o", "args"]).stdout
    instance.exec(f"pkill -f 'sleep {seconds}'")


# -- Debian: real users ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian(instance_factory: InstanceFactory) -> Iterator[Instance]:
    """One Debian 12 container for the user tests of this module (they only read its state,
    or add a user of their own)."""
    inst = instance_factory.launch(image="debian/12")
    yield inst
    inst.delete()


def test_debian_user_nobody(debian: Instance) -> None:
    r = debian.exec('id -u; id -un; echo "$HOME"; pwd', user="nobody")
    # nobody's home, /nonexistent, does not exist: the command starts in /
    assert r.stdout.splitlines() == ["65534", "nobody", "/nonexistent", "/"]
    assert debian.exec("id -un", user=65534).stdout == "nobody\n"


def test_debian_created_user_by_name_and_uid(debian: Instance, token: str) -> None:
    name = f"u{token[:8]}"
    debian.exec(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    uid = int(debian.exec(["id", "-u", name], check=True).stdout)
    groups = debian.exec(["id", "-G", name], check=True).stdout.split()
    debian.exec(["usermod", "-aG", "users", name], check=True)
    for user in (name, uid):
        r = debian.exec('id -u; id -Gn; echo "$HOME|$USER|$SHELL"; pwd', user=user)
        out = r.stdout.splitlines()
        assert out[0] == str(uid)
        assert "users" in out[1].split()  # supplementary groups from /etc/group
        assert out[2] == f"/home/{name}|{name}|/bin/bash"
        assert out[3] == f"/home/{name}"
    assert groups
    # a file it creates belongs to it
    debian.exec("echo hi > mine", user=name, check=True)
    info = debian.file(f"/home/{name}/mine")
    assert (info.uid, info.is_file) == (uid, True)
    # and it may not write where only root may
    denied = debian.exec("echo x > /etc/pti-denied", user=name)
    assert denied.exit_code != 0 and "Permission denied" in denied.stderr
    assert not debian.file("/etc/pti-denied").exists


def test_debian_missing_program_in_bash_and_argv(debian: Instance) -> None:
    for cmd in (["pti-missing"], "pti-missing"):
        r = debian.exec(cmd)
        assert r.exit_code == 127 and "pti-missing" in r.stderr and "not found" in r.stderr


# -- zombies ---------------------------------------------------------------------------------


def _zombies(instance: Instance) -> list[str]:
    """``pid ppid name`` of every zombie in the instance, read from /proc (no ps needed)."""
    listing = instance.exec(
        'for f in /proc/[0-9]*/stat; do read -r line < $f && echo "$line"; done 2>/dev/null'
    ).stdout
    found = []
    for line in listing.splitlines():
        head, _, rest = line.rpartition(")")
        fields = rest.split()
        if fields and fields[0] == "Z":
            found.append(f"{head.split()[0]} {fields[1]} {head.split('(', 1)[1]}")
    return found


@pytest.mark.parametrize("image", ["busybox", "debian/12"])
def test_background_commands_leave_no_zombies(
    instance_factory: InstanceFactory, image: str
) -> None:
    # each command's background child outlives it and is orphaned; whoever adopts it must
    # collect it as it ends (busybox init alone does so only once a second)
    inst = instance_factory.launch(image=image)

    def states(pids: list[str]) -> list[str]:
        probe = " ".join(f"/proc/{pid}/stat" for pid in pids)
        out = inst.exec(f"cat {probe} 2>/dev/null || true").stdout
        return [line.rsplit(")", 1)[1].split()[0] for line in out.splitlines()]

    try:
        for _ in range(3):
            pids = [inst.exec("sleep 0.1 & echo $!").stdout.strip() for _ in range(5)]
            assert all(pid.isdigit() for pid in pids), pids
            ended = functools.partial(lambda p: set(states(p)) <= {"Z"}, pids)
            collected = functools.partial(lambda p: states(p) == [], pids)
            wait_until(ended, 10, "the background sleeps ended")
            wait_until(collected, 0.5, f"{image}: their zombies collected")
        assert _zombies(inst) == []
    finally:
        inst.delete()
