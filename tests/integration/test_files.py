"""File methods in real containers: push and pull with ``docker cp`` semantics, write/read,
and ``file()`` checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pytest_incus import Instance

pytestmark = pytest.mark.instance(image="busybox")


def make_tree(root: Path) -> Path:
    """A small local tree: files at two levels, an empty dir, relative and absolute links."""
    root.mkdir()
    (root / "top.txt").write_text("top\n")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "mid.bin").write_bytes(bytes(range(256)))
    (root / "sub" / "deeper" / "leaf.txt").write_text("leaf\n")
    (root / "empty").mkdir()
    (root / "rel-link").symlink_to("sub/mid.bin")
    (root / "abs-link").symlink_to("/etc/hostname")
    os.chmod(root / "top.txt", 0o600)
    for path in [root, *root.rglob("*")]:
        os.lchown(path, 1234, 4321)  # not root on the host: inside it must become root
    return root


def listing(instance: Instance, path: str) -> list[str]:
    """Sorted relative paths below ``path`` inside."""
    out = instance.exec(f"cd {path} && find . -mindepth 1 | sort", check=True).stdout
    return out.split()


TREE = [
    "./abs-link",
    "./empty",
    "./rel-link",
    "./sub",
    "./sub/deeper",
    "./sub/deeper/leaf.txt",
    "./sub/mid.bin",
    "./top.txt",
]


# -- push ---------------------------------------------------------------------------------------


def test_push_file_to_a_new_path_creates_parents(instance: Instance, tmp_path: Path) -> None:
    local = tmp_path / "hello.txt"
    local.write_text("hello\n")
    instance.push(local, "/srv/a/b/renamed.txt")
    assert instance.read_text("/srv/a/b/renamed.txt") == "hello\n"
    assert instance.file("/srv/a/b").is_dir
    assert not instance.file("/srv/a/b/hello.txt").exists


def test_push_file_into_an_existing_directory(instance: Instance, tmp_path: Path) -> None:
    local = tmp_path / "hello.txt"
    local.write_text("hello\n")
    instance.push(local, "/tmp")
    assert instance.read_text("/tmp/hello.txt") == "hello\n"


def test_push_file_replaces_an_existing_file(instance: Instance, tmp_path: Path) -> None:
    instance.write_file("/etc/motd", "old content that is longer\n", mode=0o600)
    local = tmp_path / "motd"
    local.write_text("new\n")
    instance.push(local, "/etc/motd")
    assert instance.read_text("/etc/motd") == "new\n"


def test_pushed_file_belongs_to_root_and_keeps_or_gets_its_mode(
    instance: Instance, tmp_path: Path
) -> None:
    local = tmp_path / "tool.sh"
    local.write_text("#!/bin/sh\necho tool ran\n")
    os.chmod(local, 0o750)
    os.chown(local, 1234, 4321)
    instance.push(local, "/usr/local/bin/tool")
    info = instance.file("/usr/local/bin/tool")
    assert (info.uid, info.gid, info.mode) == (0, 0, 0o750)
    assert instance.exec("tool").stdout == "tool ran\n"
    # with mode=, special and group/other write bits included
    instance.push(local, "/usr/local/bin/tool2", mode=0o4711)
    assert instance.file("/usr/local/bin/tool2").mode == 0o4711
    instance.push(local, "/srv/shared", mode=0o666)
    assert instance.file("/srv/shared").mode == 0o666
    # and ls inside agrees with file()
    assert instance.exec("ls -ln /usr/local/bin/tool2").stdout.split()[2:4] == ["0", "0"]


def test_push_tree_to_a_new_path(instance: Instance, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    instance.push(tree, "/opt/new/place")
    assert listing(instance, "/opt/new/place") == TREE
    assert instance.read_text("/opt/new/place/sub/deeper/leaf.txt") == "leaf\n"
    assert instance.read_file("/opt/new/place/sub/mid.bin") == bytes(range(256))
    assert instance.file("/opt/new/place/top.txt").mode == 0o600
    # links stay links, with their targets unchanged
    assert instance.exec("readlink /opt/new/place/rel-link").stdout == "sub/mid.bin\n"
    assert instance.exec("readlink /opt/new/place/abs-link").stdout == "/etc/hostname\n"
    assert instance.file("/opt/new/place/rel-link").is_symlink
    # the absolute link resolves inside: to the container's /etc/hostname
    assert instance.read_text("/opt/new/place/abs-link") == instance.read_text("/etc/hostname")
    # everything belongs to root inside
    owners = instance.exec("find /opt/new/place -exec stat -c '%u:%g' {} +").stdout.split()
    assert set(owners) == {"0:0"}


def test_push_tree_merges_into_an_existing_directory(instance: Instance, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    instance.exec("mkdir -p /data/sub && echo keep > /data/kept && echo old > /data/top.txt")
    instance.push(tree, "/data")
    assert listing(instance, "/data") == sorted([*TREE, "./kept"])
    assert instance.read_text("/data/kept") == "keep\n"
    assert instance.read_text("/data/top.txt") == "top\n"
    # the tree's root did not become a subdirectory of the destination
    assert not instance.file("/data/tree").exists


def test_push_tree_with_mode_sets_every_file(instance: Instance, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    instance.push(tree, "/opt/moded", mode=0o604)
    files = instance.exec("find /opt/moded -type f").stdout.split()
    assert len(files) == 3
    for path in files:
        assert instance.file(path).mode == 0o604, path
    # directories stay enterable
    assert instance.file("/opt/moded/sub/deeper").is_dir
    assert instance.exec("cat /opt/moded/sub/deeper/leaf.txt", user="nobody").ok


def test_push_missing_local_path(instance: Instance, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        instance.push(tmp_path / "missing", "/tmp/x")


# -- pull ---------------------------------------------------------------------------------------


def test_pull_file_to_a_new_path_creates_parents(instance: Instance, tmp_path: Path) -> None:
    instance.write_file("/etc/pti.conf", "key = value\n")
    dest = tmp_path / "a" / "b" / "copy.conf"
    instance.pull("/etc/pti.conf", dest)
    assert dest.read_text() == "key = value\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.conf"]


def test_pull_file_into_an_existing_directory(instance: Instance, tmp_path: Path) -> None:
    instance.pull("/etc/hostname", tmp_path)
    assert (tmp_path / "hostname").read_text() == instance.read_text("/etc/hostname")


def test_pull_binary_file_intact(instance: Instance, tmp_path: Path) -> None:
    instance.pull("/bin/busybox", tmp_path / "bb")
    expected = instance.exec("sha256sum /bin/busybox").stdout.split()[0]
    assert hashlib.sha256((tmp_path / "bb").read_bytes()).hexdigest() == expected


def test_pull_tree_to_a_new_path_and_merged(instance: Instance, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    instance.push(tree, "/opt/tree")
    dest = tmp_path / "pulled" / "here"
    instance.pull("/opt/tree", dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == sorted(
        t.removeprefix("./") for t in TREE
    )
    assert (dest / "sub" / "mid.bin").read_bytes() == bytes(range(256))
    assert (dest / "rel-link").is_symlink()
    assert os.readlink(dest / "rel-link") == "sub/mid.bin"
    assert os.readlink(dest / "abs-link") == "/etc/hostname"
    # pulled again into an existing directory: merged, what was there stays
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "mine").write_text("mine\n")
    instance.pull("/opt/tree", merged)
    assert (merged / "mine").read_text() == "mine\n"
    assert (merged / "sub" / "deeper" / "leaf.txt").read_text() == "leaf\n"
    assert not (merged / "tree").exists()


def test_pull_symlink_comes_as_a_link(instance: Instance, tmp_path: Path) -> None:
    instance.exec("ln -s /etc/passwd /pw-link", check=True)
    instance.pull("/pw-link", tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "/etc/passwd"


def test_pull_missing_path(instance: Instance, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        instance.pull("/pti/missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_push_pull_round_trip_of_a_large_file(instance: Instance, tmp_path: Path) -> None:
    data = os.urandom(5_000_000)
    (tmp_path / "big").write_bytes(data)
    instance.push(tmp_path / "big", "/root/big")
    assert instance.file("/root/big").sha256 == hashlib.sha256(data).hexdigest()
    instance.pull("/root/big", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


# -- write / read -------------------------------------------------------------------------------


def test_write_and_read(instance: Instance) -> None:
    instance.write_file("/srv/new/dir/text.txt", "héllo\n")
    info = instance.file("/srv/new/dir/text.txt")
    assert (info.mode, info.uid, info.gid, info.size) == (0o644, 0, 0, len("héllo\n".encode()))
    assert instance.read_text("/srv/new/dir/text.txt") == "héllo\n"
    assert instance.exec("cat /srv/new/dir/text.txt").stdout == "héllo\n"

    raw = bytes(range(256))
    instance.write_file("/srv/raw", raw, mode=0o600)
    assert instance.read_file("/srv/raw") == raw
    assert instance.file("/srv/raw").mode == 0o600
    # replacing a file truncates it and applies the new mode
    instance.write_file("/srv/raw", b"x", mode=0o755)
    assert instance.read_file("/srv/raw") == b"x"
    assert instance.file("/srv/raw").mode == 0o755


def test_read_errors(instance: Instance) -> None:
    with pytest.raises(FileNotFoundError):
        instance.read_file("/pti/missing")
    with pytest.raises(IsADirectoryError):
        instance.read_file("/etc")
    with pytest.raises(OSError):
        instance.write_file("/proc/pti-forbidden", "x")


# -- file() -------------------------------------------------------------------------------------


def test_file_of_a_regular_file(instance: Instance) -> None:
    content = b"needle in a haystack\n"
    instance.write_file("/srv/f", content, mode=0o640)
    instance.exec("chown 65534:65534 /srv/f", check=True)
    info = instance.file("/srv/f")
    assert info.exists and info.is_file
    assert not info.is_dir and not info.is_symlink
    assert (info.mode, info.uid, info.gid, info.size) == (0o640, 65534, 65534, len(content))
    assert info.sha256 == hashlib.sha256(content).hexdigest()
    assert info.contains("needle") and info.contains(b"hay")
    assert not info.contains("pin")


def test_file_of_a_directory(instance: Instance) -> None:
    info = instance.file("/tmp")
    assert info.exists and info.is_dir and not info.is_file
    assert info.mode == 0o1777
    assert (info.uid, info.gid) == (0, 0)


def test_file_of_symlinks(instance: Instance) -> None:
    instance.write_file("/srv/target", "target\n", mode=0o600)
    instance.exec("ln -s /srv/target /srv/link && ln -s /pti/nowhere /srv/dangling", check=True)
    link = instance.file("/srv/link")
    assert link.is_symlink and link.exists and link.is_file
    assert link.mode == 0o600  # followed
    assert link.size == len("target\n")
    assert link.sha256 == hashlib.sha256(b"target\n").hexdigest()
    assert link.contains("target")
    dangling = instance.file("/srv/dangling")
    assert dangling.is_symlink
    assert not dangling.exists and not dangling.is_file
    with pytest.raises(FileNotFoundError):
        _ = dangling.size


def test_file_of_a_missing_path(instance: Instance) -> None:
    info = instance.file("/pti/missing")
    assert not info.exists
    # pathlib-like predicates say False
    assert not info.is_file and not info.is_dir and not info.is_symlink
    for attribute in ("mode", "uid", "gid", "size", "sha256"):
        with pytest.raises(FileNotFoundError):
            getattr(info, attribute)
    with pytest.raises(FileNotFoundError):
        info.contains("x")


@pytest.mark.local_only(reason="reads the overlay upper layer on this host")
def test_file_ids_are_as_the_instance_sees_them(instance: Instance) -> None:
    # unprivileged: on the host these belong to 1000000 + id
    assert instance.file("/etc/passwd").uid == 0
    assert instance.file("/bin/busybox").gid == 0
    instance.exec("touch /srv-owned && chown 1000:1001 /srv-owned", check=True)
    info = instance.file("/srv-owned")
    assert (info.uid, info.gid) == (1000, 1001)
    host = (instance.directory / "upper" / "srv-owned").stat()
    assert (host.st_uid, host.st_gid) == (1_001_000, 1_001_001)
