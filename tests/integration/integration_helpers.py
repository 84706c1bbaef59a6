"""Helpers of the integration tests: waiting on conditions and looking at the host's processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

# re-exported: the integration tests import them from here
from leftover_helpers import assert_nothing_left as assert_nothing_left
from leftover_helpers import host_processes as host_processes
from leftover_helpers import lxc_monitors as lxc_monitors

from pytest_incus import Instance

# Host directories that instances see (mounts, local images). Never under /tmp (HOST.md) and
# traversable by the host uid of an unprivileged container's root.
SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")


def wait_until(condition: Callable[[], object], deadline: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"{what}: still not true after {deadline}s"
        time.sleep(0.02)


def host_descendants(pid: int) -> list[str]:
    """``pid: cmdline`` of every live descendant of host process ``pid`` (zombies excluded)."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        states[int(entry)] = fields[0]
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo.extend(children.get(child, []))
        if states.get(child) == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        found.append(f"{child}: {cmdline.decode(errors='replace').strip()}")
    return found


def memory_limit(instance: Instance) -> int:
    """The memory limit of the container's cgroup, as the container sees it (v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
        if instance.file(path).exists:
            return int(instance.read_text(path))
    raise AssertionError(
        "no memory cgroup visible inside: " + instance.exec("ls -R /sys/fs/cgroup").stdout
    )
