"""File methods resolve paths inside the container: symlinks planted there that point at /etc
must lead to the container's /etc, never to the host's (SPEC, issue 2 item 5).

Each test runs unprivileged and privileged: in a privileged container root is the host's root,
so a path resolved on the host would really be written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_incus import Instance, InstanceFactory


@dataclass(frozen=True)
class HostFile:
    """A host file's content and times, to prove it was not touched."""

    path: Path
    sha256: str
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str) -> HostFile:
        """Snapshot the host file ``path``."""
        st = os.stat(path)
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return cls(Path(path), digest, st.st_mtime_ns, st.st_ctime_ns)

    def unchanged(self) -> bool:
        """True if the file is as it was."""
        return HostFile.of(str(self.path)) == self


@pytest.fixture(params=[False, True], ids=["unprivileged", "privileged"])
def trap(
    request: pytest.FixtureRequest, instance_factory: InstanceFactory, token: str
) -> Iterator[Instance]:
    """A busybox container with ``/danger -> /etc``, ``/pw -> /etc/passwd`` and
    ``/deep/dir -> /etc`` planted, and a marker line in its own /etc/passwd."""
    inst = instance_factory.launch(image="busybox", privileged=request.param)
    inst.exec(
        f"echo 'pti-{token}:x:4242:4242::/:/bin/false' >> /etc/passwd"
        " && ln -s /etc /danger && ln -s /etc/passwd /pw"
        " && mkdir /deep && ln -s ../etc /deep/rel && ln -s /etc /deep/dir",
        check=True,
    )
    yield inst
    inst.delete()


@pytest.fixture
def host_etc(token: str) -> Iterator[tuple[HostFile, HostFile]]:
    """Snapshots of the host's /etc/passwd and /etc/hostname; after the test they must be
    unchanged and no file of this test's token may exist in the host's /etc."""
    before = HostFile.of("/etc/passwd"), HostFile.of("/etc/hostname")
    yield before
    assert all(f.unchanged() for f in before), "the host's /etc was modified"
    assert [p for p in os.listdir("/etc") if token in p] == []


def assert_only_inside(inst: Instance, path: str) -> None:
    """``path`` (in /etc) exists in the container and not on the host."""
    name = Path(path).name
    assert inst.exec(["test", "-e", f"/etc/{name}"]).ok, f"/etc/{name} missing inside"
    assert not Path("/etc", name).exists(), f"/etc/{name} was created on the HOST"


def test_write_file_through_links(
    trap: Instance, host_etc: tuple[HostFile, HostFile], token: str
) -> None:
    for link in ("/danger", "/deep/rel", "/deep/dir"):
        probe = f"{link}/pti-probe-{token}-{Path(link).name}"
        trap.write_file(probe, "written inside\n")
        assert_only_inside(trap, probe)
        assert trap.exec(f"cat /etc/{Path(probe).name}").stdout == "written inside\n"
    # through a file link: the container's /etc/passwd is replaced, the host's is not
    original = trap.read_text("/etc/passwd")
    trap.write_file("/pw", original + f"pti-written-{token}:x:1:1::/:/bin/false\n")
    assert f"pti-written-{token}" in trap.exec("cat /etc/passwd").stdout
    assert trap.file("/pw").is_symlink  # written through, not replaced


def test_read_file_through_links(
    trap: Instance, host_etc: tuple[HostFile, HostFile], token: str
) -> None:
    inside = trap.exec("cat /etc/passwd").stdout_bytes
    assert f"pti-{token}".encode() in inside
    assert inside != Path("/etc/passwd").read_bytes()
    for path in ("/pw", "/danger/passwd", "/deep/rel/passwd", "/deep/dir/passwd"):
        assert trap.read_file(path) == inside, path
        assert trap.read_text(path) == inside.decode()
        assert trap.file(path).contains(f"pti-{token}")
        assert trap.file(path).sha256 == hashlib.sha256(inside).hexdigest()
    assert trap.read_text("/danger/hostname") == trap.exec("cat /etc/hostname").stdout


def test_push_through_links(
    trap: Instance, host_etc: tuple[HostFile, HostFile], token: str, tmp_path: Path
) -> None:
    local = tmp_path / f"pti-pushed-{token}"
    local.write_text("pushed\n")
    # into an existing directory that is a link to /etc
    trap.push(local, "/danger")
    assert_only_inside(trap, f"/etc/{local.name}")
    # as a new file below the link
    trap.push(local, f"/deep/dir/pti-renamed-{token}")
    assert_only_inside(trap, f"/etc/pti-renamed-{token}")
    # a new file with missing parents below the link
    trap.push(local, f"/danger/pti-dir-{token}/sub/file")
    assert trap.read_text(f"/etc/pti-dir-{token}/sub/file") == "pushed\n"
    assert not Path(f"/etc/pti-dir-{token}").exists()
    # a tree into a new directory below the link, and merged into the link's target
    tree = tmp_path / "tree"
    (tree / "inner").mkdir(parents=True)
    (tree / f"pti-tree-file-{token}").write_text("tree\n")
    (tree / "inner" / "leaf").write_text("leaf\n")
    trap.push(tree, f"/danger/pti-tree-{token}")
    assert trap.read_text(f"/etc/pti-tree-{token}/inner/leaf") == "leaf\n"
    trap.push(tree, "/deep/rel")
    assert_only_inside(trap, f"/etc/pti-tree-file-{token}")
    # a file pushed onto the file link: the link is replaced inside, nothing on the host
    trap.push(local, "/pw")
    assert trap.read_text("/pw") == "pushed\n"
    assert f"pti-{token}" in trap.read_text("/etc/passwd")


def test_pull_through_links(
    trap: Instance, host_etc: tuple[HostFile, HostFile], token: str, tmp_path: Path
) -> None:
    inside = trap.exec("cat /etc/passwd").stdout_bytes
    for i, path in enumerate(("/danger/passwd", "/deep/rel/passwd", "/deep/dir/passwd")):
        trap.pull(path, tmp_path / f"copy{i}")
        assert (tmp_path / f"copy{i}").read_bytes() == inside
    # the file link itself comes as a link (docker cp semantics), its target as the content
    trap.pull("/pw", tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "/etc/passwd"
    # a tree through a link: the container's files
    trap.exec(f"mkdir -p /etc/pti-sub-{token} && echo inner > /etc/pti-sub-{token}/f", check=True)
    trap.pull(f"/danger/pti-sub-{token}", tmp_path / "tree")
    assert (tmp_path / "tree" / "f").read_text() == "inner\n"


def test_file_checks_through_links(
    trap: Instance, host_etc: tuple[HostFile, HostFile], token: str
) -> None:
    trap.exec(f"echo secret > /etc/pti-only-inside-{token}", check=True)
    assert trap.file(f"/danger/pti-only-inside-{token}").is_file
    # a file that exists only on the host does not exist through the link
    host_only = Path("/etc") / "debian_version"
    assert host_only.exists()
    assert not trap.file("/danger/debian_version").exists
