"""Instances on a host-only network: called from the test, and calling each other by name.

``network="bridged"`` gives an instance an address of its own, ``instance.ipv4``, on a bridge
that only the host and the instances on it reach (no route out of the host). The test talks to
it there, after ``wait_for_port`` says that something listens; instances on one network find
each other by their instance names.
"""

from __future__ import annotations

import shutil

import pytest
import requests
from conftest import INDEX

from pytest_incus import Instance, InstanceFactory

PAGE = "<h1>served by systemd</h1>\n"

UNIT = """\
[Unit]
Description=A static web site, served by busybox httpd

[Service]
ExecStart=/usr/local/bin/busybox httpd -f -p 8080 -h /srv/www

[Install]
WantedBy=multi-user.target
"""

# bash's /dev/tcp is the HTTP client (the debian/12 image has no curl or wget). The server may
# still be starting: retry the connection until a deadline.
FETCH = r"""
deadline=$((SECONDS + 30))
until exec 3<>"/dev/tcp/$1/8000"; do
    [ "$SECONDS" -lt "$deadline" ] || exit 1
    sleep 0.1
done 2>/dev/null
printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" >&3
cat <&3
"""


def test_app_called_from_the_test(instance_factory: InstanceFactory, web_image: str) -> None:
    app = instance_factory.launch(kind="app", image=web_image, network="bridged")
    app.wait_for_port(8080)

    response = requests.get(f"http://{app.ipv4}:8080/", timeout=10)

    assert response.status_code == 200
    assert response.text == INDEX
    app.delete()


@pytest.mark.instance(image="debian/12", network="bridged")
def test_service_checked_from_the_host(instance: Instance) -> None:
    # the image has no web server: the host's static busybox has one
    instance.push(shutil.which("busybox") or "/bin/busybox", "/usr/local/bin/busybox", mode=0o755)
    instance.write_file("/srv/www/index.html", PAGE)
    instance.write_file("/etc/systemd/system/web.service", UNIT)
    instance.exec("systemctl enable --now web.service", check=True)

    instance.wait_for_port(8080)
    response = requests.get(f"http://{instance.ipv4}:8080/", timeout=10)

    assert response.text == PAGE
    assert instance.exec("systemctl is-active web.service").stdout.strip() == "active"


def test_container_fetches_from_a_vm_by_name(instance_factory: InstanceFactory) -> None:
    server = instance_factory.launch(kind="vm", image="debian/12", init="agent", network="bridged")
    server.write_file("/srv/www/index.html", f"hello from {server.name}\n")
    # in the background, on its own (setsid), its output in a file: exec returns at once
    server.exec(
        "setsid nohup python3 -m http.server 8000 --directory /srv/www"
        " </dev/null >/var/log/http.log 2>&1 &",
        check=True,
    )
    client = instance_factory.launch(kind="container", image="debian/12", network="bridged")

    result = client.exec(["bash", "-c", FETCH, "fetch", server.name], timeout=60)

    assert result.ok, result.stderr
    lines = result.stdout.splitlines()  # the status line, the headers, a blank line, the page
    assert lines[0] == "HTTP/1.0 200 OK", result.stdout
    assert lines[-1] == f"hello from {server.name}"
    client.delete()
    server.delete()
