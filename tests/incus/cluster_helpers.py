"""The two-member test cluster of scripts/incus-cluster.sh, for the ``--incus-target`` tests.

``cluster_up()`` holds the cluster up for one session (forming it if it is down) and takes it
down again at the end if a test formed it and no other session still uses it. Clients talk to
it through m1's unix socket with the plugin's own ``IncusClient`` (``cluster_client()``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from pytest_incus.incus.client import IncusClient

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "incus-cluster.sh"
ROOT = Path("/var/lib/pti-cluster")
SOCKET = ROOT / "m1" / "unix.socket"
MEMBERS = ("m1", "m2")
# outside ROOT, which `down` removes
USERS = Path("/run/lock/pti-cluster-users.lock")
STARTED_BY_TEST = ROOT / "started-by-test"


class ClusterError(AssertionError):
    """The cluster script failed (its stderr is in the message): the test fails, not skips,
    since `make test` runs as root on a host that can form the cluster."""


def script(command: str) -> subprocess.CompletedProcess[str]:
    """Run ``incus-cluster.sh COMMAND`` (up, status, down)."""
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=300
    )


def cluster_client() -> IncusClient:
    """A client of the cluster (through m1, which forwards to m2), in its default project."""
    return IncusClient(remote=str(SOCKET), project="default")


@contextlib.contextmanager
def cluster_up() -> Iterator[Path]:
    """m1's unix socket, with the cluster up while the block runs.

    Sessions running at once (xdist workers, pytester runs) share one cluster: each holds a
    shared lock on USERS while it uses it. A cluster that a test formed carries STARTED_BY_TEST
    and is taken down by the last session to let go; one that was up already (someone ran
    ``up`` by hand) is left up.
    """
    with USERS.open("a") as lock:
        for _ in range(3):
            fcntl.flock(lock, fcntl.LOCK_EX)  # one session at a time checks and forms it
            if script("status").returncode != 0:
                begin = time.monotonic()
                up = script("up")
                if up.returncode != 0:
                    raise ClusterError(f"incus-cluster.sh up failed:\n{up.stderr}")
                STARTED_BY_TEST.write_text(f"{os.getpid()}\n")
                print(f"incus-cluster.sh up: {time.monotonic() - begin:.1f} s")
            # in use; others may join. flock's change from exclusive to shared is not atomic:
            # a session that was leaving may have taken the cluster down in between, so look
            # again once the shared lock is held.
            fcntl.flock(lock, fcntl.LOCK_SH)
            if script("status").returncode == 0:
                break
        else:
            raise ClusterError("the cluster went down again each time it was formed (3 tries)")
        yield SOCKET
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still uses it: the last one takes it down
        if STARTED_BY_TEST.exists():
            STARTED_BY_TEST.unlink()  # before `down`, which removes ROOT only when it is empty
            down = script("down")
            if down.returncode != 0:
                raise ClusterError(f"incus-cluster.sh down failed:\n{down.stderr}")
