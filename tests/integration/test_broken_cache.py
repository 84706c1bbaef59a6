"""A cache that cannot work says why and what to do, instead of liblxc's words: a damaged image,
and a cache directory that an unprivileged container's root cannot reach."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left

from pytest_incus import ConfigError, InstanceFactory, InstanceStartError
from pytest_incus.images import busybox
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings


@pytest.fixture
def own_factory(scratch_cache: Path) -> Iterator[InstanceFactory]:
    """A factory on an empty cache of this test's own."""
    settings = Settings(cache_dir=scratch_cache)
    factory = InstanceFactory(settings, ImageStore(settings))
    yield factory
    factory.close()


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_a_truncated_init_says_the_cached_image_is_corrupt_and_how_to_rebuild(
    own_factory: InstanceFactory, host_dir: Path, privileged: bool
) -> None:
    source = host_dir / "rootfs"
    source.mkdir()
    busybox.build(source)
    image = own_factory.images.get(str(source))
    # what a copy cut short by a full disk leaves: the start of the file only
    program = image.rootfs / "bin" / "busybox"
    program.write_bytes(program.read_bytes()[:100_000])
    with pytest.raises(InstanceStartError) as info:
        own_factory.launch(image=str(source), privileged=privileged, name="pti-truncated")
    message = str(info.value)
    assert "the cached image" in message and "looks corrupt" in message
    assert re.search(r"/sbin/init \(/bin/busybox\) is truncated \(100000 bytes", message)
    cache = own_factory.settings.cache_dir
    assert f"pytest-incus --cache-dir {cache} images prune {source}" in message
    assert_nothing_left(own_factory.settings, "pti-truncated")
    # and the command it names does rebuild it
    assert own_factory.images.prune(str(source))
    inst = own_factory.launch(image=str(source), privileged=privileged)
    assert inst.exec("echo ok").stdout == "ok\n"


def test_a_cache_the_container_root_cannot_reach_names_the_directory(host_dir: Path) -> None:
    locked = host_dir / "locked"
    locked.mkdir(mode=0o700)
    settings = Settings(cache_dir=locked / "cache")
    factory = InstanceFactory(settings, ImageStore(settings))
    try:
        with pytest.raises(ConfigError) as info:
            factory.launch(image="busybox", name="pti-unreachable")
        message = str(info.value)
        assert f"cannot enter {locked} (mode 700, owner uid 0)" in message
        assert "--incus-cache-dir" in message and f"chmod o+x {locked}" in message
        assert_nothing_left(settings, "pti-unreachable")
        # privileged containers run as the host's root: they reach it
        inst = factory.launch(image="busybox", privileged=True)
        assert inst.exec("echo ok").stdout == "ok\n"
    finally:
        factory.close()
