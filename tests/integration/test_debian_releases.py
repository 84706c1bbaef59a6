"""Debian 11, 12 and 13 all boot with systemd in an unprivileged container.

The first run builds each image (about a minute each); later runs use the cache.
"""

from __future__ import annotations

import pytest

from pytest_incus import Instance

CODENAMES = {"debian/11": "bullseye", "debian/12": "bookworm", "debian/13": "trixie"}


@pytest.mark.instance(image=list(CODENAMES))
def test_release_boots_with_systemd(instance: Instance) -> None:
    os_release = dict(
        line.split("=", 1) for line in instance.read_text("/etc/os-release").splitlines() if line
    )
    assert os_release["VERSION_CODENAME"] == CODENAMES[instance.image]
    assert os_release["ID"] == "debian"
    state = instance.exec("systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded"), instance.exec("systemctl --failed").stdout
    assert instance.exec("readlink /proc/1/exe").stdout.strip().endswith("systemd")
    assert instance.read_text("/proc/self/uid_map").split() == ["0", "1000000", "65536"]
    # journald runs and systemd's own tools work
    assert instance.exec(["systemctl", "is-active", "systemd-journald"]).stdout == "active\n"
    assert "Debian" in instance.logs()
