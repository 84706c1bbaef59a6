"""The KVM verdict on this very host, from fresh: whatever the probe says, every VM gets ready.

On some hosts (HOST.md) KVM fails Linux guests, and a probe may pass there now and then; a VM
that KVM stops must then be noticed at once, recorded, and booted again under TCG. These tests
work on the run's own cache (where the VM image is) and leave it with no verdict, so that the
next VM probes afresh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from integration_helpers import assert_nothing_left

from pytest_incus import InstanceStartError
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import ImageStore
from pytest_incus.runtimes import accel
from pytest_incus.settings import Settings

ATTEMPTS = 10


def _clear(settings: Settings) -> None:
    accel.forget()
    (settings.cache_dir / accel.CACHE_FILE).unlink(missing_ok=True)


@pytest.fixture
def fresh_verdict(settings: Settings) -> Iterator[None]:
    """No verdict before the test (as on a freshly booted host), and none after it."""
    _clear(settings)
    yield
    _clear(settings)


def _pretend_probe_passed(settings: Settings) -> None:
    """What a probe that passed by chance leaves: a verdict that KVM works."""
    _clear(settings)
    passed = accel.Verdict(True, "a probe that passed", "probe", time.time())
    assert accel.record(settings.cache_dir, passed, None) == passed


def test_auto_choice_from_a_clean_verdict_always_gives_a_ready_vm(
    settings: Settings, fresh_verdict: None
) -> None:
    outcomes = []
    for _ in range(ATTEMPTS):
        _clear(settings)
        factory = InstanceFactory(settings, ImageStore(settings))
        started = time.monotonic()
        try:
            vm = factory.launch(kind="vm", image="debian/12", init="agent", boot_timeout=300)
            assert vm.exec(["true"]).ok
            ready = time.monotonic() - started
        finally:
            factory.close()
        verdict = accel.cached_verdict(settings.cache_dir)
        assert verdict is not None
        outcomes.append(f"{vm.machine.accel.name} in {ready:.1f}s: {verdict.detail}")  # type: ignore[attr-defined]
    print("\n".join(outcomes))  # shown with -s: how the probe and the VMs fared
    assert len(outcomes) == ATTEMPTS


def test_vm_that_kvm_stops_boots_again_under_tcg(settings: Settings) -> None:
    _pretend_probe_passed(settings)
    messages: list[str] = []
    factory = InstanceFactory(settings, ImageStore(settings, progress=messages.append))
    started = time.monotonic()
    try:
        vm = factory.launch(kind="vm", image="debian/12", init="agent", boot_timeout=600)
        took = time.monotonic() - started
        assert vm.exec(["true"]).ok
        chosen = vm.machine.accel.name  # type: ignore[attr-defined]
        log = vm.logs()
    finally:
        factory.close()
        verdict = accel.cached_verdict(settings.cache_dir)
        _clear(settings)
    assert verdict is not None
    if chosen == "kvm":  # KVM runs Linux guests on this host: nothing to fall back from
        assert verdict.works
        return
    # the stop was noticed when it happened, not at boot_timeout
    assert took < 120, f"{took:.0f}s to a ready VM"
    assert not verdict.works and verdict.source == "guest", verdict
    assert "KVM internal error" in verdict.detail
    said = [m for m in messages if "KVM stopped a Linux guest" in m]
    assert len(said) == 1, messages
    assert "pytest-incus: KVM stopped this guest" in log


def test_forced_kvm_that_stops_the_guest_is_a_clear_error(settings: Settings, token: str) -> None:
    _pretend_probe_passed(settings)
    forced = Settings(cache_dir=settings.cache_dir, accel="kvm")
    factory = InstanceFactory(forced, ImageStore(forced))
    name = f"vm-forced-{token}"
    started = time.monotonic()
    try:
        try:
            vm = factory.launch(
                kind="vm", image="debian/12", init="agent", name=name, boot_timeout=300
            )
        except InstanceStartError as exc:
            error: InstanceStartError | None = exc
        else:
            error = None
            assert vm.exec(["true"]).ok
    finally:
        factory.close()
        _clear(settings)
    if error is None:
        pytest.skip("KVM runs Linux guests on this host")
    assert time.monotonic() - started < 150, "the stop must be noticed before boot_timeout"
    message = str(error)
    assert "--incus-accel=kvm was asked, but KVM stopped the guest" in message, message
    assert "KVM internal error" in message and "--incus-accel=auto" in message
    assert_nothing_left(settings, name)
