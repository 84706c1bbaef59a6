"""Boot snapshots: boot a VM of one image and shape once, save it, resume every later VM from it.

Under TCG a cold boot costs seconds (the kernel, the initramfs, Python, for systemd its units),
and every VM of the same image, init, CPUs, memory and kernel command line boots to exactly the
same state. So the first VM of a shape is booted as usual and, once ready, paused, saved with QMP
``migrate`` into a cache entry (``ImageStore.boot_snapshot``) together with a copy of its disk
overlay, and let run on: it costs that VM a few hundred ms. Every later VM of that shape starts
QEMU with ``-incoming`` on the saved state, on an overlay of its own on the saved disk, and is
ready as soon as its agent answers.

What a resumed guest must not share with the snapshot is put right before it is called ready:
the wall clock (``guest-set-time``) and the kernel's random state (fresh bytes from the host,
credited and reseeded; see guest_agent/system.py), and on a network its own MAC, address and
name (after every start, see runtimes/vm.py). What it does share, by design: the boot id,
the boot messages (copied into its console log) and ``/proc/uptime`` from the first boot on.

Only the first start of an instance resumes; ``restart()`` boots from the instance's own disk.
VMs with ``kernel=``/``initrd=`` (a kernel under development changes) or with the stock
qemu-ga (no entropy command) always boot from scratch, as does everything with
``--incus-vm-snapshots=off``. A snapshot that does not resume (say QEMU was upgraded in place)
is removed and the VM boots from scratch, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_incus.agent.client import AgentClient
from pytest_incus.errors import IncusError
from pytest_incus.images import vm as vm_images
from pytest_incus.runtimes import qemu

ENTROPY_BYTES = 64
POLL = 0.005


def variant(argv: Sequence[str], qemu_version: str) -> str:
    """The digest naming one machine shape: QEMU's command line (with the instance's own
    directory and name taken out by the caller) and QEMU's version."""
    text = json.dumps([qemu_version, *argv])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class SaveError(IncusError):
    """A booted VM could not be saved as a boot snapshot (the VM itself may run on)."""


def save(process: qemu.QemuProcess, disk: Path, target: Path, deadline: float) -> None:
    """Pause the guest, copy its disk overlay ``disk`` to ``target / vm.DISK`` and write its
    whole state to ``target / vm.BOOT_STATE``; IncusError (or OSError, for the copy) if that
    fails or does not end by ``deadline`` (monotonic). The guest stays paused: ``cont`` lets
    it run on, on ``disk``.

    The copy is consistent: pausing drains and flushes every disk, and what the guest had not
    written yet is in the saved state."""
    process.command("stop")
    shutil.copyfile(disk, target / vm_images.DISK)
    process.command("migrate", uri=f"exec:cat > {shlex.quote(str(target / vm_images.BOOT_STATE))}")
    while True:
        status = process.command("query-migrate")
        said = status.get("status")
        if said == "completed":
            return
        if said in ("failed", "cancelled"):
            raise IncusError(f"saving the VM failed: {status.get('error-desc', said)}")
        if time.monotonic() > deadline:
            raise IncusError(f"saving the VM did not finish in time (status {said})")
        time.sleep(POLL)


def incoming(state: Path) -> list[str]:
    """The QEMU arguments that load ``state`` instead of booting."""
    return ["-incoming", f"exec:cat {shlex.quote(str(state))}"]


def resume(process: qemu.QemuProcess, deadline: float) -> None:
    """Wait until QEMU has loaded the saved state, then let the guest run; IncusError if the
    load fails or does not end by ``deadline``."""
    while True:
        status = process.command("query-status")["status"]
        if status != "inmigrate":
            break
        if not process.alive():
            raise IncusError("QEMU ended while loading the saved VM")
        if time.monotonic() > deadline:
            raise IncusError("QEMU did not load the saved VM in time")
        time.sleep(POLL)
    if status != "running":
        process.command("cont")
    status = process.command("query-status")["status"]
    if status != "running":
        raise IncusError(f"the resumed VM does not run (QEMU status {status!r})")


def refresh(agent: AgentClient) -> None:
    """Give a resumed guest the host's wall clock and fresh randomness."""
    agent.set_time(time.time_ns())
    agent.add_entropy(os.urandom(ENTROPY_BYTES))
