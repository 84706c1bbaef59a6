"""Derived images through the store and the factory: ``packages=`` on ``launch()``,
``image_store.derive`` with commands and files, its ``ref`` as ``image=``, a VM of a derived
image, a derived ``images:`` image, and the errors; each built once."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from simplestreams_helpers import SCRATCH_ROOT, ImageServer, build_tree, make_image

from pytest_incus import InstanceFactory, fsutil, registry
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings


def _builds(store: ImageStore, key: str) -> int:
    return len([b for b in store.builds() if b["key"] == key])


@pytest.fixture
def token() -> str:
    """Makes a recipe of this test's own, so that it is really built (and then pruned)."""
    return secrets.token_hex(4)


@pytest.fixture
def pruned(instance_factory: InstanceFactory) -> Iterator[list[str]]:
    """Refs to prune from the shared cache after the test (entries of one-off recipes)."""
    refs: list[str] = []
    yield refs
    for ref in refs:
        instance_factory.images.prune(ref)


def test_packages_on_launch_build_once_and_run(
    instance_factory: InstanceFactory, token: str, pruned: list[str]
) -> None:
    store = instance_factory.images
    options = {"packages": ["hello"], "kind": "container", "image": "debian/12"}
    image = store.derive("debian/12", packages=["hello"], files={"/etc/pti-token": token})
    pruned.append(image.ref)
    assert _builds(store, image.key) == 1
    instance = instance_factory.launch(**options)  # type: ignore[arg-type]
    assert instance.image == "debian/12"  # the user's name; the derived image underneath
    assert instance.exec(["hello"]).stdout == "Hello, world!\n"
    assert instance.exec("dpkg-query -W -f '${Status}' hello").stdout == "install ok installed"
    record = registry.read_record(instance.directory)
    assert record is not None and record.image.startswith("derived:")
    instance.delete()
    # the same recipe on the same base: the same entry, not built again
    again = ImageStore(store.settings).derive(
        "debian/12", packages=["hello"], files={"/etc/pti-token": token}
    )
    assert again == image and _builds(store, image.key) == 1
    on_ref = instance_factory.launch(image=image.ref)
    assert on_ref.read_text("/etc/pti-token") == token
    assert on_ref.exec(["hello"]).ok
    on_ref.delete()


def test_run_commands_and_files_in_order(
    instance_factory: InstanceFactory, token: str, pruned: list[str]
) -> None:
    image = instance_factory.images.derive(
        "debian/12",
        run=["echo first > /etc/pti-order", "echo second >> /etc/pti-order"],
        files={"/etc/pti-order.d/token": token, "/usr/local/bin/pti-hi": "#!/bin/sh\necho hi\n"},
    )
    pruned.append(image.ref)
    instance = instance_factory.launch(image=image.ref)
    assert instance.read_text("/etc/pti-order") == "first\nsecond\n"
    assert instance.read_text("/etc/pti-order.d/token") == token
    info = instance.file("/usr/local/bin/pti-hi")
    assert (info.mode, info.uid) == (0o644, 0)  # files= are data; run= makes them executable
    assert not instance.file("/usr/sbin/policy-rc.d").exists  # the build's, gone
    instance.delete()


def test_a_missing_package_is_an_image_error_with_apt_output(
    instance_factory: InstanceFactory, token: str
) -> None:
    store = instance_factory.images

    def failed_ones() -> list[str]:
        """The cached derived images of the two failing recipes below (other tests, on
        other workers, may cache and build derived images of their own meanwhile)."""
        found = []
        for entry in store.list():
            if entry.ref.startswith("derived:"):
                recipe = store.settings.cache_dir / "recipes" / f"{entry.ref.split(':')[1]}.json"
                text = recipe.read_text() if recipe.exists() else ""
                if "no-such-package-pti" in text or token in text:
                    found.append(entry.key)
        return found

    with pytest.raises(ImageError, match="Unable to locate package no-such-package-pti"):
        instance_factory.launch(image="debian/12", packages=["no-such-package-pti", "hello"])
    with pytest.raises(ImageError, match=r"exit code 3|exit 3|exited 3"):
        store.derive("debian/12", run=[f"echo {token}; exit 3"])
    assert failed_ones() == []  # nothing cached
    # and no build directory left by this process's builds (<key>.<builder's pid>.<n>)
    assert not list(store.settings.staging_dir.glob(f"derived-*.{os.getpid()}.*"))


def test_a_vm_of_a_derived_image(
    instance_factory: InstanceFactory, token: str, pruned: list[str]
) -> None:
    image = instance_factory.images.derive(
        "debian/12", packages=["hello"], files={"/etc/pti-token": token}, kind="vm"
    )
    pruned.append(image.ref)
    assert image.kind == "vm" and image.kernel_release
    vm = instance_factory.launch(kind="vm", image=image.ref, init="agent")
    assert vm.exec(["hello"]).stdout == "Hello, world!\n"
    assert vm.read_text("/etc/pti-token") == token
    vm.delete()


def test_a_derived_images_image(scratch_cache: Path) -> None:
    work = SCRATCH_ROOT / f"ss-derived-{secrets.token_hex(4)}"
    try:
        build_tree(work / "tree", [make_image(work, os="ptios", release="1")])
        with ImageServer(work / "tree") as server:
            settings = Settings(cache_dir=scratch_cache, image_server=server.url)
            factory = InstanceFactory(settings, ImageStore(settings))
            try:
                # busybox has no package manager: commands and files still work
                image = factory.images.derive(
                    "images:ptios/1", run=["echo built > /etc/pti-built"], files={"/x": "y"}
                )
                instance = factory.launch(image=image.ref)
                assert instance.read_text("/etc/pti-built") == "built\n"
                assert instance.read_text("/x") == "y"
                with pytest.raises(ImageError, match="package manager"):
                    factory.images.derive("images:ptios/1", packages=["hello"])
                base = factory.launch(image="images:ptios/1")
                assert not base.file("/etc/pti-built").exists
                # the base's alias was resolved once, for the derived images and itself
                assert len(server.gets("index.json")) == 1
            finally:
                factory.close()
    finally:
        fsutil.remove_tree(work)


def test_mistakes_are_config_errors(instance_factory: InstanceFactory) -> None:
    with pytest.raises(ConfigError, match=r"packages=.nginx. has the wrong type"):
        instance_factory.launch(image="debian/12", packages="nginx")
    with pytest.raises(ConfigError, match="does not apply to kind='app'"):
        instance_factory.launch(kind="app", image="docker://x/y:1", packages=["nginx"])
    with pytest.raises(ConfigError, match="a VM needs an image with a kernel"):
        instance_factory.images.derive("busybox", packages=["x"], kind="vm")
    with pytest.raises(ConfigError, match="derived:<16 hex digits>"):
        instance_factory.launch(image="derived:xyz:debian/12")
