"""Helpers of the tests of VM boot snapshots: which saved boot is of which machine shape."""

from __future__ import annotations

import json

from pytest_incus import fsutil
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import Image


def of_shape(entry: Image, arg: str) -> bool:
    """True if the VM boot snapshot ``entry`` is of VMs launched with ``arg`` among their
    kernel arguments (its record names the shape's command line): a test that gives its VMs a
    shape of its own finds its snapshots so, whatever other tests save meanwhile."""
    record = fsutil.read_json(entry.path / vm_images.BOOT_RECORD)
    return isinstance(record, dict) and arg in json.dumps(record.get("shape"))
