"""Fixtures and hooks of the examples: a local OCI registry with a small web service image in
it, and what a failed test's report adds about the greeter service."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pytest_incus import Instance

REGISTRY = "127.0.0.1:5055"  # named in pytest.ini: incus_insecure_registries
INDEX = "<h1>hello from an app</h1>\n"
REGISTRY_CONFIG = """\
version: 0.1
storage:
  filesystem:
    rootdirectory: {storage}
http:
  addr: {addr}
"""


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry, serving on loopback for this session."""
    root = tmp_path_factory.mktemp("registry")
    (root / "config.yml").write_text(REGISTRY_CONFIG.format(storage=root, addr=REGISTRY))
    server = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield REGISTRY
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def web_image(registry: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox web server image, built with umoci and pushed to the registry: its
    reference. Its program: busybox httpd on port 8080, serving /www."""
    work = tmp_path_factory.mktemp("web-image")
    layout, bundle = work / "layout", work / "bundle"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:web")
    run("umoci", "unpack", "--image", f"{layout}:web", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "wget"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "www").mkdir()
    (rootfs / "www" / "index.html").write_text(INDEX)
    run("umoci", "repack", "--image", f"{layout}:web", str(bundle))
    httpd = ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
    run("umoci", "config", "--image", f"{layout}:web", *(f"--config.cmd={a}" for a in httpd))
    ref = f"docker://{registry}/demo/web:1"
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:web", ref)
    return ref


def pytest_incus_failure_sections(instance: Instance) -> list[tuple[str, str]]:
    """When a test that installed the greeter fails, its report shows the service's status."""
    if not instance.file("/etc/systemd/system/greeter.service").exists:
        return []
    status = instance.exec("systemctl status greeter --no-pager --lines=5")
    return [("systemctl status greeter", status.stdout)]
