"""Instance names are unique on the host, whatever the cache directory: a second run asking
for a name that a live run holds gets a clear error at launch, at once, and never touches the
first one's instance or cgroups; an orphan's name can be taken over, and then each of the two
containers keeps cgroups of its own."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftover_helpers import assert_nothing_left, assert_run_left_nothing, lxc_monitors
from plugin_helpers import InnerInstances, InnerRun, cache_args, hold_module

from pytest_incus import ConfigError, ImageStore, InstanceFactory, fsutil, registry
from pytest_incus.runtimes import cgroups
from pytest_incus.settings import Settings

SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")


CLASH_MODULE = """
import pytest

@pytest.mark.instance(kind="container", image="busybox", name="{name}")
def test_same_name(instance):
    pass
"""


@pytest.fixture
def other_cache() -> Iterator[Path]:
    """A second empty cache directory (besides ``scratch_cache``), removed afterwards."""
    path = SCRATCH_ROOT / secrets.token_hex(4)
    path.mkdir(parents=True)
    yield path
    fsutil.remove_tree(path)


@pytest.fixture
def name() -> str:
    """An instance name of this test's own."""
    return f"x-{secrets.token_hex(4)}"


@pytest.fixture
def held(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances, name: str
) -> Iterator[InnerRun]:
    """A run on ``scratch_cache`` holding a container named ``name``."""
    inner_instances.caches.add(scratch_cache)
    pytester.makepyfile(test_hold=hold_module(f'name="{name}"'))
    run = InnerRun(pytester.path, scratch_cache, "test_hold.py")
    try:
        run.wait_for("ready", deadline=60)
        yield run
    finally:
        run.stop()
        registry.reap(Settings(cache_dir=scratch_cache))


def own_cgroups(name: str) -> set[Path]:
    """The cgroups on this host named after container ``name``, of any cache directory."""
    return {p for h in cgroups.hierarchies() for p in h.mount.glob(f"{cgroups.PREFIX}{name}.*")}


def test_a_name_a_live_run_holds_is_refused_at_launch(
    held: InnerRun,
    pytester: pytest.Pytester,
    scratch_cache: Path,
    other_cache: Path,
    name: str,
) -> None:
    first = Settings(cache_dir=scratch_cache)
    before = own_cgroups(name)
    assert before, "the held container has cgroups"
    monitors = lxc_monitors(name)
    assert len(monitors) == 1

    # another run, on another cache, asks for the same name
    pytester.makepyfile(test_clash=CLASH_MODULE.format(name=name))
    result = pytester.runpytest_subprocess(*cache_args(other_cache), "test_clash.py", timeout=120)
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    for said in (
        f"an instance named '{name}' already exists on this host",
        f"cache directory {scratch_cache}",
        f"launched by pid {held.proc.pid}",
        f"pytest-incus --cache-dir {scratch_cache} rm {name}",
    ):
        assert said in output, output

    # and from this process: refused at once, before anything is built or made
    second = Settings(cache_dir=other_cache)
    factory = InstanceFactory(second, ImageStore(second))
    started = time.monotonic()
    with pytest.raises(ConfigError, match="already exists on this host"):
        factory.launch(kind="container", image="busybox", name=name)
    refused_in = time.monotonic() - started
    factory.close()
    assert refused_in < 1.0, refused_in
    assert not (second.instances_dir / name).exists()

    # the first run's instance and cgroups are untouched
    assert own_cgroups(name) == before
    assert lxc_monitors(name) == monitors
    (pytester.path / "release").write_text("")
    assert held.wait() == 0, held.output()
    assert_run_left_nothing(first, [name])
    assert_nothing_left(second, name)
    print(f"same name from another cache refused in {refused_in * 1000:.0f} ms")


def test_the_name_of_an_orphan_is_taken_over_without_touching_its_cgroups(
    held: InnerRun, scratch_cache: Path, other_cache: Path, name: str
) -> None:
    first = Settings(cache_dir=scratch_cache)
    held.proc.send_signal(signal.SIGKILL)  # its container keeps running, owned by nobody
    held.proc.wait(timeout=30)
    orphaned = own_cgroups(name)
    assert orphaned and len(lxc_monitors(name)) == 1

    second = Settings(cache_dir=other_cache)
    factory = InstanceFactory(second, ImageStore(second))
    try:
        inst = factory.launch(kind="container", image="busybox", name=name)
        assert inst.exec("hostname").stdout == f"{name}\n"
        mine = own_cgroups(name) - orphaned
        assert mine and not mine & orphaned
        started = time.monotonic()
        inst.delete()
        deleted_in = time.monotonic() - started
    finally:
        factory.close()
    # the delete neither waited on nor removed the orphan's cgroups
    assert deleted_in < 2.0, deleted_in
    assert own_cgroups(name) == orphaned
    assert len(lxc_monitors(name)) == 1
    assert_nothing_left(second, name)

    assert registry.reap(first) == [name]
    assert_run_left_nothing(first, [name])
    assert own_cgroups(name) == set()
    print(f"delete next to an orphan of the same name: {deleted_in:.2f}s")


def test_a_name_is_free_again_once_its_instance_is_deleted(
    instance_factory: InstanceFactory, settings: Settings, name: str
) -> None:
    first = instance_factory.launch(kind="container", image="busybox", name=name)
    with pytest.raises(ConfigError, match=r"\(this process\)"):
        instance_factory.launch(kind="container", image="busybox", name=name)
    first.delete()
    second = instance_factory.launch(kind="container", image="busybox", name=name)
    second.delete()
    assert_nothing_left(settings, name)
