"""How bytes reach an Incus server: its unix socket, or HTTPS with a client certificate.

A :class:`Transport` mounts its adapter on the client's ``requests.Session`` (plain HTTP calls)
and opens connected sockets for websockets (exec streams), over the same path and with the same
credentials.

Which transport and which credentials (:func:`transport_for`):

- remote None: Incus's own socket, ``$INCUS_SOCKET``, else ``$INCUS_DIR/unix.socket``, else
  ``/var/lib/incus/unix.socket`` (the order the ``incus`` command follows);
- a path: that socket;
- ``https://HOST[:PORT]``: the client certificate given, else the ``incus`` command's own
  (``$INCUS_CONF`` or ``~/.config/incus``: ``client.crt``/``client.key``). The server's
  certificate is pinned when that configuration has a remote of this address and its
  ``servercerts/<remote>.crt`` (Incus servers use self-signed certificates, which the ``incus``
  command pins on ``incus remote add``); else normal CA verification (``REQUESTS_CA_BUNDLE``,
  ``CURL_CA_BUNDLE`` or requests' own bundle).

We write the unix socket adapter ourselves (40 lines over urllib3's public connection classes)
instead of depending on ``requests-unixsocket``: its release 0.3.0 (2021) stayed the current one
for years while it broke with urllib3 2.0 (its issue #70) and with requests 2.32's adapter change
for CVE-2024-35195 (``get_connection_with_tls_context``; pylxd had to pin ``requests<2.32``, its
PR #580), and a fork (``requests-unixsocket2``) now competes with the late 0.4 releases. An adapter
that owns its one connection pool has no such coupling: requests calls
``get_connection_with_tls_context`` (or ``get_connection`` before 2.32.2) and we return our pool.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import requests.utils
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import yaml
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from ..errors import ConfigError

DEFAULT_SOCKET = Path("/var/lib/incus/unix.socket")
DEFAULT_PORT = 8443  # Incus's registered port, what `incus remote add HOST` assumes
UNIX_BASE = "http+unix://incus"  # the scheme our adapter is mounted on; the host is not used
# connections kept per pool: the exec readers and a runtime's calls may run in a few threads
POOL_SIZE = 8


def retries() -> Retry:
    """Retry only what cannot have reached the server twice: a connection that could not be
    made, or (GET and HEAD only) a kept-alive connection the server had closed just as we
    reused it. Never a status: Incus's error answers are final."""
    return Retry(
        total=2,
        connect=2,
        read=1,
        status=0,
        redirect=0,
        other=0,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
    )


def default_socket() -> Path:
    """Incus's own unix socket, found the way the ``incus`` command finds it."""
    if env := os.environ.get("INCUS_SOCKET"):
        return Path(env)
    if env := os.environ.get("INCUS_DIR"):
        return Path(env) / "unix.socket"
    return DEFAULT_SOCKET


def config_dir() -> Path:
    """The ``incus`` command's configuration directory (client certificate, remotes)."""
    if env := os.environ.get("INCUS_CONF"):
        return Path(env)
    return Path.home() / ".config" / "incus"


def cert_fingerprint(pem: bytes | str) -> str:
    """The sha256 fingerprint (hex) of a PEM certificate, as ``incus config trust list``
    shows it."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).hexdigest()


class UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection to a unix socket instead of host:port."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # the pool sets self.timeout to its connect timeout before connecting
            sock.settimeout(Timeout.resolve_default_timeout(self.timeout))
            sock.connect(self.socket_path)
        except TimeoutError as exc:
            sock.close()
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"connection to {self.socket_path} timed out"
            ) from exc
        except OSError as exc:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(
                self, f"cannot connect to {self.socket_path}: {exc}"
            ) from exc
        self.sock = sock


class UnixConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
    """Keep-alive connections to one unix socket (thread safe, as every urllib3 pool)."""

    ConnectionCls = UnixConnection

    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        # conn_kw (socket_path) goes to every UnixConnection the pool makes
        super().__init__("localhost", socket_path=socket_path, **kwargs)


class UnixAdapter(HTTPAdapter):
    """A requests adapter that sends every request to one unix socket."""

    def __init__(self, socket_path: str, pool_size: int = POOL_SIZE) -> None:
        super().__init__(max_retries=retries())
        self.pool = UnixConnectionPool(socket_path, maxsize=pool_size, block=False)

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: tuple[str, str] | str | None = None,
    ) -> urllib3.connectionpool.ConnectionPool:
        return self.pool

    def get_connection(  # requests before 2.32.2 calls this one
        self, url: str | bytes, proxies: Mapping[str, str] | None = None
    ) -> urllib3.connectionpool.ConnectionPool:
        return self.pool

    def request_url(
        self, request: requests.PreparedRequest, proxies: Mapping[str, str] | None
    ) -> str:
        return request.path_url  # no proxies: the path alone, as to any origin server

    def close(self) -> None:
        super().close()
        self.pool.close()


class PinnedAdapter(HTTPAdapter):
    """HTTPS that trusts exactly one server certificate, by its sha256 fingerprint.

    This is what the ``incus`` command does with ``servercerts/<remote>.crt``: a self-signed
    server certificate names the server's host name, not the address we dial, so hostname and CA
    checks cannot apply; urllib3's ``assert_fingerprint`` replaces them (and marks the
    connection verified, so no InsecureRequestWarning)."""

    def __init__(self, fingerprint: str, pool_size: int = POOL_SIZE) -> None:
        self.fingerprint = fingerprint  # before super().__init__, which builds the pool manager
        super().__init__(pool_maxsize=pool_size, max_retries=retries())

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


class Transport:
    """How to reach one Incus server: the base URL of its API, the adapter for the session,
    and connected sockets for websockets."""

    remote: str  # for messages: the socket path or the URL
    base_url: str  # what API paths ("/1.0/...") are appended to
    ws_base: str  # the same for websockets

    def mount(self, session: requests.Session) -> None:
        """Prepare ``session`` to send this transport's requests."""
        raise NotImplementedError

    def open_socket(self, timeout: float) -> socket.socket:
        """A socket connected (and for TLS verified) to the server, for a websocket."""
        raise NotImplementedError

    def opened(self, sock: socket.socket) -> None:
        """``sock`` (of open_socket) has read its first answer: a TLS transport keeps its
        session to resume it on the next socket."""


@dataclass(eq=False)
class UnixTransport(Transport):
    """Incus's unix socket: trusted by file permissions, no certificate."""

    path: Path

    def __post_init__(self) -> None:
        self.remote = str(self.path)
        self.base_url = UNIX_BASE
        self.ws_base = "ws://localhost"  # the Host header of the handshake; the socket decides

    def mount(self, session: requests.Session) -> None:
        session.mount(UNIX_BASE + "/", UnixAdapter(str(self.path)))

    def open_socket(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        return sock


@dataclass(eq=False)
class TLSTransport(Transport):
    """HTTPS with a client certificate; the server's certificate pinned or CA-verified."""

    url: str  # https://HOST:PORT, normalized
    cert: Path | None  # client certificate and key (PEM), both or neither
    key: Path | None
    server_cert: Path | None = None  # pinned server certificate, else CA verification
    ca_bundle: str | None = None  # of CA verification; None: requests' own bundle
    fingerprint: str | None = field(init=False, default=None)  # of server_cert
    _context: ssl.SSLContext | None = field(init=False, default=None, repr=False)
    # the last TLS session of a websocket: resumed by the next one, which then skips the
    # certificate exchange (2.9 ms instead of 6.4 ms here; an exec opens four)
    _session: ssl.SSLSession | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.remote = self.url
        self.base_url = self.url
        self.ws_base = "wss://" + self.url.removeprefix("https://")
        parts = urlsplit(self.url)
        self.host = parts.hostname or ""
        self.port = parts.port or DEFAULT_PORT
        # read the certificate files now: a wrong one is a mistake in the options or the
        # incus configuration, not a server that cannot be reached
        if self.server_cert is not None:
            try:
                self.fingerprint = cert_fingerprint(self.server_cert.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"the server certificate {self.server_cert} pinned for {self.url} cannot be "
                    f"read ({exc}); pin it again with `incus remote remove` and `incus remote "
                    "add`",
                    exc=exc,
                ) from exc
        try:
            self._context = self._build_context()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"the client certificate {self.cert} and key {self.key} for {self.url} cannot "
                f"be loaded ({exc}); give a PEM certificate and its private key "
                "(--incus-client-cert, --incus-client-key)",
                exc=exc,
            ) from exc

    @property
    def verify(self) -> bool | str:
        """requests' ``verify`` for this server (False when pinned: the adapter checks the
        fingerprint instead)."""
        return False if self.fingerprint is not None else self.verify_path()

    def mount(self, session: requests.Session) -> None:
        if self.fingerprint is not None:
            session.mount(self.url + "/", PinnedAdapter(self.fingerprint))
        else:
            session.mount(
                self.url + "/", HTTPAdapter(pool_maxsize=POOL_SIZE, max_retries=retries())
            )
        session.verify = self.verify
        if self.cert is not None and self.key is not None:
            session.cert = (str(self.cert), str(self.key))

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of websockets: the same client certificate and server check as the
        session's (built in ``__post_init__``, which so checks the certificate files)."""
        assert self._context is not None
        return self._context

    def _build_context(self) -> ssl.SSLContext:
        if self.fingerprint is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # open_socket checks the fingerprint
        else:
            context = ssl.create_default_context(cafile=self.verify_path())
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(self.cert, self.key)
        return context

    def verify_path(self) -> str:
        """The CA bundle of CA verification."""
        return self.ca_bundle or requests.utils.DEFAULT_CA_BUNDLE_PATH

    def open_socket(self, timeout: float) -> socket.socket:
        # We hand websocket-client a socket of our own instead of its sslopt: the pinned
        # fingerprint is then checked before the handshake sends the operation's secret, with
        # the same rule as the session's adapter, and the TLS session can be resumed.
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            # as urllib3 and websocket-client do on sockets of their own: small frames (stdin,
            # close) must not wait for the peer's delayed ACK
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.ssl_context().wrap_socket(
                raw, server_hostname=self.host, session=self._session
            )
        except BaseException:
            raw.close()
            raise
        if self.fingerprint is not None:
            der = sock.getpeercert(binary_form=True) or b""
            got = hashlib.sha256(der).hexdigest()
            if got != self.fingerprint:
                sock.close()
                # what urllib3 raises for the same mismatch, so one translation covers both
                raise ssl.SSLError(
                    f"server certificate fingerprint {got} is not the pinned {self.fingerprint}"
                    f" ({self.server_cert})"
                )
        return sock

    def opened(self, sock: socket.socket) -> None:
        # TLS 1.3 sends its session ticket after the handshake: it is there once we have read
        if isinstance(sock, ssl.SSLSocket) and sock.session is not None:
            self._session = sock.session


def transport_for(
    remote: str | None, *, cert: Path | None = None, key: Path | None = None
) -> Transport:
    """The transport of ``remote`` (None: Incus's own socket; a socket path; or
    ``https://HOST[:PORT]``) with the credentials described in the module docstring."""
    if remote is None:
        return UnixTransport(default_socket())
    if remote.startswith("https://"):
        return _tls_transport(remote, cert, key)
    if "://" in remote:
        raise ConfigError(
            f"--incus-remote={remote!r}: Incus speaks HTTPS or its unix socket; give "
            "https://HOST:PORT or the path of a unix socket"
        )
    return UnixTransport(Path(remote).absolute())


def _normal_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(
            f"--incus-remote={url!r} is not a server address; give https://HOST:PORT "
            f"(port {DEFAULT_PORT} if left out), no path"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"https://{host}:{parts.port or DEFAULT_PORT}"


def _tls_transport(url: str, cert: Path | None, key: Path | None) -> TLSTransport:
    url = _normal_url(url)
    conf = config_dir()
    if cert is None and key is None:
        crt, pem = conf / "client.crt", conf / "client.key"
        if crt.is_file() and pem.is_file():
            cert, key = crt, pem
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    return TLSTransport(url, cert, key, server_cert=_pinned_cert(conf, url), ca_bundle=ca_bundle)


def _pinned_cert(conf: Path, url: str) -> Path | None:
    """``servercerts/<remote>.crt`` of the ``incus`` command's remote whose addr is ``url``."""
    try:
        config = yaml.safe_load((conf / "config.yml").read_text())
    except (OSError, yaml.YAMLError):
        return None  # no configuration (or none we can read): CA verification
    remotes = config.get("remotes") if isinstance(config, dict) else None
    if not isinstance(remotes, dict):
        return None
    for name, entry in remotes.items():
        addr = entry.get("addr") if isinstance(entry, dict) else None
        if not isinstance(addr, str) or not addr.startswith("https://"):
            continue
        try:
            same = _normal_url(addr) == url
        except ConfigError:
            continue
        crt = conf / "servercerts" / f"{name}.crt"
        if same and crt.is_file():
            return crt
    return None
