"""Which IPv4 range the networks use: the configured one, or one no route of this host uses.

A run's networks each get a /24 of one subnet (``--incus-subnet``, ini ``incus_subnet``). Left
unset, the first of ``CANDIDATES`` that overlaps no route and no address of the host is chosen
once and recorded in the cache directory's network state, so that every worker of a run, and
every later run on that cache, agrees on it. A subnet that overlaps a route of the host (other
than one of this cache's own bridges) is a ConfigError: an instance's address would then shadow
a real destination of the host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Collection, Iterable
from pathlib import Path

from pytest_incus import tools
from pytest_incus.errors import ConfigError, IncusError

Net = ipaddress.IPv4Network
# 10.0.0.0/8 is private, and its upper half is seldom used by default configurations (Docker
# takes 172.17+/16, Incus a random 10.x.y.0/24, libvirt 192.168.122.0/24)
CANDIDATES = tuple(ipaddress.IPv4Network(f"10.{n}.0.0/16") for n in range(213, 256))
NETWORK_PREFIX = 24  # each network is a /24 of the subnet: 253 instances


RESOLV_CONF = Path("/etc/resolv.conf")


def host_routes() -> list[tuple[Net, str]]:
    """Every IPv4 route of the host (all tables) with its device, default routes left out,
    and, as /32s, the addresses the host reaches through its default routes: their gateways,
    and the nameservers of /etc/resolv.conf (device "resolv.conf"). A network over any of
    these would shadow it: a bridge's connected route wins over the default route, and the
    host would lose its gateway or its DNS (a nameserver such as 10.255.255.53 lies in a
    private range any chooser may pick)."""
    said = tools.run(
        ["ip", "-4", "-j", "route", "show", "table", "all"],
        what="ip route (the host's routes)",
        error=IncusError,
        timeout=20,
    )
    routes = []
    for route in json.loads(said.stdout or b"[]"):
        dst, dev = route.get("dst", ""), str(route.get("dev", ""))
        with contextlib.suppress(ValueError):
            if dst in ("", "default"):  # no conflict itself: a more specific route wins
                if route.get("gateway"):
                    routes.append((ipaddress.IPv4Network(f"{route['gateway']}/32"), dev))
                continue
            routes.append((ipaddress.IPv4Network(dst, strict=False), dev))
    return routes + _nameservers()


def _nameservers() -> list[tuple[Net, str]]:
    try:
        text = RESOLV_CONF.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append((ipaddress.IPv4Network(f"{words[1]}/32"), "resolv.conf"))
    return found


def overlapping(subnet: Net, routes: Iterable[tuple[Net, str]], own: Collection[str]) -> list[str]:
    """The routes (described) of devices not in ``own`` that overlap ``subnet``."""
    return [f"{net} dev {dev}" for net, dev in routes if dev not in own and net.overlaps(subnet)]


def choose(routes: Iterable[tuple[Net, str]]) -> Net:
    """The first candidate subnet that no route of the host overlaps."""
    routes = list(routes)
    for candidate in CANDIDATES:
        if not overlapping(candidate, routes, ()):
            return candidate
    raise ConfigError(
        f"every subnet pytest-incus would choose ({CANDIDATES[0]} to {CANDIDATES[-1]}) "
        "overlaps a route of this host; give a free one with --incus-subnet (ini incus_subnet)"
    )


def check(subnet: Net, routes: Iterable[tuple[Net, str]]) -> None:
    """ConfigError if ``subnet`` overlaps one of ``routes``."""
    if clash := overlapping(subnet, routes, ()):
        raise ConfigError(
            f"--incus-subnet {subnet} overlaps the host's route {clash[0]}: instances would "
            "shadow addresses the host really uses; give another subnet (--incus-subnet, ini "
            "incus_subnet), or leave it unset to let pytest-incus choose a free one"
        )


def networks(subnet: Net) -> Iterable[Net]:
    """The /24 networks of ``subnet``, in order (the subnet itself if it is a /24)."""
    if subnet.prefixlen >= NETWORK_PREFIX:
        return [subnet]
    return subnet.subnets(new_prefix=NETWORK_PREFIX)
