"""A real OCI registry for the tests, and images built for it with umoci.

:func:`running_registry` starts Debian's ``docker-registry`` on a free loopback port, with its
storage in a scratch directory, and stops it by pid: a plain-HTTP one, or (``secure=True``) one
that speaks TLS with a certificate signed by a CA made for it and wants a login (htpasswd).
:func:`build_image` makes an OCI image from the host's static busybox with umoci;
:func:`push` copies it to a registry with skopeo.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tls_helpers import make_tls

from pytest_incus import fsutil
from pytest_incus.images.busybox import host_busybox

SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")
START_DEADLINE = 10.0

_CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
"""

# a secure registry: TLS with the certificate of tls/, and a login checked against htpasswd
_SECURE_CONFIG = """\
  tls:
    certificate: {tls}/server.crt
    key: {tls}/server.key
auth:
  htpasswd:
    realm: pytest-incus-tests
    path: {root}/htpasswd
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class Login:
    """A user of a secure registry."""

    username: str
    password: str


@dataclass(frozen=True)
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``; ``log`` holds its access log.

    A secure one has ``ca`` (the certificate of the CA that signed the registry's; trust it
    with ``SSL_CERT_FILE``; its directory is a certificate directory as skopeo's ``--cert-dir``
    takes) and ``login`` (its only user)."""

    host: str
    root: Path
    log: Path
    pid: int
    ca: Path | None = None
    login: Login | None = None

    def ref(self, name: str) -> str:
        """The ``docker://`` reference of ``name`` (``repo:tag``) in this registry."""
        return f"docker://{self.host}/{name}"

    def auth_config(self, password: str | None = None) -> str:
        """The credentials of ``login`` (or with another ``password``) for this registry, in
        the format that containers' auth.json and docker's config.json share."""
        assert self.login is not None, "only a secure registry has a login"
        secret = f"{self.login.username}:{password or self.login.password}"
        auth = base64.b64encode(secret.encode()).decode()
        return json.dumps({"auths": {self.host: {"auth": auth}}})

    def blob_fetches(self, digest: str) -> int:
        """How many times a blob was downloaded (GET) from this registry so far."""
        text = self.log.read_text(errors="replace")
        return sum(
            1 for line in text.splitlines() if "GET /v2/" in line and f"/blobs/{digest}" in line
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(host: str, ca: Path | None) -> bool:
    if ca is None:
        url, context = f"http://{host}/v2/", None
    else:
        url, context = f"https://{host}/v2/", ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # a secure registry answers "log in first"
    except (urllib.error.URLError, OSError):
        return False


def _run(args: Sequence[str], *, input: str | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, input=input, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def _make_htpasswd(path: Path, login: Login) -> None:
    assert shutil.which("htpasswd"), (
        "the secure registry needs htpasswd: apt-get install apache2-utils"
    )
    # docker-registry takes bcrypt hashes only (-B)
    hashed = _run(["htpasswd", "-B", "-i", "-n", login.username], input=login.password)
    path.write_text(hashed)


@contextmanager
def running_registry(*, secure: bool = False) -> Iterator[Registry]:
    """Start ``docker-registry`` on a free loopback port; stop it (by pid) and remove its
    storage afterwards. ``secure``: TLS with a CA of its own, and a login."""
    binary = shutil.which("docker-registry")
    assert binary, "the registry tests need Debian's registry: apt-get install docker-registry"
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    root = SCRATCH_ROOT / f"registry-{secrets.token_hex(4)}"
    (root / "storage").mkdir(parents=True)
    proc = None
    try:
        host = f"127.0.0.1:{_free_port()}"
        text = _CONFIG.format(storage=root / "storage", addr=host)
        ca, login = None, None
        if secure:
            make_tls(root / "tls")
            login = Login("tester", secrets.token_hex(8))
            _make_htpasswd(root / "htpasswd", login)
            text += _SECURE_CONFIG.format(tls=root / "tls", root=root)
            # alone in a directory: skopeo's --cert-dir would take the keys as client keys
            ca = root / "certs" / "ca.crt"
            ca.parent.mkdir()
            shutil.copy(root / "tls" / "ca.crt", ca)
        config = root / "config.yml"
        config.write_text(text)
        log = root / "registry.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + START_DEADLINE
        while not _answers(host, ca):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"docker-registry did not answer on {host} within {START_DEADLINE}s "
                    f"(exit code {proc.poll()}); its log:\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.02)
        yield Registry(host, root, log, proc.pid, ca, login)
    finally:
        if proc is not None:
            proc.terminate()  # our own child, by pid
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        fsutil.remove_tree(root)


def _umoci(*args: str) -> None:
    _run(["umoci", *args])


def build_image(
    layout: Path,
    tag: str,
    *,
    base: str | None = None,
    files: dict[str, str] | None = None,
    config: Sequence[str] = (),
) -> None:
    """Make image ``layout:tag``: the host's static busybox (or a copy of image ``base`` of
    the same layout, whose layers it then shares) plus ``files`` (path -> text) in a new
    layer; ``config`` are extra ``umoci config`` arguments (``--config.cmd=...``)."""
    if not (layout / "index.json").exists():
        _umoci("init", "--layout", str(layout))
    image = f"{layout}:{tag}"
    bundle = layout.parent / f"bundle-{secrets.token_hex(4)}"
    try:
        if base is None:
            _umoci("new", "--image", image)
        else:
            _umoci("tag", "--image", f"{layout}:{base}", tag)
        _umoci("unpack", "--image", image, str(bundle))
        rootfs = bundle / "rootfs"
        if base is None:
            (rootfs / "bin").mkdir(mode=0o755)
            shutil.copy2(host_busybox(), rootfs / "bin" / "busybox")
            for applet in ("sh", "cat", "ls", "echo", "id"):
                (rootfs / "bin" / applet).symlink_to("busybox")
            (rootfs / "etc").mkdir(mode=0o755)
            (rootfs / "etc" / "passwd").write_text(_PASSWD)
            (rootfs / "etc" / "group").write_text(_GROUP)
        for path, text in (files or {}).items():
            target = rootfs / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        _umoci("repack", "--image", image, str(bundle))
        if config:
            _umoci("config", "--image", image, *config)
        _umoci("gc", "--layout", str(layout))
    finally:
        fsutil.remove_tree(bundle)


def manifest(layout: Path, tag: str) -> Any:
    """The manifest of image ``layout:tag`` (its ``config`` and ``layers`` descriptors)."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest = desc["digest"].split(":", 1)[1]
            return json.loads((layout / "blobs" / "sha256" / digest).read_text())
    raise AssertionError(f"no image {tag!r} in {layout}")


def image_of_rootfs(layout: Path, tag: str, rootfs: Path, config: Sequence[str] = ()) -> None:
    """Make image ``layout:tag`` of one layer holding the directory ``rootfs`` (owners and
    modes kept), which is only read: ``umoci insert`` tars it straight from where it is, with
    no bundle to copy it into."""
    if not (layout / "index.json").exists():
        _umoci("init", "--layout", str(layout))
    image = f"{layout}:{tag}"
    _umoci("new", "--image", image)
    _umoci("insert", "--image", image, str(rootfs), "/")
    if config:
        _umoci("config", "--image", image, *config)
    _umoci("gc", "--layout", str(layout))


def push(layout: Path, tag: str, registry: Registry, name: str) -> str:
    """Copy ``layout:tag`` to ``registry`` as ``name`` (``repo:tag``); its docker:// ref.

    A secure registry is pushed to with its CA trusted and its login."""
    ref = registry.ref(name)
    if registry.ca is None:
        access = ["--dest-tls-verify=false"]
    else:
        assert registry.login is not None
        access = [
            f"--dest-cert-dir={registry.ca.parent}",
            f"--dest-creds={registry.login.username}:{registry.login.password}",
        ]
    _run(["skopeo", "copy", "--quiet", *access, f"oci:{layout}:{tag}", ref])
    return ref


@contextmanager
def pushed_busybox(name: str, *, secure: bool = False) -> Iterator[tuple[Registry, str, Path]]:
    """A busybox app image pushed as ``name`` (``repo:tag``) to a registry started on
    loopback (``secure``: see :func:`running_registry`): (registry, reference, the OCI layout
    it was built in, tag "app")."""
    work = SCRATCH_ROOT / f"oci-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        with running_registry(secure=secure) as registry:
            build_image(work / "layout", "app")
            push(work / "layout", "app", registry, name)
            yield registry, registry.ref(name), work / "layout"
    finally:
        fsutil.remove_tree(work)
