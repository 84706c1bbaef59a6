"""``--incus-target`` on a real two-member Incus cluster formed on this machine.

``scripts/incus-cluster.sh up`` forms it (two incusd, each in its own network namespace, apart
from the machine's own incusd); the module's fixture forms it if it is down and, only if it
formed it itself, takes it ``down`` at the end (cluster_helpers.cluster_up). Forming takes
1.3-2 s here (5.6 s once, on a machine under a load of 70); a cluster that is up already is
reused and left up.

Everything talks to the cluster with the plugin's own IncusClient, through m1's unix socket:
the direct tests with the backend's images and exec modules, the pytester ones as a user
would, with ``--incus-remote=/var/lib/pti-cluster/m1/unix.socket --incus-target=MEMBER``.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import MEMBERS, ROOT, SOCKET, cluster_client, cluster_up

from pytest_incus.errors import ServerError
from pytest_incus.images.store import ImageStore
from pytest_incus.incus import owners
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.images import IncusImages, Source
from pytest_incus.incus.machine import refused_target
from pytest_incus.spec import InstanceSpec


@pytest.fixture(scope="module")
def cluster() -> Iterator[Path]:
    """m1's unix socket, with the cluster up for this module."""
    with cluster_up() as socket:
        yield socket


@pytest.fixture(scope="module")
def client(cluster: Path) -> Iterator[IncusClient]:
    with cluster_client() as client:
        client.check()
        yield client


@pytest.fixture(scope="module")
def busybox(client: IncusClient, image_store: ImageStore) -> Source:
    """The plugin's busybox image on the cluster, uploaded by the backend's images module
    as a run does (on m1; Incus copies it to m2 when an instance there needs it). It stays,
    as the plugin's uploads do: the cluster's `down` removes it with everything else."""
    spec = InstanceSpec.parse("container", "busybox", {}, where="test_cluster")
    return IncusImages(client, image_store).source(spec)


@pytest.fixture
def names(client: IncusClient) -> Iterator[list[str]]:
    """Instance names for one test to append to; each is deleted afterwards. The prefix keeps
    them apart from the machine's own incusd's instances: liblxc names cgroups after the
    instance, whichever daemon runs it."""
    made: list[str] = []
    yield made
    for name in made:
        owners.delete_instance(client, name)  # nothing if never made or gone already


def _launch(client: IncusClient, name: str, source: Source, target: str) -> None:
    client.call(
        "POST",
        "/1.0/instances",
        params={"target": target},
        json={"name": name, "type": "container", "source": source.source, "start": True},
    )


def test_unknown_target_is_refused(client: IncusClient, busybox: Source, names: list[str]) -> None:
    name = f"pti-cluster-{secrets.token_hex(3)}-m3"
    names.append(name)
    with pytest.raises(ServerError) as info:
        _launch(client, name, busybox, "m3")
    # Incus's words, which the machine's translation into a ConfigError looks for
    assert info.value.status == 404
    assert refused_target(info.value), str(info.value)


# -- as a user runs it: pytester runs with --incus-remote and --incus-target ----------------

# Two tests, a busybox container each. Each records where its instance is while it runs
# (./placed/NAME: the member, from the cluster itself through an IncusClient of its own),
# since the instances are gone once the inner run ends; and checks that the member named runs
# it (its rootfs is under that member's INCUS_DIR only) and that a command in it answers
# through m1 (which forwards the exec's websockets to m2).
INNER = f"""
import pathlib
import pytest
from pytest_incus.incus.client import IncusClient

PLACED = pathlib.Path(__file__).parent / "placed"
ROOT = pathlib.Path({str(ROOT)!r})

@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.instance(kind="container", image="busybox")
def test_placed(instance, n):
    PLACED.mkdir(exist_ok=True)
    (PLACED / instance.name).write_text("?")  # known before the lookup, for the cleanup
    with IncusClient({str(SOCKET)!r}) as client:
        location = client.call("GET", f"/1.0/instances/{{instance.name}}")["location"]
    (PLACED / instance.name).write_text(location)
    holders = sorted(m for m in {MEMBERS!r} if (ROOT / m / "containers" / instance.name).exists())
    assert holders == [location]
    assert instance.exec("cat /proc/sys/kernel/hostname").stdout == instance.name + "\\n"
    assert instance.exec("exit 3").exit_code == 3
"""


class Inner:
    """Inner runs on the cluster, each in a directory of its own under pytester's."""

    def __init__(self, pytester: pytest.Pytester, args: list[str], client: IncusClient) -> None:
        self.pytester = pytester
        self.args = [
            *args,
            "-p",
            "no:hypothesispytest",
            "-p",
            "no:benchmark",
            "--incus-backend=incus",
            f"--incus-remote={SOCKET}",
        ]
        self.client = client

    def run(self, *targets: str) -> dict[str, tuple[pytest.RunResult, dict[str, str]]]:
        """Run the inner suite once per target, the runs at once (each pays a second or so
        of start-up and of instance deletes: together they take little more than one); for
        each target its result and name -> member of its instances."""
        started: dict[str, tuple[Path, subprocess.Popen[bytes], float]] = {}
        try:
            for target in targets:
                where = self.pytester.mkdir(f"on-{target}")
                (where / "test_placed.py").write_text(INNER)
                command = [
                    sys.executable, "-m", "pytest", f"--basetemp={where / 'tmp'}",
                    *self.args, f"--incus-target={target}",
                ]  # fmt: skip
                process = self.pytester.popen(command, cwd=where, stdin=subprocess.DEVNULL)
                started[target] = (where, process, time.monotonic())
            results = {}
            for target, (where, process, begin) in started.items():
                out, err = process.communicate(timeout=180)
                result = pytest.RunResult(
                    process.returncode,
                    out.decode(errors="replace").splitlines(),
                    err.decode(errors="replace").splitlines(),
                    time.monotonic() - begin,
                )
                placed = {p.name: p.read_text() for p in where.glob("placed/*")}
                results[target] = (result, placed)
            return results
        finally:
            for _, process, _ in started.values():
                if process.poll() is None:  # a run past its timeout: ours to end
                    process.kill()
                    process.wait()

    def gone(self, name: str) -> bool:
        try:
            self.client.call("GET", f"/1.0/instances/{name}")
        except ServerError as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def cleanup(self) -> None:
        """What an inner run that died left on the cluster."""
        for path in self.pytester.path.glob("on-*/placed/*"):
            owners.delete_instance(self.client, path.name)


@pytest.fixture
def inner(pytester: pytest.Pytester, inner_args: list[str], client: IncusClient) -> Iterator[Inner]:
    runs = Inner(pytester, inner_args, client)
    yield runs
    runs.cleanup()


def test_incus_target_option(inner: Inner) -> None:
    runs = inner.run(*MEMBERS)
    for member, (result, placed) in runs.items():
        result.assert_outcomes(passed=2)
        assert len(placed) == 2, placed
        assert set(placed.values()) == {member}, placed
        # the run removed them again, from the member they were on
        assert all(inner.gone(name) for name in placed)
        assert not any((ROOT / member / "containers" / name).exists() for name in placed)


def test_unknown_incus_target_is_a_config_error(inner: Inner) -> None:
    result, placed = inner.run("m3")["m3"]
    result.assert_outcomes(errors=2)
    assert placed == {}  # no test body ran
    # ConfigError, saying which option, what Incus said and what to give instead
    errors = [line for line in result.outlines if line.startswith("E   ")]
    message = next((line for line in errors if "ConfigError" in line), "")
    assert "--incus-target=m3" in message, result.stdout.str()
    assert 'Cluster member "m3" not found' in message
    assert "give one of its members (m1, m2)" in message


def test_incus_target_on_a_server_that_is_no_cluster(
    pytester: pytest.Pytester, inner_args: list[str], incus_client: IncusClient
) -> None:
    """The machine's own incusd is a single server: --incus-target there is a ConfigError
    too, which says to leave the option out (no instance is made: Incus refuses at once)."""
    pytester.makepyfile(test_placed=INNER)
    result = pytester.runpytest_subprocess(
        *inner_args,
        "--incus-backend=incus",
        f"--incus-project={incus_client.project}",
        "--incus-target=m1",
        "-k",
        "test_placed[1]",
        timeout=120,
    )
    result.assert_outcomes(errors=1, deselected=1)
    message = next((line for line in result.outlines if "ConfigError" in line), "")
    assert "--incus-target=m1" in message, result.stdout.str()
    assert "Target only allowed when clustered" in message
    assert "leave --incus-target out" in message
