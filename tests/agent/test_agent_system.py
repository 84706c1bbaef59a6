"""The guest's clock and random pool through the agent: ``guest-set-time`` (QEMU's command,
both agents) and ``pti-add-entropy`` (ours), which a VM resumed from a boot snapshot gets.

Both change the system they run on, so they run on the VM targets only (``agent_root``); the
host target runs the checks of bad arguments, which are refused before anything is done."""

from __future__ import annotations

import os
import time

import pytest
from agent_helpers import run

from pytest_incus import AgentError
from pytest_incus.agent import AgentClient

HOUR_NS = 3600 * 10**9


def _guest_time(client: AgentClient) -> float:
    code, out, err = run(client, ["date", "+%s.%N"])
    assert code == 0, err
    return float(out)


@pytest.mark.agent_root
def test_set_time_sets_the_guests_wall_clock(agent_client: AgentClient) -> None:
    try:
        agent_client.set_time(time.time_ns() + HOUR_NS)
        assert abs(_guest_time(agent_client) - (time.time() + 3600)) < 5
    finally:
        agent_client.set_time(time.time_ns())
    assert abs(_guest_time(agent_client) - time.time()) < 5


@pytest.mark.agent_root
def test_add_entropy_is_ours_only(agent_client: AgentClient) -> None:
    if agent_client.extended:
        # credited and reseeded, or an AgentError; what it changes shows across VMs resumed
        # from one snapshot (tests/integration/test_vm_snapshot.py)
        agent_client.add_entropy(os.urandom(64))
    else:
        with pytest.raises(AgentError, match="only the pytest-incus agent"):
            agent_client.add_entropy(os.urandom(64))


def test_bad_arguments_are_refused(agent_client: AgentClient) -> None:
    with pytest.raises(AgentError, match="integer"):
        agent_client.request("guest-set-time", {"time": "noon"})
    if agent_client.extended:
        with pytest.raises(AgentError, match="not base64"):
            agent_client.request("pti-add-entropy", {"data": "not base64!"})
        with pytest.raises(AgentError, match="give 1 to 4096 bytes"):
            agent_client.request("pti-add-entropy", {"data": ""})
