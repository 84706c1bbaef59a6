"""Host-only networks on an Incus server: ``network="bridged"`` or a name, as Incus managed
bridges.

Each network of the user's is one Incus bridge network, ``pti-`` and a digest of the project and
the name (a bridge is named as its interface: at most 15 characters), made on first use and
marked with ``user.pytest-incus.network``. Its config keeps it host-only, as the local backend's
bridges are (measured with nft and sysctl on Incus 6.0.4):

- ``ipv4.nat=false``: no masquerade; ``ipv4.routing=false``: Incus otherwise sets the host's
  ``net.ipv4.ip_forward`` to 1 (it did here) and routes the bridge's traffic on;
- ``ipv4.firewall=false``: Incus otherwise adds its own ``inet incus`` table with accept chains
  for the bridge (DNS, DHCP, forwarding); with it false the host's firewall stays as it was;
- ``ipv6.address=none``; ``raw.dnsmasq`` ``no-resolv`` and ``local=/#/``: the bridge's dnsmasq
  answers the instances' names and never forwards a query out of the host.

Addresses: ``ipv4.address=auto`` fails on a host like this one ("Failed to automatically find an
unused IPv4 subnet"), so a free /24 is chosen here from ``--incus-subnet`` (or the local
backend's candidate ranges, from the top down, away from the ones the local backend takes first),
one that no Incus network and no route of this host uses. Each instance gets a static address
(its nic's ``ipv4.address``, which Incus does not check for duplicates, so it is chosen here under
a file lock from the network's leases) that liblxc sets from outside (``raw.lxc``
``lxc.net.0.ipv4.address``: the one lxc.net key Incus allows), so no DHCP client is needed in
the image, and no default route is made. Names: dnsmasq knows an instance's name only once it
has a DHCP lease, so the network's ``raw.dnsmasq`` gets a ``host-record`` per static address,
rewritten (compare-and-swap on the ETag) when an instance is created; dnsmasq restarts then
(about 0.7 s here).

The lock is a file in this cache directory: it orders the workers and runs of this host; two
hosts creating instances on one network at the same instant could pick one address (Incus does
not refuse it).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock

from pytest_incus.errors import ConfigError, IncusError, ServerError
from pytest_incus.network import subnet as subnets
from pytest_incus.ownership import Owner
from pytest_incus.settings import Settings

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient

log = logging.getLogger("pytest_incus")

NETWORK_KEY = "user.pytest-incus.network"  # on the Incus network: the user's name for it
DNSMASQ_BASE = ("no-resolv", "local=/#/")
LOCK_TIMEOUT = 120.0
CAS_TRIES = 5


def network_name(project: str, network: str) -> str:
    """The Incus network of the user's ``network`` in ``project``: "pti-" and 8 hex digits."""
    return "pti-" + hashlib.sha256(f"{project}\0{network}".encode()).hexdigest()[:8]


class Placement:
    """Where one instance goes on a network: its nic device and the raw.lxc line that sets
    its address, and the DNS server it uses."""

    def __init__(self, network: str, incus_network: str, address: str, cidr: str) -> None:
        self.network = network
        self.incus_network = incus_network
        self.address = address
        net = ipaddress.IPv4Network(cidr)
        self.prefix = net.prefixlen
        self.gateway = str(net[1])
        self.broadcast = str(net.broadcast_address)

    @property
    def device(self) -> dict[str, str]:
        """The nic device (``eth0``)."""
        return {
            "type": "nic",
            "network": self.incus_network,
            "name": "eth0",
            "ipv4.address": self.address,
        }

    @property
    def raw_lxc(self) -> str:
        """The address, set by liblxc before init runs (with its broadcast: liblxc makes a
        wrong one of a bare prefix). Incus numbers its nics from 0 in device order; ``eth0``
        is the only one."""
        return f"lxc.net.0.ipv4.address = {self.address}/{self.prefix} {self.broadcast}"

    @property
    def resolv_conf(self) -> str:
        """The instance's ``/etc/resolv.conf``: the network's dnsmasq only."""
        return f"nameserver {self.gateway}\noptions timeout:1 attempts:2\n"


class IncusNetworks:
    """The incus backend's networks (``runtimes.protocol.Networks``): Incus plugs instances in
    itself, so ``attach`` gives nothing; ``place`` (called by the machine when it creates the
    instance) does the work."""

    def __init__(self, settings: Settings, client: Callable[[], IncusClient]) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> IncusClient:
        """The server's client (made when first used)."""
        return self._client()

    # -- the protocol ---------------------------------------------------------------------

    def attach(self, network: str, name: str, directory: Path, owner: Owner) -> None:
        """Nothing: the instance's nic is part of its creation on the server."""
        return None

    def detach(self, name: str, directory: Path) -> None:
        """Nothing: the nic (and its address) goes with the instance."""

    def sweep(self) -> None:
        """Delete the plugin's Incus networks that no instance uses."""
        client = self.client
        with self._lock():
            for net in client.call("GET", "/1.0/networks", params={"recursion": 1}) or []:
                if not isinstance(net, dict) or NETWORK_KEY not in (net.get("config") or {}):
                    continue
                if net.get("used_by"):
                    continue
                try:
                    client.call("DELETE", f"/1.0/networks/{net['name']}")
                except ServerError as exc:  # taken meanwhile by another host's instance
                    log.info("Incus network %s stays: %s", net["name"], exc)

    # -- placing an instance --------------------------------------------------------------

    @contextlib.contextmanager
    def placing(self, network: str, instance: str) -> Iterator[Placement]:
        """Make ``network`` if needed and choose ``instance``'s address on it; hold the lock
        while the caller creates the instance (so that its address shows in the leases before
        another is chosen), then publish the names of the network."""
        with self._lock():
            incus_network, cidr = self._ensure(network)
            placement = Placement(
                network, incus_network, self._free_address(incus_network, cidr, instance), cidr
            )
            yield placement
            self._publish_names(incus_network)

    def _lock(self) -> filelock.FileLock:
        root = self.settings.cache_dir / "incus"
        root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(root / "networks.lock", timeout=LOCK_TIMEOUT)

    def _ensure(self, network: str) -> tuple[str, str]:
        """The Incus network of ``network`` and its /24 (made if missing)."""
        client = self.client
        name = network_name(client.project, network)
        with contextlib.suppress(ServerError):
            found = client.call("GET", f"/1.0/networks/{name}")
            return name, _cidr(found)
        taken = []
        for net in client.call("GET", "/1.0/networks", params={"recursion": 1}) or []:
            address = (
                (net.get("config") or {}).get("ipv4.address", "") if isinstance(net, dict) else ""
            )
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Interface(address).network)
        routes = _local_routes(client)
        for cidr in self._candidates():
            if any(cidr.overlaps(t) for t in taken) or subnets.overlapping(cidr, routes, ()):
                continue
            config = {
                "ipv4.address": f"{cidr[1]}/{cidr.prefixlen}",
                "ipv4.nat": "false",
                "ipv4.routing": "false",
                "ipv4.firewall": "false",
                "ipv6.address": "none",
                "ipv6.firewall": "false",
                "raw.dnsmasq": "\n".join(DNSMASQ_BASE),
                NETWORK_KEY: network,
            }
            body = {
                "name": name,
                "type": "bridge",
                "description": f"pytest-incus network {network!r} (host-only)",
                "config": config,
            }
            try:
                client.call("POST", "/1.0/networks", json=body)
            except ServerError as exc:
                if "already exists" in str(exc).lower():  # another host made it meanwhile
                    return name, _cidr(client.call("GET", f"/1.0/networks/{name}"))
                raise IncusError(
                    f"network {network!r}: Incus could not make bridge network {name} on "
                    f"{cidr}: {exc}; give a free range with --incus-subnet",
                    exc=exc,
                ) from exc
            log.info("network %s: Incus bridge %s on %s", network, name, cidr)
            return name, str(cidr)
        raise ConfigError(
            f"network {network!r}: every /24 pytest-incus would use is taken by an Incus network "
            "or a route of this host; give a free range with --incus-subnet"
        )

    def _candidates(self) -> Iterator[ipaddress.IPv4Network]:
        if self.settings.subnet:
            yield from subnets.networks(ipaddress.IPv4Network(self.settings.subnet))
            return
        for whole in reversed(subnets.CANDIDATES):  # the local backend starts at the bottom
            yield from reversed(list(subnets.networks(whole)))

    def _free_address(self, incus_network: str, cidr: str, instance: str) -> str:
        net = ipaddress.IPv4Network(cidr)
        used = {lease.get("address") for lease in self._leases(incus_network)}
        hosts = list(net.hosts())[1:]  # the first is the bridge's own
        # start at a place of the name's: two hosts placing at once seldom pick one address
        start = int(hashlib.sha256(instance.encode()).hexdigest(), 16) % len(hosts)
        for i in range(len(hosts)):
            address = str(hosts[(start + i) % len(hosts)])
            if address not in used:
                return address
        raise IncusError(
            f"Incus network {incus_network} ({cidr}) is full: every address has an instance; "
            "delete some, or put more on another network (network='NAME')"
        )

    def _leases(self, incus_network: str) -> list[dict[str, Any]]:
        leases = self.client.call("GET", f"/1.0/networks/{incus_network}/leases") or []
        return [lease for lease in leases if isinstance(lease, dict)]

    def _publish_names(self, incus_network: str) -> None:
        """Rewrite the network's host-records from its static leases, if they changed;
        compare-and-swap on the ETag, so that a writer on another host is not overwritten."""
        client = self.client
        for _ in range(CAS_TRIES):
            records = sorted(
                f"host-record={lease['hostname']},{lease['address']}"
                for lease in self._leases(incus_network)
                if lease.get("type") == "static" and lease.get("hostname") and lease.get("address")
            )
            wanted = "\n".join([*DNSMASQ_BASE, *records])
            response = client.request("GET", f"/1.0/networks/{incus_network}")
            etag = response.headers.get("ETag", "")
            config = (response.json().get("metadata") or {}).get("config") or {}
            if config.get("raw.dnsmasq", "") == wanted:
                return
            try:
                client.request(
                    "PATCH",
                    f"/1.0/networks/{incus_network}",
                    json={"config": {"raw.dnsmasq": wanted}},
                    headers={"If-Match": etag} if etag else None,
                ).close()
                return
            except ServerError as exc:
                if exc.status != 412:
                    raise
        log.warning("Incus network %s: its names could not be published", incus_network)


def _cidr(network: Any) -> str:
    address = ((network or {}).get("config") or {}).get("ipv4.address", "")
    try:
        return str(ipaddress.IPv4Interface(address).network)
    except ValueError:
        raise IncusError(
            f"Incus network {network.get('name')!r} has no IPv4 address ({address!r}); delete "
            "it (incus network delete NAME) and the next launch makes it again"
        ) from None


def _local_routes(client: IncusClient) -> list[tuple[subnets.Net, str]]:
    """The routes of this host when the server is this host (its unix socket); none for a
    remote server, whose routes cannot be seen from here (Incus's networks are still avoided)."""
    if client.remote.startswith(("http://", "https://")):
        return []
    try:
        return subnets.host_routes()
    except IncusError:
        return []
