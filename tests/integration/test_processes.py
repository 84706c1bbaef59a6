"""The process limit of containers and apps (``processes``, ini ``incus_max_processes``): set
in the container's pids cgroup, read back from the host; a fork bomb stays under it, and the
instance answers afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, wait_until
from registry_helpers import SCRATCH_ROOT, build_image

from pytest_incus import (
    ConfigError,
    ExecTimeoutError,
    IncusError,
    Instance,
    InstanceFactory,
    fsutil,
)
from pytest_incus.images.store import ImageStore
from pytest_incus.runtimes import cgroups, container
from pytest_incus.settings import DEFAULT_MAX_PROCESSES, Settings

BOMB = "f(){ f | f; }; f"
BOMB_LIMIT = 64


def pids_dir(instance: Instance) -> Path:
    """The host side directory of the instance's cgroup in the pids hierarchy."""
    recorded = container.recorded_cgroups(instance.name, instance.directory)
    path = cgroups.payload(recorded, "pids")
    assert path is not None, f"no pids cgroup of {instance.name} under {recorded}"
    return path


def pids_max(instance: Instance) -> int:
    """The process limit of the instance's cgroup, as the host reads it."""
    text = (pids_dir(instance) / "pids.max").read_text().strip()
    assert text != "max", f"{instance.name} has no process limit"
    return int(text)


def _host_process_count() -> int:
    return sum(entry.isdigit() for entry in os.listdir("/proc"))


@dataclass
class BombFigures:
    """What one fork bomb reached."""

    peak: int  # the most processes its cgroup held at once (pids.peak, or sampled)
    refused: int  # forks the limit refused (pids.events "max")
    host_peak: int  # the most host processes counted while it ran, above those before it


def run_bomb(instance: Instance, argv: list[str], timeout: float) -> tuple[BombFigures, object]:
    """Run a fork bomb; only once the host has seen that the instance's cgroup holds it to a
    small limit. Returns what it reached and what exec gave (a result or the exception)."""
    limit = pids_max(instance)
    assert limit <= 256, f"refusing to run a fork bomb under a limit of {limit}"
    directory = pids_dir(instance)
    before = int((directory / "pids.events").read_text().split()[1])
    host_before = _host_process_count()
    sampled, host_peak = [0], [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, ValueError):  # read as the count changed
                sampled[0] = max(sampled[0], int((directory / "pids.current").read_text()))
            host_peak[0] = max(host_peak[0], _host_process_count() - host_before)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outcome: object
    try:
        outcome = instance.exec(argv, timeout=timeout)
    except IncusError as exc:
        outcome = exc
    finally:
        done.set()
        sampler.join()
    peak_file = directory / "pids.peak"  # kernels since 6.13 keep it; else what we sampled
    peak = max(sampled[0], int(peak_file.read_text()) if peak_file.exists() else 0)
    refused = int((directory / "pids.events").read_text().split()[1]) - before
    return BombFigures(peak, refused, host_peak[0]), outcome


@pytest.mark.local_only(
    reason="reads the limit back from the container's pids cgroup on this host, as liblxc made it (the incus backend sets Incus's limits.processes, which the incus tests check)"
)
@pytest.mark.instance(image="busybox")
def test_the_default_limit_is_applied(instance: Instance, settings: Settings) -> None:
    assert settings.max_processes == DEFAULT_MAX_PROCESSES
    assert pids_max(instance) == DEFAULT_MAX_PROCESSES
    assert instance.spec.processes == DEFAULT_MAX_PROCESSES


@pytest.mark.local_only(
    reason="reads the limit back from the container's pids cgroup on this host, as liblxc made it (the incus backend sets Incus's limits.processes, which the incus tests check)"
)
@pytest.mark.instance(image="busybox", processes=200)
def test_the_option_overrides_the_default(instance: Instance) -> None:
    assert pids_max(instance) == 200
    # the container sees its own limit in its cgroup tree as well
    inside = instance.exec("cat /sys/fs/cgroup/pids/pids.max || cat /sys/fs/cgroup/pids.max")
    assert inside.stdout.split()[0] == "200", inside


@pytest.mark.local_only(
    reason="reads the limit back from the container's pids cgroup on this host, as liblxc made it (the incus backend sets Incus's limits.processes, which the incus tests check)"
)
def test_launch_takes_the_option(instance_factory: InstanceFactory, settings: Settings) -> None:
    inst = instance_factory.launch(image="busybox", processes=33)
    name = inst.name
    try:
        assert pids_max(inst) == 33
    finally:
        inst.delete()
    assert_nothing_left(settings, name)


@pytest.mark.local_only(
    reason="reads the limit back from the container's pids cgroup on this host, as liblxc made it (the incus backend sets Incus's limits.processes, which the incus tests check)"
)
@pytest.mark.instance(image="debian/12", processes=BOMB_LIMIT, memory="256MiB", cpus=1)
def test_a_fork_bomb_stays_under_the_limit(instance: Instance) -> None:
    # bash retries a refused fork, so its bomb goes on until the exec timeout kills it
    figures, outcome = run_bomb(instance, ["bash", "-c", BOMB], timeout=5)
    print(f"bash fork bomb under processes={BOMB_LIMIT}: {figures}")
    assert isinstance(outcome, ExecTimeoutError), outcome
    assert figures.peak <= BOMB_LIMIT, figures
    assert figures.refused > 0, figures  # it did reach the limit: the limit stopped it
    # the timeout killed the bomb with its descendants: the instance answers again
    assert instance.exec("echo alive", timeout=30).stdout == "alive\n"
    wait_until(
        lambda: int((pids_dir(instance) / "pids.current").read_text()) < 16,
        10,
        "the bomb's processes to be gone",
    )
    r = instance.exec("systemctl is-system-running", timeout=30)
    assert r.stdout.strip() in ("running", "degraded"), r
    # dash gives up at its first refused fork: that bomb ends on its own
    figures, outcome = run_bomb(instance, ["sh", "-c", BOMB], timeout=30)
    print(f"dash fork bomb under processes={BOMB_LIMIT}: {figures}")
    assert not isinstance(outcome, BaseException), outcome
    assert figures.peak <= BOMB_LIMIT, figures
    assert instance.exec("echo alive", timeout=30).stdout == "alive\n"


@pytest.mark.local_only(
    reason="reads the limit back from the container's pids cgroup on this host, as liblxc made it (the incus backend sets Incus's limits.processes, which the incus tests check)"
)
def test_exec_at_the_limit_says_so(instance_factory: InstanceFactory, settings: Settings) -> None:
    inst = instance_factory.launch(image="debian/12", processes=BOMB_LIMIT, memory="256MiB", cpus=1)
    name = inst.name
    try:
        assert pids_max(inst) == BOMB_LIMIT
        directory = pids_dir(inst)
        # a bomb of no exec's: it holds the container at its limit until the container stops
        started = inst.exec(
            f"setsid bash -c '{BOMB}' </dev/null >/dev/null 2>&1 & echo started", timeout=10
        )
        assert started.stdout == "started\n", started
        wait_until(
            lambda: int((directory / "pids.current").read_text()) >= BOMB_LIMIT,
            10,
            "the bomb to reach the limit",
        )
        # the exec server cannot fork the command: an error that says why, not exit 126
        with pytest.raises(IncusError, match=f"process limit of {BOMB_LIMIT}") as info:
            inst.exec("echo hi", timeout=10)
        assert "processes=" in str(info.value) and "incus_max_processes" in str(info.value)
        assert not isinstance(info.value, ExecTimeoutError)
        # nor can liblxc attach a new exec server (after the old one ended): a note says why,
        # and the attach is tried again within the exec's timeout, never past it
        inst.machine._server.close()
        begun = time.monotonic()
        with pytest.raises(IncusError) as info:
            inst.exec("echo hi", timeout=2)
        elapsed = time.monotonic() - begun
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert f"process limit of {BOMB_LIMIT}" in notes, info.value
        assert elapsed < 2 + 3, f"the attach went on past the exec's timeout: {elapsed:.1f}s"
    finally:
        inst.delete()  # stops the container, and the bomb with it
    assert_nothing_left(settings, name)


@pytest.fixture(scope="module")
def busybox_app(image_store: ImageStore) -> Iterator[str]:
    """An OCI busybox image (its reference) whose program waits, to exec in while it runs."""
    work = SCRATCH_ROOT / f"pids-app-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    layout = work / "layout"
    try:
        build_image(
            layout,
            "app",
            config=["--config.cmd=/bin/busybox", "--config.cmd=sleep", "--config.cmd=300"],
        )
        yield f"oci:{layout}:app"
    finally:
        image_store.prune(f"oci:{layout}:app")
        fsutil.remove_tree(work)


@pytest.mark.local_only(
    reason="reads the limit back from the container's pids cgroup on this host, as liblxc made it (the incus backend sets Incus's limits.processes, which the incus tests check)"
)
def test_an_app_has_the_limit_too(
    instance_factory: InstanceFactory, busybox_app: str, settings: Settings
) -> None:
    app = instance_factory.launch(kind="app", image=busybox_app, processes=32)
    name = app.name
    try:
        assert pids_max(app) == 32
        figures, outcome = run_bomb(app, ["/bin/busybox", "sh", "-c", BOMB], timeout=10)
        print(f"busybox sh fork bomb in an app under processes=32: {figures}")
        assert not isinstance(outcome, BaseException), outcome  # ash gives up, as dash does
        assert figures.peak <= 32 and figures.refused > 0, figures
        assert app.exec(["/bin/busybox", "echo", "alive"], timeout=30).stdout == "alive\n"
    finally:
        app.delete()
    assert_nothing_left(settings, name)
    default = instance_factory.launch(kind="app", image=busybox_app)
    try:
        assert pids_max(default) == settings.max_processes
    finally:
        default.delete()


@pytest.mark.parametrize(
    ("kind", "image", "value", "said"),
    [
        ("container", "busybox", 0, "option processes=0 must be at least 1"),
        ("container", "busybox", -5, "option processes=-5 must be at least 1"),
        ("container", "busybox", "64", "option processes='64' has the wrong type"),
        ("container", "busybox", 1.5, "option processes=1.5 has the wrong type"),
        ("container", "busybox", True, "option processes=True has the wrong type"),
        ("vm", "debian/12", 64, "option processes= does not apply to kind='vm'"),
    ],
)
def test_bad_values_are_config_errors(
    instance_factory: InstanceFactory, kind: str, image: str, value: object, said: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        instance_factory.launch(kind=kind, image=image, processes=value)
