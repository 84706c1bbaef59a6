"""The same test over several Debian releases: one test id per image."""

from __future__ import annotations

import pytest

from pytest_incus import Instance


def os_release(instance: Instance) -> dict[str, str]:
    """The instance's /etc/os-release as a dict."""
    text = instance.read_text("/etc/os-release")
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


# ids: container-debian-11, container-debian-12, container-debian-13 (select with -k)
@pytest.mark.instance(image=["debian/11", "debian/12", "debian/13"])
def test_release_boots_systemd(instance: Instance) -> None:
    release = instance.image.removeprefix("debian/")

    assert os_release(instance)["VERSION_ID"] == release
    assert instance.read_text("/proc/1/comm").strip() == "systemd"
    # the instance fixture returns once boot has finished
    state = instance.exec("systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded")
    failed = instance.exec("systemctl list-units --failed --plain --no-legend").stdout
    assert state == "running" or failed.strip(), "degraded, but no unit failed?"
