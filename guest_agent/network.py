"""The guest's place on a host-only network: ``pti-net-config``.

A VM on a network has one virtio NIC, which QEMU gives the same placeholder MAC
(:data:`PLACEHOLDER_MAC`) in every VM, so that bridged VMs of one shape share one boot
snapshot. After every start, the host sends ``pti-net-config`` with the instance's own MAC,
address, DNS configuration and name; this gives the guest's one ethernet interface that MAC and
address, up, writes ``/etc/resolv.conf`` and sets the host name: one request. No route is
added: the kernel's route to the network itself is the only one, so there is no default route.
The interface has no IPv6 (the networks are IPv4 only; see ``prepare``).

Done with ioctls: the VM image has no iproute2, and a program started under TCG costs tens of
milliseconds. Under TCG, QEMU also translates every code path that a guest resumed from a boot
snapshot runs for the first time (translations are not saved), so a first run costs many times
what a second one does: measured, the first configuration of a resumed guest took 140 ms
(12,000 blocks translated) where the next took 10 ms, in a first version that brought the
interface up, wrote files of ext4 through a temporary file and read sysfs with open(). So what
needs no instance of its own is done before the boot is saved, by ``prepare`` at the agent's
start: the socket for the ioctls is opened, the file /etc/resolv.conf links to is made, and the
NIC is brought up silent (no address, no IPv6). What is left for a resumed guest is a few
ioctls and one write into a file of tmpfs: about 40 ms under TCG (the address is parsed here,
not by inet_pton, for the same reason: that alone cost 15 ms in a resumed guest).

Also a program, ``python3 -m guest_agent.network JSON`` (the request's arguments): how the
host configures a guest whose agent is the stock ``qemu-ga``, with one ``guest-exec``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys

from guest_agent.errors import CommandError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    from typing import Any

# The MAC QEMU gives every pytest-incus VM's NIC (pytest_incus/runtimes/vm.py): locally
# administered, and not of the MACs instances get (0a:70:74:...). ``prepare`` touches only a
# NIC that has it: an interface of any other machine never does.
PLACEHOLDER_MAC = "0e:70:74:00:00:00"
SYSFS = "/sys/class/net"
IPV6_OFF = "/proc/sys/net/ipv6/conf/{}/disable_ipv6"
ARPHRD_ETHER = 1  # the hardware type of an ethernet interface (/sys/class/net/*/type)
IFF_UP = 0x1
# ioctls of netdevice(7)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCGIFHWADDR = 0x8927
SIOCSIFHWADDR = 0x8924
IFNAMSIZ = 16
IFREQ_DATA = 24  # struct ifreq is 40 bytes on 64-bit: the name, then a union of 24
RESOLV_CONF = "/etc/resolv.conf"
# what RESOLV_CONF links to in the VM image (images/vm.py): a file of tmpfs, written in place
RESOLV_TARGET = "/run/resolv.conf"
MAX_RESOLV_CONF = 4096
MAX_HOSTNAME = 64  # HOST_NAME_MAX
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")

_socket: socket.socket | None = None  # for the ioctls; kept open for the agent's life


def _ioctl_socket() -> socket.socket:
    global _socket
    if _socket is None:
        _socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return _socket


def prepare() -> None:
    """At the agent's start, before a boot snapshot is saved: open the socket for the
    ioctls; make the file /etc/resolv.conf links to in the VM image (empty) if it is missing;
    and bring every NIC that has :data:`PLACEHOLDER_MAC` up with IPv6 off and no address, so
    that it sends nothing until ``pti-net-config`` gives it its own MAC and address. Failures
    are ignored: ``pti-net-config`` does all of it again where it is needed."""
    with contextlib.suppress(OSError):  # not the VM image: nothing to make
        if os.readlink(RESOLV_CONF) == RESOLV_TARGET and not os.path.exists(RESOLV_TARGET):
            os.close(os.open(RESOLV_TARGET, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    with contextlib.suppress(OSError, CommandError):
        sock = _ioctl_socket()
        for name in os.listdir(SYSFS):
            reply = _ioctl(sock, SIOCGIFHWADDR, name, b"", "reading the hardware address")
            if reply[IFNAMSIZ + 2 : IFNAMSIZ + 8] == _mac(PLACEHOLDER_MAC):
                _bring_up(sock, name)


def _mac(value: Any) -> bytes:
    mac = b""
    if isinstance(value, str) and len(value) == 17 and value[2::3] == ":::::":
        with contextlib.suppress(ValueError):  # not hex: refused below
            mac = bytes.fromhex(value.replace(":", ""))
    if len(mac) != 6:
        raise CommandError(f"pti-net-config: mac must look like '0a:70:74:00:00:05', not {value!r}")
    if mac[0] & 1 or mac == bytes(6):
        raise CommandError(f"pti-net-config: mac {value} is not a unicast address")
    return mac


def _address(value: Any) -> bytes:
    # parsed here, not by socket.inet_pton: 15 ms less in a resumed guest (measured, TCG)
    parts = value.split(".") if isinstance(value, str) else []
    packed = b""
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts):
        with contextlib.suppress(ValueError):  # past 255: refused below
            packed = bytes(int(p) for p in parts)
    if not packed or packed[0] in (0, 127) or packed[0] >= 224:
        raise CommandError(
            f"pti-net-config: address must be an IPv4 unicast address such as '10.213.0.5', "
            f"not {value!r}"
        )
    return packed


def _netmask(value: Any) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 32:
        raise CommandError(f"pti-net-config: prefix must be an integer from 1 to 32, not {value!r}")
    return ((0xFFFFFFFF << (32 - value)) & 0xFFFFFFFF).to_bytes(4, "big")


def _text(args: dict[str, Any], key: str, limit: int) -> str:
    value = args[key]
    if not isinstance(value, str) or "\0" in value or len(value) > limit:
        raise CommandError(
            f"pti-net-config: {key} must be a string of at most {limit} characters, "
            f"not {value!r:.80}"
        )
    return value


def _hostname(value: str) -> str:
    if not value or not _HOSTNAME_CHARS.issuperset(value) or value[0] in "-.":
        raise CommandError(
            f"pti-net-config: hostname {value!r} is not a host name (letters, digits, '-' "
            "and '.', not starting with '-' or '.')"
        )
    return value


def _ioctl(sock: socket.socket, request: int, name: str, data: bytes, what: str) -> bytes:
    ifreq = name.encode().ljust(IFNAMSIZ, b"\0") + data.ljust(IFREQ_DATA, b"\0")
    try:
        return fcntl.ioctl(sock.fileno(), request, ifreq)
    except OSError as exc:
        raise CommandError(
            f"pti-net-config: {what} of {name} failed: {exc.strerror}", exc.errno
        ) from None


def _flags(sock: socket.socket, name: str) -> int:
    reply = _ioctl(sock, SIOCGIFFLAGS, name, b"", "reading the flags")
    return int.from_bytes(reply[IFNAMSIZ : IFNAMSIZ + 2], sys.byteorder)


def _set_flags(sock: socket.socket, name: str, flags: int, what: str) -> None:
    _ioctl(sock, SIOCSIFFLAGS, name, flags.to_bytes(2, sys.byteorder), what)


def _bring_up(sock: socket.socket, name: str) -> None:
    """``name`` up with IPv6 off (no link-local address, nothing sent but what IPv4 sends)."""
    flags = _flags(sock, name)
    if flags & IFF_UP:
        return
    try:
        fd = os.open(IPV6_OFF.format(name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except FileNotFoundError:
        pass  # a kernel without IPv6
    except OSError as exc:
        raise CommandError(
            f"pti-net-config: turning IPv6 off on {name} failed: {exc.strerror}", exc.errno
        ) from None
    _set_flags(sock, name, flags | IFF_UP, "bringing up")


def ethernet_interface(sock: socket.socket) -> str:
    """The name of the guest's one ethernet interface (the hardware type that
    /sys/class/net/*/type shows, asked with SIOCGIFHWADDR); CommandError if it has none or
    more."""
    names = sorted(os.listdir(SYSFS))
    found = []
    for name in names:
        try:
            reply = _ioctl(sock, SIOCGIFHWADDR, name, b"", "reading the hardware address")
        except CommandError:
            continue  # gone meanwhile, or no device (bonding_masters)
        kind = int.from_bytes(reply[IFNAMSIZ : IFNAMSIZ + 2], sys.byteorder)  # sa_family
        if name != "lo" and kind == ARPHRD_ETHER:
            found.append(name)
    if not found:
        raise CommandError(
            f"pti-net-config: the guest has no ethernet interface ({SYSFS} has "
            f"{', '.join(names) or 'nothing'}): the VM has no NIC, or its driver "
            "(virtio_net) is not loaded"
        )
    if len(found) > 1:
        raise CommandError(
            f"pti-net-config: the guest has several ethernet interfaces ({', '.join(found)}); "
            "it configures a guest with exactly one"
        )
    return found[0]


def _set_mac(sock: socket.socket, name: str, mac: bytes) -> None:
    """A new MAC for ``name``: while it is up where the driver can (virtio_net can), else
    taken down for it and brought up again."""
    hwaddr = ARPHRD_ETHER.to_bytes(2, sys.byteorder) + mac
    try:
        _ioctl(sock, SIOCSIFHWADDR, name, hwaddr, "setting the MAC")
    except CommandError as exc:
        if exc.errno != errno.EBUSY:
            raise
        flags = _flags(sock, name)
        _set_flags(sock, name, flags & ~IFF_UP, "taking down")
        _ioctl(sock, SIOCSIFHWADDR, name, hwaddr, "setting the MAC")
        _set_flags(sock, name, flags, "bringing up")


def _sockaddr_in(packed: bytes) -> bytes:
    # sa_family (host order), port 0, the address
    return socket.AF_INET.to_bytes(2, sys.byteorder) + b"\0\0" + packed


def _write(path: str, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CommandError(
            f"pti-net-config: cannot write {path}: {exc.strerror}", exc.errno, path=path
        ) from None


def configure(args: dict[str, Any]) -> dict[str, Any]:
    """``pti-net-config``: give the guest's one ethernet interface ``mac`` and
    ``address``/``prefix``, up, IPv6 off, and no route but the kernel's to the network
    itself; write ``resolv-conf`` to /etc/resolv.conf and set the host name to ``hostname``.
    Every argument is checked before anything changes. Returns the interface's name."""
    mac = _mac(args["mac"])
    address = _address(args["address"])
    netmask = _netmask(args["prefix"])
    resolv_conf = _text(args, "resolv-conf", MAX_RESOLV_CONF)
    hostname = _hostname(_text(args, "hostname", MAX_HOSTNAME))
    sock = _ioctl_socket()
    name = ethernet_interface(sock)
    # the order matters: a MAC before the interface is up (when it is not, as after a boot
    # with qemu-ga) or before it has an address, so nothing is ever sent from another MAC
    _set_mac(sock, name, mac)
    _ioctl(sock, SIOCSIFADDR, name, _sockaddr_in(address), "setting the address")
    _ioctl(sock, SIOCSIFNETMASK, name, _sockaddr_in(netmask), "setting the netmask")
    _bring_up(sock, name)
    _write(RESOLV_CONF, resolv_conf)
    try:
        socket.sethostname(hostname)
    except OSError as exc:
        raise CommandError(
            f"pti-net-config: sethostname failed: {exc.strerror}", exc.errno
        ) from None
    return {"interface": name}


def main(argv: list[str]) -> int:
    """``python3 -m guest_agent.network JSON``: configure as ``pti-net-config`` with the
    arguments JSON; its return value as JSON on stdout, or the error on stderr (status 1)."""
    import json

    try:
        if len(argv) != 1:
            raise CommandError("usage: python3 -m guest_agent.network JSON-ARGUMENTS")
        args = json.loads(argv[0])
        if not isinstance(args, dict):
            raise CommandError("pti-net-config: the arguments must be a JSON object")
        print(json.dumps(configure(args)))
    except CommandError as exc:
        print(exc.desc, file=sys.stderr)
        return 1
    except KeyError as exc:
        print(f"pti-net-config: missing argument {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"pti-net-config: the arguments are not JSON: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
