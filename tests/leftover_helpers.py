"""What instances leave on the host: the one check that "nothing is left" of an instance or of
a whole run, for every test that ends instances (delete, reap, a killed worker, a signal).

:func:`leftovers` lists, for one instance name: its registry entry (instance directory with
its record), mounts below that directory in this mount namespace and overlay or other mounts
naming it in any process's namespace, its liblxc monitor, a QEMU or any other process naming
its directory, its cgroups in every hierarchy, and its claim on the name: all of that one
instance, not of another of the same name in another cache directory.
:func:`assert_run_left_nothing` checks a whole run's names at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pytest_incus import registry
from pytest_incus.settings import Settings


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


def lxc_monitors(name: str) -> list[str]:
    """The ``[lxc monitor]`` processes that name instance ``name`` (of any cache)."""
    return [p for p in host_processes("[lxc monitor]") if p.split()[-1] == name]


def mounts_naming(directory: Path) -> list[str]:
    """Mounts in any process's mount namespace whose source, point or options name a path
    below ``directory`` (a container's overlay lives in its own namespace)."""
    needle = f"{directory}/"
    found, seen = [], set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry}/ns/mnt")
            if namespace in seen:
                continue
            seen.add(namespace)
            lines = Path(f"/proc/{entry}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        found += [
            f"mount in the namespace of pid {entry}: {line}" for line in lines if needle in line
        ]
    return found


def leftovers(settings: Settings, name: str) -> list[str]:
    """Everything of instance ``name`` (in ``settings``' cache) still on the host."""
    directory = settings.instances_dir / name
    found = registry.leftovers(settings, name)
    if registry.read_record(directory) is not None:
        found.append(f"registry entry {directory / registry.RECORD}")
    reported = {item.split()[1].rstrip(":") for item in found if item.startswith("process ")}
    for process in host_processes(str(directory)):
        pid = process.split(":")[0]
        if pid not in reported:
            reported.add(pid)
            found.append(f"process {process}")
    found += mounts_naming(directory)
    return found


def assert_nothing_left(settings: Settings, name: str) -> None:
    """Fail unless instance ``name`` left nothing at all on the host."""
    left = leftovers(settings, name)
    assert left == [], f"instance {name} left: {left}"


def assert_run_left_nothing(settings: Settings, names: Iterable[str]) -> None:
    """Fail unless none of a run's instances ``names`` left anything, and the registry has
    no entry of them."""
    names = list(names)
    left = {name: found for name in names if (found := leftovers(settings, name))}
    listed = {r.name for r in registry.records(settings)} & set(names)
    assert not left and not listed, f"the run left: {left}; registry still lists: {listed}"
