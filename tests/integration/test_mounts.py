"""Host paths mounted into containers and apps: any path root can read (pytest's own
``tmp_path``, under a 0700 directory, included), read-only even for root inside (remounting it
read-write fails), the host's owners kept where the filesystem idmaps, and nothing left
mounted after a stop, a delete or a reap."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left
from registry_helpers import SCRATCH_ROOT, build_image

from pytest_incus import Instance, InstanceFactory, InstanceStartError, fsutil, registry
from pytest_incus.images.busybox import host_busybox
from pytest_incus.images.store import ImageStore
from pytest_incus.ownership import Owner
from pytest_incus.settings import Settings

SHARED = "shared by everyone\n"
OUTSIDE_UID = 70_000  # a host uid beyond the 65536 ids an unprivileged container maps
# (kind, image) of the instances that mount: "app" is a busybox OCI image of the module's own
KINDS = [("container", "busybox"), ("container", "debian/12"), ("app", "app")]
KIND_IDS = ["container-busybox", "container-debian-12", "app"]


@pytest.fixture(scope="module")
def app_image(image_store: ImageStore) -> Iterator[str]:
    """An OCI busybox image in a layout of this module's own; its cache entries are pruned
    afterwards."""
    work = SCRATCH_ROOT / f"mounts-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    ref = f"oci:{work / 'layout'}:plain"
    try:
        build_image(work / "layout", "plain")
        yield ref
    finally:
        image_store.prune(ref)
        fsutil.remove_tree(work)


def launch(
    factory: InstanceFactory,
    kind: str,
    image: str,
    app_image: str,
    mounts: dict[str, str],
    **options: object,
) -> Instance:
    """An instance of ``kind`` with ``mounts`` and busybox's programs (an app runs a long
    sleep, to exec into); a Debian one also has util-linux's mount."""
    if kind == "app":
        options["command"] = ["/bin/busybox", "sleep", "600"]
        image = app_image
    instance = factory.launch(kind=kind, image=image, mounts=mounts, **options)
    if kind == "app":  # the image has only a few applets' links
        instance.exec(["/bin/busybox", "--install", "-s", "/bin"], check=True)
    elif image.startswith("debian/"):
        instance.push(host_busybox(), "/usr/local/bin/busybox", mode=0o755)
    return instance


def host_tree(root: Path) -> None:
    """Files of several owners and modes, as tests find them on a host."""
    (root / "data.txt").write_text("from the host\n")
    (root / "secret").write_text("root's only\n")
    (root / "secret").chmod(0o600)
    (root / "shared").write_text(SHARED)
    (root / "shared").chmod(0o666)
    (root / "theirs").mkdir()
    (root / "theirs" / "file").write_text("theirs\n")
    for path in (root / "theirs", root / "theirs" / "file"):
        os.chown(path, 1000, 1000)
    (root / "far").write_text("far\n")
    os.chown(root / "far", OUTSIDE_UID, OUTSIDE_UID)
    (root / "single.conf").write_text("one file\n")


def cat(instance: Instance, path: str) -> str:
    """The content of ``path`` inside, read by a program running as root inside."""
    return instance.exec(["cat", path], check=True).stdout


def test_tmp_path_is_under_a_directory_others_cannot_search(tmp_path: Path) -> None:
    # what the tests below rely on: the real tmp_path, not a friendlier copy
    blocking = [p for p in tmp_path.parents if stat.S_IMODE(p.stat().st_mode) & 0o001 == 0]
    assert blocking, f"no directory above {tmp_path} is closed to others"


@pytest.mark.parametrize(("kind", "image"), KINDS, ids=KIND_IDS)
def test_tmp_path_is_mounted_and_read(
    instance_factory: InstanceFactory,
    settings: Settings,
    app_image: str,
    tmp_path: Path,
    kind: str,
    image: str,
) -> None:
    host_tree(tmp_path)
    mounts = {str(tmp_path): "/mnt/x", str(tmp_path / "single.conf"): "/etc/single.conf"}
    inst = launch(instance_factory, kind, image, app_image, mounts)
    name = inst.name
    try:
        assert cat(inst, "/mnt/x/data.txt") == "from the host\n"
        assert cat(inst, "/etc/single.conf") == "one file\n"
        assert inst.read_text("/mnt/x/theirs/file") == "theirs\n"
        # owners as the container sees them: the host's, through the container's mapping
        assert cat(inst, "/mnt/x/secret") == "root's only\n"  # 0600, host root's: root's inside
        paths = ("/mnt/x", "/mnt/x/data.txt", "/mnt/x/theirs", "/mnt/x/far", "/etc/single.conf")
        owners = {path: (inst.file(path).uid, inst.file(path).gid) for path in paths}
        assert owners == {
            "/mnt/x": (0, 0),
            "/mnt/x/data.txt": (0, 0),
            "/mnt/x/theirs": (1000, 1000),
            "/mnt/x/far": (65534, 65534),  # not mapped: the overflow id
            "/etc/single.conf": (0, 0),
        }
        # what the host writes afterwards shows through
        (tmp_path / "later.txt").write_text("later\n")
        assert cat(inst, "/mnt/x/later.txt") == "later\n"
        # seen idmapped and read-only in the container's mount table
        line = inst.exec(["grep", " /mnt/x ", "/proc/self/mountinfo"], check=True).stdout
        assert {"ro", "idmapped"} <= set(line.split()[5].split(",")), line
    finally:
        inst.delete()
    assert_nothing_left(settings, name)
    assert (tmp_path / "data.txt").read_text() == "from the host\n"


# The new mount API's way (util-linux 2.38 does not use it): clear MOUNT_ATTR_RDONLY with
# mount_setattr on the mount and on a clone from open_tree. Exits 1 only if both are refused
# with EPERM, as the kernel refuses to change a locked flag.
NEW_API_REMOUNT = r"""
my $path = shift;
my $empty = "";
my $clear_rdonly = pack("QQQQ", 0, 1, 0, 0);  # struct mount_attr: attr_clr = MOUNT_ATTR_RDONLY
my $on_mount = syscall(442, -100, $path, 0, $clear_rdonly, 32) == 0 ? 0 : $! + 0;
my $tree = syscall(428, -100, $path, 1 | 0x80000);  # OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
my $on_clone = syscall(442, $tree, $empty, 0x1000, $clear_rdonly, 32) == 0 ? 0 : $! + 0;
print STDERR "mount_setattr: errno $on_mount on $path, $on_clone on its clone
";
exit($on_mount == 1 && $on_clone == 1 ? 1 : 0);
"""


def remount_attempts(instance: Instance, kind: str, image: str) -> list[str]:
    """Ways root inside may try to make /mnt/x writable, with each mount program there:
    busybox's, and util-linux's (libmount's, which goes its own way)."""
    programs = ["busybox mount"]
    attempts = []
    if image.startswith("debian/"):
        programs.append("/usr/bin/mount")
        instance.write_file("/root/new-api-remount.pl", NEW_API_REMOUNT)
        attempts.append("perl /root/new-api-remount.pl /mnt/x")
    for mount in programs:
        attempts += [
            f"{mount} -o remount,bind,rw /mnt/x",
            f"{mount} -o remount,rw /mnt/x",
            # a new bind of it is no way out: it keeps the lock
            f"mkdir -p /mnt/y && {mount} --bind /mnt/x /mnt/y && {mount} -o remount,bind,rw /mnt/y",
        ]
    return attempts


@pytest.mark.parametrize(("kind", "image"), KINDS, ids=KIND_IDS)
def test_root_inside_cannot_make_a_mount_writable(
    instance_factory: InstanceFactory, app_image: str, tmp_path: Path, kind: str, image: str
) -> None:
    host_tree(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    inst = launch(instance_factory, kind, image, app_image, {str(tmp_path): "/mnt/x"})
    try:
        # the control: root inside may remount read-write a read-only mount of its own
        own = "mkdir -p /mnt/own /mnt/z && mount --bind /mnt/own /mnt/z"
        r = inst.exec(
            f"{own} && mount -o remount,bind,ro /mnt/z && mount -o remount,bind,rw /mnt/z"
            " && touch /mnt/z/ok"
        )
        assert r.ok and inst.exec("umount /mnt/z").ok, r
        for attempt in remount_attempts(inst, kind, image):
            r = inst.exec(attempt)
            assert r.exit_code != 0, (attempt, r)
            for point in ("/mnt/x", "/mnt/y"):
                line = inst.exec(["grep", f" {point} ", "/proc/self/mountinfo"]).stdout
                for mount in line.splitlines():
                    assert "ro" in mount.split()[5].split(","), (attempt, mount)
            inst.exec("umount /mnt/y 2>/dev/null; true")
            for write in (
                "echo overwritten > /mnt/x/shared",
                "echo more >> /mnt/x/data.txt",
                "echo x > /mnt/x/new",
                "rm /mnt/x/secret",
                "mv /mnt/x/data.txt /mnt/x/moved",
            ):
                r = inst.exec(write)
                assert r.exit_code != 0 and "Read-only file system" in r.stderr, (write, r)
        with pytest.raises(OSError):
            inst.write_file("/mnt/x/shared", "overwritten\n")
    finally:
        inst.delete()
    assert (tmp_path / "shared").read_text() == SHARED
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def staging_mounts(directory: Path) -> list[Path]:
    """The host's mounts below an instance directory (the staged host paths)."""
    return fsutil.mounts_below(directory)


@pytest.mark.local_only(reason="looks at the staging mounts the local backend makes on this host")
def test_stop_and_delete_leave_nothing_mounted(
    instance_factory: InstanceFactory, settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "data.txt").write_text("data\n")
    (tmp_path / "single").write_text("single\n")
    mounts = {str(tmp_path): "/mnt/x", str(tmp_path / "single"): "/etc/single"}
    inst = instance_factory.launch(image="busybox", mounts=mounts)
    name, directory = inst.name, inst.directory
    assert len(staging_mounts(directory)) == 2
    inst.stop(timeout=10)
    assert staging_mounts(directory) == []
    inst.start()
    assert len(staging_mounts(directory)) == 2
    assert cat(inst, "/mnt/x/data.txt") == "data\n"
    assert cat(inst, "/etc/single") == "single\n"
    inst.delete()
    assert_nothing_left(settings, name)
    assert (tmp_path / "data.txt").read_text() == "data\n"


@pytest.mark.local_only(reason="looks at the staging mounts the local backend makes on this host")
def test_a_reaped_instance_leaves_nothing_mounted(
    instance_factory: InstanceFactory, settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "data.txt").write_text("data\n")
    inst = instance_factory.launch(image="busybox", mounts={str(tmp_path): "/mnt/x"})
    name, directory = inst.name, inst.directory
    try:
        assert staging_mounts(directory) != []
        # as a killed run leaves it: the record names an owner that is gone
        gone = Owner(os.getpid(), start_time=-1)
        registry.write_record(directory, kind="container", image="busybox", owner=gone)
        assert registry.reap(settings, names=[name]) == [name]
        assert_nothing_left(settings, name)
        assert (tmp_path / "data.txt").read_text() == "data\n"
    finally:
        inst.delete()


def test_privileged_containers_mount_tmp_path(
    instance_factory: InstanceFactory, settings: Settings, tmp_path: Path
) -> None:
    host_tree(tmp_path)
    inst = instance_factory.launch(image="busybox", privileged=True, mounts={str(tmp_path): "/mnt"})
    name = inst.name
    try:
        assert cat(inst, "/mnt/secret") == "root's only\n"
        assert (inst.file("/mnt/theirs").uid, inst.file("/mnt/far").uid) == (1000, OUTSIDE_UID)
        r = inst.exec("echo x > /mnt/new")
        assert r.exit_code != 0 and "Read-only file system" in r.stderr, r
    finally:
        inst.delete()
    assert_nothing_left(settings, name)


@pytest.fixture
def ramfs(host_dir: Path) -> Iterator[Path]:
    """A ramfs mounted on the host: a filesystem that refuses idmapped mounts."""
    point = host_dir / "ramfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "pti-test", str(point)], check=True)
    try:
        yield point
    finally:
        fsutil.unmount_below(point)


def test_a_filesystem_without_idmapping_gets_a_plain_read_only_bind(
    instance_factory: InstanceFactory, settings: Settings, ramfs: Path
) -> None:
    open_dir = ramfs / "open"
    open_dir.mkdir(mode=0o755)
    (open_dir / "data.txt").write_text("data\n")
    (open_dir / "shared").write_text(SHARED)
    (open_dir / "shared").chmod(0o666)
    closed = ramfs / "closed"
    closed.mkdir(mode=0o700)

    inst = instance_factory.launch(image="busybox", mounts={str(open_dir): "/mnt/x"})
    try:
        assert cat(inst, "/mnt/x/data.txt") == "data\n"
        assert inst.file("/mnt/x/data.txt").uid == 65534  # host root is not mapped
        for attempt in remount_attempts(inst, "container", "busybox"):
            assert inst.exec(attempt).exit_code != 0, attempt
            inst.exec("umount /mnt/y 2>/dev/null; true")
        r = inst.exec("echo overwritten > /mnt/x/shared")
        assert r.exit_code != 0 and "Read-only file system" in r.stderr, r
    finally:
        inst.delete()
    assert (open_dir / "shared").read_text() == SHARED

    name = f"pti-closed-{secrets.token_hex(3)}"
    with pytest.raises(InstanceStartError) as caught:
        instance_factory.launch(image="busybox", name=name, mounts={str(closed): "/mnt/x"})
    message = str(caught.value)
    assert str(closed) in message and "idmapped" in message and "chmod o+rx" in message
    assert "liblxc" not in message
    assert_nothing_left(settings, name)
