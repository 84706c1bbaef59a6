"""Hook specifications of pytest-incus, added to pytest in ``pytest_addhooks``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_incus.instance import Instance


@pytest.hookspec(firstresult=True)
def pytest_incus_build_image(config: pytest.Config, ref: str, rootfs: Path) -> bool | None:
    """Build the image named ``ref`` into the empty directory ``rootfs`` and return True.

    Called for image names that pytest-incus does not build itself (not ``busybox``,
    ``debian/...`` or a path). Return None for names you do not build. The result is cached
    like every other image: the hook runs once per name for all workers and later runs (clear
    it with ``pytest-incus images prune NAME``).
    """


def pytest_incus_instance_ready(instance: Instance) -> None:
    """Called after every launch, once the instance is ready: prepare it further."""


def pytest_incus_failure_sections(instance: Instance) -> list[tuple[str, str]] | None:
    """Called for each instance a failed test used, while it still runs: return a list of
    ``(title, text)`` pairs, each of which becomes a section of that test's report (say the
    output of ``instance.exec("systemctl status myservice").stdout``). Return None or an empty
    list to add nothing."""
