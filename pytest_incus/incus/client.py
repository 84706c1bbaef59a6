"""A small client of Incus's REST API, spoken with ``requests`` (and ``websocket-client`` for the
streams of exec).

Answers come in three types (https://linuxcontainers.org/incus/docs/main/rest-api/): ``sync``
(the result is ``metadata``), ``async`` (``metadata`` is an operation, waited through
``/1.0/operations/ID/wait``) and ``error``. Every failure becomes an error of our tree here:
requests' and websocket-client's in one context manager (:func:`translated`), Incus's error
answers in :meth:`IncusClient.request`.

Threads: one ``requests.Session`` per client, shared by every thread without a lock. What a
request touches of it is read-only after ``__init__`` (adapters, headers, verify, cert; no
environment or netrc lookups, ``trust_env`` is off) except the connection pools, which urllib3
makes thread safe, and the cookie jar, which locks itself. A lock would serialize a long
operation wait in one thread with an exec in another; a session per thread would lose keep-alive
for every new reader thread.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import requests
import websocket

from ..errors import ServerError, UnavailableError, WaitTimeoutError
from ..settings import Settings
from .transport import TLSTransport, Transport, UnixTransport, cert_fingerprint, transport_for

# One /wait request waits at most this long on the server; longer waits loop, so a dead
# connection is noticed and the caller's deadline is kept.
WAIT_CHUNK = 30.0
# What the HTTP timeout of a /wait request adds to its server-side timeout.
WAIT_SLACK = 5.0
# At most this long to connect (a host that drops our SYNs is unreachable, whatever the
# request's own timeout): requests' timeout is then (connect, read).
CONNECT_TIMEOUT = 10.0

_Params = Mapping[str, str | int | float] | None


def _reach_hint(transport: Transport) -> str:
    if isinstance(transport, UnixTransport):
        return "start incusd (the incus service), or give --incus-remote"
    return "check that incusd listens there (core.https_address), or give another --incus-remote"


@contextmanager
def translated(transport: Transport, what: str) -> Iterator[None]:
    """Turn requests' and websocket-client's errors for ``what`` (say "GET /1.0") into ours:
    unreachable server and TLS problems are UnavailableError, anything else ServerError."""
    remote = transport.remote
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise _tls_error(transport, what, exc) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.ConnectTimeout) as exc:
        raise UnavailableError(
            f"Incus server at {remote} cannot be reached ({what}): {_root(exc)}; "
            f"{_reach_hint(transport)}",
            exc=exc,
        ) from exc
    except requests.exceptions.Timeout as exc:
        raise ServerError(
            f"Incus server at {remote} did not answer {what} in time: {_root(exc)}; see its "
            "log (incusd --debug), or give a longer timeout",
            exc=exc,
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise ServerError(f"Incus server at {remote}: {what} failed: {exc}", exc=exc) from exc
    except websocket.WebSocketBadStatusException as exc:
        raise ServerError(
            f"Incus server at {remote} refused {what}: {exc}",
            status=exc.status_code,
            exc=exc,
        ) from exc
    except websocket.WebSocketException as exc:
        raise ServerError(f"Incus server at {remote}: {what} failed: {exc}", exc=exc) from exc
    except (ssl.SSLError, ssl.CertificateError) as exc:  # our own TLS sockets (websockets)
        raise _tls_error(transport, what, exc) from exc
    except OSError as exc:  # sockets we open ourselves (websockets)
        raise UnavailableError(
            f"Incus server at {remote} cannot be reached ({what}): {exc}; {_reach_hint(transport)}",
            exc=exc,
        ) from exc


def _root(exc: BaseException) -> str:
    """The useful part of a requests error: requests wraps urllib3's MaxRetryError, whose
    ``reason`` wraps the socket's own error (refused, no such file, name unknown)."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    inner = getattr(inner, "reason", None) or inner
    if isinstance(inner, BaseException) and isinstance(inner.__cause__, OSError):
        inner = inner.__cause__
    return str(inner)


def _tls_error(transport: Transport, what: str, exc: BaseException) -> UnavailableError:
    if isinstance(transport, TLSTransport) and transport.server_cert is not None:
        how = (
            f"it is not the certificate pinned in {transport.server_cert}; if the server's "
            "certificate changed on purpose, `incus remote remove` and `incus remote add` it "
            "again"
        )
    else:
        how = (
            "an Incus server's certificate is self-signed: `incus remote add NAME "
            f"{transport.remote}` pins it (in the incus configuration, $INCUS_CONF or "
            "~/.config/incus, which we read), or give a CA bundle in REQUESTS_CA_BUNDLE"
        )
    return UnavailableError(
        f"Incus server at {transport.remote}: TLS failed ({what}), its certificate cannot be "
        f"verified: {_root(exc)}; {how}",
        exc=exc,
    )


class _WebSocket(websocket.WebSocket):
    """A websocket whose ``close()`` always frees its socket: websocket-client's returns at once
    when a close frame was already sent (``send_close()``, or its answer to the server's close
    when reading), leaving the socket open."""

    def close(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().close(*args, **kwargs)
        finally:
            self.shutdown()  # type: ignore[no-untyped-call]


class IncusClient:
    """The REST API of one Incus server, in one project."""

    def __init__(
        self,
        remote: str | None = None,
        *,
        project: str = "default",
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.transport = transport_for(remote, cert=cert, key=key)
        self.remote: str = self.transport.remote
        self.project = project
        self.timeout = timeout
        session = requests.Session()
        session.trust_env = False  # no proxies, netrc or CA bundle from the environment per call
        session.headers["User-Agent"] = "pytest-incus"
        self.transport.mount(session)
        self.session = session
        # both only ever go from unset to set: threads racing here at worst ask twice
        self._server: dict[str, Any] | None = None
        self._checked = False

    @classmethod
    def from_settings(cls, settings: Settings) -> IncusClient:
        """The client of ``--incus-remote``, ``--incus-project`` and the client certificate
        options."""
        return cls(
            settings.remote,
            project=settings.project,
            cert=settings.client_cert,
            key=settings.client_key,
        )

    def __repr__(self) -> str:
        return f"IncusClient({self.remote!r}, project={self.project!r})"

    def __enter__(self) -> IncusClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections."""
        self.session.close()

    # -- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        """That the server answers, trusts us and has our project; else UnavailableError
        saying what to do. Remembered once it passed."""
        if self._checked:
            return
        info = self.server()
        if info.get("auth") != "trusted":
            self._server = None  # ask again next time: a trust may be added meanwhile
            raise UnavailableError(self._untrusted_message())
        try:
            self.request("GET", f"/1.0/projects/{self.project}", project=False)
        except ServerError as exc:
            if exc.status == 403:
                raise UnavailableError(self._restricted_message(), exc=exc) from exc
            if exc.status != 404:
                raise
            raise UnavailableError(
                f"project {self.project!r} does not exist on Incus server {self.remote}; "
                f"create it with `incus project create {self.project}`, or give "
                "--incus-project",
                exc=exc,
            ) from exc
        self._checked = True

    def _certificate(self) -> str:
        """The client certificate, for messages: its path and sha256 fingerprint."""
        transport = self.transport
        if not isinstance(transport, TLSTransport) or transport.cert is None:
            return "(none)"
        try:
            fingerprint = cert_fingerprint(transport.cert.read_bytes())
        except (OSError, ValueError) as exc:
            fingerprint = f"unreadable: {exc}"
        return f"{transport.cert} (sha256 {fingerprint})"

    def _restricted_message(self) -> str:
        return (
            f"Incus server at {self.remote} trusts the client certificate "
            f"{self._certificate()} only for other projects than {self.project!r}; allow it "
            "there on the server (`incus config trust edit FINGERPRINT`: projects), or give "
            "--incus-project of a project it may use"
        )

    def _untrusted_message(self) -> str:
        transport = self.transport
        if not isinstance(transport, TLSTransport) or transport.cert is None:
            where = (
                "give --incus-client-cert and --incus-client-key, or create the incus "
                "command's own with `incus remote add NAME URL` (it makes client.crt in "
                "$INCUS_CONF or ~/.config/incus)"
            )
            return (
                f"Incus server at {self.remote} does not trust us: no client certificate "
                f"was found; {where}"
            )
        return (
            f"Incus server at {self.remote} does not trust the client certificate "
            f"{self._certificate()}; trust it on the server with `incus config trust "
            f"add-certificate {transport.cert}`, or (for the incus command's own client.crt) "
            "make a token there with `incus config trust add NAME` and use it here with "
            "`incus remote add NAME TOKEN`"
        )

    def server(self) -> dict[str, Any]:
        """The server's description (GET /1.0: api_extensions, auth, environment, ...),
        fetched once."""
        if self._server is None:
            # not in our project: a missing project is check()'s own message
            response = self.request("GET", "/1.0", project=False)
            info = self._json("GET /1.0", response).get("metadata")
            if not isinstance(info, dict):
                raise ServerError(f"Incus server at {self.remote}: GET /1.0 answered {info!r}")
            self._server = info
        return self._server

    # -- requests -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: _Params = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: float | None = None,
        project: bool = True,
    ) -> requests.Response:
        """One request to ``path`` ("/1.0/..."), in our project unless ``project`` is False.

        A non-2xx answer is ServerError carrying Incus's error text and ``status`` (call() and
        start() also check the body's type). With ``stream`` the body is left unread (close
        the response, and read it inside ``errors()``)."""
        query: dict[str, Any] = dict(params or {})
        if project:
            query.setdefault("project", self.project)
        what = f"{method} {path}"
        wait = self.timeout if timeout is None else timeout
        with translated(self.transport, what):
            response = self.session.request(
                method,
                self.transport.base_url + path,
                params=query,
                json=json,
                data=data,
                headers=headers,
                stream=stream,
                timeout=(min(CONNECT_TIMEOUT, wait), wait),
                allow_redirects=False,
            )
        if not 200 <= response.status_code < 300:
            try:
                raise self._error(what, response)
            finally:
                response.close()
        return response

    def errors(self, what: str) -> AbstractContextManager[None]:
        """The translation of requests' errors for ``what`` (say "GET /1.0/.../files"), for
        callers that read a ``stream=True`` body themselves: a connection that breaks while
        they read is then our error too."""
        return translated(self.transport, what)

    def _error(self, what: str, response: requests.Response) -> ServerError:
        status = response.status_code
        text = response.reason or ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            text = str(body.get("error") or text)
            status = int(body.get("error_code") or status)
        return ServerError(
            f"Incus server at {self.remote} refused {what}: {text} (HTTP {response.status_code})",
            status=status,
        )

    def _json(self, what: str, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise ServerError(
                f"Incus server at {self.remote}: {what} answered something that is not JSON "
                f"(HTTP {response.status_code}): {response.text[:200]!r}",
                status=response.status_code,
                exc=exc,
            ) from exc
        if not isinstance(body, dict):
            raise ServerError(f"Incus server at {self.remote}: {what} answered {body!r}")
        if body.get("type") == "error":
            # Incus writes some errors (of /wait) with HTTP 200
            raise ServerError(
                f"Incus server at {self.remote} refused {what}: {body.get('error')}",
                status=int(body.get("error_code") or 0),
            )
        return body

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: _Params = None,
        timeout: float | None = None,
    ) -> Any:
        """Do ``method path`` and return its result: a sync answer's metadata, or for an async
        answer the metadata of its operation once done (``{}`` if it has none).

        ``timeout`` bounds the request and the wait for its operation (None: each request the
        client's timeout, the operation as long as it takes). A failed operation is
        ServerError with its error; one still running at the deadline WaitTimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        what = f"{method} {path}"
        response = self.request(method, path, json=json, params=params, timeout=timeout)
        body = self._json(what, response)
        if body.get("type") != "async":
            return body.get("metadata")
        operation = body.get("metadata") or {}
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done = self._wait(str(operation.get("id")), left, what)
        if done.get("status") != "Success":  # _wait raised for failures: still running
            raise WaitTimeoutError(
                f"Incus server at {self.remote}: {what} did not finish within {timeout:g} s "
                f"(operation {done.get('id')}, {done.get('description')!r}, is still "
                f"{done.get('status')}; `incus operation show {done.get('id')}`)"
            )
        return done.get("metadata") or {}

    def start(
        self, method: str, path: str, *, json: Any = None, params: _Params = None
    ) -> dict[str, Any]:
        """Do ``method path``, which must answer with an operation, and return that operation
        (its "id", "metadata", ...) without waiting for it."""
        what = f"{method} {path}"
        body = self._json(what, self.request(method, path, json=json, params=params))
        operation = body.get("metadata")
        if body.get("type") != "async" or not isinstance(operation, dict):
            raise ServerError(
                f"Incus server at {self.remote}: {what} answered {body.get('type')!r}, not an "
                "operation"
            )
        return operation

    def wait(self, operation_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for an operation (its id, or its path "/1.0/operations/ID") to finish, at most
        ``timeout`` seconds (None: as long as it takes); return it, with status "Running" if
        it was still running at the deadline. A failed operation is ServerError."""
        return self._wait(operation_id, timeout, f"operation {operation_id}")

    def _wait(self, operation_id: str, timeout: float | None, what: str) -> dict[str, Any]:
        op_id = operation_id.rstrip("/").rsplit("/", 1)[-1]
        deadline = None if timeout is None else time.monotonic() + timeout
        path = f"/1.0/operations/{op_id}"
        while True:
            left = WAIT_CHUNK if deadline is None else deadline - time.monotonic()
            chunk = max(0.0, min(WAIT_CHUNK, left))
            # Incus takes whole seconds; 0 answers at once. Round up so a short wait waits.
            seconds = int(-(-chunk // 1))
            response = self.request(
                "GET", path + "/wait", params={"timeout": seconds}, timeout=seconds + WAIT_SLACK
            )
            try:
                body = response.json()
            except ValueError:
                body = None
            operation = body.get("metadata") if isinstance(body, dict) else None
            if not isinstance(operation, dict):
                # Incus 6.0 answers a wait that timed out, and one whose operation failed,
                # with an error body (HTTP 200): ask for the operation itself to tell them apart
                operation = self._json(f"GET {path}", self.request("GET", path))["metadata"]
                assert isinstance(operation, dict)
            status = operation.get("status")
            if status == "Failure":
                raise ServerError(
                    f"Incus server at {self.remote}: {what} failed: {operation.get('err')}",
                    status=int(operation.get("status_code") or 0),
                )
            if status == "Cancelled":
                raise ServerError(
                    f"Incus server at {self.remote}: {what} was cancelled "
                    f"({operation.get('err') or 'no reason given'})",
                    status=int(operation.get("status_code") or 0),
                )
            if status == "Success":
                return operation
            if deadline is not None and time.monotonic() >= deadline:
                return operation

    # -- websockets -----------------------------------------------------------------------

    def websocket(self, operation_id: str, secret: str) -> websocket.WebSocket:
        """The websocket of ``secret`` of operation ``operation_id`` (exec's control, 0, 1,
        2), connected over this client's transport. It blocks (no timeout) once connected:
        ``settimeout()`` it as the reader needs; its sends are thread safe; ``close()`` frees it
        in every state."""
        op_id = operation_id.rstrip("/").rsplit("/", 1)[-1]
        path = f"/1.0/operations/{op_id}/websocket?secret={secret}"
        with translated(self.transport, f"websocket {path.split('?')[0]}"):
            sock = self.transport.open_socket(min(CONNECT_TIMEOUT, self.timeout))
            try:
                ws = websocket.create_connection(
                    self.transport.ws_base + path,
                    socket=sock,
                    timeout=self.timeout,
                    class_=_WebSocket,
                    skip_utf8_validation=True,  # exec streams are bytes
                    enable_multithread=True,
                )
            except BaseException:
                sock.close()
                raise
            self.transport.opened(sock)
            ws.settimeout(None)
        return ws
