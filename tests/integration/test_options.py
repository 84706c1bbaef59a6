"""Limits and options of real containers: cpus, memory, mounts, privilege, name, network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, memory_limit

from pytest_incus import ConfigError, Instance, InstanceFactory
from pytest_incus.settings import Settings

MIB = 1024 * 1024


@pytest.mark.instance(image="busybox", cpus=1)
def test_cpus_one(instance: Instance) -> None:
    assert instance.exec("nproc").stdout == "1\n"
    assert instance.exec("grep Cpus_allowed_list /proc/self/status").stdout.split()[1] == "0"


@pytest.mark.instance(image="busybox", cpus=2)
def test_cpus_all(instance: Instance) -> None:
    assert instance.exec("nproc").stdout == f"{min(2, os.cpu_count() or 1)}\n"


@pytest.mark.instance(image="busybox", memory="256MiB")
def test_memory_limit_is_seen_and_enforced(instance: Instance) -> None:
    assert memory_limit(instance) == 256 * MIB
    # and it is a hard limit: dd's buffer of bs bytes is allocated and filled at once
    assert instance.exec("dd if=/dev/zero of=/dev/null bs=100M count=1", timeout=60).ok
    r = instance.exec("dd if=/dev/zero of=/dev/null bs=300M count=1", timeout=60)
    assert r.exit_code == 128 + 9, r  # killed by the OOM killer of its cgroup
    assert instance.exec("echo still alive").ok


@pytest.mark.instance(image="debian/12", memory="300MiB", cpus=1)
def test_limits_on_debian(instance: Instance) -> None:
    assert memory_limit(instance) == 300 * MIB
    assert instance.exec("nproc").stdout == "1\n"


@pytest.mark.instance(image="busybox")
def test_no_limits_by_default(instance: Instance) -> None:
    assert instance.exec("nproc").stdout == f"{os.cpu_count()}\n"
    assert memory_limit(instance) > 1024**4 or memory_limit(instance) == 0


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_mounts_are_visible_and_read_only(
    instance_factory: InstanceFactory, host_dir: Path, privileged: bool
) -> None:
    (host_dir / "data.txt").write_text("from the host\n")
    (host_dir / "sub").mkdir()
    single = host_dir / "single.conf"
    single.write_text("one file\n")
    inst = instance_factory.launch(
        image="busybox",
        mounts={str(host_dir): "/mnt/x", str(single): "/etc/single.conf"},
        privileged=privileged,
    )
    try:
        assert inst.read_text("/mnt/x/data.txt") == "from the host\n"
        assert inst.file("/mnt/x/sub").is_dir
        assert inst.read_text("/etc/single.conf") == "one file\n"
        # what the host changes afterwards shows through
        (host_dir / "later.txt").write_text("later\n")
        assert inst.exec("cat /mnt/x/later.txt").stdout == "later\n"
        # read only, for root inside too
        for cmd in (
            "echo x > /mnt/x/new",
            "echo x >> /mnt/x/data.txt",
            "rm /mnt/x/data.txt",
            "echo x > /etc/single.conf",
        ):
            r = inst.exec(cmd)
            # unprivileged root may not write the host's files anyway; privileged root could
            denied = ("Read-only file system",) if privileged else ("Read-only", "Permission")
            assert r.exit_code != 0 and any(d in r.stderr for d in denied), (cmd, r)
        for target in ("/mnt/x", "/etc/single.conf"):
            options = inst.exec(["grep", f" {target} ", "/proc/self/mountinfo"]).stdout
            assert "ro" in options.split()[5].split(","), options
        with pytest.raises(OSError):
            inst.write_file("/mnt/x/via-api", "x")
        assert sorted(p.name for p in host_dir.iterdir()) == [
            "data.txt",
            "later.txt",
            "single.conf",
            "sub",
        ]
        assert (host_dir / "data.txt").read_text() == "from the host\n"
    finally:
        inst.delete()
    # the host directory is still there, untouched
    assert (host_dir / "data.txt").read_text() == "from the host\n"


@pytest.mark.local_only(
    reason="also checks who owns the instance's files in the overlay's upper layer on this host"
)
@pytest.mark.instance(image="busybox")
def test_unprivileged_by_default(instance: Instance) -> None:
    assert instance.read_text("/proc/self/uid_map").split() == ["0", "1000000", "65536"]
    assert instance.read_text("/proc/self/gid_map").split() == ["0", "1000000", "65536"]
    owners = instance.exec("stat -c '%u:%g %n' /bin /etc /etc/passwd /root").stdout
    assert {line.split()[0] for line in owners.splitlines()} == {"0:0"}
    # what root inside writes belongs to 1000000 on the host
    instance.write_file("/root/mine", "x")
    st = os.stat(instance.directory / "upper" / "root" / "mine")
    assert st.st_uid == 1_000_000
    # and root inside cannot do what only the host's root may
    r = instance.exec("echo 1 > /proc/sys/vm/drop_caches")
    assert r.exit_code != 0


@pytest.mark.local_only(
    reason="also checks who owns the instance's files in the overlay's upper layer on this host"
)
@pytest.mark.instance(image="busybox", privileged=True)
def test_privileged(instance: Instance) -> None:
    assert instance.read_text("/proc/self/uid_map").split() == ["0", "0", "4294967295"]
    assert instance.file("/etc/passwd").uid == 0
    instance.write_file("/root/mine", "x")
    assert (instance.directory / "upper" / "root" / "mine").stat().st_uid == 0


def test_name_option(instance_factory: InstanceFactory, settings: Settings, token: str) -> None:
    name = f"pti-named-{token}"
    inst = instance_factory.launch(image="busybox", name=name)
    try:
        assert inst.name == name
        assert inst.exec("hostname").stdout == f"{name}\n"
        with pytest.raises(ConfigError, match=name):
            instance_factory.launch(image="busybox", name=name)
        assert inst.exec("true").ok  # the failed launch did not touch the first one
    finally:
        inst.delete()
    assert_nothing_left(settings, name)
    # once deleted, the name may be used again
    again = instance_factory.launch(image="busybox", name=name)
    assert again.exec("hostname").stdout == f"{name}\n"
    again.delete()
    assert_nothing_left(settings, name)


@pytest.mark.instance(image="busybox", network="none")
def test_network_none_has_only_loopback(instance: Instance) -> None:
    links = instance.exec("ls /sys/class/net").stdout.split()
    assert links == ["lo"]
