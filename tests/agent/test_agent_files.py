"""Files through the agent client: read/write/stat/sha256, trees, missing paths."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile

import pytest
from agent_helpers import AgentTarget, run

from pytest_incus.agent import AgentClient


def test_write_then_read(agent_client: AgentClient, workdir: str) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    path = f"{workdir}/new/parents/file.bin"
    agent_client.write_file(path, data, 0o640)
    assert agent_client.read_file(path) == data
    lst, st = agent_client.stat(path) or pytest.fail("no stat")
    assert stat.S_IMODE(st.st_mode if hasattr(st, "st_mode") else st.mode) == 0o640
    assert stat.S_ISREG(lst.mode) and not lst.is_symlink
    assert lst.size == len(data)


def test_write_replaces(agent_client: AgentClient, workdir: str) -> None:
    path = f"{workdir}/f"
    agent_client.write_file(path, b"a much longer first content", 0o644)
    agent_client.write_file(path, b"short", 0o600)
    assert agent_client.read_file(path) == b"short"
    found = agent_client.stat(path)
    assert found is not None and stat.S_IMODE(found[1].mode) == 0o600


@pytest.mark.agent_root
def test_written_files_belong_to_root(agent_client: AgentClient, workdir: str) -> None:
    path = f"{workdir}/owned"
    run(agent_client, ["sh", "-c", f"touch {path} && chown 65534:65534 {path}"])
    agent_client.write_file(path, b"x", 0o644)
    found = agent_client.stat(path)
    assert found is not None and (found[1].uid, found[1].gid) == (0, 0)


def test_empty_file(agent_client: AgentClient, workdir: str) -> None:
    agent_client.write_file(f"{workdir}/empty", b"", 0o644)
    assert agent_client.read_file(f"{workdir}/empty") == b""
    assert agent_client.sha256(f"{workdir}/empty") == hashlib.sha256(b"").hexdigest()


def test_sha256(agent_client: AgentClient, workdir: str) -> None:
    data = b"hello agent\n" * 999
    agent_client.write_file(f"{workdir}/h", data, 0o644)
    assert agent_client.sha256(f"{workdir}/h") == hashlib.sha256(data).hexdigest()


def test_missing_paths(agent_client: AgentClient, workdir: str) -> None:
    missing = f"{workdir}/no/such/file"
    assert agent_client.stat(missing) is None
    with pytest.raises(FileNotFoundError):
        agent_client.read_file(missing)
    with pytest.raises(FileNotFoundError):
        agent_client.sha256(missing)
    with pytest.raises(FileNotFoundError):
        agent_client.get_archive(missing)


def test_read_a_directory_is_an_error(agent_client: AgentClient, workdir: str) -> None:
    with pytest.raises(IsADirectoryError):
        agent_client.read_file(workdir)


def test_stat_of_links(agent_client: AgentClient, workdir: str) -> None:
    agent_client.write_file(f"{workdir}/target", b"12345", 0o600)
    run(agent_client, ["ln", "-s", "target", f"{workdir}/link"])
    run(agent_client, ["ln", "-s", "nowhere", f"{workdir}/dangling"])
    found = agent_client.stat(f"{workdir}/link")
    assert found is not None
    lst, st = found
    assert lst.is_symlink and stat.S_ISLNK(lst.mode)
    assert not st.is_symlink and stat.S_ISREG(st.mode) and st.size == 5
    dangling = agent_client.stat(f"{workdir}/dangling")
    assert dangling is not None and dangling[0] == dangling[1] and dangling[0].is_symlink
    directory = agent_client.stat(workdir)
    assert directory is not None and stat.S_ISDIR(directory[1].mode)


def _tree_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data, mode in (("a.txt", b"A\n", 0o644), ("sub/b.sh", b"#!/bin/sh\n", 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("sub/link")
        link.type, link.linkname = tarfile.SYMTYPE, "b.sh"
        tar.addfile(link)
    return buffer.getvalue()


def _one_file_archive(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_put_tree_and_get_it_back(agent_client: AgentClient, workdir: str) -> None:
    dest = f"{workdir}/tree/deep"
    agent_client.put_archive(_tree_archive(), dest, True)
    assert agent_client.read_file(f"{dest}/sub/b.sh") == b"#!/bin/sh\n"
    found = agent_client.stat(f"{dest}/sub/b.sh")
    assert found is not None and stat.S_IMODE(found[1].mode) == 0o755
    link = agent_client.stat(f"{dest}/sub/link")
    assert link is not None and link[0].is_symlink
    with tarfile.open(fileobj=io.BytesIO(agent_client.get_archive(dest))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.getmembers()[0].name == "." and tar.getmembers()[0].isdir()
        content = tar.extractfile(members["./a.txt"])
        assert content is not None and content.read() == b"A\n"
    assert members["./sub/link"].issym() and members["./sub/link"].linkname == "b.sh"


def test_put_tree_merges(agent_client: AgentClient, workdir: str) -> None:
    agent_client.write_file(f"{workdir}/m/keep", b"kept", 0o644)
    agent_client.put_archive(_tree_archive(), f"{workdir}/m", True)
    assert agent_client.read_file(f"{workdir}/m/keep") == b"kept"
    assert agent_client.read_file(f"{workdir}/m/a.txt") == b"A\n"


def test_put_one_file_as_dest_or_into_a_directory(agent_client: AgentClient, workdir: str) -> None:
    archive = _one_file_archive("orig.txt", b"content")
    agent_client.put_archive(archive, f"{workdir}/x/renamed.txt", False)
    assert agent_client.read_file(f"{workdir}/x/renamed.txt") == b"content"
    agent_client.put_archive(archive, f"{workdir}/x", False)
    assert agent_client.read_file(f"{workdir}/x/orig.txt") == b"content"
    agent_client.write_file(f"{workdir}/x/old", b"old content, longer", 0o644)
    agent_client.put_archive(_one_file_archive("n", b"new"), f"{workdir}/x/old", False)
    assert agent_client.read_file(f"{workdir}/x/old") == b"new"


def test_a_file_in_the_way_is_not_a_directory_naming_it(
    agent_client: AgentClient, workdir: str
) -> None:
    # what makes parents finds a file where a directory should be: the error names the file,
    # as in containers (not mkdir's "File exists" for the new path)
    blocker = f"{workdir}/file"
    agent_client.write_file(blocker, b"x", 0o644)
    for path in (f"{blocker}/new", f"{blocker}/sub/new"):
        with pytest.raises(NotADirectoryError) as written:
            agent_client.write_file(path, b"y", 0o644)
        assert written.value.filename == blocker
        with pytest.raises(NotADirectoryError) as put:
            agent_client.put_archive(_one_file_archive("n", b"new"), path, False)
        assert put.value.filename == blocker
        assert agent_client.stat(path) is None  # missing, as pathlib's exists() says
    assert agent_client.read_file(blocker) == b"x"


def test_get_one_file(agent_client: AgentClient, workdir: str) -> None:
    agent_client.write_file(f"{workdir}/single", b"one", 0o600)
    with tarfile.open(fileobj=io.BytesIO(agent_client.get_archive(f"{workdir}/single"))) as tar:
        (member,) = tar.getmembers()
        content = tar.extractfile(member)
        assert member.name == "single" and content is not None and content.read() == b"one"


def test_put_refuses_members_outside_dest(agent_client: AgentClient, workdir: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(Exception):  # noqa: B017 - ours and tar word it differently
        agent_client.put_archive(buffer.getvalue(), f"{workdir}/in", True)
    assert agent_client.stat(f"{workdir}/escaped") is None


def test_agent_target_workdir_exists(agent_client: AgentClient, agent_target: AgentTarget) -> None:
    found = agent_client.stat(agent_target.workdir)
    assert found is not None and stat.S_ISDIR(found[1].mode)


def test_files_and_archives_larger_than_a_message(agent_client: AgentClient, workdir: str) -> None:
    data = os.urandom(50 << 20)  # past the agent's 64 MiB message limit in base64
    path = f"{workdir}/big.bin"
    agent_client.write_file(path, data, 0o600)
    assert agent_client.sha256(path) == hashlib.sha256(data).hexdigest()
    assert agent_client.read_file(path) == data

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("big.bin")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    agent_client.put_archive(archive.getvalue(), f"{workdir}/copy.bin", False)
    assert agent_client.sha256(f"{workdir}/copy.bin") == hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(agent_client.get_archive(path))) as tar:
        got = tar.extractfile("big.bin")
        assert got is not None and got.read() == data
