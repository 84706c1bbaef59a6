"""App images from a registry that speaks TLS with a certificate of its own CA and wants a login:
credentials from the files skopeo reads, trust of the CA, and what the user is told when either
is missing or wrong. Real docker-registry on loopback, real skopeo."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_helpers import SCRATCH_ROOT, Registry, pushed_busybox

from pytest_incus import fsutil
from pytest_incus.errors import ImageError
from pytest_incus.images.busybox import host_busybox
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings


@dataclass(frozen=True)
class Secure:
    """The module's secure registry and the busybox image pushed to it."""

    registry: Registry
    ref: str

    @property
    def ca(self) -> str:
        assert self.registry.ca is not None
        return str(self.registry.ca)


@pytest.fixture(scope="module")
def secure() -> Iterator[Secure]:
    """A TLS + login registry on loopback holding a busybox app image."""
    with pushed_busybox("private/app:1", secure=True) as (registry, ref, _):
        yield Secure(registry, ref)


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty HOME, so that skopeo finds no credentials and trusts no CA but what the test
    gives it: no ~/.config/containers/auth.json or ~/.docker/config.json, XDG_RUNTIME_DIR an
    empty directory, and no REGISTRY_AUTH_FILE, DOCKER_CONFIG, SSL_CERT_FILE, SSL_CERT_DIR."""
    path = SCRATCH_ROOT / f"home-{secrets.token_hex(4)}"
    (path / "run").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path / "run"))
    for name in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    yield path
    fsutil.remove_tree(path)


@pytest.fixture
def store(scratch_cache: Path) -> ImageStore:
    """An image store on an empty cache, that names no registry insecure."""
    return ImageStore(Settings(cache_dir=scratch_cache))


def _auth_file(home: Path, secure: Secure, password: str | None = None) -> Path:
    path = home / "auth.json"
    path.write_text(secure.registry.auth_config(password))
    return path


def _assert_pulled(store: ImageStore, secure: Secure) -> None:
    image = store.get(secure.ref, kind="app")
    assert (image.rootfs / "bin" / "busybox").read_bytes() == host_busybox().read_bytes()
    assert store.list() == [image]


def test_credentials_from_containers_auth_json(
    store: ImageStore, secure: Secure, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(_auth_file(home, secure)))
    monkeypatch.setenv("SSL_CERT_FILE", secure.ca)  # Go's root pool: only the test CA
    _assert_pulled(store, secure)


def test_credentials_from_docker_config_json(
    store: ImageStore, secure: Secure, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(secure.registry.auth_config())
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("SSL_CERT_FILE", secure.ca)
    _assert_pulled(store, secure)


def test_no_credentials_is_a_refused_login(
    store: ImageStore, secure: Secure, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", secure.ca)
    with pytest.raises(ImageError) as info:
        store.get(secure.ref, kind="app")
    message = str(info.value)
    host = secure.registry.host
    assert f"registry {host} refused the login: no credentials for {host} were found" in message
    for where in ("REGISTRY_AUTH_FILE", "auth.json", "~/.docker/config.json", "skopeo login"):
        assert where in message
    assert store.list() == []


def test_wrong_password_is_a_refused_login(
    store: ImageStore, secure: Secure, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(_auth_file(home, secure, "wrong")))
    monkeypatch.setenv("SSL_CERT_FILE", secure.ca)
    host = secure.registry.host
    with pytest.raises(
        ImageError,
        match=rf"registry {host} refused the login of user 'tester' .*"
        rf"the credentials stored for {host} are wrong or expired; correct them: .*auth\.json",
    ):
        store.get(secure.ref, kind="app")
    assert store.list() == []


def test_untrusted_certificate_says_how_to_trust_it(
    store: ImageStore, secure: Secure, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(_auth_file(home, secure)))
    with pytest.raises(ImageError) as info:
        store.get(secure.ref, kind="app")  # the system's CAs only
    message = str(info.value)
    host = secure.registry.host
    assert f"the TLS certificate of registry {host} is not trusted" in message
    assert "certificate signed by unknown authority" in message  # what skopeo said
    assert f"/etc/containers/certs.d/{host}/ca.crt" in message
    assert "SSL_CERT_FILE" in message
    assert f"--incus-insecure-registry={host}" in message
    assert store.list() == []


def test_tls_registry_named_insecure_needs_no_ca(
    scratch_cache: Path, secure: Secure, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(_auth_file(home, secure)))
    store = ImageStore(
        Settings(cache_dir=scratch_cache, insecure_registries=frozenset({secure.registry.host}))
    )
    _assert_pulled(store, secure)
