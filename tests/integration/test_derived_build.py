"""Derived images built for real (images/derived.py over runtimes/build.py): a package of the
Debian mirror installed into the shared cache's debian/12, a command run, files written; the
errors of a package that does not exist, a failing command and a step past its deadline; and
after every build, success or not, nothing left of it on the host. The built tree then boots
as an ordinary test instance with no network, and the package runs there."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration_helpers import SCRATCH_ROOT, host_processes, lxc_monitors
from leftover_helpers import mounts_naming

from pytest_incus import InstanceFactory, fsutil
from pytest_incus.errors import ImageError
from pytest_incus.images import derived
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.runtimes import cgroups
from pytest_incus.runtimes.build import ContainerBuilder
from pytest_incus.settings import Settings

SCRATCH = SCRATCH_ROOT / "derived-builds"
PACKAGE = "hello"  # 50 kB, one program, in every Debian release
NAME = re.compile(r"starting the build container (\S+)")


@pytest.fixture(scope="module")
def settings_of_cache(settings: Settings) -> Settings:
    """The run's settings: its shared cache."""
    return settings


@pytest.fixture(scope="module")
def base(settings_of_cache: Settings) -> Image:
    """The shared cache's debian/12 (built there already)."""
    return ImageStore(settings_of_cache).get("debian/12")


@dataclass
class Build:
    """One build into a scratch staging directory, and what it showed."""

    rootfs: Path
    lines: list[str]

    @property
    def work(self) -> Path:
        return self.rootfs.with_name(derived.BUILD_WORK)

    def names(self) -> list[str]:
        """The build containers' names, from the progress lines."""
        return [m[1] for line in self.lines if (m := NAME.search(line))]

    def run(self, base: Image, recipe: derived.Recipe, settings: Settings) -> None:
        derived.build(
            base,
            self.rootfs,
            recipe,
            mirror=settings.mirror,
            progress=self.lines.append,
            builder=ContainerBuilder(settings.cache_dir),
        )


def _scratch() -> Iterator[Build]:
    SCRATCH.mkdir(mode=0o755, parents=True, exist_ok=True)
    SCRATCH.chmod(0o755)  # an unprivileged instance's root reaches the local image below
    staging = SCRATCH / f"derived-{secrets.token_hex(4)}"
    rootfs = staging / "rootfs"
    rootfs.mkdir(parents=True, mode=0o755)
    staging.chmod(0o755)
    yield Build(rootfs, [])
    fsutil.remove_tree(staging)


@pytest.fixture
def build() -> Iterator[Build]:
    """A fresh scratch build, removed afterwards."""
    yield from _scratch()


def assert_build_left_nothing(build: Build) -> None:
    """No build container, monitor, process, mount or cgroup of ``build``, no work dir."""
    names = build.names()
    assert names, f"no build container was started: {build.lines}"
    assert not build.work.exists(), f"work directory left: {list(build.work.iterdir())}"
    assert host_processes(str(build.work)) == []
    assert mounts_naming(build.work) == []
    for name in names:
        assert lxc_monitors(name) == []
        left = cgroups.placements(cgroups.container_dir(name, build.work / name))
        assert [p for p in left if p.exists()] == []


@pytest.fixture(scope="module")
def built(base: Image, settings_of_cache: Settings) -> Iterator[Build]:
    """debian/12 with ``hello``, a command that runs it, and two files: built once."""
    for scratch in _scratch():
        recipe = derived.Recipe.make(
            [PACKAGE],
            ["hello > /root/greeting", "mkdir -p /srv/made && echo made > /srv/made/by-run"],
            {"/etc/pti/app.conf": "answer = 42\n", "/srv/made/blob": bytes(range(256))},
        )
        scratch.run(base, recipe, settings_of_cache)
        yield scratch


def test_the_result_has_the_package_the_command_output_and_the_files(
    built: Build, base: Image
) -> None:
    root = built.rootfs
    status = (root / "var/lib/dpkg/status").read_text()
    assert re.search(rf"^Package: {PACKAGE}\nStatus: install ok installed$", status, re.M)
    assert (root / "usr/bin/hello").is_file()
    assert (root / "root/greeting").read_text() == "Hello, world!\n"
    assert (root / "srv/made/by-run").read_text() == "made\n"
    conf = root / "etc/pti/app.conf"
    assert conf.read_text() == "answer = 42\n"
    assert (root / "srv/made/blob").read_bytes() == bytes(range(256))
    for path in (conf, root / "srv/made/blob"):
        st = path.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0)
    assert (root / "etc/pti").stat().st_mode & 0o7777 == 0o755
    # the base is untouched, and the result is base + changes
    assert not (base.rootfs / "usr/bin/hello").exists()
    assert (root / "usr/bin/apt-get").is_file() and (root / "sbin/init").is_symlink()


def test_the_build_leaves_no_trace_in_the_image(built: Build, base: Image) -> None:
    root = built.rootfs
    # the image's own resolv.conf, not the host's that the build used
    assert (root / "etc/resolv.conf").read_bytes() == (base.rootfs / "etc/resolv.conf").read_bytes()
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert not (root / derived.SCRATCH.lstrip("/")).exists()
    # apt's downloads and indexes are cleaned (the base has lists: removed, not hidden)
    assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
    assert list((root / "var/lib/apt/lists").glob("*_Packages")) == []
    # one progress line per step, in order
    steps = [line for line in built.lines if re.search(r"\[\d+/\d+\]", line)]
    assert len(steps) == 7 and "installing hello" in steps[2], built.lines


def test_a_successful_build_leaves_nothing_on_the_host(built: Build) -> None:
    assert_build_left_nothing(built)


def test_the_result_boots_with_no_network_and_the_package_runs(
    built: Build, instance_factory: InstanceFactory, image_store: ImageStore
) -> None:
    try:
        inst = instance_factory.launch(image=str(built.rootfs), network="none")
        try:
            r = inst.exec("hello")
            assert (r.exit_code, r.stdout) == (0, "Hello, world!\n"), r
            assert inst.read_text("/etc/pti/app.conf") == "answer = 42\n"
            assert inst.exec("ls /sys/class/net").stdout.split() == ["lo"]
        finally:
            inst.delete()
    finally:
        image_store.prune(str(built.rootfs))  # the local image's entries in the shared cache


def test_a_package_that_does_not_exist_is_an_image_error_with_apt_s_words(
    build: Build, base: Image, settings_of_cache: Settings
) -> None:
    recipe = derived.Recipe.make([PACKAGE, "no-such-package-pti"])
    with pytest.raises(ImageError) as caught:
        build.run(base, recipe, settings_of_cache)
    message = str(caught.value)
    assert "Unable to locate package no-such-package-pti" in message
    assert "apt-get install" in message and "exit code 100" in message
    assert_build_left_nothing(build)


def test_a_failing_command_is_an_image_error_with_its_exit_code_and_output(
    build: Build, base: Image, settings_of_cache: Settings
) -> None:
    command = "echo out-$((6 * 7)); echo err-on-stderr >&2; exit 7"
    with pytest.raises(ImageError) as caught:
        build.run(base, derived.Recipe.make(run=["true", command]), settings_of_cache)
    message = str(caught.value)
    assert "run[1]" in message and command in message and "exit code 7" in message
    # stdout and stderr, in their order
    assert re.search(r"out-42\nerr-on-stderr", message), message
    assert_build_left_nothing(build)


def test_a_step_past_its_deadline_is_killed_and_leaves_nothing(
    build: Build, base: Image, settings_of_cache: Settings
) -> None:
    steps = [derived.Step("a step that hangs", "echo started; sleep 600", derived.BASE_ENV, 1.0)]
    with pytest.raises(ImageError, match="past its deadline of 1s") as caught:
        ContainerBuilder(settings_of_cache.cache_dir).build(
            base,
            steps,
            build.rootfs,
            work=build.work,
            progress=build.lines.append,
        )
    assert "started" in str(caught.value)
    assert host_processes("sleep 600") == []
    assert_build_left_nothing(build)


def test_an_interrupt_midway_leaves_nothing(
    build: Build, base: Image, settings_of_cache: Settings
) -> None:
    def progress(line: str) -> None:
        build.lines.append(line)
        if "[2/" in line:  # the container runs, the first step is done
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        derived.build(
            base,
            build.rootfs,
            derived.Recipe.make(run=["true", "true"]),
            mirror=settings_of_cache.mirror,
            progress=progress,
            builder=ContainerBuilder(settings_of_cache.cache_dir),
        )
    assert_build_left_nothing(build)
