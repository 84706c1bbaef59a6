"""Several instances in one test with ``instance_factory``, on the tiny busybox image."""

from __future__ import annotations

from pathlib import Path

from pytest_incus import InstanceFactory, InstanceState


def test_two_instances_are_isolated(instance_factory: InstanceFactory, tmp_path: Path) -> None:
    left = instance_factory.launch(image="busybox")
    right = instance_factory.launch(image="busybox", env={"SIDE": "right"})
    try:
        assert left.name != right.name

        left.write_file("/root/note.txt", "written in left\n")
        assert left.file("/root/note.txt").contains("left")
        assert not right.file("/root/note.txt").exists

        # carry the file across through the host
        left.pull("/root/note.txt", tmp_path / "note.txt")
        right.push(tmp_path / "note.txt", "/srv/from-left.txt", mode=0o640)
        assert right.read_text("/srv/from-left.txt") == "written in left\n"
        assert right.file("/srv/from-left.txt").mode == 0o640

        # each has its own hostname (its instance name) and its own processes
        assert left.exec("hostname", check=True).stdout.strip() == left.name
        assert right.exec("hostname", check=True).stdout.strip() == right.name
        assert left.exec("readlink /proc/1/exe").stdout.strip() == "/bin/busybox"
        # env= of launch() applies to every exec in that instance only
        assert left.exec("echo ${SIDE:-none}").stdout.strip() == "none"
        assert right.exec("echo ${SIDE:-none}").stdout.strip() == "right"
    finally:
        left.delete()
        right.delete()
    assert left.state is InstanceState.DELETED and right.state is InstanceState.DELETED
