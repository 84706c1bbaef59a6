"""``?target=`` on a real two-member Incus cluster formed on this machine.

``scripts/incus-cluster.sh up`` forms it (two incusd, each in its own network namespace, apart
from the machine's own incusd); the module's fixture runs it and, only if it formed the cluster
itself, ``down`` at the end (see the fixture for sessions that run at once). Forming takes
1.3-2 s here (5.6 s once, on a machine under a load of 70); a cluster that is up already is
reused and left up.

The client talks to the cluster through m1's unix socket, with the small adapter of
cluster_helpers for now (the lead switches it to the plugin's IncusClient, then to pytester
runs with ``--incus-remote=/var/lib/pti-cluster/m1/unix.socket --incus-target=m1|m2``).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import IncusError, UnixIncus, image_tarball

from pytest_incus.images.store import ImageStore

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "incus-cluster.sh"
ROOT = Path("/var/lib/pti-cluster")
SOCKET = ROOT / "m1" / "unix.socket"
MEMBERS = ("m1", "m2")
# outside ROOT, which `down` removes
USERS = Path("/run/lock/pti-cluster-users.lock")
STARTED_BY_TEST = ROOT / "started-by-test"


def _script(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Path]:
    """m1's unix socket, with the cluster up.

    Sessions running at once (xdist workers, pytester runs) share one cluster: each holds a
    shared lock on USERS while it uses it. A cluster that a test formed carries STARTED_BY_TEST
    and is taken down by the last session to let go; one that was up already (someone ran
    ``up`` by hand) is left up.
    """
    with USERS.open("a") as lock:
        for _ in range(3):
            fcntl.flock(lock, fcntl.LOCK_EX)  # one session at a time checks and forms it
            if _script("status").returncode != 0:
                begin = time.monotonic()
                up = _script("up")
                assert up.returncode == 0, f"incus-cluster.sh up failed:\n{up.stderr}"
                STARTED_BY_TEST.write_text(f"{os.getpid()}\n")
                print(f"incus-cluster.sh up: {time.monotonic() - begin:.1f} s")
            # in use; others may join. flock's change from exclusive to shared is not atomic:
            # a session that was leaving may have taken the cluster down in between, so look
            # again once the shared lock is held.
            fcntl.flock(lock, fcntl.LOCK_SH)
            if _script("status").returncode == 0:
                break
        else:
            pytest.fail("the cluster went down again each time it was formed (3 tries)")
        yield SOCKET
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still uses it: the last one takes it down
        if STARTED_BY_TEST.exists():
            STARTED_BY_TEST.unlink()  # before `down`, which removes ROOT only when it is empty
            down = _script("down")
            assert down.returncode == 0, f"incus-cluster.sh down failed:\n{down.stderr}"


@pytest.fixture(scope="module")
def client(cluster: Path) -> Iterator[UnixIncus]:
    client = UnixIncus(cluster)
    yield client
    client.close()


@pytest.fixture(scope="module")
def busybox(client: UnixIncus, image_store: ImageStore) -> Iterator[str]:
    """The fingerprint of the plugin's busybox image, imported into the cluster (on m1; Incus
    copies it to m2 when an instance there needs it)."""
    rootfs = image_store.get("busybox").rootfs
    operation = client.call(
        "POST",
        "/1.0/images",
        data=image_tarball(rootfs, "busybox (pytest-incus cluster test)"),
        headers={"Content-Type": "application/octet-stream"},
    )
    fingerprint: str = operation["fingerprint"]
    yield fingerprint
    client.call("DELETE", f"/1.0/images/{fingerprint}")


@pytest.fixture
def names(client: UnixIncus) -> Iterator[list[str]]:
    """Instance names for one test to append to; each is deleted afterwards. The prefix keeps
    them apart from the machine's own incusd's instances: liblxc names cgroups after the
    instance, whichever daemon runs it."""
    made: list[str] = []
    yield made
    for name in made:
        try:
            # the API has no forced delete: a running instance is stopped first
            client.call(
                "PUT", f"/1.0/instances/{name}/state", json={"action": "stop", "force": True}
            )
        except IncusError as exc:
            if exc.status == 404:
                continue  # never made (the refused launch) or gone already
            if "already stopped" not in str(exc).lower():
                raise
        client.call("DELETE", f"/1.0/instances/{name}")


def _launch(client: UnixIncus, name: str, fingerprint: str, target: str) -> dict[str, Any]:
    client.call(
        "POST",
        "/1.0/instances",
        params={"target": target},
        json={
            "name": name,
            "type": "container",
            "source": {"type": "image", "fingerprint": fingerprint},
            "start": True,
        },
    )
    return client.call("GET", f"/1.0/instances/{name}")  # type: ignore[no-any-return]


def test_target_places_an_instance_on_each_member(
    client: UnixIncus, busybox: str, names: list[str]
) -> None:
    token = secrets.token_hex(3)
    for member in MEMBERS:
        name = f"pti-cluster-{token}-{member}"
        names.append(name)
        instance = _launch(client, name, busybox, member)
        assert instance["location"] == member
        assert instance["status"] == "Running"
        # the member named runs it: its rootfs is under that member's INCUS_DIR only
        assert (ROOT / member / "containers" / name).exists()
        other = next(m for m in MEMBERS if m != member)
        assert not (ROOT / other / "containers" / name).exists()
        # and a command in it answers, through m1 (Incus forwards to the member)
        code, stdout = client.exec(name, ["cat", "/proc/sys/kernel/hostname"])
        assert (code, stdout.strip()) == (0, name)
        code, _ = client.exec(name, ["sh", "-c", "exit 3"])
        assert code == 3
    members = {client.call("GET", f"/1.0/instances/{n}")["location"] for n in names}
    assert members == set(MEMBERS)


def test_unknown_target_is_refused(client: UnixIncus, busybox: str, names: list[str]) -> None:
    name = f"pti-cluster-{secrets.token_hex(3)}-m3"
    names.append(name)
    with pytest.raises(IncusError) as info:
        _launch(client, name, busybox, "m3")
    assert info.value.status in (400, 404)
    assert "m3" in str(info.value) or "not found" in str(info.value).lower()
