"""A real OCI registry for the tests, and images built for it with umoci.

:func:`running_registry` starts Debian's ``docker-registry`` on a free loopback port, with its
storage in a scratch directory, and stops it by pid. :func:`build_image` makes an OCI image
from the host's static busybox with umoci; :func:`push` copies it to a registry with skopeo.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``; ``log`` holds its access log."""

    host: str
    root: Path
    log: Path
    pid: int

    def ref(self, name: str) -> str:
        """The ``docker://`` reference of ``name`` (``repo:tag``) in this registry."""
        return f"docker://{self.host}/{name}"

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


def _answers(host: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}/v2/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running_registry() -> Iterator[Registry]:
    """Start ``docker-registry`` on a free loopback port; stop it (by pid) and remove its
    storage afterwards."""
    binary = shutil.which("docker-registry")
    assert binary, "the registry tests need Debian's registry: apt-get install docker-registry"
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    root = SCRATCH_ROOT / f"registry-{secrets.token_hex(4)}"
    (root / "storage").mkdir(parents=True)
    host = f"127.0.0.1:{_free_port()}"
    config = root / "config.yml"
    config.write_text(_CONFIG.format(storage=root / "storage", addr=host))
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        end = time.monotonic() + START_DEADLINE
        while not _answers(host):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"docker-registry did not answer on {host} within {START_DEADLINE}s "
                    f"(exit code {proc.poll()}); its log:\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.02)
        yield Registry(host, root, log, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fsutil.remove_tree(root)


def _umoci(*args: str) -> None:
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"umoci {' '.join(args)} failed: {proc.stderr}"


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


def push(layout: Path, tag: str, registry: Registry, name: str) -> str:
    """Copy ``layout:tag`` to ``registry`` as ``name`` (``repo:tag``); its docker:// ref."""
    ref = registry.ref(name)
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", ref],
        check=True,
        capture_output=True,
    )
    return ref


@contextmanager
def pushed_busybox(name: str) -> Iterator[tuple[Registry, str, Path]]:
    """A busybox app image pushed as ``name`` (``repo:tag``) to a registry started on
    loopback: (registry, reference, the OCI layout it was built in, tag "app")."""
    work = SCRATCH_ROOT / f"oci-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        with running_registry() as registry:
            build_image(work / "layout", "app")
            push(work / "layout", "app", registry, name)
            yield registry, registry.ref(name), work / "layout"
    finally:
        fsutil.remove_tree(work)
