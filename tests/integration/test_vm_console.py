"""A VM's ``logs()`` is its console: the kernel's and systemd's messages of every boot, and for a
VM that resumed a saved boot, that boot followed by its own output."""

from __future__ import annotations

import dataclasses
import re

from integration_helpers import wait_until

from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

RESUMED = "pytest-incus: resumed from the boot saved at "


def _assert_boot_messages(log: str) -> None:
    assert re.search(r"Linux version 6\.\d+\.\S+ ", log), log[:2000]
    assert re.search(r"systemd\[1\]: systemd \d+", log), log[-3000:]
    assert "Welcome to" in log and "Debian GNU/Linux 12 (bookworm)" in log
    assert re.search(r"Reached target .*Multi-User System", log), log[-3000:]


def test_resumed_systemd_vm_shows_the_saved_boot_then_its_own(
    instance_factory: InstanceFactory, token: str
) -> None:
    # the first VM of the shape may be the one that boots and saves it; the second resumes
    instance_factory.launch(kind="vm", image="debian/12").delete()
    vm = instance_factory.launch(kind="vm", image="debian/12")
    try:
        log = vm.logs()
        assert RESUMED in log, log[-2000:]
        saved = log.partition(RESUMED)[0]
        _assert_boot_messages(saved)
        mark = f"pti-own-output-{token}"
        vm.exec(f"echo {mark} > /dev/kmsg", check=True)
        wait_until(lambda: mark in vm.logs().partition(RESUMED)[2], 10, "its own output")
    finally:
        vm.delete()


def test_cold_systemd_vm_logs_its_boot_and_every_restart(settings: Settings) -> None:
    cold = dataclasses.replace(settings, vm_snapshots=False)
    factory = InstanceFactory(cold, ImageStore(cold))
    try:
        vm = factory.launch(kind="vm", image="debian/12")
        log = vm.logs()
        assert RESUMED not in log
        _assert_boot_messages(log)
        vm.restart()
        assert len(re.findall(r"Linux version 6\.", vm.logs())) == 2
    finally:
        factory.close()
