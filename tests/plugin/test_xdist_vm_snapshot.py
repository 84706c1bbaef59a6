"""`-n 2`, four VMs of one new shape: one boot is saved, once, and every VM resumes it."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances
from snapshot_helpers import of_shape

from pytest_incus import registry
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

VM_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.parametrize("n", range(4))
@pytest.mark.instance(kind="vm", image="debian/12", init="agent", kernel_args="{shape}")
def test_vm(instance, n):
    record(instance)
    # the kernel's boot messages with their µs timestamps: the same only in resumed VMs
    log = instance.exec("dmesg | head -n 150", check=True).stdout
    (NAMES.parent / f"boot-{n}").write_text(log)
"""
)


def test_one_save_for_two_workers(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    store = ImageStore(settings)
    before = {e.key for e in store.list() if e.kind == "vm-boot"}
    shape = f"pti.shape={secrets.token_hex(4)}"
    pytester.makepyfile(test_vm=VM_MODULE.replace("{shape}", shape))
    try:
        result = pytester.runpytest_subprocess(*args, "-n", "2", "-q", timeout=600)
        result.assert_outcomes(passed=4)
        made = [e for e in store.list() if e.kind == "vm-boot" and of_shape(e, shape)]
        assert len(made) == 1  # this shape's, saved once
        saves = [b for b in store.builds() if b["key"] == made[0].key]
        assert len(saves) == 1
        logs = {Path(pytester.path / f"boot-{n}").read_text() for n in range(4)}
        assert len(logs) == 1  # all four resumed the one saved boot
        workers = inner_instances.workers()
        assert len(set(workers.values())) == 2  # both workers launched VMs
        for name in workers:
            assert registry.leftovers(settings, name) == []
    finally:
        for entry in store.list():
            if entry.kind == "vm-boot" and entry.key not in before and of_shape(entry, shape):
                store.discard(entry)
