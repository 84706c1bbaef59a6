"""Settings: the run-wide values, checked where they are made (pytest's config or the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_incus import ConfigError, Settings

CACHE = Path("/var/cache/pytest-incus-unit")


def settings(**values: Any) -> Settings:
    return Settings(cache_dir=CACHE, **values)


def test_network_defaults() -> None:
    assert settings().subnet is None  # the network module chooses one
    assert settings().default_network == "none"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("10.250.0.0/16", "10.250.0.0/16"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.168.77.0/24", "192.168.77.0/24"),
        (" 172.20.0.0/14 ", "172.20.0.0/14"),
        ("10.250.0.0/255.255.0.0", "10.250.0.0/16"),
    ],
)
def test_good_subnets_are_kept_canonical(given: str, canonical: str) -> None:
    assert settings(subnet=given).subnet == canonical


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("ten", "is not an IPv4 network; give one like 10.250.0.0/16 (a /8 to a /24)"),
        ("10.250.0.0/33", "is not an IPv4 network"),
        ("fd00::/64", "is not an IPv4 network"),
        ("10.250.0.0", "has no prefix length; give one like 10.250.0.0/16"),
        ("10.0.0.0/7", "a /7 is larger than the largest private range (a /8)"),
        ("10.250.0.0/25", "a /25 leaves too few addresses for a network"),
        ("10.250.0.1/16", "has host bits set; give the network's address: 10.250.0.0/16"),
        ("127.0.0.0/8", "overlaps 127.0.0.0/8, the loopback range"),
        ("169.0.0.0/8", "overlaps 169.254.0.0/16, the link-local range"),
        ("169.254.3.0/24", "overlaps 169.254.0.0/16, the link-local range"),
        ("224.1.0.0/16", "overlaps 224.0.0.0/4, the multicast range"),
        ("240.0.0.0/8", "overlaps 240.0.0.0/4, the reserved range"),
        ("0.0.0.0/8", 'overlaps 0.0.0.0/8, the "this network" range'),
    ],
)
def test_bad_subnets(given: str, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(subnet=given)
    assert str(info.value).startswith(f"--incus-subnet={given!r}")
    assert said in str(info.value)


@pytest.mark.parametrize("network", ["none", "bridged", "ci-net"])
def test_good_default_networks(network: str) -> None:
    assert settings(default_network=network).default_network == network


@pytest.mark.parametrize(
    ("network", "said"),
    [
        ("my_net", 'incus_default_network = \'my_net\' is not a network; give "none", "bridged"'),
        ("", "incus_default_network = '' is not a network"),
        ("Bridged", "incus_default_network = 'Bridged' is not a network; write 'bridged'"),
    ],
)
def test_bad_default_networks(network: str, said: str) -> None:
    with pytest.raises(ConfigError, match="^" + said.replace("(", r"\(")):
        settings(default_network=network)
