"""exec in VMs when commands misbehave: a daemon holding the pipes, output and input of any
size, commands that ignore signals, and commands that stop or kill the guest agent itself.

The figures (time, peak memory of the agent and of this process) go to the terminal with
``-s``; the tests assert bounds on them."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_incus import AgentError, ExecTimeoutError, Instance, InstanceFactory

GRACE = 6.0  # seconds past its timeout that an exec may take to raise, whatever the guest did
BIG_OUTPUT = 200_000_000
BIG_INPUT = 50 << 20
AGENT_PEAK = 64 << 20  # bytes: the agent's peak RSS after streaming BIG_OUTPUT through it
HOST_SLACK = 96 << 20  # bytes this process may grow by beyond the result it holds


@pytest.fixture(scope="module")
def vm(instance_factory: InstanceFactory) -> Iterator[Instance]:
    """One init="agent" VM for the tests that leave it working."""
    inst = instance_factory.launch(kind="vm", image="debian/12", init="agent")
    yield inst
    inst.delete()


@pytest.fixture(scope="module")
def systemd_vm(instance_factory: InstanceFactory) -> Iterator[Instance]:
    """One systemd VM, where the agent is a service that a command can stop or kill: the
    last test of the module leaves its agent stopped for good."""
    inst = instance_factory.launch(kind="vm", image="debian/12")
    yield inst
    inst.delete()


# the pids of the processes whose command line starts with $1 (the image has no procps)
PIDS_OF = (
    'for p in /proc/[0-9]*; do tr "\\0" " " < $p/cmdline 2>/dev/null | grep -q "^$1 " '
    '&& echo "${p#/proc/}"; done; true'
)


def _pids(vm: Instance, command: str) -> list[str]:
    return vm.exec(["sh", "-c", PIDS_OF, "sh", command]).stdout.split()


def _kib(status: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match[1]) << 10


def _reset_peak(status_dir: Path | str) -> None:
    """Start a process's VmHWM afresh (``5`` in clear_refs resets the peak RSS)."""
    Path(status_dir, "clear_refs").write_text("5")


def test_exec_returns_when_the_command_exits(vm: Instance) -> None:
    token = 100_000 + secrets.randbelow(100_000)
    started = time.monotonic()
    r = vm.exec(f"setsid nohup sleep {token} & echo started", timeout=5)  # it holds the pipes
    elapsed = time.monotonic() - started
    print(f"\nexec with a daemon holding its pipes: {elapsed:.2f}s")
    assert (r.exit_code, r.stdout) == (0, "started\n")
    assert elapsed < 2, f"exec took {elapsed:.2f}s"
    # the daemon runs on (as in a container), and does not disturb the next exec
    daemons = _pids(vm, f"sleep {token}")
    assert len(daemons) == 1
    assert vm.exec("echo next").stdout == "next\n"
    vm.exec(["kill", *daemons])


def test_200_mb_of_output_streams_with_bounded_memory(vm: Instance) -> None:
    vm.exec("echo 5 > /proc/1/clear_refs")  # the agent is PID 1
    _reset_peak("/proc/self")
    host_before = _kib(Path("/proc/self/status").read_text(), "VmRSS")
    started = time.monotonic()
    r = vm.exec(f"head -c {BIG_OUTPUT} /dev/zero", timeout=300)
    elapsed = time.monotonic() - started
    host_peak = _kib(Path("/proc/self/status").read_text(), "VmHWM")
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout_bytes) == BIG_OUTPUT
    assert r.stdout_bytes.count(0) == BIG_OUTPUT
    del r
    agent_peak = _kib(vm.read_text("/proc/1/status"), "VmHWM")
    growth = host_peak - host_before
    print(
        f"\n200 MB of output from a VM: {elapsed:.1f}s ({BIG_OUTPUT / elapsed / 1e6:.1f} MB/s); "
        f"agent peak RSS {agent_peak >> 20} MiB; this process grew by {growth >> 20} MiB at "
        f"its peak (RSS before {host_before >> 20} MiB)"
    )
    assert agent_peak < AGENT_PEAK
    assert growth < BIG_OUTPUT + HOST_SLACK


def test_50_mib_of_input_and_files(vm: Instance, tmp_path: Path) -> None:
    data = os.urandom(BIG_INPUT)
    digest = hashlib.sha256(data).hexdigest()
    started = time.monotonic()
    r = vm.exec("sha256sum", input=data, timeout=300)
    took_input = time.monotonic() - started
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split()[0] == digest

    started = time.monotonic()
    vm.write_file("/root/big.bin", data)
    took_write = time.monotonic() - started
    assert vm.file("/root/big.bin").sha256 == digest
    started = time.monotonic()
    assert vm.read_file("/root/big.bin") == data
    took_read = time.monotonic() - started

    local = tmp_path / "big.bin"
    local.write_bytes(data)
    started = time.monotonic()
    vm.push(local, "/root/pushed/big.bin")
    took_push = time.monotonic() - started
    assert vm.file("/root/pushed/big.bin").sha256 == digest
    started = time.monotonic()
    vm.pull("/root/pushed", tmp_path / "pulled")
    took_pull = time.monotonic() - started
    assert hashlib.sha256((tmp_path / "pulled/big.bin").read_bytes()).hexdigest() == digest
    vm.exec("rm -rf /root/big.bin /root/pushed")
    print(
        f"\n50 MiB into a VM: input {took_input:.1f}s, write_file {took_write:.1f}s, read_file "
        f"{took_read:.1f}s, push {took_push:.1f}s, pull {took_pull:.1f}s"
    )


def test_a_command_that_ignores_signals_dies_with_its_tree_at_the_timeout(vm: Instance) -> None:
    token = 100_000 + secrets.randbelow(100_000)
    script = (
        "trap '' TERM INT HUP; "
        f"sh -c \"trap '' TERM INT HUP; sleep {token}\" & "
        f"(trap '' TERM; sleep {token + 1}) & "
        "while :; do sleep 1; done"
    )
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as info:
        vm.exec(script, timeout=2)
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 2 + GRACE, f"the timeout took {elapsed:.2f}s"
    assert info.value.exit_code == 128 + 9
    assert _pids(vm, f"sleep {token}") == _pids(vm, f"sleep {token + 1}") == []


def test_kill_stop_of_every_process_spares_the_agent_at_pid_1(vm: Instance) -> None:
    # init="agent": the agent is PID 1, which kill -1 never signals; the shell goes on
    started = time.monotonic()
    r = vm.exec("kill -STOP -1; echo x", timeout=5)
    elapsed = time.monotonic() - started
    print(f"\nkill -STOP -1 with init=agent: returned in {elapsed:.2f}s")
    assert (r.exit_code, r.stdout) == (0, "x\n")
    assert elapsed < 5 + GRACE
    assert vm.exec("echo alive").stdout == "alive\n"


def test_a_killed_agent_ends_the_exec_in_time_and_the_next_one_works(
    systemd_vm: Instance,
) -> None:
    # the command kills the agent that runs it; systemd starts the agent again
    started = time.monotonic()
    with pytest.raises((ExecTimeoutError, AgentError)) as info:
        systemd_vm.exec("kill -KILL $PPID; sleep 60", timeout=5)
    elapsed = time.monotonic() - started
    print(f"\nagent killed under systemd: the exec raised after {elapsed:.2f}s: {info.value}")
    assert elapsed < 5 + GRACE
    assert "agent" in str(info.value)
    started = time.monotonic()
    assert systemd_vm.exec("echo back").stdout == "back\n"
    print(f"the next exec answered after {time.monotonic() - started:.2f}s")


def test_a_stopped_agent_ends_the_exec_in_time_and_the_next_one_says_why(
    systemd_vm: Instance,
) -> None:
    # under systemd, kill -STOP -1 stops the agent too (it is not PID 1): for good
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as info:
        systemd_vm.exec("kill -STOP -1; echo x", timeout=5)
    elapsed = time.monotonic() - started
    print(f"\nkill -STOP -1 under systemd: ExecTimeoutError after {elapsed:.2f}s")
    assert 5 <= elapsed < 5 + GRACE
    assert "stopped answering" in str(info.value)
    started = time.monotonic()
    with pytest.raises(AgentError, match="has not answered since"):
        systemd_vm.exec("echo again", timeout=5)
    failed_after = time.monotonic() - started
    print(f"the next exec failed after {failed_after:.2f}s")
    assert failed_after < 5
