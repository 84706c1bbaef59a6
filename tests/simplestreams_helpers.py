"""Simplestreams image servers for the tests, written by the Incus project's own tool.

:func:`make_image` builds a small split image (a metadata tarball and a squashfs rootfs made
from the host's static busybox, with an /etc/os-release that names the image's os and
release); :func:`build_tree` adds images to a tree with the real ``incus-simplestreams add``
(Debian's ``incus-extra``), so the client is checked against what Incus writes, not against
our own reading of the format. :class:`ImageServer` serves a tree on loopback over HTTP or
HTTPS (a CA of the test's own), with Range requests, a log of the requests it got, and two
faults on demand: a first download of each image file cut midway, and a file served damaged.
"""

from __future__ import annotations

import datetime
import http.server
import io
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from tls_helpers import make_tls

from pytest_incus import fsutil
from pytest_incus.images import busybox

SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")
CREATED = 1764547200  # 2025-12-01 00:00 UTC: incus-simplestreams names the version 202512010000

# metadata.yaml's architecture is the kernel's name; the product's is Debian's
_KERNEL_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


def version_of(created: int) -> str:
    """The version name incus-simplestreams gives an image of creation date ``created``."""
    return datetime.datetime.fromtimestamp(created, datetime.UTC).strftime("%Y%m%d%H%M")


def _run(args: list[str], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr}"
    return proc.stdout


def make_image(
    workdir: Path,
    *,
    os: str,
    release: str,
    variant: str = "default",
    arch: str = "amd64",
    created: int = CREATED,
    files: dict[str, str | bytes] | None = None,
) -> tuple[Path, Path]:
    """A split image in ``workdir`` (made if missing): (metadata tarball ``incus.tar.xz``,
    rootfs ``root.squashfs``). The rootfs is the busybox image's layout with an
    /etc/os-release of ``ID=<os>`` and ``VERSION_ID=<release>`` and ``files`` (path ->
    content) added; ``created`` is metadata.yaml's creation_date (the version's name)."""
    name = f"{os}-{release}-{variant}-{created}-{secrets.token_hex(3)}".replace("/", "_")
    work = workdir / name
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    busybox.build(rootfs)
    (rootfs / "etc" / "os-release").write_text(
        f'NAME="{os}"\nID={os}\nVERSION_ID="{release}"\nPRETTY_NAME="{os} {release}"\n'
    )
    for path, content in (files or {}).items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    squashfs = work / "root.squashfs"
    _run(["mksquashfs", str(rootfs), str(squashfs), "-noappend", "-all-root", "-no-progress"])
    fsutil.remove_tree(rootfs)
    metadata = (
        f"architecture: {_KERNEL_ARCH.get(arch, arch)}\n"
        f"creation_date: {created}\n"
        "properties:\n"
        f"  description: {os} {release} {variant} (a pytest-incus test image)\n"
        f"  os: {os}\n"
        f'  release: "{release}"\n'
        f"  variant: {variant}\n"
        f"  architecture: {arch}\n"
    ).encode()
    tarball = work / "incus.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        info = tarfile.TarInfo("metadata.yaml")
        info.size, info.mtime, info.mode = len(metadata), created, 0o644
        tar.addfile(info, io.BytesIO(metadata))
    return tarball, squashfs


def build_tree(tree: Path, images: Iterable[tuple[Path, Path]]) -> None:
    """Add each (metadata tarball, rootfs) of ``images`` to the simplestreams tree ``tree``
    (made if missing) with ``incus-simplestreams add``, run in the tree as its docs say."""
    assert shutil.which("incus-simplestreams"), (
        "the simplestreams tests need incus-simplestreams: apt-get install incus-extra "
        "(from bookworm-backports; scripts/setup-host.sh does it)"
    )
    tree.mkdir(parents=True, exist_ok=True)
    for metadata, rootfs in images:
        _run(["incus-simplestreams", "add", str(metadata), str(rootfs)], cwd=tree)


def damaged(data: bytes) -> bytes:
    """``data`` with its middle byte flipped: same size, other sha256."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the tree's files, with single-range requests."""

    server: _Server
    timeout = 10  # a client that connects and says nothing does not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is ImageServer.requests

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        owner._log(self.command, path, self.headers.get("Range"))
        file = (owner.tree / path.lstrip("/")).resolve()
        if not file.is_relative_to(owner.tree.resolve()) or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        if owner.corrupt is not None and path.endswith(owner.corrupt):
            data = damaged(data)
        start, end, status = 0, len(data), 200
        wanted = self.headers.get("Range")
        if wanted:
            match = _RANGE.match(wanted.strip())
            if not match or int(match[1]) >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, status = int(match[1]), 206
            end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if owner._cut_now(self.command, path):
            assert owner.cut_after is not None
            self.wfile.write(data[start : min(start + owner.cut_after, end)])
            self.wfile.flush()
            # the client sees the connection end before Content-Length bytes
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:end])


class _Server(http.server.ThreadingHTTPServer):
    # join every request thread on server_close(): nothing is left running afterwards
    daemon_threads = False
    block_on_close = True

    def __init__(self, owner: ImageServer, context: ssl.SSLContext | None) -> None:
        self.owner, self.context = owner, context
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is None:
            super().finish_request(request, client_address)
            return
        # the TLS handshake in the request's thread, never in the accepting one
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that rejects our certificate, or hangs up on a cut: expected here


class ImageServer:
    """Serve the simplestreams tree ``tree`` on a free loopback port, as a context manager.

    ``url`` is its base URL; ``tls``: HTTPS with a certificate signed by a CA made for it
    (``ca_file``); ``requests`` lists (method, path, Range header) of every request so far;
    ``cut_after``: the first GET of each file below images/ sends only that many bytes and
    closes the connection; ``corrupt``: the files whose path ends so are served damaged."""

    def __init__(
        self,
        tree: Path,
        *,
        tls: bool = False,
        cut_after: int | None = None,
        corrupt: str | None = None,
    ) -> None:
        self.tree, self.tls, self.cut_after, self.corrupt = tree, tls, cut_after, corrupt
        self.requests: list[tuple[str, str, str | None]] = []
        self.ca_file: Path | None = None
        self.url = ""
        self._lock = threading.Lock()
        self._cut: set[str] = set()
        self._certs: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _log(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))

    def _cut_now(self, method: str, path: str) -> bool:
        """True for the first GET of each image file, when cutting."""
        if self.cut_after is None or method != "GET" or not path.startswith("/images/"):
            return False
        with self._lock:
            first = path not in self._cut
            self._cut.add(path)
        return first

    def gets(self, suffix: str) -> list[tuple[str, str, str | None]]:
        """The GET requests so far of paths ending in ``suffix``."""
        with self._lock:
            return [r for r in self.requests if r[0] == "GET" and r[1].endswith(suffix)]

    def __enter__(self) -> ImageServer:
        context = None
        if self.tls:
            SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
            self._certs = SCRATCH_ROOT / f"ss-tls-{secrets.token_hex(4)}"
            make_tls(self._certs)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._certs / "server.crt", self._certs / "server.key")
            self.ca_file = self._certs / "ca.crt"
        self._server = _Server(self, context)
        host, port = self._server.server_address[:2]
        self.url = f"{'https' if self.tls else 'http'}://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever has stopped
            self._server.server_close()  # closes the socket, joins the request threads
        if self._thread is not None:
            self._thread.join()
        if self._certs is not None:
            fsutil.remove_tree(self._certs)
