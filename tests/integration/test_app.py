"""Application containers (kind="app") from OCI images built here with umoci: the image's
program as the first process, its config, its output and exit code, exec in the running app."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left, wait_until
from registry_helpers import SCRATCH_ROOT, build_image, image_of_rootfs, push, running_registry

from pytest_incus import (
    ConfigError,
    IncusError,
    InstanceFactory,
    InstanceStartError,
    InstanceState,
    fsutil,
)
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings

ECHO_CONFIG = [
    "--config.cmd=sh",
    "--config.cmd=-c",
    "--config.cmd=echo out $GREETING from $(pwd) as $(id -un); echo err >&2; exit 3",
    "--config.env=GREETING=hello",
    "--config.workingdir=/srv",
    "--config.user=nobody",
]


@dataclass(frozen=True)
class DebianApp:
    """A Debian app image in a secure registry, and what pulling it needs."""

    ref: str
    ca: Path  # trusted through SSL_CERT_FILE
    auth_file: Path  # the login, as containers' auth.json


@pytest.fixture(scope="module")
def debian_app(image_store: ImageStore) -> Iterator[DebianApp]:
    """The cached debian/12 container image (only read) as a one-layer OCI image whose program
    is ``cat /etc/debian_version``, pushed to a TLS + login registry on loopback; its cache
    entries are pruned afterwards."""
    rootfs = image_store.get("debian/12").rootfs
    work = SCRATCH_ROOT / f"debian-app-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        with running_registry(secure=True) as registry:
            assert registry.ca is not None
            config = ["--config.cmd=cat", "--config.cmd=/etc/debian_version"]
            image_of_rootfs(work / "layout", "debian", rootfs, config)
            ref = push(work / "layout", "debian", registry, "debian/app:12")
            (work / "auth.json").write_text(registry.auth_config())
            try:
                yield DebianApp(ref, registry.ca, work / "auth.json")
            finally:
                image_store.prune(ref)
    finally:
        fsutil.remove_tree(work)


@pytest.fixture(scope="module")
def layout(image_store: ImageStore) -> Iterator[Path]:
    """An OCI layout with image ``echo`` (a program that prints and exits 3) and ``plain``
    (busybox with no program configured); their cache entries are pruned afterwards."""
    work = SCRATCH_ROOT / f"app-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        build_image(work / "layout", "echo", files={"srv/.keep": ""}, config=ECHO_CONFIG)
        build_image(work / "layout", "plain")
        yield work / "layout"
    finally:
        for tag in ("echo", "plain"):
            image_store.prune(f"oci:{work / 'layout'}:{tag}")
        fsutil.remove_tree(work)


def test_program_runs_with_the_image_config(
    instance_factory: InstanceFactory, layout: Path, settings: Settings
) -> None:
    app = instance_factory.launch(kind="app", image=f"oci:{layout}:echo")
    assert app.wait(timeout=30) == 3
    assert app.logs() == "out hello from /srv as nobody\nerr\n"
    name = app.name
    app.delete()
    assert_nothing_left(settings, name)


def test_a_program_the_image_lacks_is_a_start_error(
    instance_factory: InstanceFactory, layout: Path, settings: Settings
) -> None:
    for command, said in (
        (["/bin/nothere"], "no program '/bin/nothere' at that path"),
        (["nothere", "-x"], "no program 'nothere' in PATH=/usr/local/sbin:"),
        (["/etc/passwd"], "no program '/etc/passwd' at that path (an executable file)"),
    ):
        name = f"app-missing-{secrets.token_hex(3)}"
        with pytest.raises(InstanceStartError, match=re.escape(said)):
            instance_factory.launch(
                kind="app", image=f"oci:{layout}:plain", command=command, name=name
            )
        assert_nothing_left(settings, name)


def test_command_and_env_replace_and_add(instance_factory: InstanceFactory, layout: Path) -> None:
    app = instance_factory.launch(
        kind="app",
        image=f"oci:{layout}:echo",
        command=["sh", "-c", "echo $GREETING $EXTRA; exit 0"],
        env={"EXTRA": "added"},
    )
    assert app.wait(timeout=30) == 0
    assert app.logs() == "hello added\n"
    app.delete()


def test_exec_in_a_running_app(
    instance_factory: InstanceFactory, layout: Path, settings: Settings
) -> None:
    app = instance_factory.launch(
        kind="app", image=f"oci:{layout}:plain", command=["/bin/busybox", "sleep", "300"]
    )
    assert app.exec(["cat", "/etc/passwd"]).stdout.startswith("root:x:0:0:")
    assert app.exec("echo $HOME $PTI", env={"PTI": "x"}).stdout == "/root x\n"
    missing = app.exec(["curl", "http://localhost/"])  # not in the image
    assert missing.exit_code == 127 and "curl: not found" in missing.stderr
    # unprivileged: root inside is a high uid on the host
    uid_map = app.exec(["cat", "/proc/self/uid_map"]).stdout.split()
    assert uid_map[:2] == ["0", "1000000"]
    assert app.logs() == ""  # the program's output only, not liblxc's about the attach
    with pytest.raises(TimeoutError):
        app.wait(timeout=0.2)
    name = app.name
    app.stop(timeout=5)
    assert app.wait(timeout=10) != 0  # ended by the stop
    app.delete()
    assert_nothing_left(settings, name)


def test_image_without_a_program_needs_a_command(
    instance_factory: InstanceFactory, layout: Path
) -> None:
    with pytest.raises(IncusError, match="command="):
        instance_factory.launch(kind="app", image=f"oci:{layout}:plain")


def test_app_needs_an_oci_image(instance_factory: InstanceFactory) -> None:
    with pytest.raises(ConfigError, match="kind='app' runs OCI images"):
        instance_factory.launch(kind="app", image="busybox")


def test_wait_is_for_apps(instance_factory: InstanceFactory) -> None:
    container = instance_factory.launch(kind="container", image="busybox")
    with pytest.raises(IncusError, match="wait\\(\\) is for kind='app'"):
        container.wait(1)
    container.delete()


def test_loopback_is_up(instance_factory: InstanceFactory, layout: Path) -> None:
    app = instance_factory.launch(
        kind="app",
        image=f"oci:{layout}:plain",
        command=["/bin/busybox", "cat", "/sys/class/net/lo/operstate"],
    )
    assert app.wait(timeout=30) == 0
    assert app.logs() == "unknown\n"  # what an UP loopback reports; a down one says "down"
    app.delete()


def test_restart_runs_the_program_again(instance_factory: InstanceFactory, layout: Path) -> None:
    # each run appends to a file of the app's own (kept across runs, as its overlay is) and
    # prints how many runs there were
    count = "echo run >> /runs; busybox wc -l < /runs; exec busybox sleep 300"
    app = instance_factory.launch(
        kind="app", image=f"oci:{layout}:plain", command=["sh", "-c", count]
    )
    wait_until(lambda: app.logs() == "1\n", 10, "the first run printed its count")
    app.stop(timeout=5)
    assert app.state is InstanceState.STOPPED
    app.start()
    assert app.state is InstanceState.RUNNING
    wait_until(lambda: app.logs() == "1\n2\n", 10, "the second run printed its count")
    assert app.exec(["cat", "/runs"]).stdout == "run\nrun\n"  # exec works after the restart
    app.restart()
    wait_until(lambda: app.logs() == "1\n2\n3\n", 10, "the third run printed its count")
    app.delete()


def test_start_after_the_program_ended_runs_it_again(
    instance_factory: InstanceFactory, layout: Path
) -> None:
    app = instance_factory.launch(kind="app", image=f"oci:{layout}:echo")
    assert app.wait(timeout=30) == 3
    app.stop()
    app.start()
    assert app.wait(timeout=30) == 3
    assert app.logs() == "out hello from /srv as nobody\nerr\n" * 2
    app.delete()


def test_debian_app_from_a_private_registry(
    instance_factory: InstanceFactory, debian_app: DebianApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(debian_app.ca))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(debian_app.auth_file))
    # privileged: no uid-shifted copy of the 220 MB tree to make and remove (the busybox
    # tests above cover unprivileged apps)
    app = instance_factory.launch(kind="app", image=debian_app.ref, privileged=True)
    assert app.wait(timeout=30) == 0
    assert app.logs().startswith("12.")  # the image's own program: cat /etc/debian_version
    app.delete()
    program = "import platform; print(platform.freedesktop_os_release()['VERSION_CODENAME'])"
    app = instance_factory.launch(
        kind="app",
        image=debian_app.ref,
        command=["python3", "-c", f"{program}; exit(7)"],
        privileged=True,
    )
    assert app.wait(timeout=30) == 7
    assert app.logs() == "bookworm\n"
    app.delete()
