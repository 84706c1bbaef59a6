"""The subnet chooser avoids what the host reaches through its default route: its gateway and
its nameservers (a bridge over one would shadow it, and the host would lose its DNS)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from pytest_incus.network import subnet


def test_a_nameserver_in_a_candidate_range_is_avoided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = subnet.CANDIDATES[0]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"# a comment\nsearch example\nnameserver {first[53]}\nnameserver ::1\n")
    monkeypatch.setattr(subnet, "RESOLV_CONF", resolv)
    routes = subnet.host_routes()
    assert (ipaddress.IPv4Network(f"{first[53]}/32"), "resolv.conf") in routes
    chosen = subnet.choose(routes)
    assert chosen != first and not chosen.overlaps(first)
    with pytest.raises(subnet.ConfigError, match="overlaps the host's route"):
        subnet.check(first, routes)


def test_the_default_gateway_counts_as_used() -> None:
    said = subprocess.run(
        ["ip", "-4", "-j", "route", "show", "default"], capture_output=True, check=True
    )
    gateways = {r["gateway"] for r in json.loads(said.stdout or b"[]") if r.get("gateway")}
    assert gateways, "this machine has a default route through a gateway (HOST.md: eth0)"
    used = {str(net.network_address) for net, _ in subnet.host_routes() if net.prefixlen == 32}
    assert gateways <= used
