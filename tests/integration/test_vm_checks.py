"""VM specs that cannot work, and the choice of accelerator (a real KVM probe), with few or no
boots: what is refused at collection, what a broken QEMU start says, and the probe's cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, host_processes

from pytest_incus import ConfigError, InstanceStartError
from pytest_incus.factory import InstanceFactory
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import ImageStore
from pytest_incus.runtimes import accel
from pytest_incus.settings import Settings
from pytest_incus.values import AccelMode


@pytest.fixture
def fresh_choice() -> Iterator[None]:
    """Forget this process's accelerator choice before and after the test."""
    accel.forget()
    yield
    accel.forget()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image": "busybox"}, "a VM needs an image with a kernel"),
        ({"cpus": 4096}, "cpus=4096 but this host has only"),
        ({"memory": "16MiB"}, "too little for a VM"),
        ({"kernel": "/nonexistent/vmlinuz"}, "kernel='/nonexistent/vmlinuz': no such file"),
        ({"initrd": "/nonexistent/initrd"}, "initrd='/nonexistent/initrd': no such file"),
        ({"init": "sysv"}, "init='sysv'"),
    ],
)
def test_impossible_vm_is_a_config_error(
    instance_factory: InstanceFactory, options: dict[str, object], message: str
) -> None:
    options = {"image": "debian/12", **options}
    with pytest.raises(ConfigError, match=message):
        instance_factory.launch(kind="vm", **options)


def test_impossible_vm_stops_collection(pytester: pytest.Pytester, inner_args: list[str]) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.instance(kind="vm", image="busybox")
        def test_vm(instance):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*inner_args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *::test_vm: *a VM needs an image with a kernel*"])


@pytest.fixture(scope="module")
def vm_kernel(image_store: ImageStore) -> Path:
    """The kernel of the debian/12 VM image: what the KVM probe boots."""
    return vm_images.boot_kernel(image_store.get("debian/12", "vm").path)


def test_kvm_probe_is_cached_per_host(
    scratch_cache: Path, fresh_choice: None, vm_kernel: Path
) -> None:
    started = time.monotonic()
    first = accel.choose(AccelMode.AUTO, scratch_cache, vm_kernel)
    probing = time.monotonic() - started
    assert probing < accel.PROBE_DEADLINE + 2, "the probe must give up quickly"
    assert host_processes(str(scratch_cache)) == [], "the probe's QEMU is still running"
    record = (scratch_cache / accel.CACHE_FILE).read_text()
    assert accel.qemu_version() in record
    assert Path("/proc/sys/kernel/random/boot_id").read_text().strip() in record
    assert "a Linux guest (kernel debian-bookworm.vm/" in first.reason

    accel.forget()  # as a new process would
    started = time.monotonic()
    second = accel.choose(AccelMode.AUTO, scratch_cache, vm_kernel)
    assert time.monotonic() - started < 0.5, "the cached answer was not used"
    assert second.name == first.name
    assert second.reason.endswith(", cached)")


def test_kvm_probe_guest_reaches_its_init_under_tcg(scratch_cache: Path, vm_kernel: Path) -> None:
    # the probe's guest itself is sound: where KVM fails, it is KVM, not the probe
    verdict = accel.boot_probe(
        scratch_cache, vm_kernel, accel.Accel(AccelMode.TCG, "forced"), 120.0
    )
    assert verdict.works, verdict.detail
    assert "reached its init in" in verdict.detail


def test_forced_kvm_that_does_not_work_is_a_clear_error(
    scratch_cache: Path, settings: Settings, fresh_choice: None, vm_kernel: Path
) -> None:
    if accel.choose(AccelMode.AUTO, scratch_cache, vm_kernel).name is AccelMode.KVM:
        pytest.skip("KVM works on this host")  # HOST.md: it does not, here
    forced = Settings(cache_dir=settings.cache_dir, accel="kvm")
    factory = InstanceFactory(forced, ImageStore(forced))
    with pytest.raises(InstanceStartError, match=r"--incus-accel=kvm was asked, but KVM") as info:
        factory.launch(kind="vm", image="debian/12", init="agent")
    assert "--incus-accel=auto or tcg" in str(info.value)


def test_forced_kvm_fails_the_inner_test_with_the_reason(
    pytester: pytest.Pytester,
    inner_args: list[str],
    fresh_choice: None,
    settings: Settings,
    vm_kernel: Path,
) -> None:
    if accel.choose(AccelMode.AUTO, settings.cache_dir, vm_kernel).name is AccelMode.KVM:
        pytest.skip("KVM works on this host")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.instance(kind="vm", image="debian/12", init="agent")
        def test_vm(instance):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*inner_args, "--incus-accel=kvm", timeout=300)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*InstanceStartError*--incus-accel=kvm was asked, but KVM*"])


def test_qemu_that_cannot_start_says_why_and_leaves_nothing(
    instance_factory: InstanceFactory, settings: Settings, token: str
) -> None:
    not_a_kernel = settings.cache_dir / "probe" / f"not-a-kernel-{token}"
    not_a_kernel.parent.mkdir(parents=True, exist_ok=True)
    not_a_kernel.write_text("this is no kernel image\n")
    name = f"vm-badkernel-{token}"
    started = time.monotonic()
    try:
        with pytest.raises(InstanceStartError) as info:
            instance_factory.launch(
                kind="vm", image="debian/12", kernel=str(not_a_kernel), boot_timeout=60, name=name
            )
    finally:
        not_a_kernel.unlink()
    assert time.monotonic() - started < 20, "QEMU's early death must be noticed at once"
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "QEMU exited at once (exit code 1)" in str(info.value)
    assert "QEMU said:" in notes and "invalid kernel header" in notes, notes
    assert_nothing_left(settings, name)
