"""Host-only networks with real containers and apps: the host reaches an instance at its
address, instances on one network reach each other by name, instances on different networks
cannot reach each other at all, no instance has a route out, and a deleted instance gives its
address, name and device back. (VMs on networks: test_vm_network.py.)"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from registry_helpers import SCRATCH_ROOT, build_image

from pytest_incus import ConfigError, Instance, InstanceFactory, fsutil, network
from pytest_incus.images.store import ImageStore
from pytest_incus.network import links, services, subnet
from pytest_incus.settings import Settings

PORT = 8080


def serve(instance: Instance, body: str) -> None:
    """Start busybox httpd in ``instance`` (busybox image) on PORT, answering ``body``."""
    instance.exec(f"mkdir -p /www && printf %s '{body}' > /www/index.html", check=True)
    instance.exec(f"busybox httpd -p {PORT} -h /www", check=True)  # it daemonizes


def get(instance: Instance) -> str:
    """GET / from ``instance``'s web server, from the host."""
    instance.wait_for_port(PORT, timeout=10)
    reply = requests.get(f"http://{instance.ipv4}:{PORT}/", timeout=5)
    reply.raise_for_status()
    return reply.text


def connects(client: Instance, address: str) -> bool:
    """True if ``client`` opens a TCP connection to ``address``:PORT within 2 s."""
    result = client.exec(f"timeout 2 busybox nc {address} {PORT} </dev/null", timeout=10)
    return result.exit_code == 0


def default_routes(instance: Instance) -> list[str]:
    """The lines of the instance's IPv4 routing table whose destination is 0.0.0.0/0."""
    lines = instance.read_text("/proc/net/route").splitlines()[1:]
    return [line for line in lines if line.split()[1] == "00000000"]


@pytest.fixture(scope="module")
def web_app(image_store: ImageStore) -> Iterator[str]:
    """A busybox OCI image whose program serves /www on PORT: its reference."""
    work = SCRATCH_ROOT / f"net-app-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        build_image(
            work / "layout",
            "web",
            files={"www/index.html": "hello from an app on a network\n"},
            config=[
                *(f"--config.cmd={a}" for a in ("/bin/busybox", "httpd", "-f", "-p", str(PORT))),
                "--config.cmd=-h",
                "--config.cmd=/www",
            ],
        )
        yield f"oci:{work / 'layout'}:web"
        image_store.prune(f"oci:{work / 'layout'}:web")
    finally:
        fsutil.remove_tree(work)


def test_the_host_reaches_a_bridged_container(instance_factory: InstanceFactory) -> None:
    box = instance_factory.launch(image="busybox", network="bridged")
    assert box.ipv4 is not None and box.network is not None
    subnet = ipaddress.ip_network(f"{box.ipv4}/{box.network.prefix}", strict=False)
    assert ipaddress.ip_address(box.network.gateway) in subnet
    serve(box, f"hello from {box.name}")
    assert get(box) == f"hello from {box.name}"
    # its interface has its own MAC and address; it has no route out of its network
    assert box.read_text("/sys/class/net/eth0/address").strip() == box.network.mac
    assert box.ipv4 in box.exec("ip -4 addr show eth0").stdout
    assert default_routes(box) == []
    assert box.read_text("/etc/resolv.conf").startswith(f"nameserver {box.network.gateway}\n")
    box.delete()


def test_instances_reach_each_other_by_name(instance_factory: InstanceFactory) -> None:
    server = instance_factory.launch(image="busybox", network="bridged")
    client = instance_factory.launch(image="debian/12", network="bridged")
    serve(server, "by name")
    # glibc's resolver, through the network's DNS server, in a systemd container
    resolved = client.exec(["getent", "hosts", server.name], check=True).stdout.split()
    assert resolved == [server.ipv4, server.name]
    request = (
        f"exec 3<>/dev/tcp/{server.name}/{PORT} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 "
        "&& cat <&3"
    )
    reply = client.exec(["bash", "-c", request], timeout=20, check=True).stdout
    assert reply.endswith("\r\n\r\nby name"), reply
    # and the other way round: the busybox container resolves the debian one
    assert client.ipv4 in server.exec(["nslookup", client.name], check=True).stdout
    # a name that is no instance's is unknown (and never asked of a server off the host)
    assert not client.exec(["getent", "hosts", "deb.debian.org"]).ok
    server.delete()
    client.delete()


def test_networks_are_apart(instance_factory: InstanceFactory) -> None:
    a = instance_factory.launch(image="busybox", network="left")
    b = instance_factory.launch(image="busybox", network="right")
    a2 = instance_factory.launch(image="busybox", network="left")
    for box in (a, b):
        serve(box, box.name)
    assert a.network is not None and b.network is not None
    assert a.network.bridge != b.network.bridge
    assert connects(a2, a.ipv4 or "")  # on one network: the check itself works
    assert connects(a2, a.name)
    assert not connects(a, b.ipv4 or "")  # not from left to right
    assert not connects(b, a.ipv4 or "")  # nor from right to left
    assert not b.exec(["nslookup", a.name]).ok  # nor are names seen across
    # the host reaches both
    assert get(a) == a.name and get(b) == b.name


def test_an_app_on_a_network(instance_factory: InstanceFactory, web_app: str) -> None:
    app = instance_factory.launch(kind="app", image=web_app, network="bridged")
    assert get(app) == "hello from an app on a network\n"
    assert app.read_text("/sys/class/net/lo/operstate").strip() == "unknown"  # lo is up
    assert default_routes(app) == []


@pytest.mark.local_only(reason="looks at this host's own leases and veth devices")
def test_delete_gives_everything_back(
    instance_factory: InstanceFactory, settings: Settings
) -> None:
    first = instance_factory.launch(image="busybox", network="bridged")
    name, address, device = first.name, first.ipv4, first.network and first.network.device
    assert device is not None and links.exists(device)
    assert network.leftovers(settings, name) != []  # the check sees a live one
    first.delete()
    assert network.leftovers(settings, name) == []
    assert not links.exists(device)
    # a released address is not handed out again at once
    second = instance_factory.launch(image="busybox", network="bridged")
    assert second.ipv4 != address
    second.delete()


@pytest.fixture
def scratch_settings(scratch_cache: Path, settings: Settings) -> Iterator[Settings]:
    """Settings on an empty cache directory (busybox builds there in a moment); whatever
    network it made is swept afterwards."""
    scratch = Settings(cache_dir=scratch_cache)
    yield scratch
    network.sweep(scratch)
    assert network.leftovers(scratch) == []


def host_route() -> ipaddress.IPv4Network:
    """A network that a route of this host (not ours) goes to."""
    said = subprocess.run(
        ["ip", "-4", "-j", "route", "show"], capture_output=True, check=True, text=True
    )
    for route in json.loads(said.stdout):
        if route["dst"] != "default" and not links.ours(route.get("dev", "")):
            return ipaddress.IPv4Network(route["dst"], strict=False)
    pytest.skip("this host has no route but the default one")


def test_a_subnet_over_a_host_route_is_refused(scratch_settings: Settings) -> None:
    taken = host_route()
    settings = Settings(cache_dir=scratch_settings.cache_dir, subnet=str(taken))
    factory = InstanceFactory(settings, ImageStore(settings))
    try:
        with pytest.raises(ConfigError, match="overlaps the host's route"):
            factory.launch(image="busybox", network="bridged")
    finally:
        factory.close()
    assert network.leftovers(settings) == []


def test_the_chosen_subnet_is_free_and_recorded(scratch_settings: Settings) -> None:
    factory = InstanceFactory(scratch_settings, ImageStore(scratch_settings))
    try:
        box = factory.launch(image="busybox", network="bridged")
        state = json.loads((scratch_settings.cache_dir / "network" / "state.json").read_text())
        chosen = ipaddress.IPv4Network(state["subnet"])
        assert ipaddress.ip_address(box.ipv4) in chosen
        routes = [(n, d) for n, d in subnet.host_routes() if d != box.network.bridge]  # type: ignore[union-attr]
        assert subnet.overlapping(chosen, routes, ()) == []
        # the bridge has our firewall table and DNS server while it is used
        bridge = box.network.bridge  # type: ignore[union-attr]
        assert services.firewall_exists(bridge)
        assert services.dns_pid(scratch_settings.cache_dir / "network" / bridge) is not None
    finally:
        factory.close()
    # the session's end removes the bridge nobody uses any more
    assert network.leftovers(scratch_settings) == []
    assert os.path.exists(scratch_settings.cache_dir / "network" / "state.json")


def test_runs_on_two_caches_share_a_subnet_apart(scratch_settings: Settings) -> None:
    shared = ipaddress.IPv4Network("10.249.0.0/16")
    if any(route.overlaps(shared) for route, dev in subnet.host_routes() if not links.ours(dev)):
        pytest.skip(f"this host routes part of {shared}")
    other_dir = scratch_settings.cache_dir / "other-cache"
    other_dir.mkdir()
    one = Settings(cache_dir=scratch_settings.cache_dir, subnet=str(shared))
    two = Settings(cache_dir=other_dir, subnet=str(shared))
    first, second = (InstanceFactory(s, ImageStore(s)) for s in (one, two))
    try:
        a = first.launch(image="busybox", network="bridged")
        b = second.launch(image="busybox", network="bridged")
        c = first.launch(image="busybox", network="left")  # a second network of the first run
        nets = {
            ipaddress.ip_network(f"{i.ipv4}/{i.network.prefix}", strict=False)  # type: ignore[union-attr]
            for i in (a, b, c)
        }
        assert len(nets) == 3 and all(net.subnet_of(shared) for net in nets), nets
        for box in (a, b, c):
            serve(box, box.name)
            assert get(box) == box.name  # each address leads to its own instance
    finally:
        first.close()
        second.close()
    assert network.leftovers(one) == [] and network.leftovers(two) == []


def test_a_container_and_a_vm_know_each_other_by_name(instance_factory: InstanceFactory) -> None:
    vm = instance_factory.launch(kind="vm", image="debian/12", init="agent", network="bridged")
    box = instance_factory.launch(image="debian/12", network="bridged")
    assert box.exec(["getent", "hosts", vm.name], check=True).stdout.split() == [vm.ipv4, vm.name]
    lookup = f"import socket; print(socket.gethostbyname({box.name!r}))"
    assert vm.exec(["python3", "-c", lookup], check=True).stdout == f"{box.ipv4}\n"
