"""Packages across a matrix of releases: derived images, and a .deb of your own.

``packages=["nginx"]`` runs the test on an image derived from ``debian/N`` with nginx installed
by apt, built once (the first run takes a minute per release; later runs and every xdist worker
use the cache). The build reaches Debian's mirror; the test's instance itself has no route out:
here it is on a host-only network so that the test can call nginx from the host.

The second test builds a package on the host with ``dpkg-deb``, pushes it into a plain
``debian/N`` instance, installs it and checks what it installed, in each release.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from pytest_incus import Instance

RELEASES = ["debian/11", "debian/12", "debian/13"]


@pytest.mark.instance(image=RELEASES, packages=["nginx"], network="bridged")
def test_nginx_serves_its_default_site(instance: Instance) -> None:
    assert instance.exec("systemctl is-active nginx").stdout.strip() == "active"
    config = instance.file("/etc/nginx/sites-enabled/default")
    assert config.is_symlink and config.contains("listen 80 default_server")
    assert instance.exec(["nginx", "-t"]).ok  # the configuration as shipped is valid
    instance.wait_for_port(80)
    page = requests.get(f"http://{instance.ipv4}/", timeout=10)
    assert page.status_code == 200 and "Welcome to nginx" in page.text
    assert page.headers["Server"].startswith("nginx")


POSTINST = """\
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    echo "installed $(date +%s)" > /var/lib/pti-hello.stamp
fi
"""


@pytest.fixture(scope="module")
def hello_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .deb built on the host: a script, a config file and a postinst."""
    root = tmp_path_factory.mktemp("pti-hello")
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: pti-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: pytest-incus <dev@example.invalid>\nDepends: coreutils\n"
        "Description: says hello from a .deb built on the host\n"
    )
    (root / "DEBIAN/conffiles").write_text("/etc/pti-hello.conf\n")
    postinst = root / "DEBIAN/postinst"
    postinst.write_text(POSTINST)
    postinst.chmod(0o755)
    script = root / "usr/bin/pti-hello"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/sh\n. /etc/pti-hello.conf\necho "hello, $NAME"\n')
    script.chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc/pti-hello.conf").write_text("NAME=world\n")
    deb = root.parent / "pti-hello_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True)
    return deb


@pytest.mark.instance(image=RELEASES)
def test_a_deb_built_on_the_host_installs(instance: Instance, hello_deb: Path) -> None:
    instance.push(hello_deb, "/root/pti-hello.deb")
    instance.exec(["dpkg", "-i", "/root/pti-hello.deb"], check=True)
    assert instance.exec("dpkg-query -W -f '${Status}' pti-hello").stdout == (
        "install ok installed"
    )
    assert instance.exec(["pti-hello"]).stdout == "hello, world\n"
    assert instance.file("/var/lib/pti-hello.stamp").contains("installed")
    script = instance.file("/usr/bin/pti-hello")
    assert (script.uid, script.mode) == (0, 0o755)
    instance.write_file("/etc/pti-hello.conf", "NAME=incus\n")
    assert instance.exec(["pti-hello"]).stdout == "hello, incus\n"
    instance.exec(["dpkg", "-r", "pti-hello"], check=True)
    assert not instance.file("/usr/bin/pti-hello").exists
    assert instance.file("/etc/pti-hello.conf").exists  # a conffile stays until purge
