"""A container's overlay root behaves like a filesystem: directories of the image can be removed
and made again (whiteouts and opaque directories), so a package can be removed, purged and
installed again, unprivileged as privileged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_incus import Instance, InstanceFactory

PACKAGE = "pti-hello"


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
@pytest.mark.parametrize("image", ["debian/12", "busybox"])
def test_directories_of_the_image_can_be_removed_and_made_again(
    instance_factory: InstanceFactory, image: str, privileged: bool
) -> None:
    inst = instance_factory.launch(image=image, privileged=privileged)
    try:
        # an empty directory of the image (a whiteout, then a directory over it)
        base = "/usr/local/bin" if image == "debian/12" else "/home"
        assert inst.file(base).is_dir
        r = inst.exec(f"rmdir {base} && test ! -e {base} && mkdir {base}")
        assert r.ok, r
        assert inst.file(base).is_dir
        assert inst.exec(f"ls -A {base}").stdout == ""
        # a full directory of the image: removed, made again empty (an opaque directory, so
        # nothing of the image's comes back), and filled
        full = "/usr/share/doc/apt" if image == "debian/12" else "/usr/sbin"
        assert inst.exec(f"ls -A {full}").stdout != ""
        r = inst.exec(f"rm -rf {full} && test ! -e {full} && mkdir {full}")
        assert r.ok, r
        assert inst.exec(f"ls -A {full}").stdout == ""
        inst.write_file(f"{full}/new", "new\n")
        assert inst.exec(f"ls -A {full}").stdout == "new\n"
    finally:
        inst.delete()


def build_deb(directory: Path, version: str = "1.0") -> Path:
    """A real .deb, built on the host with dpkg-deb: a program in /usr/local/bin and a manual
    page directory under /usr/local (directories of the image that no package of it owns, so
    removing the package removes them), its doc directory, and a conffile (what purge removes)."""
    root = directory / f"{PACKAGE}_{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: pytest-incus tests <tests@example.invalid>\n"
        "Description: a package that pytest-incus removes and installs again\n"
    )
    (root / "DEBIAN" / "conffiles").write_text(f"/etc/{PACKAGE}.conf\n")
    program = root / "usr" / "local" / "bin" / PACKAGE
    program.parent.mkdir(parents=True)
    program.write_text(f"#!/bin/sh\necho hello from {PACKAGE} {version}\n")
    program.chmod(0o755)
    share = root / "usr" / "local" / "share" / PACKAGE
    share.mkdir(parents=True)
    (share / "data").write_text("data\n")
    doc = root / "usr" / "share" / "doc" / PACKAGE
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("public domain\n")
    (root / "etc").mkdir()
    (root / "etc" / f"{PACKAGE}.conf").write_text("greeting=hello\n")
    deb = directory / f"{PACKAGE}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def dpkg(instance: Instance, *args: str) -> None:
    """Run dpkg inside and fail with its output unless it succeeds."""
    r = instance.exec(["dpkg", *args], timeout=120)
    assert r.ok, f"dpkg {' '.join(args)}: exit {r.exit_code}\n{r.stdout}{r.stderr}"


def assert_installed(instance: Instance) -> None:
    """The package's files are there and its program runs."""
    assert instance.exec([PACKAGE]).stdout == f"hello from {PACKAGE} 1.0\n"
    assert instance.read_text(f"/usr/local/share/{PACKAGE}/data") == "data\n"
    assert instance.read_text(f"/usr/share/doc/{PACKAGE}/copyright") == "public domain\n"
    assert instance.read_text(f"/etc/{PACKAGE}.conf") == "greeting=hello\n"
    status = instance.exec(["dpkg-query", "-W", "-f=${Status}", PACKAGE]).stdout
    assert status == "install ok installed"


@pytest.mark.instance(image="debian/12")
def test_deb_install_remove_purge_reinstall(instance: Instance, host_dir: Path) -> None:
    deb = build_deb(host_dir)
    instance.push(deb, f"/root/{deb.name}")
    package = f"/root/{deb.name}"

    dpkg(instance, "-i", package)
    assert_installed(instance)

    dpkg(instance, "-r", PACKAGE)
    assert not instance.file(f"/usr/local/bin/{PACKAGE}").exists
    assert not instance.file(f"/usr/share/doc/{PACKAGE}").exists
    # removed, not purged: the conffile stays
    assert instance.read_text(f"/etc/{PACKAGE}.conf") == "greeting=hello\n"
    status = instance.exec(["dpkg-query", "-W", "-f=${Status}", PACKAGE]).stdout
    assert status == "deinstall ok config-files"

    dpkg(instance, "-i", package)
    assert_installed(instance)

    dpkg(instance, "-P", PACKAGE)
    for gone in (f"/usr/local/bin/{PACKAGE}", f"/usr/share/doc/{PACKAGE}", f"/etc/{PACKAGE}.conf"):
        assert not instance.file(gone).exists, gone
    r = instance.exec(["dpkg-query", "-W", PACKAGE])
    assert r.exit_code != 0 and "no packages found" in r.stderr, r

    dpkg(instance, "-i", package)
    assert_installed(instance)
    # and the directories the removals took away are ordinary directories again
    assert instance.exec("ls -A /usr/local/bin").stdout == f"{PACKAGE}\n"
