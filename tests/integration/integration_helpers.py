"""Helpers of the integration tests: waiting on conditions and looking at the host's processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pytest_incus import Instance, registry
from pytest_incus.settings import Settings

# Host directories that instances see (mounts, local images). Never under /tmp (HOST.md) and
# traversable by the host uid of an unprivileged container's root.
SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")


def wait_until(condition: Callable[[], object], deadline: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"{what}: still not true after {deadline}s"
        time.sleep(0.02)


def host_processes(needle: str) -> list[str]:
    """``pid: cmdline`` of every host process whose command line contains ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        text = cmdline.decode(errors="replace").strip()
        if needle in text:
            found.append(f"{entry}: {text}")
    return found


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


def lxc_monitors(name: str) -> list[str]:
    """The ``[lxc monitor]`` processes that name instance ``name``."""
    return [p for p in host_processes("[lxc monitor]") if p.split()[-1] == name]


def assert_nothing_left(settings: Settings, name: str) -> None:
    """Fail unless instance ``name`` left nothing at all on the host."""
    left = registry.leftovers(settings, name)
    assert left == [], f"instance {name} left: {left}"
    assert lxc_monitors(name) == []
    assert host_processes(str(settings.instances_dir / name)) == []


def memory_limit(instance: Instance) -> int:
    """The memory limit of the container's cgroup, as the container sees it (v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
        if instance.file(path).exists:
            return int(instance.read_text(path))
    raise AssertionError(
        "no memory cgroup visible inside: " + instance.exec("ls -R /sys/fs/cgroup").stdout
    )
