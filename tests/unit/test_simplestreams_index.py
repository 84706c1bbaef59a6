"""Reading simplestreams indexes: which product, version and files an alias names.

The documents are shaped as the public Incus image server's are (comma-separated aliases,
lxd.tar.xz on older images, root.tar.xz beside the squashfs, VM disks), the parts
incus-simplestreams does not write and the integration tests therefore do not see.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_incus.errors import ImageError
from pytest_incus.images.simplestreams import (
    ServerUnreachable,
    host_arch,
    parse_index,
    pick_image,
)

SERVER = "https://images.example.org"


def _item(ftype: str, sha: str, **extra: str) -> dict[str, Any]:
    return {"ftype": ftype, "path": f"images/x/{ftype}", "sha256": sha * 64, "size": 10, **extra}


def _container(meta: str = "incus.tar.xz", fp: str = "f") -> dict[str, Any]:
    return {
        "items": {
            meta: _item(
                meta, "a", combined_squashfs_sha256=fp * 64, combined_rootxz_sha256="e" * 64
            ),
            "root.tar.xz": _item("root.tar.xz", "b"),
            "squashfs": _item("squashfs", "c"),
        }
    }


def _vm(fp: str = "9") -> dict[str, Any]:
    return {
        "items": {
            "incus.tar.xz": _item("incus.tar.xz", "a", **{"combined_disk-kvm-img_sha256": fp * 64}),
            "disk-kvm.img": _item("disk-kvm.img", "d"),
        }
    }


def _product(aliases: str, versions: dict[str, Any], arch: str = "amd64") -> dict[str, Any]:
    return {"aliases": aliases, "arch": arch, "os": "x", "release": "y", "versions": versions}


PRODUCTS = {
    "content_id": "images",
    "datatype": "image-downloads",
    "format": "products:1.0",
    "products": {
        "debian:12:default:amd64": _product(
            "debian/12/default,debian/12,debian/bookworm/default,debian/bookworm",
            {"20251130_05:24": _container(fp="1"), "20251201_05:24": _container(fp="2")},
        ),
        "debian:12:default:arm64": _product(
            "debian/12/default,debian/12", {"20251201_05:24": _container(fp="3")}, arch="arm64"
        ),
        "debian:12:cloud:amd64": _product(
            "debian/12/cloud,debian/bookworm/cloud", {"20251201_05:24": _container(fp="4")}
        ),
        "ubuntu:noble:default:amd64": _product(
            "ubuntu/noble/default,ubuntu/noble,ubuntu/24.04",
            # the newest version is a VM only: the one before is the container image
            {"20251130_07:42": _container(meta="lxd.tar.xz", fp="5"), "20251201_07:42": _vm()},
        ),
        "fedora:41:default:amd64": _product("fedora/41/default,fedora/41", {"20251201": _vm()}),
        "alpine:3.20:default:amd64": _product(
            "alpine/3.20/default,alpine/3.20",
            {
                "20251201_13:00": {
                    "items": {
                        "incus.tar.xz": _item("incus.tar.xz", "a", combined_rootxz_sha256="6" * 64),
                        "root.tar.xz": _item("root.tar.xz", "b"),
                    }
                }
            },
        ),
        "busybox:1.36:default:amd64": _product(
            "busybox/1.36/default", {"202512010000": _container(fp="7")}
        ),
    },
}


def pick(alias: str, arch: str = "amd64", doc: Any = PRODUCTS) -> Any:
    return pick_image(doc, server=SERVER, alias=alias, arch=arch)


def test_index_names_the_products_file() -> None:
    index = {
        "format": "index:1.0",
        "index": {
            "other": {"datatype": "content-download", "path": "streams/v1/other.json"},
            "images": {
                "datatype": "image-downloads",
                "path": "streams/v1/images.json",
                "products": ["debian:12:default:amd64"],
                "format": "products:1.0",
            },
        },
    }
    assert parse_index(index, server=SERVER) == "streams/v1/images.json"


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {},
        {"index": []},
        {"index": {"x": {"datatype": "content-download", "path": "p"}}},
        {"index": {"images": {"datatype": "image-downloads"}}},
    ],
)
def test_an_index_that_is_not_simplestreams(doc: Any) -> None:
    with pytest.raises(ImageError, match=f"{SERVER}: its index is not a simplestreams index"):
        parse_index(doc, server=SERVER)


def test_newest_version_of_the_exact_alias() -> None:
    image = pick("debian/bookworm")
    assert image.product == "debian:12:default:amd64"
    assert image.version == "20251201_05:24"
    assert image.fingerprint == "2" * 64
    assert (image.server, image.alias) == (SERVER, "debian/bookworm")


def test_squashfs_is_preferred_and_its_fingerprint_taken() -> None:
    image = pick("debian/12")
    assert (image.metadata.ftype, image.rootfs.ftype) == ("incus.tar.xz", "squashfs")
    assert image.rootfs.sha256 == "c" * 64
    assert image.rootfs.size == 10


def test_root_tar_xz_when_there_is_no_squashfs() -> None:
    image = pick("alpine/3.20")
    assert image.rootfs.ftype == "root.tar.xz"
    assert image.fingerprint == "6" * 64


def test_release_alias_matches_the_default_variant() -> None:
    assert pick("busybox/1.36").product == "busybox:1.36:default:amd64"
    # an exact alias beats a /default match: debian/bookworm is debian:12:default's own
    assert pick("debian/bookworm").product == "debian:12:default:amd64"
    assert pick("debian/bookworm/cloud").product == "debian:12:cloud:amd64"


def test_aliases_compare_case_insensitively() -> None:
    assert pick(" Debian/12/CLOUD ").product == "debian:12:cloud:amd64"


def test_the_architecture_picks_the_product() -> None:
    assert pick("debian/12", arch="arm64").fingerprint == "3" * 64


def test_older_version_when_the_newest_is_vm_only() -> None:
    image = pick("ubuntu/24.04")
    assert image.version == "20251130_07:42"
    assert image.metadata.ftype == "lxd.tar.xz"
    assert image.fingerprint == "5" * 64


def test_vm_only_image_says_so() -> None:
    with pytest.raises(ImageError, match=r"no container image.*only VM images"):
        pick("fedora/41")


def test_unknown_alias_lists_close_ones() -> None:
    with pytest.raises(ImageError) as info:
        pick("debian/13")
    message = str(info.value)
    assert SERVER in message and "'debian/13'" in message
    assert "debian/12" in message
    assert "fedora" not in message
    assert not isinstance(info.value, ServerUnreachable)


def test_unknown_alias_with_nothing_close() -> None:
    with pytest.raises(ImageError, match="none close"):
        pick("plan9/4")


def test_alias_only_for_another_architecture() -> None:
    with pytest.raises(ImageError, match=r"architecture riscv64.*only for amd64, arm64"):
        pick("debian/12", arch="riscv64")


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"products": []},
        {"products": {"p": "not an object"}},
        {"products": {"p": _product("a/b", "not versions")}},
        {"products": {"p": _product("a/b", {"1": {"no": "items"}})}},
        {
            "products": {
                "p": _product(
                    "a/b",
                    {
                        "1": {
                            "items": {
                                "m": {"ftype": "incus.tar.xz", "combined_squashfs_sha256": "0"},
                                "s": {"ftype": "squashfs"},
                            }
                        }
                    },
                )
            }
        },
    ],
)
def test_products_that_are_not_simplestreams(doc: Any) -> None:
    with pytest.raises(ImageError, match="not a simplestreams index"):
        pick("a/b", doc=doc)


def test_host_arch_is_a_simplestreams_name() -> None:
    assert host_arch() in {"amd64", "arm64", "armhf", "i386", "ppc64el", "s390x", "riscv64"}
