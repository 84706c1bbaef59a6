"""VMs on a host-only network (runtimes/vm.py, guest_agent/network.py): a tap on the network's
bridge, virtio-net with one placeholder MAC for every VM, and the guest's own MAC, address, DNS
server and name given by the agent after every start: the host reaches it at ``ipv4``, VMs
reach each other by address and by name, and a boot snapshot holds none of that.

Each VM boot costs seconds under TCG: the checks are combined into few VMs.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
from collections.abc import Iterator

import pytest
from integration_helpers import assert_nothing_left
from snapshot_helpers import of_shape

from guest_agent.network import PLACEHOLDER_MAC
from pytest_incus import Instance, registry
from pytest_incus.factory import InstanceFactory
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.network import links
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.vm import VmRuntime
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import NetworkAttachment

PORT = 8765
SERVE_TIMEOUT = 60.0  # seconds for the guest's listener to answer (python3 starts under TCG)
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
# connects to a host (an address or a name, resolved by the network's DNS server) and prints
# what the listener there says
CLIENT = (
    "import socket, sys; "
    "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); "
    "print(c.makefile().read().strip())"
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A machine shape of the test's own (``kernel_args=arg``), so that its first VM boots
    and saves the boot snapshot that the next ones resume."""

    arg: str
    store: ImageStore
    before: frozenset[str]

    def snapshots(self) -> list[Image]:
        """The boot snapshots of this shape made since the test began (other tests may
        save snapshots of their own meanwhile, on another worker)."""
        return [
            e
            for e in self.store.list()
            if e.kind == "vm-boot" and e.key not in self.before and of_shape(e, self.arg)
        ]


@pytest.fixture
def shape(image_store: ImageStore) -> Iterator[Shape]:
    """A shape of this test's own; the snapshots made meanwhile are removed afterwards."""
    before = frozenset(e.key for e in image_store.list() if e.kind == "vm-boot")
    made = Shape(f"pti.shape={secrets.token_hex(4)}", image_store, before)
    yield made
    for entry in made.snapshots():
        image_store.discard(entry)


def _launch(factory: InstanceFactory, **options: object) -> Instance:
    return factory.launch(kind="vm", image="debian/12", network="bridged", **options)


def _attachment(vm: Instance) -> NetworkAttachment:
    attachment = vm.machine.network
    assert isinstance(attachment, NetworkAttachment)
    return attachment


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _serve(vm: Instance) -> None:
    """Start the listener in ``vm``, in the background (its output nowhere: the agent does
    not wait for it), and wait until the host reaches it."""
    vm.write_file("/root/pti-server.py", SERVER)
    command = f"setsid python3 /root/pti-server.py {PORT} </dev/null >/dev/null 2>&1 &"
    vm.exec(["/bin/sh", "-c", command], check=True)
    vm.wait_for_port(PORT, timeout=SERVE_TIMEOUT)


def _greeting(address: str) -> str:
    """What the listener at ``address`` says to the host."""
    with socket.create_connection((address, PORT), timeout=10) as conn:
        return conn.makefile().read().strip()


def _assert_on_its_network(vm: Instance) -> None:
    """``vm`` has its attachment's MAC and address on its one NIC and answers the host there
    with its own name; one route (to the network itself), no IPv6 on the NIC, the network's
    DNS server."""
    attachment = _attachment(vm)
    assert vm.ipv4 == attachment.address
    _serve(vm)
    assert _greeting(attachment.address) == vm.name  # its address, and its host name
    assert vm.read_text("/sys/class/net/eth0/address").strip() == attachment.mac
    routes = vm.read_text("/proc/net/route").splitlines()[1:]
    network = socket.inet_aton(attachment.address)[:3] + b"\0"  # little-endian hex below
    assert [r.split()[:2] for r in routes] == [["eth0", network[::-1].hex().upper()]]
    assert vm.read_text("/etc/resolv.conf") == attachment.resolv_conf
    assert "eth0" not in vm.read_text("/proc/net/if_inet6")


def _reaches(client: Instance, server: Instance, host: str) -> bool:
    """True if ``client`` connects to ``server``'s listener at ``host`` (address or name)."""
    said = client.exec(["python3", "-c", CLIENT, host, str(PORT)], check=True)
    return said.stdout.strip() == server.name


def test_resumed_vms_get_macs_and_addresses_of_their_own_and_reach_each_other(
    instance_factory: InstanceFactory, settings: Settings, shape: Shape
) -> None:
    vms: list[Instance] = []
    try:
        # the first boots and saves the shape's boot, then gets its network: never before
        for _ in range(3):
            vms.append(_launch(instance_factory, init="agent", kernel_args=shape.arg))
        attachments = [_attachment(vm) for vm in vms]
        [entry] = shape.snapshots()
        saved = (entry.path / vm_images.BOOT_STATE).read_bytes()
        assert _mac_bytes(PLACEHOLDER_MAC) in saved  # the search finds a MAC that is there
        in_saved = [
            what
            for a in attachments
            for what in (_mac_bytes(a.mac), a.mac.encode(), a.address.encode())
            if what in saved
        ]
        assert in_saved == []
        for vm in vms:
            _assert_on_its_network(vm)
        macs = {vm.read_text("/sys/class/net/eth0/address").strip() for vm in vms}
        assert len(macs) == 3 and PLACEHOLDER_MAC not in macs
        # the two that resumed one saved boot reach each other, by name and by address
        first, second = vms[1], vms[2]
        assert _reaches(first, second, second.name)
        assert _reaches(second, first, attachments[1].address)
        # a restart boots the VM from its own disk; a tap removed meanwhile is made again
        first.stop()
        links.delete([attachments[1].device])
        first.start()
        _assert_on_its_network(first)
        assert _reaches(second, first, first.name)
    finally:
        for vm in vms:
            vm.delete()
    for vm in vms:
        assert_nothing_left(settings, vm.name)  # the tap and the lease too


@pytest.mark.parametrize(
    "agent", ["ours", pytest.param("qemu-ga", id="qemu-ga (configured by one guest-exec)")]
)
def test_a_cold_booted_systemd_vm_is_on_its_network(settings: Settings, agent: str) -> None:
    # without boot snapshots every VM boots; a VM with qemu-ga always does
    off = dataclasses.replace(settings, vm_snapshots=False)
    booting = InstanceFactory(off, ImageStore(off))
    kernel_args = vm_images.QEMU_GA_ARG if agent == "qemu-ga" else ""
    try:
        vm = _launch(booting, init="systemd", kernel_args=kernel_args)
        assert vm.machine.agent.extended is (agent == "ours")
        _assert_on_its_network(vm)
    finally:
        booting.close()


def test_the_shape_names_no_tap_and_no_mac_of_the_instance(image_store: ImageStore) -> None:
    """Two VMs are only made (not started), to compare their machine shapes."""
    spec = InstanceSpec.parse("vm", "debian/12", {"init": "agent"}, where="test")
    shapes, taps = [], []
    for host in (2, 3):
        directory = image_store.settings.instances_dir / f"pti-{secrets.token_hex(4)}"
        directory.mkdir(parents=True)
        attachment = NetworkAttachment(
            network="bridged",
            bridge="ptibshape",
            device=f"ptii{secrets.token_hex(4)}",
            address=f"10.250.254.{host}",
            prefix=24,
            gateway="10.250.254.1",
            mac=f"0a:70:74:fa:fe:{host:02x}",
        )
        taps.append(attachment.device)
        try:
            machine = VmRuntime(RuntimeContext.of(image_store)).create(
                spec, directory.name, directory, attachment
            )
            assert f"ifname={attachment.device}," in " ".join(machine.qemu_argv())
            shapes.append(machine.machine_shape())
            machine.destroy()
        finally:
            registry.forget(directory)
    assert shapes[0] == shapes[1]
    text = " ".join(shapes[0])
    assert f"mac={PLACEHOLDER_MAC}" in text
    assert not any(tap in text for tap in taps)
