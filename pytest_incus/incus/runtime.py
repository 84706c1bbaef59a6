"""The incus backend's runtimes: containers, apps and VMs on an Incus server or cluster.

One ``IncusRuntime`` per kind, all sharing one ``IncusClient`` and one ``IncusImages``, both
made when first used: building the runtime table contacts nothing, so a run of the local
backend never needs a server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pytest_incus.errors import ConfigError, IncusError, ServerError, UnavailableError
from pytest_incus.incus import owners
from pytest_incus.incus.machine import IncusMachine, refused_type
from pytest_incus.incus.networks import IncusNetworks
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.protocol import Networks, Runtime
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import Kind, NetworkAttachment

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient
    from pytest_incus.incus.images import Source


class SourceMaker(Protocol):
    """What gives a new instance its source (``incus.images.IncusImages``)."""

    def source(self, spec: InstanceSpec) -> Source:
        """The "source" of POST /1.0/instances for ``spec``, extra config, a shell inside."""
        ...


class Server:
    """What the runtimes of one backend share: the client and the images, made lazily."""

    def __init__(
        self,
        context: RuntimeContext,
        *,
        client: Callable[[], IncusClient] | None = None,
        images: Callable[[IncusClient], SourceMaker] | None = None,
    ) -> None:
        self.context = context
        self._make_client = client
        self._make_images = images
        self._client: IncusClient | None = None
        self._images: SourceMaker | None = None
        self._vm_asked = False
        self._vm_refusal: str | None = None

    @property
    def client(self) -> IncusClient:
        """The server's client."""
        if self._client is None:
            if self._make_client is not None:
                self._client = self._make_client()
            else:
                from pytest_incus.incus.client import IncusClient

                self._client = IncusClient.from_settings(self.context.settings)
        return self._client

    @property
    def images(self) -> SourceMaker:
        """The images of the server (uploads, remote sources)."""
        if self._images is None:
            if self._make_images is not None:
                self._images = self._make_images(self.client)
            else:
                from pytest_incus.incus.images import IncusImages

                self._images = IncusImages(self.client, self.context.images)
        return self._images

    def vm_refusal(self) -> str | None:
        """None if the server can run VMs; else why not, in Incus's own words.

        A server without a VM driver (``environment.driver`` has no "qemu") is asked once for
        an empty VM: its refusal says why (here: "vhost_vsock kernel module not loaded").
        Should it accept, the probe is deleted at once and VMs are left to it."""
        if self._vm_asked:
            return self._vm_refusal
        client = self.client
        drivers = str((client.server().get("environment") or {}).get("driver", ""))
        if "qemu" in drivers.split(" | "):
            self._vm_asked = True
            return None
        probe = f"pti-probe-{secrets.token_hex(4)}"
        body = {"name": probe, "type": "virtual-machine", "source": {"type": "none"}}
        reason: str | None = None
        try:
            client.call("POST", "/1.0/instances", json=body, timeout=60)
        except ServerError as exc:
            said = str(exc).split("failed: ", 1)[-1]
            reason = (
                f"Incus server {client.remote} cannot run VMs (its drivers: {drivers or '?'}); "
                f"it says: {said}"
                + (
                    "; load the module on the server (modprobe vhost_vsock), or run VMs with "
                    "--incus-backend=local"
                    if "vhost_vsock" in said
                    else "; run VMs with --incus-backend=local"
                )
            )
            if not refused_type(exc):
                reason = f"Incus server {client.remote} refused a VM: {said}"
        else:
            owners.delete_instance(client, probe)
        self._vm_asked, self._vm_refusal = True, reason
        return reason


class IncusRuntime:
    """Makes instances of one kind on an Incus server."""

    backend = "incus"

    def __init__(self, kind: str, server: Server, local: Runtime, networks: IncusNetworks) -> None:
        self.kind = kind
        self.server = server
        self._local = local  # its check() is spec-only: the same ConfigErrors on both backends
        self.networks: Networks = networks  # the protocol's view
        self.incus_networks = networks  # the machines' (placing instances)

    @property
    def settings(self) -> Settings:
        """The run's settings."""
        return self.server.context.settings

    @property
    def client(self) -> IncusClient:
        """The server's client."""
        return self.server.client

    @property
    def images(self) -> SourceMaker:
        """The server's images."""
        return self.server.images

    def vm_refusal(self) -> str | None:
        """Why the server cannot run VMs, or None (see ``Server.vm_refusal``)."""
        return self.server.vm_refusal()

    def check(self, spec: InstanceSpec) -> None:
        """The local runtime's checks of the kind, and the options Incus cannot honour: a VM's
        own kernel, initrd or command line (an Incus VM boots its image's kernel through its
        firmware). ``init="agent"``, a way to boot faster, is taken as a hint: an Incus VM boots
        its image's init, and is ready when systemd says so, as ``init="systemd"`` is.

        Asks the server (once a session) whether it runs VMs at all: if not, UnavailableError
        comes first, whatever the options."""
        self._local.check(spec)
        if spec.kind == "vm":
            # a server that runs no VM at all: that is what the user must hear (and what
            # --incus-skip-unavailable skips on), not which VM option it would not take
            if reason := self.unavailable():
                raise UnavailableError(f"cannot launch kind='vm' here: {reason}")
            for option, value in (
                ("kernel", spec.kernel),
                ("initrd", spec.initrd),
                ("kernel_args", spec.kernel_args or None),
            ):
                if value is not None:
                    raise ConfigError(
                        f"{option}= is not supported with --incus-backend=incus: an Incus VM "
                        "boots its image's own kernel; leave it out, or use "
                        "--incus-backend=local"
                    )

    def unavailable(self) -> str | None:
        """None if the server can run this kind; else why not and what to do."""
        try:
            self.client.check()
        except UnavailableError as exc:
            return str(exc)
        except IncusError as exc:
            return f"Incus server {self.client.remote} cannot be used: {exc}"
        if self.kind == "vm":
            try:
                return self.vm_refusal()
            except IncusError as exc:
                return str(exc)
        return None

    def create(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        network: NetworkAttachment | None,
    ) -> IncusMachine:
        """An instance to be created on the server at its first ``start()`` (its network is
        the spec's: ``networks.attach`` gave nothing)."""
        return IncusMachine(self, spec, name, directory)

    def shell(self, name: str, directory: Path, command: list[str] | None) -> int:
        """A login shell (or ``command``) in ``name`` on this terminal, by ``incus exec``
        (the incus command must be installed: the REST API's exec has no terminal of ours)."""
        if shutil.which("incus") is None:
            raise IncusError(
                f"pytest-incus shell {name}: the incus command is not installed here; install "
                f"it (apt-get install incus-client) or run on the server: incus exec {name} -- "
                "/bin/sh -l"
            )
        remote = self.client.remote
        env = dict(os.environ)
        target = name
        if remote.startswith(("http://", "https://")):
            raise IncusError(
                f"pytest-incus shell {name}: the server is {remote}; add it to the incus "
                f"command (incus remote add NAME {remote}) and run: incus exec --project "
                f"{self.client.project} NAME:{name} -- /bin/sh -l"
            )
        env["INCUS_SOCKET"] = remote
        argv = command or ["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l']
        cmd = ["incus", "exec", "--project", self.client.project, target, "--", *argv]
        return subprocess.call(cmd, env=env)

    def reap(self, name: str, directory: Path) -> None:
        """Delete instance ``name`` on the server if it is one of ours (nothing if gone)."""
        if owners.is_our_instance(self.client, name):
            owners.delete_instance(self.client, name)


def incus_runtimes(
    context: RuntimeContext,
    *,
    client: Callable[[], IncusClient] | None = None,
    images: Callable[[IncusClient], SourceMaker] | None = None,
) -> list[Runtime]:
    """The incus backend's runtimes, one per kind, sharing one client and one IncusImages
    (``client`` and ``images`` make others, for tests). Nothing contacts the server here."""
    from pytest_incus.runtimes.app import AppRuntime
    from pytest_incus.runtimes.container import ContainerRuntime
    from pytest_incus.runtimes.vm import VmRuntime

    server = Server(context, client=client, images=images)
    networks = IncusNetworks(context.settings, lambda: server.client)
    local: dict[str, Runtime] = {
        "container": ContainerRuntime(context),
        "app": AppRuntime(context),
        "vm": VmRuntime(context),
    }
    return [IncusRuntime(kind, server, local[kind], networks) for kind in Kind]
