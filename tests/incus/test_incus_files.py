"""``pytest_incus.incus.files`` against the real incusd: read/write, stat of files, dirs and
symlinks, sha256, archives in and out, and paths resolved inside the container."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from incus_helpers import busybox_image, container, incus

from pytest_incus.incus import exec as incus_exec
from pytest_incus.incus import files
from pytest_incus.incus.client import IncusClient
from pytest_incus.values import ExecRequest, ExecResult


@pytest.fixture(scope="module")
def client() -> Iterator[IncusClient]:
    c = IncusClient()
    yield c
    c.close()


@pytest.fixture(scope="module")
def name() -> Iterator[str]:
    """A busybox container on Incus with links planted: /danger -> /etc, /pw -> /etc/passwd,
    /deep/rel -> ../etc, /dangling -> /pti/nowhere, /chain -> /pw."""
    with busybox_image() as image, container(image) as inst:
        incus("exec", inst, "--", "sh", "-c",
              "ln -s /etc /danger && ln -s /etc/passwd /pw && mkdir /deep"
              " && ln -s ../etc /deep/rel && ln -s /pti/nowhere /dangling && ln -s pw /chain")  # fmt: skip
        yield inst


def sh(name: str, cmd: str) -> str:
    return incus("exec", name, "--", "sh", "-c", cmd)


def inside_of(client: IncusClient, name: str) -> files.Inside:
    """What the machine gives: argv run as root inside through the exec wrapper, its
    result."""

    def read(path: str) -> bytes:
        return files.read_file(client, name, path)

    def run(argv: Sequence[str]) -> ExecResult:
        request = ExecRequest(tuple(argv), {}, None, None, None, 60.0)
        return incus_exec.run(client, name, request, shell="/bin/sh", read_file=read)

    return run


def no_tools(argv: Sequence[str]) -> ExecResult:
    """An instance whose tools are all missing, as the exec wrapper says it."""
    return ExecResult(127, b"", f"{argv[0]}: not found\n".encode(), 0.0)


def test_write_read_and_stat(client: IncusClient, name: str) -> None:
    files.write_file(client, name, "/srv/new/dir/text.txt", "héllo\n".encode(), 0o640)
    assert files.read_file(client, name, "/srv/new/dir/text.txt") == "héllo\n".encode()
    pair = files.stat(client, name, "/srv/new/dir/text.txt")
    assert pair is not None and pair[0] is pair[1]
    st = pair[0]
    assert (stat.S_ISREG(st.mode), stat.S_IMODE(st.mode), st.uid, st.gid, st.size) == (
        True, 0o640, 0, 0, 7,
    )  # fmt: skip
    # replaced: truncated, new mode
    files.write_file(
        client, name, "/srv/new/dir/text.txt", b"x", 0o4711, inside=inside_of(client, name)
    )
    assert sh(name, "stat -c '%a %s' /srv/new/dir/text.txt") == "4711 1\n"
    d = files.stat(client, name, "/srv/new")
    assert d is not None and stat.S_ISDIR(d[0].mode) and stat.S_IMODE(d[0].mode) == 0o755


def test_errors(client: IncusClient, name: str) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        files.read_file(client, name, "/pti/missing")
    assert missing.value.filename == "/pti/missing"
    with pytest.raises(IsADirectoryError):
        files.read_file(client, name, "/etc")
    with pytest.raises(IsADirectoryError):
        files.write_file(client, name, "/etc", b"x", 0o644)
    with pytest.raises(NotADirectoryError):
        files.write_file(client, name, "/etc/passwd/x", b"x", 0o644)
    with pytest.raises(FileNotFoundError):
        files.get_archive(client, name, "/pti/missing")
    with pytest.raises(OSError):
        files.write_file(client, name, "/proc/pti-forbidden", b"x", 0o644)
    assert files.stat(client, name, "/pti/missing") is None


def test_ids_as_the_instance_sees_them(client: IncusClient, name: str) -> None:
    sh(name, "touch /srv-owned && chown 1000:1001 /srv-owned && chmod 600 /srv-owned")
    pair = files.stat(client, name, "/srv-owned")
    assert pair is not None and (pair[1].uid, pair[1].gid) == (1000, 1001)
    assert stat.S_IMODE(pair[1].mode) == 0o600


def test_symlinks(client: IncusClient, name: str) -> None:
    inside = sh(name, "cat /etc/passwd").encode()
    assert inside != Path("/etc/passwd").read_bytes()
    for path in ("/pw", "/chain", "/danger/passwd", "/deep/rel/passwd"):
        assert files.read_file(client, name, path) == inside, path
        assert files.sha256(client, name, path) == hashlib.sha256(inside).hexdigest()
    pair = files.stat(client, name, "/chain", inside=inside_of(client, name))
    assert pair is not None
    assert pair[0].is_symlink and not pair[1].is_symlink and stat.S_ISREG(pair[1].mode)
    assert pair[0].size == len("pw")
    dangling = files.stat(client, name, "/dangling")
    assert dangling is not None and dangling[0].is_symlink and dangling[1] is dangling[0]
    # written through the link: the link stays, the target changes, the host's is untouched
    host = Path("/etc/passwd").read_bytes()
    files.write_file(client, name, "/pw", inside + b"pti-x:x:7:7::/:/bin/false\n", 0o644)
    assert b"pti-x" in sh(name, "cat /etc/passwd").encode()
    assert sh(name, "readlink /pw") == "/etc/passwd\n"
    files.write_file(client, name, "/danger/pti-probe", b"inside\n", 0o644)
    assert sh(name, "cat /etc/pti-probe") == "inside\n"
    assert not Path("/etc/pti-probe").exists() and Path("/etc/passwd").read_bytes() == host


def test_sha256_of_a_big_file(client: IncusClient, name: str) -> None:
    data = os.urandom(5_000_000)
    files.write_file(client, name, "/root/big", data, 0o644)
    assert files.sha256(client, name, "/root/big") == hashlib.sha256(data).hexdigest()
    assert files.read_file(client, name, "/root/big") == data


def _tree(root: Path) -> bytes:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "top.txt").write_text("top\n")
    (root / "sub" / "mid.bin").write_bytes(bytes(range(256)))
    (root / "sub" / "deeper" / "leaf.txt").write_text("leaf\n")
    (root / "empty").mkdir()
    (root / "rel-link").symlink_to("sub/mid.bin")
    (root / "abs-link").symlink_to("/etc/hostname")
    os.chmod(root / "top.txt", 0o600)
    buffer = io.BytesIO()

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        return info

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(root, arcname=".", filter=owned)
    return buffer.getvalue()


TREE = [
    "./abs-link", "./empty", "./rel-link", "./sub", "./sub/deeper", "./sub/deeper/leaf.txt",
    "./sub/mid.bin", "./top.txt",
]  # fmt: skip


def test_put_and_get_a_tree(client: IncusClient, name: str, tmp_path: Path) -> None:
    archive = _tree(tmp_path / "tree")
    files.put_archive(client, name, archive, "/opt/new/place", True)
    listing = sh(name, "cd /opt/new/place && find . -mindepth 1 | sort").split()
    assert listing == TREE
    assert sh(name, "readlink /opt/new/place/abs-link") == "/etc/hostname\n"
    assert sh(name, "stat -c %a /opt/new/place/top.txt") == "600\n"
    assert set(sh(name, "find /opt/new/place -exec stat -c '%u:%g' {} +").split()) == {"0:0"}
    # merged into an existing directory
    sh(name, "mkdir -p /data && echo keep > /data/kept && echo old > /data/top.txt")
    files.put_archive(client, name, archive, "/data", True)
    assert sh(name, "cat /data/kept /data/top.txt") == "keep\ntop\n"
    # and back out: "." and the same members, links as links
    with tarfile.open(
        fileobj=io.BytesIO(
            files.get_archive(client, name, "/opt/new/place", inside=inside_of(client, name))
        )
    ) as t:
        members = {m.name: m for m in t.getmembers()}
        assert members["."].isdir()
        assert sorted(n for n in members if n != ".") == TREE
        assert members["./rel-link"].issym() and members["./rel-link"].linkname == "sub/mid.bin"
        mid = t.extractfile(members["./sub/mid.bin"])
        assert mid is not None and mid.read() == bytes(range(256))


def test_put_and_get_one_file(client: IncusClient, name: str, tmp_path: Path) -> None:
    local = tmp_path / "hello.txt"
    local.write_text("hello\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(local, arcname="hello.txt")
    files.put_archive(client, name, buffer.getvalue(), "/tmp", False)  # into a directory
    assert sh(name, "cat /tmp/hello.txt") == "hello\n"
    files.put_archive(client, name, buffer.getvalue(), "/srv/a/b/renamed.txt", False)
    assert sh(name, "cat /srv/a/b/renamed.txt") == "hello\n"
    files.put_archive(client, name, buffer.getvalue(), "/danger", False)  # a link to a dir
    assert sh(name, "cat /etc/hello.txt") == "hello\n"
    with tarfile.open(fileobj=io.BytesIO(files.get_archive(client, name, "/pw"))) as t:
        (member,) = t.getmembers()
        assert member.name == "pw" and member.issym() and member.linkname == "/etc/passwd"


def test_stat_inside_has_special_bits_devices_and_relative_links(
    client: IncusClient, name: str
) -> None:
    inside = inside_of(client, name)
    sh(name, "touch /srv-suid && chmod 4711 /srv-suid && ln -sf ../srv-suid /deep/suid-link")
    assert files.stat(client, name, "/tmp", inside=no_tools) is not None
    tmp = files.stat(client, name, "/tmp", inside=inside)
    assert tmp is not None and tmp[0] is tmp[1] and tmp[0].mode == stat.S_IFDIR | 0o1777
    # the files API alone drops the sticky bit: why stat asks inside
    api = files.stat(client, name, "/tmp")
    assert api is not None and stat.S_IMODE(api[0].mode) == 0o777
    pair = files.stat(client, name, "/deep/suid-link", inside=inside)
    assert pair is not None and pair[0].is_symlink and pair[0].size == len("../srv-suid")
    assert pair[1].mode == stat.S_IFREG | 0o4711 and not pair[1].is_symlink
    null = files.stat(client, name, "/dev/null", inside=inside)
    assert null is not None and stat.S_ISCHR(null[1].mode)
    dangling = files.stat(client, name, "/dangling", inside=inside)
    assert dangling is not None and dangling[0].is_symlink and dangling[1] is dangling[0]
    assert files.stat(client, name, "/no/such/path", inside=inside) is None
    assert files.stat(client, name, "/srv-suid/below", inside=inside) is None
    # without the tools inside, the files API answers (permission bits only)
    fallback = files.stat(client, name, "/srv-suid", inside=no_tools)
    assert fallback is not None and stat.S_IMODE(fallback[0].mode) == 0o711


def test_pseudo_files_are_read_inside(client: IncusClient, name: str) -> None:
    inside = inside_of(client, name)
    # the API reads by size: 0 for /proc, a 4096-byte promise that breaks off for /sys, and
    # /proc/self is its own SFTP server
    uid_map = files.read_file(client, name, "/proc/self/uid_map", inside=inside)
    assert uid_map.split()[:1] == [b"0"] and len(uid_map.split()) == 3
    operstate = "/sys/class/net/lo/operstate"
    assert (
        files.read_file(client, name, operstate, inside=inside)
        == sh(name, f"cat {operstate}").encode()
        and sh(name, f"cat {operstate}") != ""
    )
    assert (
        files.read_file(client, name, "/proc/1/comm", inside=inside)
        == sh(name, "cat /proc/1/comm").encode()
    )
    assert files.sha256(client, name, "/proc/self/uid_map", inside=inside) == (
        hashlib.sha256(uid_map).hexdigest()
    )
    with pytest.raises(FileNotFoundError) as missing:
        files.read_file(client, name, "/proc/pti-nowhere", inside=inside)
    assert missing.value.filename == "/proc/pti-nowhere"
    with pytest.raises(IsADirectoryError):
        files.read_file(client, name, "/sys/class", inside=inside)
    # an ordinary file is still read through the files API (no exec: cat is not needed)
    assert (
        files.read_file(client, name, "/pw", inside=no_tools)
        == sh(name, "cat /etc/passwd").encode()
    )
