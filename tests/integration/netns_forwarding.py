"""Does anything of an instance on our bridge leave a host that forwards? Measured in a network
namespace of its own; run by ``test_network_safety.py`` under ``unshare --net --mount``, never
directly on the host (it refuses to: it turns IPv4 forwarding on and deletes a firewall table).

Usage: ``python netns_forwarding.py CACHE_DIR WORK_DIR HOST_PID``, where HOST_PID is a process
in the host's namespaces (the test's: only read from, never changed).

In its namespace (the "host" of this experiment) it turns ``net.ipv4.ip_forward`` on, as on a
CI host with Docker, and makes an "outside": a second namespace, held by a ``sleep``, joined by
a veth pair (10.250.77.1 here, 10.250.77.2 there) with a UDP listener on 10.250.77.2 that
records every datagram it gets. Then it launches a bridged busybox container through
``InstanceFactory`` on CACHE_DIR and has it send UDP datagrams (busybox ``tftp`` read requests,
named after the case, so every datagram that arrives says which case sent it) to 10.250.77.2:

- case0: as launched, with no default route: nothing can even be sent;
- case1: with a default route via the bridge's host address added inside: nothing arrives (the
  bridge's own ``forwarding`` is 0 and the plugin's nftables table drops it);
- case2: the bridge's ``forwarding`` set to 1 too (what a later global ``ip_forward=1`` write,
  say by Docker, does to every device): nothing arrives (the table still drops it);
- case3, the control: the plugin's table of the bridge deleted too: the datagrams arrive, so
  the setup really forwards and case2 was held by the table alone;
- case4: table still gone, the bridge's ``forwarding`` back to 0: nothing arrives (the
  per-device setting is a second guard of its own).

Then ``factory.close()`` and ``network.leftovers``. Prints one JSON object (the result) as its
last line of stdout. Everything it starts (the holder, the listener, the container) it ends by
pid or through the factory, also when it fails or gets SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_incus import InstanceFactory, network
from pytest_incus.images.store import ImageStore
from pytest_incus.instance import Instance
from pytest_incus.settings import Settings

HERE = "10.250.77.1"  # this namespace's end of the link to the outside
OUTSIDE = "10.250.77.2"  # the outside's end: the only address datagrams are sent to
PREFIX = 24
PORT = 6969
SEND_SECONDS = 2  # each case's sender runs this long (busybox tftp resends about 6 times)
SETTLE = 0.5  # after it: how long a datagram on its way may still take to arrive
DEADLINE = 10.0
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

# the listener, run in the outside: one JSON line per datagram it gets
LISTENER = """
import json, socket, sys
address, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, port))
with open(out, "a", buffering=1) as log:
    log.write(json.dumps({"ready": True}) + "\\n")
    while True:
        data, peer = sock.recvfrom(65535)
        log.write(json.dumps({"from": peer[0], "data": data.hex()}) + "\\n")
"""


def run(*argv: str) -> str:
    """Run ``argv``; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr}")
    return done.stdout


def wait_until(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll ``condition`` for up to ``deadline`` seconds; whether it became true."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def die_with_parent() -> None:
    """In a child before its exec: SIGKILL it when this script dies, however it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def start(argv: list[str], started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a child that dies with this script; recorded in ``started``."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    started.append(child)
    return child


def netns(pid: int | str) -> str:
    """The network namespace of process ``pid`` ("self" for this one)."""
    return os.readlink(f"/proc/{pid}/ns/net")


class Outside:
    """A namespace beyond this one, reached through a veth pair, with a UDP listener on
    OUTSIDE:PORT that records what it gets in ``log``."""

    def __init__(self, work: Path, started: list[subprocess.Popen[bytes]]) -> None:
        self.log = work / "received.jsonl"
        token = secrets.token_hex(3)
        self.here, self.there = f"ptiu{token}h", f"ptiu{token}o"  # 11 characters
        own = netns("self")
        self.holder = start(["unshare", "--net", "sleep", "600"], started)
        # unshare is in this namespace until it has made its own
        if not wait_until(lambda: netns(self.holder.pid) != own, DEADLINE):
            raise RuntimeError("the outside's holder made no namespace of its own")
        self.enter = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]
        run("ip", "link", "add", self.here, "type", "veth", "peer", "name", self.there)
        run("ip", "link", "set", self.there, "netns", str(self.holder.pid))
        run("ip", "addr", "add", f"{HERE}/{PREFIX}", "dev", self.here)
        run("ip", "link", "set", self.here, "up")
        run(*self.enter, "ip", "addr", "add", f"{OUTSIDE}/{PREFIX}", "dev", self.there)
        run(*self.enter, "ip", "link", "set", self.there, "up")
        # take whatever arrives, from any source: the outside has no route back to the
        # instance, and a reverse path filter would drop its datagrams before the listener
        run(*self.enter, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0")
        run(*self.enter, "sysctl", "-q", "-w", f"net.ipv4.conf.{self.there}.rp_filter=0")
        listener = [sys.executable, "-c", LISTENER, OUTSIDE, str(PORT), str(self.log)]
        self.listener = start([*self.enter, *listener], started)
        if not wait_until(lambda: bool(self.received(ready=True)), DEADLINE):
            raise RuntimeError("the outside's UDP listener did not start")

    def received(self, *, ready: bool = False) -> list[dict[str, str]]:
        """The datagrams that arrived so far (or, with ``ready``, the listener's ready line)."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = [json.loads(line) for line in lines if line.endswith("}")]
        return [r for r in records if ("ready" in r) == ready]

    def count(self, tag: str) -> int:
        """How many of the datagrams that arrived name ``tag``."""
        return sum(tag.encode().hex() in r["data"] for r in self.received())

    def remove(self) -> None:
        """Delete our end of the link (the other end goes with it)."""
        with contextlib.suppress(RuntimeError):
            run("ip", "link", "delete", self.here)


def udp_sent(box: Instance) -> int:
    """The UDP datagrams the instance's kernel has sent (its ``/proc/net/snmp``)."""
    rows = [line.split() for line in box.read_text("/proc/net/snmp").splitlines()]
    names, values = (row for row in rows if row[0] == "Udp:")
    return int(values[names.index("OutDatagrams")])


def default_routes(box: Instance) -> list[str]:
    """The instance's IPv4 routes to 0.0.0.0/0."""
    lines = box.read_text("/proc/net/route").splitlines()[1:]
    return [line for line in lines if line.split()[1] == "00000000"]


def case(box: Instance, outside: Outside, tag: str) -> dict[str, Any]:
    """Have ``box`` send datagrams named ``tag`` to the outside for SEND_SECONDS: how many
    left its kernel, how many arrived, what the sender said."""
    before = udp_sent(box)
    said = box.exec(
        f"timeout {SEND_SECONDS} tftp -g -r {tag} -l /dev/null {OUTSIDE} {PORT}",
        timeout=SEND_SECONDS + 10,
    )
    wait_until(lambda: outside.count(tag) > 0, SETTLE)
    return {
        "sent": udp_sent(box) - before,
        "received": outside.count(tag),
        "sender": said.stderr.strip()[-300:],
    }


def experiment(cache: Path, outside: Outside, result: dict[str, Any]) -> None:
    """Launch the container and run the cases; what it measures goes into ``result``."""
    settings = Settings(cache_dir=cache)
    factory = InstanceFactory(settings, ImageStore(settings))
    try:
        box = factory.launch(image="busybox", network="bridged")
        attachment = box.network
        assert attachment is not None
        bridge = attachment.bridge
        forwarding = Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding")
        result.update(bridge=bridge, address=attachment.address, gateway=attachment.gateway)
        result["default_routes"] = default_routes(box)
        result["bridge_forwarding"] = forwarding.read_text().strip()
        result["table_made"] = f"inet {bridge}" in run("nft", "list", "tables")
        cases = result["cases"]
        cases["case0"] = case(box, outside, "case0")
        box.exec(f"ip route add default via {attachment.gateway}", check=True)
        cases["case1"] = case(box, outside, "case1")
        forwarding.write_text("1")
        cases["case2"] = case(box, outside, "case2")
        run("nft", "delete", "table", "inet", bridge)
        cases["case3"] = case(box, outside, "case3")
        forwarding.write_text("0")
        cases["case4"] = case(box, outside, "case4")
    finally:
        try:
            factory.close()
        except Exception as exc:  # reported, and the test fails on it
            result["close_error"] = f"{type(exc).__name__}: {exc}"
        result["leftovers"] = network.leftovers(settings)


def sys_children() -> list[str]:
    """The mount points of the mounts right below ``/sys`` (the cgroup hierarchies, ...)."""
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    ids = [m[0] for m in mounts if m[4] == "/sys"]
    return [m[4] for m in mounts if ids and m[1] == ids[-1]]


def own_sysfs(work: Path) -> None:
    """Mount a sysfs of this network namespace on ``/sys``, in this mount namespace only.

    A sysfs shows the devices of the network namespace that mounted it: under a plain
    ``unshare --net`` it is still the host's, and liblxc (which looks for
    ``/sys/class/net/BRIDGE/bridge`` before it plugs a veth into a bridge, and otherwise takes
    it for an Open vSwitch one) cannot find our bridge. Binding just the network directories
    over the host's sysfs is not enough: a container in a user namespace may mount a sysfs only
    where one is already fully visible (nothing mounted over its non-empty directories), so
    liblxc's mount of the container's /sys is then refused. So a whole sysfs goes on ``/sys``,
    and what was mounted below the old one (the cgroup hierarchies liblxc needs) is moved onto
    the new one. ``unshare --mount`` made every mount private: the host sees none of this.
    """
    held = []
    for i, point in enumerate(sys_children()):
        hold = work / f"held-{i}"
        hold.mkdir()
        run("mount", "--rbind", point, str(hold))
        held.append((hold, point))
    run("mount", "-t", "sysfs", "sysfs", "/sys")
    for hold, point in held:
        run("mount", "--move", str(hold), point)


def main(cache: Path, work: Path, host: int) -> dict[str, Any]:
    """The whole experiment, in this (unshared) namespace; its result. ``host`` is the pid of
    a process in the host's namespaces."""
    for kind in ("net", "mnt"):
        if os.readlink(f"/proc/self/ns/{kind}") == os.readlink(f"/proc/{host}/ns/{kind}"):
            raise SystemExit(
                f"refusing to run in the host's {kind} namespace: run me under unshare"
            )
    own_sysfs(work)
    result: dict[str, Any] = {"cases": {}}
    run("ip", "link", "set", "lo", "up")
    result["sysfs_devices"] = sorted(os.listdir("/sys/class/net"))
    IP_FORWARD.write_text("1")
    result["inside_ip_forward"] = IP_FORWARD.read_text().strip()
    # the host's value, read in the host's namespace while ours is 1
    said = run("nsenter", f"--net=/proc/{host}/ns/net", "cat", str(IP_FORWARD))
    result["host_ip_forward_during"] = said.strip()
    started: list[subprocess.Popen[bytes]] = []
    outside = None
    try:
        outside = Outside(work, started)
        result["link"] = [outside.here, outside.there]
        experiment(cache, outside, result)
        result["received_total"] = len(outside.received())
    finally:
        for child in reversed(started):  # only what this script started, by its pid
            child.kill()
            child.wait()
        if outside is not None:
            outside.remove()
    return result


if __name__ == "__main__":
    # SIGTERM (the test's timeout) ends the script through its finally blocks
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
