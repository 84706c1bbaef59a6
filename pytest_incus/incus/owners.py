"""Who made an instance on an Incus server: its ``user.pytest-incus.*`` keys, and the reap.

Every instance the incus backend creates carries, in its config:

========================== =====================================================================
``owner-host``             this host's name and boot id (``/proc/sys/kernel/random/boot_id``):
                           a pid means something only on the host, and for the boot, it ran on
``owner-pid``              the pid of the launching process
``owner-start``            that process's start time (clock ticks since boot, ``ownership``)
``run-id``                 the test run (pytest-xdist's ``PYTEST_XDIST_TESTRUNUID``, shared by
                           its workers; else one uuid per process)
``kind``, ``image``        what the user asked for (``kind`` marks an instance as ours)
``kept``                   "true" once ``--incus-keep`` kept it: never reaped unless asked
========================== =====================================================================

So ``ls`` finds the plugin's instances on a server from any host, and ``reap`` deletes those of
a dead run. Only this host can tell whether one of its processes is gone: instances owned by
another host (or by an earlier boot of this one, whose processes are all gone, see
``ServerRecord.orphaned``) are never judged from here, except an earlier boot's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_incus.errors import ServerError
from pytest_incus.ownership import Owner

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient

log = logging.getLogger("pytest_incus")

PREFIX = "user.pytest-incus."
OWNER_HOST = PREFIX + "owner-host"
OWNER_PID = PREFIX + "owner-pid"
OWNER_START = PREFIX + "owner-start"
RUN_ID = PREFIX + "run-id"
KIND = PREFIX + "kind"
IMAGE = PREFIX + "image"
KEPT = PREFIX + "kept"
RUN_ENV = "PYTEST_XDIST_TESTRUNUID"
STOP_TIMEOUT = 30.0  # seconds for a forced stop before the delete


@functools.cache
def boot_id() -> str:
    """This boot's id (a new one at every boot), or "" where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def this_host() -> str:
    """What ``owner-host`` says of this host now: "HOSTNAME/BOOT_ID"."""
    return f"{socket.gethostname()}/{boot_id()}"


@functools.cache
def _process_run_id() -> str:
    return uuid.uuid4().hex


def run_id() -> str:
    """The id of this test run: the one all pytest-xdist workers share, else this process's."""
    return os.environ.get(RUN_ENV) or _process_run_id()


def owner_config(kind: str, image: str, owner: Owner) -> dict[str, str]:
    """The ``user.pytest-incus.*`` keys of a new instance launched by ``owner``."""
    return {
        OWNER_HOST: this_host(),
        OWNER_PID: str(owner.pid),
        OWNER_START: str(owner.start_time),
        RUN_ID: run_id(),
        KIND: kind,
        IMAGE: image,
    }


def is_ours(config: dict[str, Any]) -> bool:
    """True for the config of an instance the plugin made (it has our ``kind`` key)."""
    return isinstance(config.get(KIND), str) and bool(config.get(OWNER_HOST))


@dataclass(frozen=True)
class ServerRecord:
    """One of the plugin's instances on an Incus server, as its keys describe it."""

    name: str
    kind: str
    image: str
    owner_host: str
    owner: Owner | None
    run_id: str
    created: str  # the server's created_at, RFC 3339
    location: str  # the cluster member it runs on ("none" outside a cluster)
    status: str = ""  # "Running", "Stopped", ...
    kept: bool = False

    @classmethod
    def of(cls, instance: dict[str, Any]) -> ServerRecord | None:
        """The record of an instance (GET /1.0/instances?recursion=1's items); None if it is
        not ours."""
        config = instance.get("config") or {}
        if not is_ours(config):
            return None
        owner = None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            owner = Owner(int(config[OWNER_PID]), int(config[OWNER_START]))
        return cls(
            name=str(instance.get("name", "")),
            kind=str(config.get(KIND, "")),
            image=str(config.get(IMAGE, "")),
            owner_host=str(config.get(OWNER_HOST, "")),
            owner=owner,
            run_id=str(config.get(RUN_ID, "")),
            created=str(instance.get("created_at", "")),
            location=str(instance.get("location", "")),
            status=str(instance.get("status", "")),
            kept=config.get(KEPT) == "true",
        )

    @property
    def local(self) -> bool:
        """True if this host (in any boot) launched it."""
        return self.owner_host.split("/", 1)[0] == socket.gethostname()

    @property
    def orphaned(self) -> bool:
        """True if its owner is known to be gone: it was launched on this host, and by an
        earlier boot or by a process that no longer runs. An instance of another host is
        never orphaned as seen from here: its processes cannot be looked at."""
        if not self.local:
            return False
        if self.owner_host != this_host():
            return True  # an earlier boot of this host: every process of it is gone
        return self.owner is None or not self.owner.alive()


def server_instances(client: IncusClient) -> list[ServerRecord]:
    """The plugin's instances in the client's project (of every host), oldest first."""
    listed = client.call("GET", "/1.0/instances", params={"recursion": 1}) or []
    found = [ServerRecord.of(item) for item in listed if isinstance(item, dict)]
    return sorted((r for r in found if r is not None), key=lambda r: r.created)


@contextlib.contextmanager
def _gone_is_fine() -> Iterator[None]:
    """An instance that is already gone (404) is what a delete wanted."""
    try:
        yield
    except ServerError as exc:
        if exc.status != 404 and "not found" not in str(exc).lower():
            raise


def delete_instance(client: IncusClient, name: str, *, timeout: float = STOP_TIMEOUT) -> None:
    """Stop ``name`` at once if it runs and delete it; nothing if it is already gone."""
    with _gone_is_fine():
        # the instance's status, not /state's: that one fails while a container ends
        instance = client.call("GET", f"/1.0/instances/{name}")
        if isinstance(instance, dict) and instance.get("status") not in ("Stopped", None):
            try:
                client.call(
                    "PUT",
                    f"/1.0/instances/{name}/state",
                    json={"action": "stop", "force": True, "timeout": -1},
                    timeout=timeout,
                )
            except ServerError as exc:
                if (
                    "already stopped" not in str(exc).lower()
                    and "not running" not in str(exc).lower()
                ):
                    raise
        client.call("DELETE", f"/1.0/instances/{name}", timeout=timeout)


def is_our_instance(client: IncusClient, name: str) -> bool:
    """True if instance ``name`` exists and carries our keys."""
    with _gone_is_fine():
        instance = client.call("GET", f"/1.0/instances/{name}")
        return isinstance(instance, dict) and is_ours(instance.get("config") or {})
    return False


def mark_kept(client: IncusClient, name: str) -> None:
    """Record on the server that ``--incus-keep`` keeps ``name``: ``reap_server`` leaves it."""
    client.call("PATCH", f"/1.0/instances/{name}", json={"config": {KEPT: "true"}})


def reap_server(
    client: IncusClient, *, include_kept: bool = False, names: list[str] | None = None
) -> list[str]:
    """Delete the plugin's instances on the server whose owner is gone (see
    ``ServerRecord.orphaned``: launched here, by a process that no longer runs); returns their
    names. Kept instances stay unless ``include_kept``; those of other hosts always stay."""
    removed = []
    for record in server_instances(client):
        if names is not None and record.name not in names:
            continue
        if not record.orphaned or (record.kept and not include_kept):
            continue
        log.info("reaping Incus instance %s left by a process that is gone", record.name)
        delete_instance(client, record.name)
        removed.append(record.name)
    return removed
