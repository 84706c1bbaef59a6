"""Real VMs under QEMU (TCG here): launch, exec and files through the guest agent, the options
seen inside, readiness with systemd, life cycle, and guests that never get ready.

Boots are costly under TCG, so one VM per init is shared by the checks that do not need a fresh
one; the life-cycle test runs last on the shared init="agent" VM."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, host_processes, wait_until

from pytest_incus import IncusError, Instance, InstanceStartError, InstanceState
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

TOKEN = "pti.check=c0ffee42"


@pytest.fixture(scope="module")
def agent_vm(instance_factory: InstanceFactory) -> Iterator[Instance]:
    """One init="agent" VM with 2 CPUs, 768 MiB and an extra kernel argument."""
    vm = instance_factory.launch(
        kind="vm", image="debian/12", init="agent", cpus=2, memory="768MiB", kernel_args=TOKEN
    )
    yield vm
    vm.delete()


@pytest.fixture(scope="module")
def systemd_vm(instance_factory: InstanceFactory) -> Iterator[Instance]:
    """One VM booted with systemd (the default init)."""
    vm = instance_factory.launch(kind="vm", image="debian/12")
    yield vm
    vm.delete()


def test_exec_in_agent_vm(agent_vm: Instance) -> None:
    assert agent_vm.kind == "vm" and agent_vm.state is InstanceState.RUNNING
    result = agent_vm.exec("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert agent_vm.exec(["cat"], input="fed\n").stdout == "fed\n"
    assert agent_vm.exec("echo $PTI_X", env={"PTI_X": "set"}).stdout == "set\n"
    assert agent_vm.exec(["no-such-program"]).exit_code == 127
    assert agent_vm.exec("cat /proc/1/comm").stdout.strip() != "systemd"  # no systemd here
    assert "bookworm" in agent_vm.read_text("/etc/os-release")


def test_files_in_agent_vm(agent_vm: Instance, tmp_path: Path) -> None:
    agent_vm.write_file("/root/dir/hello.txt", "hello vm\n", mode=0o600)
    info = agent_vm.file("/root/dir/hello.txt")
    assert info.is_file and info.mode == 0o600 and info.uid == 0 and info.size == 9
    assert info.contains("vm")
    assert not agent_vm.file("/root/nothing").exists
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a").write_bytes(b"\x00\x01 binary")
    agent_vm.push(tree, "/srv/tree")
    assert agent_vm.read_file("/srv/tree/sub/a") == b"\x00\x01 binary"
    agent_vm.pull("/srv/tree", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "a").read_bytes() == b"\x00\x01 binary"
    with pytest.raises(FileNotFoundError):
        agent_vm.read_file("/root/nothing")


def test_overlay_is_on_a_pinned_copy_of_the_image(
    agent_vm: Instance, image_store: ImageStore
) -> None:
    disk = agent_vm.directory / "disk.qcow2"
    chain = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(disk)],
            capture_output=True,
            check=True,
        ).stdout
    )
    # the instance's overlay, on the boot snapshot's disk when it resumed one, on the image's
    # disk: every file of the chain is a link in the instance's own directory
    names = [Path(layer["filename"]) for layer in chain]
    assert [p.parent for p in names] == [agent_vm.directory] * len(names)
    assert names[0].name == "disk.qcow2" and names[-1].name == "base.qcow2"
    assert names[1:-1] in ([], [agent_vm.directory / "boot.qcow2"])
    base = agent_vm.directory / "base.qcow2"
    image = image_store.get("debian/12", "vm")
    launched = (agent_vm.directory / "instance.json").stat().st_mtime
    if image.created < launched:  # else the image was rebuilt since, and the VM kept its base
        assert base.samefile(image.disk)  # a hard link to the image's disk, not a copy


def test_options_seen_inside(agent_vm: Instance) -> None:
    assert agent_vm.exec("nproc").stdout.strip() == "2"
    meminfo = agent_vm.read_text("/proc/meminfo")
    match = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    assert match, meminfo
    assert 600 * 1024 < int(match.group(1)) <= 768 * 1024
    assert TOKEN in agent_vm.read_text("/proc/cmdline").split()

    # the serial console is the log
    agent_vm.exec("echo pti-console-mark > /dev/ttyS0", check=True)
    assert "pti-console-mark" in agent_vm.logs()


def test_systemd_vm_is_ready_when_launched(systemd_vm: Instance) -> None:
    # ready means systemd had finished booting when launch() returned
    state = systemd_vm.exec(["systemctl", "is-system-running"]).stdout.strip()
    assert state in ("running", "degraded")
    assert systemd_vm.exec("cat /proc/1/comm").stdout.strip() == "systemd"
    systemd_vm.write_file("/etc/pti-check", "x")
    assert systemd_vm.file("/etc/pti-check").size == 1


def test_systemd_vm_stops_cleanly(systemd_vm: Instance, settings: Settings) -> None:
    started = time.monotonic()
    systemd_vm.stop(timeout=60)
    assert systemd_vm.state is InstanceState.STOPPED
    assert time.monotonic() - started < 60
    assert host_processes(f"{settings.instances_dir / systemd_vm.name}/") == []
    # a clean shutdown (systemd's), not QMP quit or a kill
    assert re.search(r"reboot: Power down", systemd_vm.logs())


def test_stop_start_restart(agent_vm: Instance, settings: Settings) -> None:
    agent_vm.write_file("/root/survives", "kept across restarts\n")
    agent_vm.exec("sync")
    first = agent_vm.exec("cat /proc/sys/kernel/random/boot_id").stdout

    agent_vm.stop()
    assert agent_vm.state is InstanceState.STOPPED
    assert host_processes(f"{settings.instances_dir / agent_vm.name}/") == []
    with pytest.raises(IncusError, match="not running"):
        agent_vm.exec("true")

    agent_vm.start()
    assert agent_vm.read_text("/root/survives") == "kept across restarts\n"
    second = agent_vm.exec("cat /proc/sys/kernel/random/boot_id").stdout

    agent_vm.restart()
    third = agent_vm.exec("cat /proc/sys/kernel/random/boot_id").stdout
    assert len({first, second, third}) == 3  # three boots
    assert agent_vm.exec("nproc").stdout.strip() == "2"  # same options every boot

    # a guest that powers itself off: QEMU ends, the instance says STOPPED, start() works
    agent_vm.exec("(sleep 0.3; echo o > /proc/sysrq-trigger) >/dev/null 2>&1 &")
    wait_until(lambda: agent_vm.state is InstanceState.STOPPED, 30, "the guest powered off")
    agent_vm.start()
    assert agent_vm.exec("echo back").stdout == "back\n"


def test_guest_that_never_gets_ready_times_out(
    instance_factory: InstanceFactory, settings: Settings, token: str
) -> None:
    name = f"vm-hang-{token}"
    started = time.monotonic()
    # /bin/cat as PID 1 reads the console forever: the guest lives but never answers
    with pytest.raises(InstanceStartError, match=r"did not answer within 8") as info:
        instance_factory.launch(
            kind="vm",
            image="debian/12",
            init="agent",
            kernel_args="init=/bin/cat",
            boot_timeout=8,
            name=name,
        )
    took = time.monotonic() - started
    assert 8 <= took < 8 + 15
    assert "console log:" in "\n".join(info.value.__notes__)
    assert_nothing_left(settings, name)  # no QEMU, no overlay, no directory


def test_guest_whose_init_fails_fails_fast(
    instance_factory: InstanceFactory, settings: Settings, token: str
) -> None:
    name = f"vm-fail-{token}"
    started = time.monotonic()
    with pytest.raises(InstanceStartError, match="QEMU ended") as info:
        instance_factory.launch(
            kind="vm",
            image="debian/12",
            init="agent",
            kernel_args="init=/nonexistent",
            boot_timeout=120,
            name=name,
        )
    assert time.monotonic() - started < 60, "a guest that powered off must not wait out 120s"
    notes = "\n".join(info.value.__notes__)
    assert "console log:" in notes and "/nonexistent" in notes, notes
    assert_nothing_left(settings, name)


def test_delete_leaves_nothing(agent_vm: Instance, settings: Settings) -> None:
    assert host_processes(f"{settings.instances_dir / agent_vm.name}/") != []
    agent_vm.delete()
    assert agent_vm.state is InstanceState.DELETED
    assert_nothing_left(settings, agent_vm.name)
