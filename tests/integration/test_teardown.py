"""Nothing of an instance remains after ``delete()`` or after a launch that failed: no
directory, mount, process, LXC monitor or cgroup in any hierarchy."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, lxc_monitors

from pytest_incus import ImageStore, InstanceFactory, InstanceStartError, registry
from pytest_incus.runtimes import cgroups
from pytest_incus.settings import Settings


@pytest.mark.local_only(
    reason="looks for the LXC monitor, processes and cgroups that this host's liblxc makes"
)
@pytest.mark.parametrize(
    ("image", "privileged"),
    [("busybox", False), ("busybox", True), ("debian/12", False), ("debian/12", True)],
)
def test_delete_leaves_nothing(
    instance_factory: InstanceFactory, settings: Settings, image: str, privileged: bool
) -> None:
    inst = instance_factory.launch(image=image, privileged=privileged, memory="512MiB", cpus=1)
    name = inst.name
    # while it runs, each of the things we look for exists: the checks can see them
    present = registry.leftovers(settings, name)
    assert any(p.startswith("directory") for p in present)
    assert any(p.startswith("process") for p in present), present
    assert any(p.startswith("cgroup") for p in present), present
    assert len(lxc_monitors(name)) == 1
    hierarchies = {str(h.mount) for h in cgroups.hierarchies()}
    in_cgroups = {p.split()[1] for p in present if p.startswith("cgroup")}
    assert {h for h in hierarchies if any(c.startswith(h + "/") for c in in_cgroups)}, present
    inst.exec("sleep 1000 & echo started")  # a daemon inside
    inst.delete()
    assert_nothing_left(settings, name)


def test_leftovers_of_a_never_started_name(settings: Settings) -> None:
    assert registry.leftovers(settings, "pti-never-existed") == []


def test_failed_boot_leaves_nothing(
    instance_factory: InstanceFactory, settings: Settings, token: str
) -> None:
    name = f"pti-slowboot-{token}"
    started = time.monotonic()
    with pytest.raises(InstanceStartError) as excinfo:
        instance_factory.launch(image="debian/12", name=name, boot_timeout=0.01)
    assert time.monotonic() - started < 15
    error = excinfo.value
    assert "boot_timeout" in str(error)
    # the console's tail (systemd may not have printed anything yet after 10 ms)
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "console log:" in notes, notes
    assert_nothing_left(settings, name)


@pytest.fixture
def broken_rootfs(host_dir: Path, image_store: ImageStore) -> Iterator[Path]:
    """A local rootfs with busybox's sh whose /sbin/init is replaced per test; its cache
    entries are pruned afterwards."""
    root = host_dir / "rootfs"
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (root / d).mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    yield root
    image_store.prune(str(root))


@pytest.mark.parametrize("init", ["dangling", "exits"])
def test_image_without_a_working_init_fails_and_leaves_nothing(
    instance_factory: InstanceFactory,
    settings: Settings,
    broken_rootfs: Path,
    token: str,
    init: str,
) -> None:
    if init == "dangling":
        (broken_rootfs / "sbin" / "init").symlink_to("/bin/pti-no-such-init")
        expected = 'Failed to exec "/sbin/init"'
    else:
        (broken_rootfs / "sbin" / "init").write_text(f"#!/bin/sh\necho {token} bye\nexit 1\n")
        os.chmod(broken_rootfs / "sbin" / "init", 0o755)
        expected = f"{token} bye"  # what it printed, from the console log
    name = f"pti-noinit-{token}"
    with pytest.raises(InstanceStartError) as excinfo:
        instance_factory.launch(image=str(broken_rootfs), name=name)
    report = "\n".join([str(excinfo.value), *getattr(excinfo.value, "__notes__", [])])
    assert expected in report, report
    assert_nothing_left(settings, name)


def test_instance_fixture_cleans_up_after_a_failing_test(
    pytester: pytest.Pytester, inner_args: list[str], settings: Settings
) -> None:
    names = pytester.path / "names"
    pytester.makepyfile(
        f"""
        import pathlib
        import pytest

        @pytest.mark.instance(image="busybox")
        def test_fails(instance):
            pathlib.Path({str(names)!r}).write_text(instance.name)
            instance.exec("sleep 1000 &")
            assert False, "on purpose"

        @pytest.fixture
        def broken(instance):
            pathlib.Path({str(names)!r} + "-setup").write_text(instance.name)
            raise RuntimeError("setup breaks after the instance was made")

        @pytest.mark.instance(image="busybox")
        def test_setup_error(broken):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*inner_args)
    result.assert_outcomes(failed=1, errors=1)
    for path in (names, Path(f"{names}-setup")):
        assert_nothing_left(settings, path.read_text())
