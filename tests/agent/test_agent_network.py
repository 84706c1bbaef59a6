"""``pti-net-config`` (guest_agent/network.py) through ``AgentClient.configure_network``: our
agent answers it in one request, a stock qemu-ga runs our agent's own code with one guest-exec.

The targets here have no NIC: what can be checked is that every bad argument is refused,
saying which, before anything changes (on the host target too), and that a guest with no
ethernet interface says so. A VM on a network is configured for real in
tests/integration/test_vm_network.py."""

from __future__ import annotations

import dataclasses

import pytest
from agent_helpers import AgentTarget

from pytest_incus import AgentError
from pytest_incus.agent import AgentClient
from pytest_incus.values import NetworkAttachment

GOOD = NetworkAttachment(
    network="bridged",
    bridge="ptibtest",
    device="ptittest",
    address="10.250.254.2",
    prefix=24,
    gateway="10.250.254.1",
    mac="0a:70:74:fa:fe:02",
)


@pytest.fixture
def client(agent_client: AgentClient, agent_target: AgentTarget) -> AgentClient:
    """A client whose agent has our network code: ours, or qemu-ga in our VM image."""
    if not (agent_client.extended or agent_target.root):
        pytest.skip("a stock qemu-ga on the host has no pytest-incus agent to run")
    return agent_client


@pytest.mark.parametrize(
    ("change", "hostname", "said"),
    [
        ({"mac": "0a:70:74:fa:fe"}, "vm", "mac must look like"),
        ({"mac": "0a-70-74-fa-fe-02"}, "vm", "mac must look like"),
        ({"mac": "zz:70:74:fa:fe:02"}, "vm", "mac must look like"),
        ({"mac": "01:70:74:fa:fe:02"}, "vm", "not a unicast address"),
        ({"mac": "00:00:00:00:00:00"}, "vm", "not a unicast address"),
        ({"address": "10.250.254"}, "vm", "address must be an IPv4 unicast address"),
        ({"address": "10.250.254.256"}, "vm", "address must be an IPv4 unicast address"),
        ({"address": "127.0.0.2"}, "vm", "address must be an IPv4 unicast address"),
        ({"address": "fe80::1"}, "vm", "address must be an IPv4 unicast address"),
        ({"prefix": 33}, "vm", "prefix must be an integer from 1 to 32"),
        ({"prefix": 0}, "vm", "prefix must be an integer from 1 to 32"),
        ({}, "-vm", "is not a host name"),
        ({}, "a b", "is not a host name"),
        ({}, "x" * 65, "hostname must be a string of at most 64"),
    ],
)
def test_bad_arguments_are_refused_saying_which(
    client: AgentClient, change: dict[str, object], hostname: str, said: str
) -> None:
    bad = dataclasses.replace(GOOD, **change)  # type: ignore[arg-type]
    with pytest.raises(AgentError, match=said):
        client.configure_network(bad, hostname)


def test_wrong_types_and_missing_arguments_are_refused(client: AgentClient) -> None:
    if not client.extended:
        pytest.skip("raw requests of pti-net-config: our agent only")
    arguments = {
        "mac": GOOD.mac,
        "address": GOOD.address,
        "prefix": GOOD.prefix,
        "resolv-conf": GOOD.resolv_conf,
        "hostname": "vm",
    }
    for key, value, said in [
        ("prefix", True, "prefix must be an integer"),
        ("prefix", "24", "prefix must be an integer"),
        ("mac", 5, "mac must look like"),
        ("resolv-conf", ["nameserver 10.0.0.1"], "resolv-conf must be a string"),
        ("resolv-conf", "x\0y", "resolv-conf must be a string"),
    ]:
        with pytest.raises(AgentError, match=said):
            client.request("pti-net-config", {**arguments, key: value})
    for key in arguments:
        incomplete = {k: v for k, v in arguments.items() if k != key}
        with pytest.raises(AgentError, match=f"missing argument '{key}'"):
            client.request("pti-net-config", incomplete)


@pytest.mark.agent_root
def test_a_guest_without_a_nic_says_so(client: AgentClient) -> None:
    with pytest.raises(AgentError, match=r"no ethernet interface .*virtio_net"):
        client.configure_network(GOOD, "vm")
