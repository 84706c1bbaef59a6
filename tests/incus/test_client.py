"""IncusClient against this machine's real incusd: the unix socket, HTTPS with a client
certificate trusted through a token, operations, errors and websockets.

Everything made on the server is named ``pti-cl-<hex>`` and removed by the fixtures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from pytest_incus.errors import ServerError, UnavailableError, WaitTimeoutError
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.transport import TLSTransport, UnixAdapter, cert_fingerprint

BUSYBOX = Path("/var/cache/pytest-incus/images/busybox/rootfs")
HTTPS_ADDRESS = "127.0.0.1:8443"  # set only if the server listens nowhere yet


def _name() -> str:
    return f"pti-cl-{secrets.token_hex(4)}"


def _delete_instance(client: IncusClient, name: str) -> None:
    """Remove instance ``name`` if it exists (stopped first)."""
    with contextlib.suppress(ServerError):  # not running, or gone
        client.call("PUT", f"/1.0/instances/{name}/state", json={"action": "stop", "force": True})
    try:
        client.call("DELETE", f"/1.0/instances/{name}")
    except ServerError as exc:
        if exc.status != 404:
            raise


# -- unix socket --------------------------------------------------------------------------


def test_server_over_unix_socket(incus_client: IncusClient) -> None:
    info = incus_client.server()
    assert info["auth"] == "trusted"  # the socket is trusted by its permissions
    assert "api_extensions" in info and info["environment"]["server"] == "incus"
    body = incus_client.request("GET", "/1.0").json()
    assert body["type"] == "sync" and body["metadata"]["api_version"] == "1.0"


def test_connections_are_kept_alive() -> None:
    with IncusClient() as client:
        for _ in range(20):
            client.request("GET", "/1.0")
        adapter = client.session.get_adapter(client.transport.base_url + "/1.0")
        assert isinstance(adapter, UnixAdapter)
        assert adapter.pool.num_connections == 1  # one socket for 20 requests


def test_call_waits_an_async_operation(incus_client: IncusClient) -> None:
    name = _name()
    try:
        # an empty container (no rootfs): a cheap async create and delete
        done = incus_client.call(
            "POST", "/1.0/instances", json={"name": name, "source": {"type": "none"}}
        )
        assert done == {}
        state = incus_client.call("GET", f"/1.0/instances/{name}")
        assert state["name"] == name and state["status"] == "Stopped"
        incus_client.call("DELETE", f"/1.0/instances/{name}")
        with pytest.raises(ServerError) as info:
            incus_client.call("GET", f"/1.0/instances/{name}")
        assert info.value.status == 404
    finally:
        _delete_instance(incus_client, name)


def test_failed_operation_is_server_error(incus_client: IncusClient) -> None:
    name = _name()
    request = {"name": name, "source": {"type": "image", "alias": f"{name}-no-such-image"}}
    try:
        start = incus_client.start("POST", "/1.0/instances", json=request)
        # accepted: the failure comes with the operation (which a busy server may already
        # have failed by the time it answers)
        assert start["status"] in ("Running", "Failure")
        with pytest.raises(ServerError) as info:
            incus_client.wait(start["id"], timeout=10)
        assert "failed" in str(info.value) and info.value.status == 400  # Incus's "Failure"
        with pytest.raises(ServerError) as info:
            incus_client.call("POST", "/1.0/instances", json=request)
        assert str(info.value).startswith(f"Incus server at {incus_client.remote}: POST ")
    finally:
        _delete_instance(incus_client, name)


def test_missing_path_is_404(incus_client: IncusClient) -> None:
    with pytest.raises(ServerError) as info:
        incus_client.request("GET", f"/1.0/instances/{_name()}")
    assert info.value.status == 404 and "not found" in str(info.value).lower()


def test_missing_socket_is_unavailable(scratch: Path) -> None:
    socket_path = scratch / "unix.socket"
    client = IncusClient(str(socket_path), timeout=5)
    start = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        client.check()
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert str(socket_path) in message and "cannot be reached" in message
    assert "start incusd" in message and "No such file" in message


def test_missing_project_is_unavailable() -> None:
    project = _name()
    with IncusClient(project=project) as client, pytest.raises(UnavailableError) as info:
        client.check()
    assert f"project {project!r} does not exist" in str(info.value)
    assert f"incus project create {project}" in str(info.value)


def test_existing_project_passes_check(incus_client: IncusClient) -> None:
    project = _name()
    incus_client.call("POST", "/1.0/projects", json={"name": project})  # a sync answer
    try:
        with IncusClient(project=project) as client:
            client.check()
            assert client.call("GET", "/1.0/instances") == []  # the request is in its project
    finally:
        incus_client.call("DELETE", f"/1.0/projects/{project}")


# -- operations that run until cancelled (trust tokens) -----------------------------------


@pytest.fixture(scope="module")
def https_url(incus_client: IncusClient) -> str:
    """The server's HTTPS address, set to 127.0.0.1:8443 if it listened nowhere. Left set:
    the setup script sets the same, and others on this machine may rely on it."""
    address = incus_client.call("GET", "/1.0")["config"].get("core.https_address")
    if not address:
        incus_client.call("PATCH", "/1.0", json={"config": {"core.https_address": HTTPS_ADDRESS}})
        address = HTTPS_ADDRESS
    host, _, port = address.rpartition(":")
    if host in ("", "[::]", "0.0.0.0"):
        host = "127.0.0.1"
    return f"https://{host}:{port}"


@pytest.fixture
def token_operation(incus_client: IncusClient, https_url: str) -> Iterator[dict[str, Any]]:
    """A trust token's operation: it runs until used or cancelled."""
    operation = incus_client.start(
        "POST", "/1.0/certificates", json={"name": _name(), "type": "client", "token": True}
    )
    yield operation
    with contextlib.suppress(ServerError):  # cancelled by the test already
        incus_client.request("DELETE", f"/1.0/operations/{operation['id']}")


def test_wait_returns_a_running_operation_at_its_deadline(
    incus_client: IncusClient, token_operation: dict[str, Any]
) -> None:
    start = time.monotonic()
    still = incus_client.wait(token_operation["id"], timeout=1)
    assert 0.9 < time.monotonic() - start < 5
    assert still["status"] == "Running" and still["id"] == token_operation["id"]
    incus_client.request("DELETE", f"/1.0/operations/{token_operation['id']}")
    with pytest.raises(ServerError) as info:
        incus_client.wait(f"/1.0/operations/{token_operation['id']}", timeout=5)
    assert "cancelled" in str(info.value)


def test_call_past_its_timeout_is_wait_timeout(incus_client: IncusClient, https_url: str) -> None:
    request = {"name": _name(), "type": "client", "token": True}
    with pytest.raises(WaitTimeoutError) as info:
        incus_client.call("POST", "/1.0/certificates", json=request, timeout=1)
    message = str(info.value)
    assert "did not finish within 1 s" in message and "incus operation show" in message
    op_id = message.split("operation ")[1].split(",")[0]
    incus_client.request("DELETE", f"/1.0/operations/{op_id}")


def test_threads_share_a_client(incus_client: IncusClient, token_operation: dict[str, Any]) -> None:
    """A long wait in one thread does not hold up requests in others."""
    done: dict[str, float] = {}
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            incus_client.wait(token_operation["id"], timeout=2)
            done["waiter"] = time.monotonic()
        except BaseException as exc:
            errors.append(exc)

    def getter(n: int) -> None:
        try:
            for _ in range(30):
                assert incus_client.call("GET", "/1.0")["auth"] == "trusted"
            done[f"getter{n}"] = time.monotonic()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter)]
    threads += [threading.Thread(target=getter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(done) == 5
    assert all(done[f"getter{n}"] < done["waiter"] for n in range(4))


# -- websockets ---------------------------------------------------------------------------


def _image_tarball(rootfs: Path) -> bytes:
    """A unified image tarball (metadata.yaml + rootfs/) of ``rootfs``."""
    buffer = io.BytesIO()
    metadata = json.dumps(
        {
            "architecture": "x86_64",
            "creation_date": int(time.time()),
            "properties": {"description": "pti-cl busybox"},
        }
    ).encode()  # JSON is YAML
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        entry = tarfile.TarInfo("metadata.yaml")
        entry.size = len(metadata)
        tar.addfile(entry, io.BytesIO(metadata))
        tar.add(rootfs, arcname="rootfs")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def busybox_container(incus_client: IncusClient) -> Iterator[str]:
    """A running busybox container (from the shared cache's rootfs, uploaded as an image of
    our own)."""
    if not (BUSYBOX / "bin" / "busybox").exists():
        pytest.fail(f"no busybox image in {BUSYBOX}: build it with a run of the plugin first")
    response = incus_client.request(
        "POST",
        "/1.0/images",
        data=_image_tarball(BUSYBOX),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    fingerprint = incus_client.wait(response.json()["metadata"]["id"], timeout=120)["metadata"][
        "fingerprint"
    ]
    name = _name()
    try:
        incus_client.call(
            "POST",
            "/1.0/instances",
            json={"name": name, "source": {"type": "image", "fingerprint": fingerprint}},
            timeout=120,
        )
        incus_client.call(
            "PUT", f"/1.0/instances/{name}/state", json={"action": "start"}, timeout=60
        )
        yield name
    finally:
        _delete_instance(incus_client, name)
        incus_client.call("DELETE", f"/1.0/images/{fingerprint}")


def _start_exec(client: IncusClient, name: str, argv: list[str]) -> dict[str, Any]:
    return client.start(
        "POST",
        f"/1.0/instances/{name}/exec",
        json={"command": argv, "wait-for-websocket": True, "interactive": False},
    )


def _finish_exec(client: IncusClient, operation: dict[str, Any]) -> tuple[int, bytes]:
    """Connect the websockets of exec ``operation``, give no stdin, read stdout to its end:
    the exit code and stdout."""
    fds = operation["metadata"]["fds"]
    sockets = {fd: client.websocket(operation["id"], fds[fd]) for fd in ("control", "0", "1", "2")}
    try:
        sockets["0"].send_close()  # no stdin: EOF
        out = b""
        while True:
            try:
                opcode, data = sockets["1"].recv_data(control_frame=False)
            except websocket.WebSocketConnectionClosedException:
                break  # Incus may end a stream without a close frame
            if opcode == websocket.ABNF.OPCODE_CLOSE or not data:
                break
            out += data
        done = client.wait(operation["id"], timeout=30)
    finally:
        for ws in sockets.values():
            ws.close()
    return int(done["metadata"]["return"]), out


def _exec_over_websockets(client: IncusClient, name: str, argv: list[str]) -> tuple[int, bytes]:
    """Run ``argv`` in ``name`` through exec's websockets; its exit code and stdout."""
    return _finish_exec(client, _start_exec(client, name, argv))


def test_websocket_streams_exec_over_unix(
    incus_client: IncusClient, busybox_container: str
) -> None:
    code, out = _exec_over_websockets(incus_client, busybox_container, ["echo", "over unix"])
    assert (code, out) == (0, b"over unix\n")


def test_websocket_with_a_wrong_secret_is_server_error(
    incus_client: IncusClient, busybox_container: str
) -> None:
    operation = _start_exec(incus_client, busybox_container, ["echo", "after all"])
    try:
        with pytest.raises(ServerError) as info:
            incus_client.websocket(operation["id"], "0" * 64)
        assert info.value.status == 403 and "websocket" in str(info.value)
    finally:
        # an exec waiting for its websockets cannot be cancelled: connect them, let it end
        assert _finish_exec(incus_client, operation) == (0, b"after all\n")


# -- HTTPS --------------------------------------------------------------------------------


def _make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:secp384r1",
            ),
            *(
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={name}",
                "-keyout",
                str(key),
                "-out",
                str(crt),
            ),
        ],
        check=True,
        capture_output=True,
    )
    return crt, key


@pytest.fixture
def incus_conf(scratch: Path, https_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``incus`` configuration directory (INCUS_CONF) with a client certificate and the
    server's certificate pinned for a remote of ``https_url``, as `incus remote add` leaves
    it."""
    conf = scratch / "incus"
    (conf / "servercerts").mkdir(parents=True)
    crt, key = _make_cert(conf, "client")
    assert (crt, key) == (conf / "client.crt", conf / "client.key")
    host, port = https_url.removeprefix("https://").rsplit(":", 1)
    (conf / "servercerts" / "pti.crt").write_text(ssl.get_server_certificate((host, int(port))))
    remotes = {"pti": {"addr": https_url, "protocol": "incus", "auth_type": "tls"}}
    (conf / "config.yml").write_text(json.dumps({"default-remote": "pti", "remotes": remotes}))
    monkeypatch.setenv("INCUS_CONF", str(conf))
    return conf


@pytest.fixture
def trusted_conf(incus_client: IncusClient, incus_conf: Path, https_url: str) -> Iterator[Path]:
    """``incus_conf`` with its client certificate trusted by the server through a token."""
    name = _name()
    # the incus command of the server's own socket, not of the scratch configuration
    env = {k: v for k, v in os.environ.items() if k != "INCUS_CONF"}
    token = subprocess.run(
        ["incus", "config", "trust", "add", name, "--quiet"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    fingerprint = cert_fingerprint((incus_conf / "client.crt").read_bytes())
    try:
        with IncusClient(https_url) as client:
            assert client.server()["auth"] == "untrusted"
            client.call("POST", "/1.0/certificates", json={"trust_token": token})
        yield incus_conf
    finally:
        try:
            incus_client.request("DELETE", f"/1.0/certificates/{fingerprint}", project=False)
        except ServerError as exc:
            if exc.status != 404:
                raise
        subprocess.run(  # the token, if the test failed before using it
            ["incus", "config", "trust", "revoke-token", name],
            capture_output=True,
            check=False,
            env=env,
        )


def test_https_with_a_trusted_certificate(trusted_conf: Path, https_url: str) -> None:
    with IncusClient(https_url) as client:
        assert isinstance(client.transport, TLSTransport)
        assert client.transport.cert == trusted_conf / "client.crt"
        assert client.transport.server_cert == trusted_conf / "servercerts" / "pti.crt"
        client.check()
        assert client.server()["auth"] == "trusted"
        assert client.server()["auth_user_name"] == cert_fingerprint(
            (trusted_conf / "client.crt").read_bytes()
        )


def test_https_with_the_incus_commands_own_remote(
    incus_client: IncusClient, scratch: Path, https_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `incus remote add NAME TOKEN` leaves in its configuration is what we read."""
    conf = scratch / "incus"
    name = _name()
    server_env = {k: v for k, v in os.environ.items() if k != "INCUS_CONF"}
    token = subprocess.run(
        ["incus", "config", "trust", "add", name, "--quiet"],
        check=True,
        capture_output=True,
        text=True,
        env=server_env,
    ).stdout.strip()
    try:
        subprocess.run(
            ["incus", "remote", "add", name, token],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env={**server_env, "INCUS_CONF": str(conf)},
            timeout=60,
        )
        monkeypatch.setenv("INCUS_CONF", str(conf))
        with IncusClient(https_url, project=incus_client.project) as client:
            assert isinstance(client.transport, TLSTransport)
            assert client.transport.server_cert == conf / "servercerts" / f"{name}.crt"
            assert client.transport.cert == conf / "client.crt"
            client.check()
            assert client.call("GET", "/1.0/instances", params={"recursion": 0}) is not None
    finally:
        crt = conf / "client.crt"
        if crt.exists():
            with contextlib.suppress(ServerError):  # not trusted: the token is still there
                incus_client.request(
                    "DELETE",
                    f"/1.0/certificates/{cert_fingerprint(crt.read_bytes())}",
                    project=False,
                )
        subprocess.run(
            ["incus", "config", "trust", "revoke-token", name],
            capture_output=True,
            check=False,
            env=server_env,
        )


def test_https_websocket_streams_exec(
    incus_client: IncusClient, trusted_conf: Path, https_url: str, busybox_container: str
) -> None:
    with IncusClient(https_url, project=incus_client.project) as client:
        code, out = _exec_over_websockets(client, busybox_container, ["echo", "over TLS"])
        assert (code, out) == (0, b"over TLS\n")
        # the websockets' TLS session is resumed by the next socket (no certificate exchange)
        sock = client.transport.open_socket(5)
        with sock:
            assert isinstance(sock, ssl.SSLSocket) and sock.session_reused


def test_https_missing_project_is_unavailable(trusted_conf: Path, https_url: str) -> None:
    project = _name()
    with IncusClient(https_url, project=project) as client, pytest.raises(UnavailableError) as info:
        client.check()
    assert f"project {project!r} does not exist on Incus server {https_url}" in str(info.value)


def test_https_untrusted_certificate_is_named(
    incus_conf: Path, https_url: str, scratch: Path
) -> None:
    crt, key = _make_cert(scratch, "fresh")
    with (
        IncusClient(https_url, cert=crt, key=key) as client,
        pytest.raises(UnavailableError) as info,
    ):
        client.check()
    message = str(info.value)
    assert f"does not trust the client certificate {crt}" in message
    assert cert_fingerprint(crt.read_bytes()) in message
    assert f"incus config trust add-certificate {crt}`" in message and "token" in message


def test_https_restricted_certificate_is_unavailable(
    incus_client: IncusClient, incus_conf: Path, https_url: str
) -> None:
    """A certificate trusted only for other projects is told so, not "project missing"."""
    crt = incus_conf / "client.crt"
    fingerprint = cert_fingerprint(crt.read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "INCUS_CONF"}
    subprocess.run(
        [
            *("incus", "config", "trust", "add-certificate", str(crt), "--name", _name()),
            *("--restricted", "--projects", "default"),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        client = IncusClient(https_url, project=incus_client.project)
        with client, pytest.raises(UnavailableError) as info:
            client.check()
        message = str(info.value)
        assert f"{crt} (sha256 {fingerprint})" in message
        assert f"only for other projects than {incus_client.project!r}" in message
    finally:
        incus_client.request("DELETE", f"/1.0/certificates/{fingerprint}", project=False)


def test_https_unverifiable_server_certificate(
    scratch: Path, https_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INCUS_CONF", str(scratch))  # no remotes: CA verification
    _make_cert(scratch, "client")  # a client certificate of its own: the server's is the issue
    with IncusClient(https_url) as client, pytest.raises(UnavailableError) as info:
        client.check()
    message = str(info.value)
    assert "certificate cannot be verified" in message and "incus remote add" in message


def test_https_pinned_certificate_mismatch(incus_conf: Path, https_url: str) -> None:
    (incus_conf / "servercerts" / "pti.crt").write_bytes((incus_conf / "client.crt").read_bytes())
    with IncusClient(https_url) as client, pytest.raises(UnavailableError) as info:
        client.check()
    assert "pinned" in str(info.value) and str(incus_conf / "servercerts" / "pti.crt") in str(
        info.value
    )


def test_https_unreachable_is_unavailable(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INCUS_CONF", str(scratch))
    start = time.monotonic()
    with (
        IncusClient("https://127.0.0.1:1", timeout=5) as client,
        pytest.raises(UnavailableError) as info,
    ):
        client.check()
    assert time.monotonic() - start < 2
    assert "cannot be reached" in str(info.value) and "refused" in str(info.value).lower()
