"""Boot snapshots (runtimes/snapshot.py): VMs of one shape resume one saved boot, each with
its own disk, the host's clock and randomness of its own; restart boots for real; a snapshot
that does not resume gives way to a boot; ``vm_snapshots=False`` boots every VM."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Iterator

import pytest
from snapshot_helpers import of_shape

from pytest_incus import Instance
from pytest_incus.factory import InstanceFactory
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.runtimes import snapshot
from pytest_incus.settings import Settings

# the kernel's messages of the boot, with their timestamps in µs: the same in every VM resumed
# from one saved boot, never the same in two boots
BOOT_LOG = "dmesg | head -n 150"


def _boot_log(vm: Instance) -> str:
    return vm.exec(BOOT_LOG, check=True).stdout


def _launch(factory: InstanceFactory, **options: object) -> Instance:
    return factory.launch(kind="vm", image="debian/12", init="agent", **options)


def _boot_snapshots(store: ImageStore) -> dict[str, Image]:
    return {e.key: e for e in store.list() if e.kind == "vm-boot"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A machine shape of one test's own: VMs launched with ``kernel_args=arg``."""

    arg: str
    store: ImageStore
    before: frozenset[str]

    def snapshots(self) -> list[Image]:
        """The boot snapshots of this shape made since the test began (other tests may
        save snapshots of their own meanwhile, on another worker)."""
        return [
            e
            for k, e in _boot_snapshots(self.store).items()
            if k not in self.before and of_shape(e, self.arg)
        ]


@pytest.fixture
def shape(image_store: ImageStore) -> Iterator[Shape]:
    """A kernel argument that gives this test a machine shape (and boot snapshot) of its own;
    the snapshots made meanwhile are removed afterwards."""
    made = Shape(
        f"pti.shape={secrets.token_hex(4)}", image_store, frozenset(_boot_snapshots(image_store))
    )
    yield made
    for entry in made.snapshots():
        image_store.discard(entry)


def test_vms_of_one_shape_resume_one_saved_boot(
    instance_factory: InstanceFactory, shape: Shape
) -> None:
    first = _launch(instance_factory, kernel_args=shape.arg)
    second = _launch(instance_factory, kernel_args=shape.arg)
    third = _launch(instance_factory, kernel_args=shape.arg)
    try:
        assert len(shape.snapshots()) == 1  # saved once, by the first launch
        logs = {_boot_log(vm) for vm in (first, second, third)}
        assert len(logs) == 1  # one boot, resumed three times
        # each has a disk of its own: a write in one is seen in no other, nor in the snapshot
        # (the first, which saved it, runs on on its own disk too)
        second.write_file("/root/mine", "second\n")
        first.write_file("/root/first", "first\n")
        assert not first.file("/root/mine").exists
        assert not third.file("/root/mine").exists
        assert not third.file("/root/first").exists
        fourth = _launch(instance_factory, kernel_args=shape.arg)
        try:
            assert not fourth.file("/root/mine").exists
            assert not fourth.file("/root/first").exists
            assert fourth.exec("cat /proc/cmdline").stdout.split()[-1] == shape.arg
        finally:
            fourth.delete()
    finally:
        for vm in (first, second, third):
            vm.delete()


def test_resumed_vms_get_the_host_clock_and_randomness_of_their_own(
    instance_factory: InstanceFactory, shape: Shape
) -> None:
    _launch(instance_factory, kernel_args=shape.arg).delete()  # saves the boot
    time.sleep(3)  # the saved clock is now 3 s behind
    one = _launch(instance_factory, kernel_args=shape.arg)
    two = _launch(instance_factory, kernel_args=shape.arg)
    try:
        assert _boot_log(one) == _boot_log(two)
        for vm in (one, two):
            guest = float(vm.exec(["date", "+%s.%N"], check=True).stdout)
            assert abs(guest - time.time()) < 2.0
        draws = [
            vm.exec("head -c 32 /dev/urandom | od -An -tx1", check=True).stdout for vm in (one, two)
        ]
        assert draws[0] != draws[1]
        uuids = [vm.read_text("/proc/sys/kernel/random/uuid") for vm in (one, two)]
        assert uuids[0] != uuids[1]
    finally:
        one.delete()
        two.delete()


def test_restart_boots_from_the_instances_own_disk(
    instance_factory: InstanceFactory, shape: Shape
) -> None:
    _launch(instance_factory, kernel_args=shape.arg).delete()  # saves the boot
    vm = _launch(instance_factory, kernel_args=shape.arg)
    try:
        resumed = _boot_log(vm)
        vm.write_file("/root/kept", "kept\n")
        vm.exec("sync", check=True)
        vm.restart()
        assert _boot_log(vm) != resumed  # a real boot
        assert vm.read_text("/root/kept") == "kept\n"
    finally:
        vm.delete()


def test_a_snapshot_that_does_not_resume_gives_way_to_a_boot(
    instance_factory: InstanceFactory,
    shape: Shape,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _launch(instance_factory, kernel_args=shape.arg).delete()  # saves the boot
    [entry] = shape.snapshots()
    state = entry.path / vm_images.BOOT_STATE
    state.write_bytes(b"not a QEMU migration stream\n" * 100)
    vm = _launch(instance_factory, kernel_args=shape.arg)
    try:
        assert vm.exec("cat /proc/cmdline", check=True).stdout.split()[-1] == shape.arg
        assert "did not resume from the boot snapshot" in caplog.text
        assert not entry.path.exists()  # removed, and the VM booted instead
    finally:
        vm.delete()


def test_a_snapshot_of_another_image_disk_is_not_resumed(
    instance_factory: InstanceFactory, shape: Shape
) -> None:
    saver = _launch(instance_factory, kernel_args=shape.arg)
    try:
        saved = _boot_log(saver)
    finally:
        saver.delete()
    [entry] = shape.snapshots()
    # as if the image had been rebuilt between the instance's start and the snapshot's save
    (entry.path / "boot.json").write_text(json.dumps({"base": [0, 0]}))
    vm = _launch(instance_factory, kernel_args=shape.arg)
    try:
        assert _boot_log(vm) != saved  # booted
        assert entry.path.exists()  # and the snapshot stays for the disk it was saved on
    finally:
        vm.delete()


def test_a_boot_that_cannot_be_saved_runs_on(
    instance_factory: InstanceFactory,
    shape: Shape,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a failing save cannot be caused for real here (QEMU saves whatever it runs): simulated
    def fail(*args: object) -> None:
        raise snapshot.SaveError("simulated: no space left on device")

    monkeypatch.setattr(snapshot, "save", fail)
    vm = _launch(instance_factory, kernel_args=shape.arg)
    try:
        assert "booted, but its boot could not be saved" in caplog.text
        assert vm.exec("cat /proc/cmdline", check=True).stdout.split()[-1] == shape.arg
        assert shape.snapshots() == []
    finally:
        vm.delete()


def test_without_snapshots_every_vm_boots(settings: Settings, shape: Shape) -> None:
    off = dataclasses.replace(settings, vm_snapshots=False)
    booting = InstanceFactory(off, ImageStore(off))
    one = _launch(booting, kernel_args=shape.arg)
    two = _launch(booting, kernel_args=shape.arg)
    try:
        assert _boot_log(one) != _boot_log(two)
        assert shape.snapshots() == []
    finally:
        one.delete()
        two.delete()
