"""The mount hook (pytest_incus/hooks/verify-rootfs) refuses to start a container whose rootfs
is not its own overlay (HOST.md: liblxc without a rootfs boots the container on the host's /).

Each test lets the runtime write a correct config, then rewrites ``lxc.rootfs.path`` behind its
back just before the start, keeping the hook lines. As a second line of defence the tampered
config also runs ``/bin/true`` as init, so nothing harmful runs even if the hook failed to
refuse: the test would then fail on "started", not damage the host.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left

from pytest_incus import InstanceFactory, InstanceStartError
from pytest_incus.runtimes.container import Container
from pytest_incus.settings import Settings

# how to point lxc.rootfs.path elsewhere, given the container being started
Rewrite = Callable[[Container], str]

REWRITES: dict[str, Rewrite] = {
    # no rootfs at all: liblxc would use the host's /
    "empty": lambda c: "",
    # the image itself, not an overlay: writes would land in the shared cache
    "image-dir": lambda c: str(c.image.rootfs),
    # an overlay, but with another upper directory than this instance's
    "other-upper": lambda c: f"overlay:{c.image.rootfs}:{c.directory / 'elsewhere'}",
    # the host's / named explicitly
    "host-root": lambda c: "/",
}

pytestmark = pytest.mark.local_only(
    reason="the verify-rootfs hook is liblxc's start hook on this host; Incus checks its own rootfs"
)


def tamper(monkeypatch: pytest.MonkeyPatch, rewrite: Rewrite, seen: list[str]) -> None:
    """Make every container start with its rootfs rewritten and /bin/true as init."""
    original_start = Container.start

    def start(self: Container) -> None:
        import lxc

        config = self.directory / "config"
        kept = [
            line
            for line in config.read_text().splitlines()
            if not line.startswith(("lxc.rootfs.path", "lxc.init.cmd"))
        ]
        assert any(line.startswith("lxc.hook.mount") for line in kept)
        target = rewrite(self)
        if target.startswith("overlay:"):
            Path(target.rsplit(":", 1)[1]).mkdir(exist_ok=True)
        config.write_text(
            "\n".join([*kept, f"lxc.rootfs.path = {target}", "lxc.init.cmd = /bin/true"]) + "\n"
        )
        # liblxc reads the config when the container object is made: make it again
        self._c = lxc.Container(self.name, str(self.directory.parent))
        # (liblxc reads an overlay path back without its "overlay:" prefix)
        assert self._c.get_config_item("lxc.rootfs.path") in (target, target.split(":", 1)[-1])
        assert self._c.get_config_item("lxc.init.cmd") == "/bin/true"
        seen.append(self.name)
        original_start(self)

    monkeypatch.setattr(Container, "start", start)


@pytest.mark.parametrize(
    ("how", "privileged"),
    [
        ("empty", False),
        ("empty", True),
        ("image-dir", False),
        ("other-upper", False),
        ("host-root", True),
    ],
)
def test_hook_refuses_a_rootfs_that_is_not_the_overlay(
    instance_factory: InstanceFactory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    token: str,
    how: str,
    privileged: bool,
) -> None:
    name = f"pti-tamper-{token}"
    seen: list[str] = []
    tamper(monkeypatch, REWRITES[how], seen)
    with pytest.raises(InstanceStartError) as excinfo:
        instance_factory.launch(image="busybox", name=name, privileged=privileged)
    assert seen == [name], "the tampered start did not run"
    # it was the hook that refused, and the error says so
    report = "\n".join([str(excinfo.value), *getattr(excinfo.value, "__notes__", [])])
    assert "Failed to run mount hooks" in report, report
    assert "rootfs check" in report
    assert_nothing_left(settings, name)


def test_untampered_launch_passes_the_hook(
    instance_factory: InstanceFactory, settings: Settings, token: str
) -> None:
    """The control: the same launch without tampering starts, so the hook is what refused."""
    inst = instance_factory.launch(image="busybox", name=f"pti-control-{token}")
    try:
        assert inst.exec("true").ok
    finally:
        inst.delete()
    assert_nothing_left(settings, inst.name)
