"""VMs on a host-only network (runtimes/vm.py, guest_agent/network.py): a tap on a bridge,
virtio-net with one placeholder MAC for every VM, and the guest's own MAC, address, DNS
server and name given by the agent after every start.

The bridge is this test module's own (a 10.250.N.0/24 that no route of the host uses), and the
attachments are made by hand: what the network module will hand the runtime. The VMs are made
the way the factory makes them (a record in the cache's instances directory, then
``VmRuntime().create``) with the attachment passed in. Each VM boot costs seconds under TCG:
the checks are combined into few VMs.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from guest_agent.network import PLACEHOLDER_MAC
from pytest_incus import Instance, registry
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.network import links
from pytest_incus.ownership import Owner
from pytest_incus.runtimes.vm import VmRuntime
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import NetworkAttachment

PORT = 8765
SERVE_DEADLINE = 60.0  # seconds for the guest's listener to answer (python3 starts under TCG)
# answers every connection with the guest's host name, then closes it
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(socket.gethostname().encode() + b"\\n")
    c.close()
"""
CLIENT = (
    "import socket, sys; "
    "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); "
    "print(c.makefile().read().strip())"
)


@dataclasses.dataclass
class Bridge:
    """A bridge of the test's own, 10.250.``subnet``.1/24 on the host side."""

    name: str
    subnet: int
    taps: list[str] = dataclasses.field(default_factory=list)

    def attachment(self, host: int) -> NetworkAttachment:
        """What the network module would lease: address 10.250.``subnet``.``host``."""
        tap = f"ptit{secrets.token_hex(4)}"
        self.taps.append(tap)
        return NetworkAttachment(
            network="bridged",
            bridge=self.name,
            device=tap,
            address=f"10.250.{self.subnet}.{host}",
            prefix=24,
            gateway=f"10.250.{self.subnet}.1",
            mac=f"0a:70:74:fa:{self.subnet:02x}:{host:02x}",
        )


def _free_subnet() -> int:
    """An N for which no route or address of the host is in 10.250.N.0/24."""
    used = "".join(
        subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for argv in (["ip", "route", "show", "table", "all"], ["ip", "-4", "addr"])
    )
    for n in random.sample(range(1, 255), 254):
        if f"10.250.{n}." not in used:
            return n
    raise AssertionError("no free 10.250.N.0/24 on this host")


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    """A bridge with the host's address on it; it and every tap made for it are removed
    afterwards (and checked gone)."""
    made = Bridge(f"ptib{secrets.token_hex(4)}", _free_subnet())
    links.make_bridge(made.name, f"10.250.{made.subnet}.1", 24)
    try:
        yield made
    finally:
        links.delete([*made.taps, made.name])
        assert [d for d in (*made.taps, made.name) if links.exists(d)] == []


@dataclasses.dataclass(frozen=True)
class Shape:
    """A machine shape of the test's own (``kernel_args=arg``), so that its first VM boots
    and saves the boot snapshot that the next ones resume."""

    arg: str
    store: ImageStore
    before: frozenset[str]

    def snapshots(self) -> list[Image]:
        """The boot snapshots made since the test began."""
        return [e for e in self.store.list() if e.kind == "vm-boot" and e.key not in self.before]


@pytest.fixture
def shape(image_store: ImageStore) -> Iterator[Shape]:
    """A shape of this test's own; the snapshots made meanwhile are removed afterwards."""
    before = frozenset(e.key for e in image_store.list() if e.kind == "vm-boot")
    made = Shape(f"pti.shape={secrets.token_hex(4)}", image_store, before)
    yield made
    for entry in made.snapshots():
        image_store.discard(entry)


def _launch(store: ImageStore, attachment: NetworkAttachment, **options: object) -> Instance:
    """A debian/12 VM on ``attachment``, made as the factory makes one, started and ready."""
    spec = InstanceSpec.parse("vm", "debian/12", options, where="test_vm_network")
    name = f"pti-{secrets.token_hex(4)}"
    directory = store.settings.instances_dir / name
    directory.mkdir(parents=True)
    registry.write_record(directory, kind="vm", image=spec.image, owner=Owner.current())
    machine = VmRuntime().create(spec, name, directory, store, attachment)
    instance = Instance(machine, spec, exec_timeout=120, on_delete=_destroy, on_use=lambda _: None)
    try:
        machine.start()
    except BaseException:
        instance.delete()
        raise
    return instance


def _destroy(instance: Instance) -> None:
    try:
        instance.machine.destroy()
    finally:
        registry.forget(instance.directory)


def _serve(vm: Instance) -> None:
    """Start the listener in ``vm``, in the background (its output nowhere: the agent does
    not wait for it)."""
    vm.write_file("/root/pti-server.py", SERVER)
    command = f"setsid python3 /root/pti-server.py {PORT} </dev/null >/dev/null 2>&1 &"
    vm.exec(["/bin/sh", "-c", command], check=True)


def _greeting(address: str) -> str:
    """What the listener at ``address`` says to the host, once it answers."""
    deadline = time.monotonic() + SERVE_DEADLINE
    while True:
        try:
            with socket.create_connection((address, PORT), timeout=5) as conn:
                return conn.makefile().read().strip()
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answers at {address}:{PORT}: {exc}") from exc
            time.sleep(0.05)


def _assert_on_its_network(vm: Instance, attachment: NetworkAttachment) -> None:
    """``vm`` has the attachment's MAC and address on its one NIC and answers the host there,
    no default route, no IPv6 on the NIC, the network's DNS server, the instance's name."""
    _serve(vm)
    assert _greeting(attachment.address) == vm.name  # address, listener, host name
    assert vm.read_text("/sys/class/net/eth0/address").strip() == attachment.mac
    routes = vm.read_text("/proc/net/route").splitlines()[1:]
    # one route, to the network itself (Destination 10.250.N.0 in little-endian hex)
    network = socket.inet_aton(attachment.address)[:3] + b"\0"
    assert [r.split()[:2] for r in routes] == [["eth0", network[::-1].hex().upper()]]
    assert vm.read_text("/etc/resolv.conf") == attachment.resolv_conf
    assert "eth0" not in vm.read_text("/proc/net/if_inet6")


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _reaches(client: Instance, server: Instance, attachment: NetworkAttachment) -> bool:
    said = client.exec(["python3", "-c", CLIENT, attachment.address, str(PORT)], check=True)
    return said.stdout.strip() == server.name


def test_resumed_vms_get_macs_and_addresses_of_their_own_and_reach_each_other(
    image_store: ImageStore, bridge: Bridge, shape: Shape
) -> None:
    attachments = [bridge.attachment(host) for host in (2, 3, 4)]
    vms: list[Instance] = []
    try:
        # the first boots and saves the shape's boot, then gets its own network: never before
        for attachment in attachments:
            vms.append(_launch(image_store, attachment, init="agent", kernel_args=shape.arg))
        [entry] = shape.snapshots()
        saved = (entry.path / vm_images.BOOT_STATE).read_bytes()
        assert _mac_bytes(PLACEHOLDER_MAC) in saved  # the search finds a MAC that is there
        in_saved = [
            what
            for attachment in attachments
            for what in (
                _mac_bytes(attachment.mac),
                attachment.mac.encode(),
                attachment.address.encode(),
            )
            if what in saved
        ]
        assert in_saved == []
        for vm, attachment in zip(vms, attachments, strict=True):
            _assert_on_its_network(vm, attachment)
        macs = {vm.read_text("/sys/class/net/eth0/address").strip() for vm in vms}
        assert len(macs) == 3 and PLACEHOLDER_MAC not in macs
        # the two that resumed one saved boot reach each other, both ways
        first, second = vms[1], vms[2]
        assert _reaches(first, second, attachments[2])
        assert _reaches(second, first, attachments[1])
        # a restart boots the VM from its own disk; a tap removed meanwhile is made again
        first.stop()
        links.delete([attachments[1].device])
        first.start()
        _assert_on_its_network(first, attachments[1])
        assert _reaches(second, first, attachments[1])
    finally:
        for vm in vms:
            vm.delete()


@pytest.mark.parametrize(
    "agent", ["ours", pytest.param("qemu-ga", id="qemu-ga (configured by one guest-exec)")]
)
def test_a_cold_booted_systemd_vm_is_on_its_network(
    settings: Settings, bridge: Bridge, agent: str
) -> None:
    # without boot snapshots every VM boots; a VM with qemu-ga always does
    store = ImageStore(dataclasses.replace(settings, vm_snapshots=False))
    attachment = bridge.attachment(5)
    kernel_args = vm_images.QEMU_GA_ARG if agent == "qemu-ga" else ""
    vm = _launch(store, attachment, init="systemd", kernel_args=kernel_args)
    try:
        assert vm.machine.agent.extended is (agent == "ours")
        _assert_on_its_network(vm, attachment)
    finally:
        vm.delete()


def test_the_shape_names_no_tap_and_no_mac_of_the_instance(
    image_store: ImageStore, bridge: Bridge
) -> None:
    """No VM is started: the two machines are only made, to compare their shapes."""
    spec = InstanceSpec.parse("vm", "debian/12", {"init": "agent"}, where="test")
    shapes = []
    for host in (6, 7):
        attachment = bridge.attachment(host)
        directory = image_store.settings.instances_dir / f"pti-{secrets.token_hex(4)}"
        directory.mkdir(parents=True)
        try:
            machine = VmRuntime().create(spec, directory.name, directory, image_store, attachment)
            assert f"ifname={attachment.device}," in " ".join(machine.qemu_argv())
            shapes.append(machine.machine_shape())
            machine.destroy()
        finally:
            registry.forget(directory)
    assert shapes[0] == shapes[1]
    text = " ".join(shapes[0])
    assert f"mac={PLACEHOLDER_MAC}" in text
    assert not any(tap in text for tap in bridge.taps)
