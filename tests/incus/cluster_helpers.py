"""A tiny Incus REST client over a unix socket, for the cluster test only.

Stand-in until the plugin's own ``pytest_incus.incus.client.IncusClient`` is merged: the test
then switches to it (and later to pytester runs with ``--incus-remote`` / ``--incus-target``).
It knows just enough of the API for that test: sync and async answers, operations waited
through ``/1.0/operations/ID/wait``, and Incus's error text on failure.
"""

from __future__ import annotations

import io
import socket
import tarfile
import time
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

# The host part of every URL: the adapter below answers it, whatever the name.
BASE = "http://incus"


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection to a unix socket instead of a TCP port."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path
        self._timeout = timeout

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._socket_path, self._timeout)


class _UnixAdapter(HTTPAdapter):
    """Sends every request of its mount point to one unix socket."""

    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        super().__init__()
        self._pool = _UnixPool(socket_path, timeout)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> _UnixPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


class IncusError(Exception):
    """Incus refused a request or an operation failed: ``status`` is the HTTP status or the
    operation's error code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UnixIncus:
    """``call(method, path, ...)`` on the Incus server behind ``socket_path``."""

    def __init__(self, socket_path: Path) -> None:
        self.session = requests.Session()
        self.session.mount(BASE, _UnixAdapter(str(socket_path)))

    def close(self) -> None:
        self.session.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The answer's metadata; an async answer's operation is waited for first and its
        metadata returned. A refusal or a failed operation raises ``IncusError``."""
        response = self.session.request(
            method, BASE + path, params=params, json=json, data=data, headers=headers
        )
        body = response.json()
        if response.status_code >= 400 or body.get("type") == "error":
            raise IncusError(
                f"{method} {path} {params or ''}: {body.get('error')}", response.status_code
            )
        if body.get("type") == "async":
            return self.wait(body["metadata"]["id"])
        return body["metadata"]

    def wait(self, operation_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """The finished operation's metadata; IncusError if it failed or outlived timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            response = self.session.get(
                f"{BASE}/1.0/operations/{operation_id}/wait", params={"timeout": str(left)}
            )
            body = response.json()
            if response.status_code >= 400:
                raise IncusError(
                    f"operation {operation_id}: {body.get('error')}", response.status_code
                )
            operation: dict[str, Any] = body["metadata"]
            if operation["status"] == "Success":
                return operation["metadata"] or {}
            if operation["status"] in ("Failure", "Cancelled"):
                raise IncusError(
                    f"operation {operation_id}: {operation['err']}", operation["status_code"]
                )
            if time.monotonic() >= deadline:
                raise IncusError(f"operation {operation_id} still {operation['status']}", 0)

    def text(self, path: str) -> str:
        """A raw (non-JSON) GET, such as an exec's recorded output."""
        response = self.session.get(BASE + path)
        if response.status_code >= 400:
            raise IncusError(f"GET {path}: {response.text}", response.status_code)
        return response.text

    def exec(self, name: str, argv: list[str]) -> tuple[int, str]:
        """Run argv in instance ``name``; its exit code and stdout (recorded output: this test
        does not need the plugin's websocket exec)."""
        metadata = self.call(
            "POST",
            f"/1.0/instances/{name}/exec",
            json={
                "command": argv,
                "wait-for-websocket": False,
                "interactive": False,
                "record-output": True,
            },
        )
        stdout = self.text(metadata["output"]["1"])
        return int(metadata["return"]), stdout


def image_tarball(rootfs: Path, description: str) -> bytes:
    """A unified Incus image (metadata.yaml and rootfs/ in one gzipped tar) of ``rootfs``,
    built in memory: it is small (a busybox root is about 2 MB) and needs no scratch file."""
    metadata = (
        "architecture: x86_64\n"
        f"creation_date: {int(time.time())}\n"
        "properties:\n"
        f"  description: {description}\n"
        "  os: busybox\n"
    ).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("metadata.yaml")
        info.size = len(metadata)
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(metadata))
        tar.add(rootfs, arcname="rootfs")  # owners, modes and links as they are on disk
    return buffer.getvalue()
