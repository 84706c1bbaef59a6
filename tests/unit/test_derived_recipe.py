"""Derived images without instances (images/derived.py): the recipe's checks and digest, the
package managers found in fake rootfs trees and their commands, the planned steps (mirror,
proxy, services), and files written into a tree with the image's symlinks."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images import derived
from pytest_incus.images.derived import Recipe
from pytest_incus.settings import DEFAULT_MIRROR

# -- the recipe ------------------------------------------------------------------------------


def test_make_sorts_packages_keeps_run_order_and_sorts_files() -> None:
    recipe = Recipe.make(
        ["nginx", "curl", "nginx"], ["b", "a"], {"/z": "z", "/etc//a.conf": b"\x00a"}
    )
    assert recipe.packages == ("curl", "nginx")
    assert recipe.run == ("b", "a")
    assert recipe.files == (("/etc/a.conf", b"\x00a"), ("/z", b"z"))
    assert not Recipe.make() and recipe


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"packages": "nginx"}, "a str alone is not a list"),
        ({"packages": ["ng inx"]}, "not a package name"),
        ({"packages": ["-y"]}, "starting with '-'"),
        ({"packages": [""]}, "not a package name"),
        ({"packages": [3]}, "3 is not a str"),
        ({"run": "make install"}, "a str alone is not a list"),
        ({"run": [["ls"]]}, "is not a str"),
        ({"run": ["  "]}, "an empty command"),
        ({"files": ["/etc/x"]}, "give a dict"),
        ({"files": {"etc/x": ""}}, "must be an absolute path"),
        ({"files": {Path("/etc/x"): ""}}, "must be an absolute path"),
        ({"files": {"/": ""}}, "root directory"),
        ({"files": {"/etc/x": 1}}, "is of type int; give bytes or a str"),
        ({"files": {"/etc/x": "", "/etc//x": ""}}, "names '/etc/x' again"),
    ],
)
def test_make_rejects_what_cannot_work(arguments: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Recipe.make(**arguments)  # type: ignore[arg-type]
    assert words in str(caught.value)


def test_the_digest_is_of_the_content_not_of_how_it_was_given() -> None:
    one = Recipe.make(["b", "a"], ["x"], {"/f": "data", "/e": b"e"})
    two = Recipe.make(("a", "b", "a"), ("x",), {"/e": "e", "/f": b"data"})
    assert one == two and one.digest() == two.digest()
    assert Recipe.make(["a"], ["x", "y"]).digest() != Recipe.make(["a"], ["y", "x"]).digest()
    assert Recipe.make(files={"/f": "1"}).digest() != Recipe.make(files={"/f": "2"}).digest()
    assert Recipe.make(["a"]).digest() != Recipe.make(run=["a"]).digest()


def test_the_digest_is_stable_across_versions() -> None:
    # the canonical form keys cache entries: changing it rebuilds every derived image
    recipe = Recipe.make(["hello"], ["echo hi"], {"/etc/x": "x\n"})
    assert recipe.digest() == "e048340d84dac0e68680c2b85ba663f78e63988d55713f8a8b0beedf1ec0284c"


def test_json_round_trip() -> None:
    recipe = Recipe.make(["hello"], ["echo hi"], {"/bin/blob": bytes(range(256))})
    data = recipe.to_json()
    assert data["files"] == {"/bin/blob": data["files"]["/bin/blob"]}
    assert isinstance(data["files"]["/bin/blob"], str)
    assert Recipe.from_json(data) == recipe
    for broken in ({}, {"packages": [], "run": [], "files": {"/x": "!!"}}, []):
        with pytest.raises(ConfigError, match="not a derived image recipe"):
            Recipe.from_json(broken)


# -- package managers ------------------------------------------------------------------------


def _program(rootfs: Path, path: str, mode: int = 0o755) -> None:
    target = rootfs / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\n")
    target.chmod(mode)


@pytest.mark.parametrize("manager", derived.MANAGERS, ids=lambda m: m.name)
def test_each_manager_is_found_by_its_program(
    tmp_path: Path, manager: derived.PackageManager
) -> None:
    _program(tmp_path, manager.program)
    assert derived.detect(tmp_path) is manager


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"bin/apt-get": None}, "apt"),  # not merged /usr: /bin besides /usr/bin
        ({"usr/sbin/apk": None}, "apk"),  # /usr/sbin besides /sbin
        ({"usr/bin/zypper": None, "bin": "usr/bin"}, "zypper"),  # merged /usr, relative link
        ({"usr/bin/dnf": None, "bin": "/usr/bin"}, "dnf"),  # an absolute link, inside
    ],
)
def test_managers_are_found_where_distributions_put_them(
    tmp_path: Path, layout: dict[str, str | None], expected: str
) -> None:
    for path, link in layout.items():
        if link is None:
            _program(tmp_path, path)
        else:
            (tmp_path / path).symlink_to(link)
    assert derived.detect(tmp_path).name == expected


def test_detection_looks_inside_the_rootfs_only(tmp_path: Path) -> None:
    # this host has /usr/bin/apt-get: links to it lead into the tree, where there is none
    assert os.path.exists("/usr/bin/apt-get")
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/apt-get").symlink_to("/usr/bin/apt-get")
    (tmp_path / "sbin").symlink_to("/")  # /sbin/apk -> /apk: not the host's
    _program(tmp_path, "/usr/bin/pacman", mode=0o644)  # not executable: not a program
    with pytest.raises(ImageError) as caught:
        derived.detect(tmp_path)
    assert derived.find(tmp_path) is None
    message = str(caught.value)
    assert all(m.name in message for m in derived.MANAGERS) and "run=[...]" in message


def test_install_commands_quote_the_names() -> None:
    names = ["hello", "a;rm"]  # no spaces, so a valid recipe, but not a shell word
    assert derived.APT.install_command(names) == (
        "apt-get install -y --no-install-recommends hello 'a;rm'"
    )
    for manager in derived.MANAGERS:
        words = shlex.split(manager.install_command(names))
        assert words[-2:] == names and words[0] == manager.program.rsplit("/", 1)[1]
        assert manager.clean
    assert derived.APT.env == {"DEBIAN_FRONTEND": "noninteractive"}
    assert "rm -rf /var/lib/apt/lists/*" in derived.APT.clean
    assert derived.APT.update == "apt-get update"


# -- planning --------------------------------------------------------------------------------


def _debian(rootfs: Path, sources: str) -> Path:
    _program(rootfs, "/usr/bin/apt-get")
    (rootfs / "etc/apt/sources.list.d").mkdir(parents=True)
    (rootfs / "etc/apt/sources.list").write_text(sources)
    (rootfs / "etc/apt/sources.list.d/extra.sources").write_text(f"URIs: {DEFAULT_MIRROR}\n")
    (rootfs / "etc/apt/sources.list.d/notes.txt").write_text("not a source\n")
    return rootfs


def test_the_plan_of_an_apt_image(tmp_path: Path) -> None:
    rootfs = _debian(tmp_path, f"deb {DEFAULT_MIRROR} bookworm main\n")
    recipe = Recipe.make(["hello"], ["hello > /root/out"])
    environ = {"HTTP_PROXY": "http://127.0.0.1:3142", "no_proxy": "localhost", "HOME": "/x"}
    steps = derived.plan(derived.APT, recipe, rootfs, mirror=DEFAULT_MIRROR, environ=environ)
    commands = [step.command for step in steps]
    assert derived.POLICY_RC_D in commands[0] and "exit 101" in commands[0]
    assert commands[1:5] == [
        "apt-get update",
        "apt-get install -y --no-install-recommends hello",
        derived.APT.clean,
        "hello > /root/out",
    ]
    assert derived.POLICY_RC_D in commands[5] and derived.SCRATCH in commands[5]
    env = steps[2].env
    assert env["DEBIAN_FRONTEND"] == "noninteractive" and env["LC_ALL"] == "C"
    assert env["http_proxy"] == env["HTTP_PROXY"] == "http://127.0.0.1:3142"
    assert env["no_proxy"] == env["NO_PROXY"] == "localhost"
    assert env["HOME"] == "/root" and "https_proxy" not in env
    assert all(step.timeout == derived.STEP_TIMEOUT for step in steps)


def test_another_mirror_is_used_for_the_build_only(tmp_path: Path) -> None:
    rootfs = _debian(tmp_path, f"deb {DEFAULT_MIRROR} bookworm main\n")
    mirror = "http://127.0.0.1:3142/debian/"
    steps = derived.plan(derived.APT, Recipe.make(["hello"]), rootfs, mirror=mirror, environ={})
    assert steps[1].what == f"using the mirror {mirror}"
    options = derived.apt_mirror_options(rootfs, mirror)
    assert options and f"{derived.SCRATCH}/apt/sources.list" in options
    assert steps[2].command == f"apt-get {options} update"
    assert steps[3].command.startswith(f"apt-get {options} install -y")
    # the copies are made in the scratch directory, which the last step removes
    setup = steps[1].command
    assert "/etc/apt/sources.list.d/extra.sources" in setup and "notes.txt" not in setup
    assert f"rm -rf {derived.SCRATCH}" in steps[-1].command


def test_the_mirror_is_left_alone_where_the_image_does_not_name_the_default(
    tmp_path: Path,
) -> None:
    rootfs = tmp_path / "own"
    _program(rootfs, "/usr/bin/apt-get")
    (rootfs / "etc/apt").mkdir(parents=True)
    (rootfs / "etc/apt/sources.list").write_text(
        "deb http://archive.ubuntu.com/ubuntu noble main\n"
    )
    assert derived.apt_mirror_options(rootfs, "http://127.0.0.1/debian") == ""
    debian = _debian(tmp_path / "debian", f"deb {DEFAULT_MIRROR} bookworm main\n")
    assert derived.apt_mirror_options(debian, DEFAULT_MIRROR + "/") == ""


def test_the_mirror_replacement_keeps_other_archives(tmp_path: Path) -> None:
    sources = (
        f"deb {DEFAULT_MIRROR} bookworm main\n"
        f"deb {DEFAULT_MIRROR}-security bookworm-security main\n"
        f"URIs: {DEFAULT_MIRROR}/\n"
        f"deb\t{DEFAULT_MIRROR}\tbookworm-updates main\n"
    )
    rootfs = _debian(tmp_path, sources)
    setup = derived.apt_mirror_setup(rootfs, "http://m.example:3142/a&b/")
    sed = next(part for part in setup.split(" && ") if part.startswith("sed "))
    words = shlex.split(sed)
    out = subprocess.run(
        [*words[:4], str(rootfs / "etc/apt/sources.list")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == (
        "deb http://m.example:3142/a&b bookworm main\n"
        f"deb {DEFAULT_MIRROR}-security bookworm-security main\n"
        "URIs: http://m.example:3142/a&b/\n"
        "deb\thttp://m.example:3142/a&b\tbookworm-updates main\n"
    )


def test_a_recipe_without_packages_needs_no_package_manager(tmp_path: Path) -> None:
    steps = derived.plan(None, Recipe.make(run=["true"]), tmp_path, mirror="x", environ={})
    assert [step.command for step in steps][1] == "true" and len(steps) == 3
    assert "DEBIAN_FRONTEND" not in steps[1].env
    with pytest.raises(ImageError, match="no package manager"):
        derived.plan(None, Recipe.make(["hello"]), tmp_path, mirror="x", environ={})


# -- files -----------------------------------------------------------------------------------


def test_files_are_written_with_parents_mode_and_owner(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a strict umask must not change the modes
    try:
        derived.write_file(tmp_path, "/srv/app/conf/app.ini", b"x=1\n")
    finally:
        os.umask(old)
    written = tmp_path / "srv/app/conf/app.ini"
    assert written.read_bytes() == b"x=1\n"
    assert written.stat().st_mode & 0o7777 == 0o644 and written.stat().st_uid == 0
    assert (tmp_path / "srv/app").stat().st_mode & 0o7777 == 0o755
    derived.write_file(tmp_path, "/srv/app/conf/app.ini", b"2")  # replaced
    assert written.read_bytes() == b"2"


def test_files_follow_the_image_s_symlinks_inside_it(tmp_path: Path) -> None:
    (tmp_path / "data/etc").mkdir(parents=True)
    (tmp_path / "etc").symlink_to("/data/etc")  # absolute: the image's /data, not the host's
    (tmp_path / "data/etc/target").write_text("old")
    (tmp_path / "data/etc/link").symlink_to("/data/etc/target")
    derived.write_file(tmp_path, "/etc/new.conf", b"new")
    derived.write_file(tmp_path, "/etc/link", b"through")
    assert (tmp_path / "data/etc/new.conf").read_text() == "new"
    assert (tmp_path / "data/etc/target").read_text() == "through"
    assert (tmp_path / "data/etc/link").is_symlink()


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/dangling/x", "/dangling is a symlink in the image that leads nowhere"),
        ("/file/x", "/file is not a directory"),
        ("/gone", "it is a symlink in the image that leads nowhere"),
        ("/dir", "it is a directory"),
    ],
)
def test_files_that_cannot_be_written(tmp_path: Path, path: str, words: str) -> None:
    (tmp_path / "dangling").symlink_to("/nowhere")
    (tmp_path / "gone").symlink_to("nowhere")
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ImageError) as caught:
        derived.write_file(tmp_path, path, b"")
    assert words in str(caught.value)
