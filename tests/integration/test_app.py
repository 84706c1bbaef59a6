"""Application containers (kind="app") from OCI images built here with umoci: the image's
program as the first process, its config, its output and exit code, exec in the running app."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import assert_nothing_left
from registry_helpers import SCRATCH_ROOT, build_image

from pytest_incus import ConfigError, IncusError, InstanceFactory, fsutil
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
