"""What the local backend's runtimes share: the plugin is the engine, on this host."""

from __future__ import annotations

from pytest_incus.network import HostNetworks
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.protocol import Networks


class LocalRuntime:
    """Base of the runtimes that run instances on this host (liblxc, QEMU): their context,
    and this host's host-only networks."""

    backend = "local"

    def __init__(self, context: RuntimeContext) -> None:
        self.context = context
        self.networks: Networks = HostNetworks(context.settings)
