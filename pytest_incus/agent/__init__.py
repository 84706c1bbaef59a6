"""The host side of the guest agent protocol (see ``client``)."""

from pytest_incus.agent.client import AgentClient

__all__ = ["AgentClient"]
