"""Host-only networks: bridges, addresses, names and their cleanup, for every kind.

One module owns the host's network resources that instances use. ``attach`` gives an instance
a place on a network (a ``NetworkAttachment``: bridge, address, MAC, DNS server), making the
network's bridge on first use; the instance's runtime plugs it in its own way (liblxc makes a
veth pair on the bridge; a VM gets a tap made here by ``make_tap``); ``detach`` gives it all
back. ``sweep`` removes what nobody uses any more: leases of instances that are gone, and
bridges without leases, with their DNS server and firewall table. ``leftovers`` says what of
this cache directory's networks still exists on the host.

State: ``<cache>/network/state.json`` (the chosen subnet, the networks with their bridge and
/24, and one lease per instance: its network, address, host device and directory), read and
written only under ``<cache>/network/.lock``, so that pytest-xdist workers and concurrent runs
on one cache never hand out one address twice. Each bridge has a directory
``<cache>/network/<bridge>/`` (its DNS server's pid file, log and hosts directory), made before
the bridge, so a bridge whose state was lost is still found and removed. A network is a /24 of
the subnet (see ``subnet.py``) that no route of the host uses when its bridge is made (under a
host-wide lock, as runs on other cache directories make theirs); the host is its ``.1`` and the DNS server; instances get the
next free address after the last one handed out, so a released address is not reused at once,
and a MAC derived from the address, so a peer's ARP cache stays right even when it is.

Names of host devices are ``ptib`` + 8 hex digits (bridges, from the cache directory and network
name) and ``ptii`` + 8 hex digits (an instance's veth peer or tap, from the cache directory and
instance name): short enough for Linux (15 characters), and the same in every process.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from pytest_incus import claims, fsutil
from pytest_incus.errors import ConfigError, IncusError
from pytest_incus.network import links, services, subnet
from pytest_incus.ownership import Owner
from pytest_incus.settings import Settings
from pytest_incus.values import NetworkAttachment

log = logging.getLogger("pytest_incus")

STATE = "state.json"
MARKER = "network.json"  # in an instance's directory: it has (or is getting) a lease
LOCK_TIMEOUT = 120.0
PROBE_NETWORK = ".probe"  # no user's network name starts with "."
TOOLS = {"ip": "iproute2", "nft": "nftables", "dnsmasq": "dnsmasq-base"}

State = dict[str, Any]


def _root(settings: Settings) -> Path:
    return settings.cache_dir / "network"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def bridge_name(settings: Settings, network: str) -> str:
    """The bridge of ``network`` in this cache directory."""
    return f"{links.PREFIX}b{_digest(str(settings.cache_dir), network)}"


def device_name(settings: Settings, instance: str) -> str:
    """The host side of ``instance``'s link (its veth peer or tap)."""
    return f"{links.PREFIX}i{_digest(str(settings.cache_dir), instance)}"


def mac_of(address: ipaddress.IPv4Address) -> str:
    """The MAC of the instance at ``address``: locally administered, unicast, 0a:70:74 (after
    "pt") and the address's last three bytes, unique within a subnet."""
    last = address.packed[1:]
    return "0a:70:74:" + ":".join(f"{b:02x}" for b in last)


@contextlib.contextmanager
def _state(settings: Settings) -> Iterator[State]:
    """The network state, locked; written back when the block ends (even by an error, so
    that what it made before failing is recorded and can be removed)."""
    root = _root(settings)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # dnsmasq (as nobody) reads its hosts directory below
    with filelock.FileLock(root / ".lock", timeout=LOCK_TIMEOUT):
        data = fsutil.read_json(root / STATE)
        state: State = data if isinstance(data, dict) else {}
        for key in ("networks", "leases"):
            if not isinstance(state.get(key), dict):
                state[key] = {}
        before = json.dumps(state, sort_keys=True)
        try:
            yield state
        finally:
            if json.dumps(state, sort_keys=True) != before:
                fsutil.write_atomic(root / STATE, json.dumps(state, indent=1, sort_keys=True))


def _bridge_dir(settings: Settings, bridge: str) -> Path:
    return _root(settings) / bridge


def _subnet(settings: Settings, state: State, routes: list[tuple[subnet.Net, str]]) -> subnet.Net:
    """The subnet new networks come from: the configured one, checked against the host's
    routes, or the one chosen before (chosen again if the host has since taken it and no
    network of it is left). The routes of pytest-incus's own bridges, of any cache
    directory, are no conflict here: each network's /24 is checked against every route when
    its bridge is made."""
    foreign = [(net, dev) for net, dev in routes if not links.ours(dev)]
    if settings.subnet:
        chosen = ipaddress.IPv4Network(settings.subnet)
        subnet.check(chosen, foreign)
        return chosen
    recorded = state.get("subnet")
    if recorded:
        chosen = ipaddress.IPv4Network(recorded)
        clash = subnet.overlapping(chosen, foreign, ())
        if not clash:
            return chosen
        if state["networks"]:
            raise ConfigError(
                f"the subnet {chosen} that pytest-incus chose for this cache directory now "
                f"overlaps a route of the host ({clash[0]}), while networks of it are in use; "
                "give another with --incus-subnet"
            )
    chosen = subnet.choose(routes)  # one that no route uses, other runs' bridges' included
    state["subnet"] = str(chosen)
    return chosen


def _network(settings: Settings, state: State, name: str) -> dict[str, Any]:
    """The record of network ``name``, its bridge, firewall and DNS server made if missing."""
    net = state["networks"].get(name)
    if net is not None:
        state_dir = _bridge_dir(settings, net["bridge"])
        if links.exists(net["bridge"]) and services.dns_pid(state_dir) is not None:
            return dict(net)
        _remove_network(settings, state, name)  # a part of it is gone: make it again
    with _host_lock():
        return _make_network(settings, state, name)


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """The lock of the host's routes: held from looking at them to making a bridge, so that
    runs on other cache directories (each with its own state and lock) never pick one range."""
    path = claims.claims_dir().parent / "networks.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(path, timeout=LOCK_TIMEOUT):
        yield


def _make_network(settings: Settings, state: State, name: str) -> dict[str, Any]:
    if missing := unavailable():  # once per network, not at every launch
        raise IncusError(f"network {name!r}: {missing}")
    routes = subnet.host_routes()
    whole = _subnet(settings, state, routes)
    own = {n["bridge"] for n in state["networks"].values()}
    taken = {ipaddress.IPv4Network(n["cidr"]) for n in state["networks"].values()}
    for cidr in subnet.networks(whole):
        if cidr not in taken and not subnet.overlapping(cidr, routes, own):
            break
    else:
        raise ConfigError(
            f"the subnet {whole} has no free /24 left for network {name!r} "
            f"({len(taken)} networks in use); give a larger --incus-subnet"
        )
    bridge = bridge_name(settings, name)
    gateway = str(cidr[1])
    net = {"bridge": bridge, "cidr": str(cidr), "next": 0}
    state_dir = _bridge_dir(settings, bridge)
    state_dir.mkdir(parents=True, exist_ok=True)
    state["networks"][name] = net  # recorded first: a failure below is removed by sweep
    try:
        links.delete([bridge])  # of a state that was lost
        links.make_bridge(bridge, gateway, cidr.prefixlen, mac_of(cidr[1]))
        services.keep_on_host(bridge)
        services.make_firewall(bridge)
        services.start_dns(state_dir, bridge, gateway)
    except BaseException:
        with contextlib.suppress(IncusError, OSError):
            _remove_network(settings, state, name)
        raise
    log.info("network %s: bridge %s on %s", name, bridge, cidr)
    return dict(net)


def _remove_bridge(settings: Settings, bridge: str) -> None:
    state_dir = _bridge_dir(settings, bridge)
    services.stop_dns(state_dir)
    services.remove_firewall(bridge)
    links.delete([bridge])
    shutil.rmtree(state_dir, ignore_errors=True)


def _remove_network(settings: Settings, state: State, name: str) -> None:
    net = state["networks"].pop(name, None)
    if net is not None:
        _remove_bridge(settings, net["bridge"])


def _allocate(state: State, name: str, net: dict[str, Any]) -> ipaddress.IPv4Address:
    """The next free address of network ``name`` after the last one handed out."""
    cidr = ipaddress.IPv4Network(net["cidr"])
    hosts = list(cidr.hosts())[1:]  # the first is the host's
    used = {lease["address"] for lease in state["leases"].values() if lease["network"] == name}
    start = int(net.get("next", 0))  # the index in ``hosts`` to try first
    for i in range(len(hosts)):
        address = hosts[(start + i) % len(hosts)]
        if str(address) not in used:
            state["networks"][name]["next"] = (start + i + 1) % len(hosts)
            return address
    raise IncusError(
        f"network {name!r} ({cidr}) is full: {len(hosts)} instances have an address on it; "
        "delete some, or put more on another network (network='NAME')"
    )


def attach(
    settings: Settings, network: str, instance: str, directory: Path, owner: Owner
) -> NetworkAttachment:
    """Lease an address on ``network`` ("bridged" or a name) for ``instance`` (whose
    directory is ``directory``), make the network's bridge if it has none, and make the
    instance's name resolvable on it. ConfigError for a subnet that cannot work here."""
    fsutil.write_atomic(directory / MARKER, json.dumps({"network": network}))
    with _state(settings) as state:
        if instance in state["leases"]:  # of a crashed launch of the same name
            _release(settings, state, instance)
        net = _network(settings, state, network)
        address = _allocate(state, network, net)
        device = device_name(settings, instance)
        state["leases"][instance] = {
            "network": network,
            "address": str(address),
            "device": device,
            "directory": str(directory),
            "owner": owner.to_dict(),
        }
        services.add_name(_bridge_dir(settings, net["bridge"]), instance, str(address))
    cidr = ipaddress.IPv4Network(net["cidr"])
    return NetworkAttachment(
        network=network,
        bridge=net["bridge"],
        device=device,
        address=str(address),
        prefix=cidr.prefixlen,
        gateway=str(cidr[1]),
        mac=mac_of(address),
    )


def make_tap(attachment: NetworkAttachment) -> None:
    """Make the tap device ``attachment.device`` on its bridge, up (for a VM's QEMU:
    ``-netdev tap,ifname=DEVICE,script=no,downscript=no``). ``detach`` removes it."""
    links.make_tap(attachment.device, attachment.bridge)


def _release(settings: Settings, state: State, instance: str) -> None:
    lease = state["leases"].pop(instance)
    net = state["networks"].get(lease["network"])
    if net is not None:
        services.remove_name(_bridge_dir(settings, net["bridge"]), instance)
    links.delete([lease["device"]])  # liblxc removes a veth itself; a tap is ours


def detach(settings: Settings, instance: str, directory: Path) -> None:
    """Give back what ``attach`` gave ``instance``: its lease, its name, its host device
    (veth peer or tap) if still there. Idempotent; a no-op for an instance with no network."""
    marker = directory / MARKER
    if not marker.exists():
        return
    with _state(settings) as state:
        lease = state["leases"].get(instance)
        if lease is not None and lease["directory"] == str(directory):
            _release(settings, state, instance)
    marker.unlink(missing_ok=True)


def sweep(settings: Settings) -> list[str]:
    """Remove the leases of instances whose directory is gone, then every bridge of this
    cache that has no lease, with its DNS server and firewall table. Returns what it
    removed, described."""
    if not _root(settings).is_dir():
        return []
    removed = []
    with _state(settings) as state:
        for instance, lease in list(state["leases"].items()):
            if not Path(lease["directory"]).is_dir():
                _release(settings, state, instance)
                removed.append(f"lease {lease['address']} of {instance}")
        used = {lease["network"] for lease in state["leases"].values()}
        for name, net in list(state["networks"].items()):
            if name not in used:
                _remove_network(settings, state, name)
                removed.append(f"network {name} (bridge {net['bridge']})")
        known = {net["bridge"] for net in state["networks"].values()}
        for state_dir in _root(settings).glob(f"{links.PREFIX}b*"):
            if state_dir.is_dir() and state_dir.name not in known:
                _remove_bridge(settings, state_dir.name)  # of a state that was lost
                removed.append(f"bridge {state_dir.name}")
    return removed


def leftovers(settings: Settings, instance: str | None = None) -> list[str]:
    """What of this cache directory's networks exists on the host, described: bridges, veth
    and tap devices, firewall tables, DNS server processes, leases. Empty once all is gone.
    With ``instance``: only what is that instance's (its lease, name and host device)."""
    root = _root(settings)
    found = []
    state = fsutil.read_json(root / STATE)
    state = state if isinstance(state, dict) else {}
    leases = state.get("leases") or {}
    networks = state.get("networks") or {}
    if instance is not None:
        device = device_name(settings, instance)
        if links.exists(device):
            found.append(f"network device {device}")
        if instance in leases:
            found.append(f"lease {leases[instance]['address']} of {instance}")
        found += [f"DNS name {p}" for p in root.glob(f"*/{services.HOSTS_DIR}/{instance}")]
        return found
    found += [f"lease {lease['address']} of {name}" for name, lease in leases.items()]
    bridges = {net["bridge"] for net in networks.values()}
    bridges |= {p.name for p in root.glob(f"{links.PREFIX}b*") if p.is_dir()}
    devices = {lease["device"] for lease in leases.values()}
    found += [f"bridge {b}" for b in sorted(bridges) if links.exists(b)]
    found += [f"network device {d}" for d in sorted(devices) if links.exists(d)]
    found += [f"firewall table inet {t}" for t in services.firewall_tables() if t in bridges]
    for bridge in sorted(bridges):
        if (pid := services.dns_pid(_bridge_dir(settings, bridge))) is not None:
            found.append(f"DNS server (dnsmasq) pid {pid} of bridge {bridge}")
    return found


def unavailable() -> str | None:
    """Why host-only networks cannot work here (a tool missing, not root), or None."""
    if os.geteuid() != 0:
        return "host-only networks need root (bridges, veth and tap devices, nftables)"
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return f"host-only networks need {', '.join(missing)}: apt-get install {' '.join(missing)}"
    return None


def probe(settings: Settings) -> str | None:
    """None if host-only networks work here (a bridge, its firewall table and its DNS server
    really made and removed again), else why not and what to do."""
    if reason := unavailable():
        return reason
    try:
        with _state(settings) as state:
            try:
                net = _network(settings, state, PROBE_NETWORK)
                if not services.firewall_exists(net["bridge"]):
                    return f"the firewall table of bridge {net['bridge']} was not made"
            finally:
                _remove_network(settings, state, PROBE_NETWORK)
    except IncusError as exc:
        return str(exc)
    return None


class HostNetworks:
    """The local backend's networks (``runtimes.protocol.Networks``): this module's host-only
    bridges, for the cache directory of ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def attach(
        self, network: str, name: str, directory: Path, owner: Owner
    ) -> NetworkAttachment | None:
        """Lease ``name`` an address on ``network`` (see ``attach``)."""
        return attach(self.settings, network, name, directory, owner)

    def detach(self, name: str, directory: Path) -> None:
        """Give back what ``attach`` gave ``name`` (see ``detach``)."""
        detach(self.settings, name, directory)

    def sweep(self) -> None:
        """Remove leases of instances gone and bridges nobody uses (see ``sweep``)."""
        sweep(self.settings)
