"""Fixtures of the agent client's tests: a connected ``AgentClient`` per agent target.

The targets are in ``agent_helpers.TARGETS`` (one fixture param each). Each target is started
once per session and shared by every test; each test gets its own directory inside it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from agent_helpers import TARGETS, AgentTarget, run

from pytest_incus.agent import AgentClient

CONNECT_TIMEOUT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "agent_root: needs commands to run as root inside the guest (user switching, chown); "
        "runs on the VM targets only",
    )


@pytest.fixture(scope="session", params=sorted(TARGETS))
def agent_target(request: pytest.FixtureRequest) -> Iterator[AgentTarget]:
    """A running agent (see agent_helpers.TARGETS), shared by the session."""
    with TARGETS[request.param]() as target:
        yield target


@pytest.fixture(scope="session")
def _session_client(agent_target: AgentTarget) -> Iterator[AgentClient]:
    client = AgentClient(
        agent_target.socket_path, name="agent-test", extensions=agent_target.extensions
    )
    client.connect(time.monotonic() + CONNECT_TIMEOUT)
    yield client
    client.close()


@pytest.fixture
def agent_client(
    request: pytest.FixtureRequest, agent_target: AgentTarget, _session_client: AgentClient
) -> AgentClient:
    """A connected AgentClient to one agent target."""
    if request.node.get_closest_marker("agent_root") and not agent_target.root:
        pytest.skip("needs root inside the guest; runs on the VM targets")
    return _session_client


@pytest.fixture
def workdir(agent_client: AgentClient, agent_target: AgentTarget) -> Iterator[str]:
    """A fresh directory inside the guest for this test, removed afterwards."""
    path = f"{agent_target.workdir}/{secrets.token_hex(4)}"
    code, _, err = run(agent_client, ["mkdir", "-p", path])
    assert code == 0, err
    yield path
    run(agent_client, ["rm", "-rf", path])
