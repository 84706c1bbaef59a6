"""What each bridge has besides its devices: a firewall table that keeps its packets on the
host, and a DNS server that answers the names of its instances.

Firewall: an nftables table of our own per bridge (``inet <bridge>``), made and removed with
the bridge. It drops every packet the host would forward from the bridge to anywhere else, or
from anywhere else to the bridge, so nothing of an instance leaves the host even where
``net.ipv4.ip_forward`` is 1 (and instances on different networks cannot reach each other
through the host). Traffic between ports of the bridge itself, and between instances and the
host, is not forwarded and passes. A drop in any base chain is final, so other tables cannot
undo it; nothing of the host's own ruleset is touched.

DNS: one dnsmasq per bridge, listening on the bridge's host address only, with no upstream
server (no name leaves the host either) and no DHCP (addresses are static). It reads the
names from a hosts directory, one file per instance, and sees files come and go through
inotify, so a launch costs one small file write, not a reload. dnsmasq daemonizes itself (it is
nobody's child, so no run keeps a zombie of it) and writes its pid file; it is ended by that pid,
and only while that pid is still a dnsmasq naming our pid file.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pytest_incus import fsutil, tools
from pytest_incus.errors import IncusError

NFT_TIMEOUT = 20.0
DNSMASQ_DEADLINE = 10.0
PID_FILE = "dnsmasq.pid"
HOSTS_DIR = "hosts"
DNSMASQ_LOG = "dnsmasq.log"


def firewall_rules(bridge: str) -> str:
    """The nftables table of ``bridge``, as ``nft -f`` reads it."""
    return (
        f"table inet {bridge} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{bridge}" oifname != "{bridge}" drop\n'
        f'    oifname "{bridge}" iifname != "{bridge}" drop\n'
        "  }\n"
        "}\n"
    )


def _nft(script: str, what: str) -> None:
    tools.run(
        ["nft", "-f", "-"],
        input=script.encode(),
        what=f"nft ({what})",
        error=IncusError,
        fix="apt-get install nftables (and a kernel with nf_tables)",
        timeout=NFT_TIMEOUT,
    )


def _drop_table(bridge: str) -> str:
    """nft lines that delete the table of ``bridge`` whether it exists or not: the first
    declares it (a no-op for one that exists), so the delete always finds it."""
    return f"table inet {bridge}\ndelete table inet {bridge}\n"


def make_firewall(bridge: str) -> None:
    """Add the table of ``bridge`` (replacing one a crashed run left), in one nft run."""
    _nft(_drop_table(bridge) + firewall_rules(bridge), f"the firewall table of bridge {bridge}")


def firewall_tables() -> list[str]:
    """The names of the host's ``inet`` tables that are ours (named after our bridges)."""
    try:
        said = tools.run(
            ["nft", "list", "tables", "inet"],
            what="nft list tables",
            error=IncusError,
            timeout=NFT_TIMEOUT,
        )
    except IncusError:
        return []
    names = [line.split()[-1] for line in said.stdout.decode().splitlines() if line.strip()]
    return [name for name in names if name.startswith("pti")]


def firewall_exists(bridge: str) -> bool:
    """True if the table of ``bridge`` exists."""
    return bridge in firewall_tables()


def remove_firewall(bridge: str) -> None:
    """Delete the table of ``bridge`` if it exists."""
    _nft(_drop_table(bridge), f"deleting the firewall table of bridge {bridge}")


def keep_on_host(bridge: str) -> None:
    """Per-device settings of our own bridge: no IPv4 forwarding of what arrives on it (the
    firewall table is the guarantee; this keeps it so even without nftables' help), and no
    IPv6 on the host's side of it (instances have no IPv6 route to the host or beyond)."""
    for path, value in (
        (f"/proc/sys/net/ipv4/conf/{bridge}/forwarding", "0"),
        (f"/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6", "1"),
    ):
        try:
            Path(path).write_text(value)
        except OSError:
            continue  # IPv6 disabled on the host: nothing to turn off


def start_dns(state_dir: Path, bridge: str, address: str) -> None:
    """Start the DNS server of ``bridge`` on ``address``, answering from ``state_dir/hosts``."""
    hosts = state_dir / HOSTS_DIR
    hosts.mkdir(parents=True, exist_ok=True)
    os.chmod(hosts, 0o755)
    stop_dns(state_dir)
    pid_file = state_dir / PID_FILE
    argv = [
        "dnsmasq",
        "--conf-file=/dev/null",
        f"--pid-file={pid_file}",
        f"--log-facility={state_dir / DNSMASQ_LOG}",
        f"--listen-address={address}",
        "--bind-interfaces",
        "--except-interface=lo",
        "--no-resolv",
        "--local=/#/",  # every name is local: unknown ones are NXDOMAIN, never asked upstream
        "--no-poll",
        "--no-hosts",
        "--no-negcache",
        f"--hostsdir={hosts}",
        "--user=nobody",
        "--group=nogroup",
    ]
    # it returns once it has bound its sockets and forked into the background
    tools.run(
        argv,
        what=f"dnsmasq (the DNS server of bridge {bridge})",
        error=IncusError,
        fix="apt-get install dnsmasq-base; is another DNS server bound to every address?",
        timeout=DNSMASQ_DEADLINE,
    )
    deadline = time.monotonic() + DNSMASQ_DEADLINE
    while dns_pid(state_dir) is None:
        if time.monotonic() > deadline:
            raise IncusError(f"dnsmasq of bridge {bridge} started but wrote no pid file")
        time.sleep(0.002)


def dns_pid(state_dir: Path) -> int | None:
    """The pid of the running DNS server of this state directory, or None."""
    pid_file = state_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # that pid is still our dnsmasq, not a process that got the number since
    if not cmdline or not cmdline[0].endswith(b"dnsmasq"):
        return None
    return pid if f"--pid-file={pid_file}".encode() in cmdline else None


def stop_dns(state_dir: Path) -> None:
    """End the DNS server of this state directory, if it runs."""
    pid = dns_pid(state_dir)
    if pid is not None:
        deadline = time.monotonic() + 5.0
        os.kill(pid, signal.SIGTERM)
        while dns_pid(state_dir) == pid:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    (state_dir / PID_FILE).unlink(missing_ok=True)


def add_name(state_dir: Path, name: str, address: str) -> None:
    """Make ``name`` resolve to ``address`` on this bridge."""
    fsutil.write_atomic(state_dir / HOSTS_DIR / name, f"{address} {name}\n")


def remove_name(state_dir: Path, name: str) -> None:
    """Make ``name`` unknown on this bridge again."""
    (state_dir / HOSTS_DIR / name).unlink(missing_ok=True)
