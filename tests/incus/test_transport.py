"""Which transport and credentials a remote gets (no server needed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pytest_incus.errors import ConfigError
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.transport import (
    DEFAULT_SOCKET,
    TLSTransport,
    UnixTransport,
    cert_fingerprint,
    transport_for,
)
from pytest_incus.settings import Settings


@pytest.fixture
def conf(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty incus configuration directory (INCUS_CONF), no socket variables."""
    for name in ("INCUS_SOCKET", "INCUS_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INCUS_CONF", str(scratch / "incus"))
    (scratch / "incus").mkdir()
    return scratch / "incus"


def _cert(path: Path) -> Path:
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", "/CN=pti-cl", "-keyout", str(path) + ".key"),
            *("-out", str(path)),
        ],
        check=True,
        capture_output=True,
    )
    return path


def test_default_socket_follows_incus_environment(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert transport_for(None).remote == str(DEFAULT_SOCKET)
    monkeypatch.setenv("INCUS_DIR", "/srv/incus")
    assert transport_for(None).remote == "/srv/incus/unix.socket"
    monkeypatch.setenv("INCUS_SOCKET", "/run/other.socket")  # wins over INCUS_DIR
    assert transport_for(None).remote == "/run/other.socket"


def test_a_path_is_a_socket(conf: Path) -> None:
    transport = transport_for("/srv/incus.socket")
    assert isinstance(transport, UnixTransport) and transport.remote == "/srv/incus.socket"


@pytest.mark.parametrize("remote", ["http://127.0.0.1:8443", "unix:///x", "https://h:1/1.0"])
def test_other_remotes_are_config_errors(conf: Path, remote: str) -> None:
    with pytest.raises(ConfigError, match="--incus-remote"):
        transport_for(remote)


def test_https_without_any_certificate(conf: Path) -> None:
    transport = transport_for("https://incus.example")
    assert isinstance(transport, TLSTransport)
    assert transport.url == "https://incus.example:8443"  # Incus's port when none is given
    assert transport.cert is None and transport.server_cert is None
    assert transport.verify is not False  # CA verification


def test_https_takes_the_incus_commands_certificate_and_pinned_server(conf: Path) -> None:
    _cert(conf / "client.crt")
    (conf / "client.crt.key").rename(conf / "client.key")
    (conf / "servercerts").mkdir()
    server = _cert(conf / "servercerts" / "lab.crt")
    remotes = {
        "local": {"addr": "unix://"},
        "other": {"addr": "https://10.0.0.9:8443"},
        "lab": {"addr": "https://10.0.0.1", "protocol": "incus"},  # same as :8443
    }
    (conf / "config.yml").write_text(json.dumps({"remotes": remotes}))
    transport = transport_for("https://10.0.0.1:8443")
    assert isinstance(transport, TLSTransport)
    assert (transport.cert, transport.key) == (conf / "client.crt", conf / "client.key")
    assert transport.server_cert == server
    assert transport.fingerprint == cert_fingerprint(server.read_bytes())
    assert transport.verify is False  # the adapter checks the fingerprint instead


def test_given_certificate_wins(conf: Path, scratch: Path) -> None:
    _cert(conf / "client.crt")
    (conf / "client.crt.key").rename(conf / "client.key")
    mine = _cert(scratch / "mine.crt")
    transport = transport_for("https://h", cert=mine, key=Path(str(mine) + ".key"))
    assert isinstance(transport, TLSTransport) and transport.cert == mine


def test_client_from_settings(conf: Path, scratch: Path) -> None:
    settings = Settings(
        cache_dir=scratch / "cache",
        backend="incus",
        remote="/srv/incus.socket",
        project="ci",
    )
    with IncusClient.from_settings(settings) as client:
        assert (client.remote, client.project) == ("/srv/incus.socket", "ci")


def test_unreadable_certificates_are_config_errors(conf: Path, scratch: Path) -> None:
    mine = _cert(scratch / "mine.crt")
    with pytest.raises(ConfigError, match=f"client certificate {mine} and key"):
        transport_for("https://h", cert=mine, key=scratch / "missing.key")
    other = _cert(scratch / "other.crt")
    with pytest.raises(ConfigError, match="cannot be loaded"):  # a key of another certificate
        transport_for("https://h", cert=mine, key=Path(str(other) + ".key"))
    (conf / "servercerts").mkdir()
    (conf / "servercerts" / "lab.crt").write_text("not a certificate")
    (conf / "config.yml").write_text(json.dumps({"remotes": {"lab": {"addr": "https://h"}}}))
    with pytest.raises(ConfigError, match="pinned for https://h:8443 cannot be read"):
        transport_for("https://h")
