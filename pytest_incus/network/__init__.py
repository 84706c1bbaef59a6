"""Host-only networks: bridges, addresses, names and their cleanup, for every kind.

One module owns the host's network resources that instances use. ``attach`` gives an instance
a place on a network (a ``NetworkAttachment``: bridge, address, MAC, DNS server), making the
network's bridge on first use; the instance's runtime plugs it in its own way (liblxc makes a
veth pair on the bridge; a VM gets a tap made here by ``make_tap``); ``detach`` gives it all
back. ``sweep`` removes what nobody uses any more: leases of instances that are gone, and
bridges without leases, with their DNS server and firewall table. ``leftovers`` says what of
this cache directory's networks still exists on the host.
"""

from __future__ import annotations

from pathlib import Path

from pytest_incus.network import links
from pytest_incus.ownership import Owner
from pytest_incus.settings import Settings
from pytest_incus.values import NetworkAttachment


def attach(
    settings: Settings, network: str, instance: str, directory: Path, owner: Owner
) -> NetworkAttachment:
    """Lease an address on ``network`` ("bridged" or a name) for ``instance`` (whose
    directory is ``directory``), make the network's bridge if it has none, and make the
    instance's name resolvable on it. ConfigError for a subnet that cannot work here."""
    raise NotImplementedError


def make_tap(attachment: NetworkAttachment) -> None:
    """Make the tap device ``attachment.device`` on its bridge, up (for a VM's QEMU:
    ``-netdev tap,ifname=DEVICE,script=no,downscript=no``). ``detach`` removes it."""
    links.make_tap(attachment.device, attachment.bridge)


def detach(settings: Settings, instance: str, directory: Path) -> None:
    """Give back what ``attach`` gave ``instance``: its lease, its name, its host device
    (veth peer or tap) if still there. Idempotent; a no-op for an instance with no network."""
    raise NotImplementedError


def sweep(settings: Settings) -> list[str]:
    """Remove the leases of instances whose directory is gone, then every bridge of this
    cache that has no lease, with its DNS server and firewall table. Returns what it
    removed, described."""
    raise NotImplementedError


def leftovers(settings: Settings) -> list[str]:
    """What of this cache directory's networks exists on the host, described: bridges, veth
    and tap devices, firewall tables, DNS server processes, leases. Empty once all is gone."""
    raise NotImplementedError


def probe(settings: Settings) -> str | None:
    """None if host-only networks work here (a bridge, its firewall table and its DNS server
    really made and removed again), else why not and what to do."""
    raise NotImplementedError
