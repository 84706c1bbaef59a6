"""The interface every kind of instance implements (the values it exchanges are in
``pytest_incus.values``).

A ``Runtime`` knows one kind (container, app, vm) on one backend (``local``: the plugin as its
own engine; ``incus``: an Incus server): it checks specs, says whether the kind can run, and
makes ``Machine`` objects. The factory picks it from a ``RuntimeTable`` by (backend, kind); each
runtime gets a ``RuntimeContext`` when it is made. A ``Machine`` is one instance's engine; the public
``Instance`` wraps it and implements everything kind-independent (push/pull semantics, ``file()``,
``check=True``), so fixtures and ``Instance`` never branch on kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pytest_incus.values import ExecRequest, ExecResult, NetworkAttachment, Stat

if TYPE_CHECKING:
    # annotations only: defining the protocol must not import the image store and all it
    # imports (the store's modules may import this one)
    from pytest_incus.ownership import Owner
    from pytest_incus.spec import InstanceSpec


class Machine(Protocol):
    """One instance's engine, as a runtime makes it."""

    name: str
    directory: Path

    @property
    def ipv4(self) -> str | None:
        """The instance's IPv4 address on its network, which the host reaches; None for no
        network (or none yet)."""
        ...

    def start(self) -> None:
        """Boot and return once ready (init finished booting and exec works)."""
        ...

    def stop(self, timeout: float, force: bool) -> None:
        """Shut down cleanly within ``timeout`` seconds (then kill), or kill at once."""
        ...

    def destroy(self) -> None:
        """Stop if running and remove everything the instance had; idempotent."""
        ...

    def running(self) -> bool:
        """True while the instance runs."""
        ...

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command; raises ExecTimeoutError after killing it past its timeout."""
        ...

    def read_file(self, path: str) -> bytes:
        """The content of ``path`` (symlinks followed inside the instance)."""
        ...

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace ``path`` (parents created), owned by root inside."""
        ...

    def stat(self, path: str) -> tuple[Stat, Stat] | None:
        """(lstat, stat) of ``path``; stat is the lstat again for a dangling link; None if
        ``path`` does not exist."""
        ...

    def sha256(self, path: str) -> str:
        """The hex sha256 of the file at ``path``."""
        ...

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack a tar archive made by ``Instance.push``: a tree (members under ``.``) into
        directory ``dest``, created or merged; or its one member as ``dest`` (into ``dest`` if
        that is a directory). Missing parents are created."""
        ...

    def get_archive(self, path: str) -> bytes:
        """A tar archive of ``path``: a directory as ``.`` with its contents, anything else as
        one member named after it."""
        ...

    def logs(self) -> str:
        """The console log (for an app: its output)."""
        ...

    def wait(self, timeout: float | None) -> int:
        """Wait for an app's main process to end; its exit code. IncusError for kinds whose
        init does not end."""
        ...

    def keep(self) -> None:
        """``--incus-keep`` keeps the instance after its run: say so wherever its backend
        records its owner (the local record is the factory's), so that no reap removes it."""
        ...


class Networks(Protocol):
    """A backend's networks: where ``network="bridged"`` (or a name) puts an instance."""

    def attach(
        self, network: str, name: str, directory: Path, owner: Owner
    ) -> NetworkAttachment | None:
        """Give instance ``name`` a place on ``network`` before it is created; None when the
        backend's runtime plugs it in itself (an Incus server's managed networks)."""
        ...

    def detach(self, name: str, directory: Path) -> None:
        """Release what ``attach`` gave ``name``; idempotent."""
        ...

    def sweep(self) -> None:
        """Remove the networks no instance uses any more."""
        ...


class Runtime(Protocol):
    """Makes instances of one kind on one backend."""

    kind: str
    backend: str
    networks: Networks

    def check(self, spec: InstanceSpec) -> None:
        """Raise ConfigError for a spec this kind can never honour (checked at collection)."""
        ...

    def unavailable(self) -> str | None:
        """None if this host can run the kind, else why not and what to do."""
        ...

    def create(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        network: NetworkAttachment | None,
    ) -> Machine:
        """Prepare an instance in ``directory`` (which exists); ``start()`` boots it.

        ``network`` is what ``networks.attach`` gave it: its place on a host-only network
        (already leased, its bridge up), or None for no network (or a network the runtime
        plugs in itself): the runtime plugs the instance in, its own way (a veth for
        containers and apps, a tap with virtio-net for VMs), and gives it that address, MAC
        and DNS server."""
        ...

    def shell(self, name: str, directory: Path, command: list[str] | None) -> int:
        """Run an interactive login shell (or ``command``) in instance ``name`` on this
        terminal; returns its exit code."""
        ...

    def reap(self, name: str, directory: Path) -> None:
        """Remove what a dead run left of instance ``name``: processes, mounts, cgroups.

        The instance directory itself is removed by the caller afterwards."""
        ...
