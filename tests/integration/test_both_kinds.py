"""One test body for both kinds: each test runs in a Debian 12 system container and in a
Debian 12 VM (under TCG here), through the same ``Instance`` API, with the same results."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from integration_helpers import memory_limit

from pytest_incus import ExecError, ExecTimeoutError, Instance

pytestmark = pytest.mark.instance(kind=["container", "vm"], image="debian/12", memory="1GiB")


def test_exec_semantics(instance: Instance) -> None:
    assert instance.exec("echo $((6 * 7)); echo $0").stdout == "42\n/bin/sh\n"
    assert instance.exec(["echo", "$HOME", "a b"]).stdout == "$HOME a b\n"
    r = instance.exec(["sh", "-c", 'echo "$PTI_A|$HOME|$USER"; pwd'], env={"PTI_A": "x y"})
    assert r.stdout == "x y|/root|root\n/root\n"
    assert instance.exec("pwd", cwd="/usr/share").stdout == "/usr/share\n"
    assert instance.exec(["id", "-un"], user="nobody").stdout == "nobody\n"
    assert instance.exec(["id", "-u"], user=65534).stdout == "65534\n"
    assert instance.exec(["cat"], input="fed on stdin\n").stdout == "fed on stdin\n"
    assert instance.exec(["cat"], input=b"\x00\xffbytes").stdout_bytes == b"\x00\xffbytes"
    missing = instance.exec(["no-such-program-pti"])
    assert missing.exit_code == 127 and "not found" in missing.stderr
    r = instance.exec("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    with pytest.raises(ExecError) as info:
        instance.exec("exit 4", check=True)
    assert info.value.exit_code == 4


def test_timeout_kills_the_command_and_its_descendants(instance: Instance) -> None:
    with pytest.raises(ExecTimeoutError):
        instance.exec("sleep 300 & sleep 301; echo never", timeout=2)
    survivors = instance.exec("ps -eo args | grep -c '^sleep 30[01]' || true").stdout.strip()
    assert survivors == "0"


def test_files_and_trees(instance: Instance, tmp_path: Path) -> None:
    instance.write_file("/etc/pti/app.conf", "key = value\n", mode=0o600)
    assert instance.read_text("/etc/pti/app.conf") == "key = value\n"
    conf = instance.file("/etc/pti/app.conf")
    assert conf.is_file and not conf.is_dir and conf.mode == 0o600 and conf.uid == 0
    assert conf.contains("key =") and conf.size == 12
    assert conf.sha256 == hashlib.sha256(b"key = value\n").hexdigest()
    instance.exec(["ln", "-s", "/etc/pti", "/root/link"], check=True)
    assert instance.file("/root/link").is_symlink and instance.file("/root/link").is_dir
    assert not instance.file("/no/such/path").exists

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "top.txt").write_text("top\n")
    (tree / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
    (tree / "sub" / "link").symlink_to("../top.txt")
    instance.push(tree, "/srv/tree")
    assert instance.read_text("/srv/tree/top.txt") == "top\n"
    assert instance.file("/srv/tree/sub/link").is_symlink

    back = tmp_path / "back"
    instance.pull("/srv/tree", back)
    assert (back / "sub" / "data.bin").read_bytes() == bytes(range(256)) * 64
    assert (back / "sub" / "link").readlink() == Path("../top.txt")
    instance.pull("/etc/pti/app.conf", tmp_path / "app.conf")
    assert (tmp_path / "app.conf").read_text() == "key = value\n"


def test_its_own_os_and_limits(instance: Instance) -> None:
    assert "bookworm" in instance.read_text("/etc/os-release")
    assert instance.exec(["systemctl", "is-system-running"]).stdout.strip() in (
        "running",
        "degraded",
    )
    if instance.kind == "vm":  # its own kernel sees its RAM
        seen = 1024 * int(instance.exec("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
        assert 0.8 * 2**30 <= seen <= 2**30
    else:  # the host's kernel, with a cgroup limit
        assert memory_limit(instance) == 2**30
