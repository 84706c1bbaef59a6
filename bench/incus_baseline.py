"""Measure a real Incus daemon as a baseline for pytest-incus.

Incus is installed and started by ``scripts/incus-setup.sh``. This module only drives
the ``incus`` command-line client, through :mod:`subprocess` with timeouts, so
what it measures is what a user of Incus sees: the client, the REST API over the
unix socket, the daemon and liblxc.

Typical use::

    from pathlib import Path
    from statistics import median

    import incus_baseline as ib

    reason = ib.incus_available()
    if reason is None:
        ib.import_rootfs(Path("/var/lib/pti-scratch/bookworm"), "pti-bookworm",
                         workdir=Path("/var/lib/pti-incus-scratch/work"))
        boot = ib.time_launch("pti-bookworm", 5, ready_cmd=ib.SYSTEMD_READY_CMD,
                              ready_output=ib.SYSTEMD_READY_OUTPUT)
        with ib.launched("pti-bookworm", ready_cmd=ib.SYSTEMD_READY_CMD,
                         ready_output=ib.SYSTEMD_READY_OUTPUT) as name:
            rtt = ib.time_exec(name, 20)
        print(median(boot), median(rtt))

or from the command line (run from the repository root)::

    python bench/incus_baseline.py ROOTFS --alias NAME -n 5 --systemd
    python bench/incus_baseline.py --no-import --alias NAME -n 10   # busybox-like

All instances this module creates are named ``ptibench-<random hex>`` and are
deleted (``incus delete -f``) before the function that created them returns,
whether it succeeded or not; so is the network of :func:`bridge_network` when its
block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

INCUS = "incus"
"""The client binary (looked up on PATH)."""

NAME_PREFIX = "ptibench-"
"""Prefix of every instance name this module creates."""

CLI_TIMEOUT = 60.0
"""Timeout in seconds for one ordinary ``incus`` client call."""

IMPORT_TIMEOUT = 600.0
"""Timeout in seconds for building and importing an image."""

LAUNCH_DEADLINE = 60.0
"""Default seconds from the launch call until the instance must be ready."""

POLL_INTERVAL = 0.01
"""Pause in seconds between two readiness probes (each probe is itself an exec)."""

SYSTEMD_READY_CMD: tuple[str, ...] = ("systemctl", "is-system-running")
"""Readiness probe for a systemd image; pair it with :data:`SYSTEMD_READY_OUTPUT`."""

SYSTEMD_READY_OUTPUT: tuple[str, ...] = ("running", "degraded")
"""States of ``systemctl is-system-running`` that count as booted.

``degraded`` exits non-zero, so a systemd probe is judged by its output only.
"""

EXEC_READY_CMD: tuple[str, ...] = ("true",)
"""Readiness probe for any image whose init is not systemd (busybox and the like):
ready as soon as a command can be run in the instance."""


class IncusError(RuntimeError):
    """An ``incus`` client call failed; the message carries its stderr."""


@dataclass(frozen=True)
class LaunchTiming:
    """Seconds from the start of one ``incus launch`` call.

    Attributes:
        launched: until ``incus launch`` returned (image unpacked, instance started).
        ready: until the readiness probe first succeeded (equal to ``launched``
            when there was no probe).
    """

    launched: float
    ready: float


def _incus(
    *args: str, timeout: float = CLI_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``incus ARGS``, capturing text output.

    Raises:
        IncusError: if ``check`` and the command exits non-zero.
        subprocess.TimeoutExpired: if it takes longer than ``timeout`` (the client
            is killed; the daemon may still finish the operation).
    """
    proc = subprocess.run(
        [INCUS, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise IncusError(
            f"incus {' '.join(args[:3])}... exited {proc.returncode}: "
            f"{detail[-1] if detail else 'no output'}"
        )
    return proc


def _query(path: str) -> object:
    """GET ``path`` from the Incus REST API and return the decoded JSON."""
    return json.loads(_incus("query", path).stdout)


def incus_available() -> str | None:
    """Tell whether Incus can run containers here.

    Returns:
        None if the client is installed, the daemon answers and trusts us, it
        has a container driver, and the default profile has a root disk; else a
        one-line reason (what to run to fix it, where that is known).
    """
    if shutil.which(INCUS) is None:
        return "the incus client is not installed (run scripts/incus-setup.sh as root)"
    try:
        server = _query("/1.0")
        profile = _query("/1.0/profiles/default")
    except (IncusError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the incus daemon does not answer (run scripts/incus-setup.sh): {first}"
    if not isinstance(server, dict) or server.get("auth") != "trusted":
        return "the incus daemon does not trust this user (run as root)"
    env = server.get("environment") or {}
    drivers = str(env.get("driver", "")) if isinstance(env, dict) else ""
    if "lxc" not in drivers.split(" | "):
        return f"the incus daemon has no container driver (drivers: {drivers or 'none'})"
    devices = profile.get("devices", {}) if isinstance(profile, dict) else {}
    has_root = any(
        isinstance(dev, dict) and dev.get("type") == "disk" and dev.get("path") == "/"
        for dev in devices.values()
    )
    if not has_root:
        return "the default incus profile has no root disk (run scripts/incus-setup.sh)"
    return None


def _architecture() -> str:
    """The Incus architecture name of this host (``x86_64``, ``aarch64``...)."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def _metadata_yaml(rootfs: Path, alias: str) -> str:
    """The metadata.yaml of a container image built from ``rootfs``."""
    # Plain flow-style YAML written by hand (the stdlib has no YAML writer);
    # json.dumps gives valid YAML scalars for the strings.
    os_name = "unknown"
    release = ""
    os_release = rootfs / "etc" / "os-release"
    with contextlib.suppress(OSError):
        for line in os_release.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key == "ID":
                os_name = value.strip().strip("\"'")
            elif key == "VERSION_ID":
                release = value.strip().strip("\"'")
    description = f"{alias} (pytest-incus benchmark, from {rootfs})"
    return (
        f"architecture: {json.dumps(_architecture())}\n"
        f"creation_date: {int(time.time())}\n"
        "properties:\n"
        f"  description: {json.dumps(description)}\n"
        f"  os: {json.dumps(os_name)}\n"
        f"  release: {json.dumps(release)}\n"
        f"  architecture: {json.dumps(_architecture())}\n"
    )


def _alias_target(alias: str) -> str | None:
    """The fingerprint that ``alias`` points to, or None if there is no such alias."""
    aliases = json.loads(_incus("image", "alias", "list", "--format", "json").stdout)
    for entry in aliases:
        if entry.get("name") == alias:
            return str(entry["target"])
    return None


def import_rootfs(rootfs: Path, alias: str, *, workdir: Path) -> None:
    """Import a plain root filesystem directory as an Incus container image.

    The image is made of a metadata tarball (``metadata.yaml`` with the host's
    architecture and the current time) and an uncompressed rootfs tarball that
    keeps numeric owners, modes, device nodes, hard links, ACLs and xattrs. An
    existing image with that alias is replaced: the alias moves to the new image
    and the old image is deleted. ``rootfs`` itself is only read.

    Args:
        rootfs: the directory with ``sbin/init`` and the rest of the tree.
        alias: the image alias to create or move.
        workdir: where the tarballs are built (in a fresh subdirectory that is
            removed afterwards); must have room for a copy of ``rootfs``.

    Raises:
        FileNotFoundError: if ``rootfs`` has no ``sbin/init``.
        IncusError: if tar or the import fails.
    """
    rootfs = Path(rootfs)
    init = rootfs / "sbin" / "init"
    if not (init.exists() or init.is_symlink()):
        raise FileNotFoundError(f"{rootfs} has no sbin/init: not a rootfs")
    workdir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="incus-import-", dir=workdir))
    try:
        (build / "metadata.yaml").write_text(_metadata_yaml(rootfs, alias))
        meta_tar = build / "meta.tar"
        rootfs_tar = build / "rootfs.tar"
        _run_tar(["-C", str(build), "-cf", str(meta_tar), "metadata.yaml"])
        _run_tar(
            [
                "-C", str(rootfs), "--numeric-owner", "--acls", "--xattrs",
                "--xattrs-include=*", "-cf", str(rootfs_tar), ".",
            ]
        )  # fmt: skip
        old = _alias_target(alias)
        out = _incus("image", "import", str(meta_tar), str(rootfs_tar), timeout=IMPORT_TIMEOUT)
        fingerprint = _parse_fingerprint(out.stdout)
        if old is not None:
            _incus("image", "alias", "delete", alias)
        _incus("image", "alias", "create", alias, fingerprint)
        if old is not None and old != fingerprint:
            _incus("image", "delete", old, check=False)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _run_tar(args: list[str]) -> None:
    """Run GNU tar with ``args``; raise :class:`IncusError` if it fails."""
    proc = subprocess.run(
        ["tar", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise IncusError(f"tar exited {proc.returncode}: {proc.stderr.strip()[-500:]}")


def _parse_fingerprint(stdout: str) -> str:
    """Read the fingerprint from the output of ``incus image import``."""
    for line in stdout.splitlines():
        if "fingerprint:" in line:
            return line.rsplit(":", 1)[1].strip()
    raise IncusError(f"no fingerprint in the output of incus image import: {stdout!r}")


def _new_name() -> str:
    """A fresh instance name: ``ptibench-`` and 8 random hex digits."""
    return f"{NAME_PREFIX}{secrets.token_hex(4)}"


def _delete_instance(name: str) -> None:
    """``incus delete -f NAME``; a name that does not exist is not an error.

    Raises:
        IncusError: if the instance still exists afterwards.
    """
    proc = _incus("delete", "-f", name, check=False)
    if proc.returncode == 0:
        return
    exists = _incus("query", f"/1.0/instances/{name}", check=False)
    if exists.returncode != 0 and "not found" in exists.stderr.lower():
        return
    raise IncusError(f"could not delete instance {name}: {proc.stderr.strip()}")


def _probe(
    name: str, ready_cmd: Sequence[str], ready_output: Collection[str] | None, timeout: float
) -> bool:
    """Run the readiness probe once; True if it says ready."""
    try:
        proc = _incus("exec", name, "--", *ready_cmd, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False
    if ready_output is None:
        return proc.returncode == 0
    return proc.stdout.strip() in ready_output


def _wait_ready(
    name: str,
    ready_cmd: Sequence[str],
    ready_output: Collection[str] | None,
    deadline: float,
) -> None:
    """Probe until ready or until ``deadline`` (a :func:`time.monotonic` value).

    Raises:
        TimeoutError: if the probe never said ready before the deadline.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"instance {name} was not ready: {' '.join(ready_cmd)}")
        if _probe(name, ready_cmd, ready_output, min(remaining, 10.0)):
            return
        time.sleep(POLL_INTERVAL)


def _launch(
    alias: str,
    name: str,
    ready_cmd: Sequence[str] | None,
    ready_output: Collection[str] | None,
    deadline_s: float,
    launch_args: Sequence[str],
) -> LaunchTiming:
    """Launch ``name`` from ``alias`` and wait until it is ready (not deleting it)."""
    start = time.monotonic()
    deadline = start + deadline_s
    _incus("launch", alias, name, *launch_args, timeout=deadline_s)
    launched = time.monotonic() - start
    if ready_cmd is None:
        return LaunchTiming(launched, launched)
    _wait_ready(name, ready_cmd, ready_output, deadline)
    return LaunchTiming(launched, time.monotonic() - start)


def time_launch_phases(
    alias: str,
    n: int,
    *,
    ready_cmd: Sequence[str] | None,
    ready_output: Collection[str] | None = None,
    deadline: float = LAUNCH_DEADLINE,
    launch_args: Sequence[str] = (),
) -> list[LaunchTiming]:
    """Like :func:`time_launch`, but also report when ``incus launch`` returned."""
    timings: list[LaunchTiming] = []
    for _ in range(n):
        name = _new_name()
        try:
            timings.append(_launch(alias, name, ready_cmd, ready_output, deadline, launch_args))
        finally:
            _delete_instance(name)
    return timings


def time_launch(
    alias: str,
    n: int,
    *,
    ready_cmd: Sequence[str] | None,
    ready_output: Collection[str] | None = None,
    deadline: float = LAUNCH_DEADLINE,
    launch_args: Sequence[str] = (),
) -> list[float]:
    """Time ``n`` launches of image ``alias``, each until the instance is ready.

    Each round: ``incus launch ALIAS ptibench-<random>``, then ``incus exec NAME --
    READY_CMD`` every :data:`POLL_INTERVAL` seconds until it says ready, then
    ``incus delete -f NAME`` (always, also on error or timeout). Rounds run one
    after another.

    Args:
        alias: an image alias (e.g. from :func:`import_rootfs`).
        n: how many launches.
        ready_cmd: the readiness probe, run inside the instance; None to count
            the instance as ready when ``incus launch`` returns (its init has
            been started). Use :data:`SYSTEMD_READY_CMD` with
            :data:`SYSTEMD_READY_OUTPUT` for systemd, :data:`EXEC_READY_CMD`
            for anything else.
        ready_output: if given, the probe is ready when its stripped stdout is
            one of these strings, whatever its exit status; if None, when it
            exits 0.
        deadline: seconds from the start of the launch call to ready.
        launch_args: extra arguments for ``incus launch`` (for example
            ``["-c", "security.privileged=true"]``).

    Returns:
        For each launch, seconds from the start of the launch call to the first
        ready answer.

    Raises:
        TimeoutError: if an instance was not ready within ``deadline``.
        IncusError: if a launch or a deletion failed.
    """
    phases = time_launch_phases(
        alias,
        n,
        ready_cmd=ready_cmd,
        ready_output=ready_output,
        deadline=deadline,
        launch_args=launch_args,
    )
    return [t.ready for t in phases]


@contextlib.contextmanager
def launched(
    alias: str,
    *,
    ready_cmd: Sequence[str] | None = EXEC_READY_CMD,
    ready_output: Collection[str] | None = None,
    deadline: float = LAUNCH_DEADLINE,
    launch_args: Sequence[str] = (),
) -> Iterator[str]:
    """Launch an instance of ``alias``, wait until ready, yield its name, delete it.

    The arguments mean what they mean for :func:`time_launch`.
    """
    name = _new_name()
    try:
        _launch(alias, name, ready_cmd, ready_output, deadline, launch_args)
        yield name
    finally:
        _delete_instance(name)


NETWORK_PREFIX = "incbench"
"""Prefix of every Incus network this module creates (not ``pti``: host devices named so are
pytest-incus's own)."""

FIREWALL_TABLE = ("inet", "incus")
"""The nftables table in which Incus puts the rules of its bridges; it stays, empty, after the
last of them is deleted."""


def _firewall_chains() -> int | None:
    """How many chains Incus's firewall table has; None if there is no such table."""
    proc = subprocess.run(
        ["nft", "-j", "list", "table", *FIREWALL_TABLE],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        return None
    return sum("chain" in item for item in json.loads(proc.stdout)["nftables"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_networks() -> None:
    """Delete the networks of this module that a killed run left: named with
    :data:`NETWORK_PREFIX`, made by a process that is gone (its pid is in the description),
    and used by no instance."""
    listing = json.loads(_incus("network", "list", "--format", "json").stdout)
    for net in listing:
        name, description = str(net.get("name", "")), str(net.get("description", ""))
        pid = description.rpartition("pid ")[2]
        if (
            name.startswith(NETWORK_PREFIX)
            and pid.isdigit()
            and not _pid_alive(int(pid))
            and not net.get("used_by")
        ):
            _incus("network", "delete", name, check=False)


@contextlib.contextmanager
def bridge_network(address: ipaddress.IPv4Interface) -> Iterator[str]:
    """An Incus-managed bridge with the host at ``address`` (``10.251.128.1/24``): its name.

    Made with ``incus network create NAME ipv4.address=ADDRESS ipv4.nat=false
    ipv4.routing=false ipv6.address=none raw.dnsmasq=dhcp-option=3``: no NAT; no routing
    (Incus's default, ``ipv4.routing=true``, sets the host's ``net.ipv4.ip_forward`` to 1, and
    with false its firewall rejects what would be forwarded off the bridge); and its DHCP
    server offers no default route (``dhcp-option=3`` without a value: no router). Launch
    instances on it with ``launch_args=["--network", NAME]``. On exit the network is deleted,
    and so is Incus's firewall table if it was not there before and is empty now. Networks of
    killed runs are deleted first.

    Raises:
        IncusError: if the network cannot be made or deleted.
    """
    _remove_stale_networks()
    name = f"{NETWORK_PREFIX}{secrets.token_hex(3)}"
    had_table = _firewall_chains() is not None
    try:
        _incus(
            "network", "create", name, f"ipv4.address={address}", "ipv4.nat=false",
            "ipv4.routing=false", "ipv6.address=none", "raw.dnsmasq=dhcp-option=3",
            "--description", f"pytest-incus bench network, pid {os.getpid()}",
        )  # fmt: skip
        yield name
    finally:
        gone = _incus("network", "delete", name, check=False)
        if gone.returncode != 0 and "not found" not in gone.stderr.lower():
            raise IncusError(f"could not delete network {name}: {gone.stderr.strip()}")
        if not had_table and _firewall_chains() == 0:
            subprocess.run(
                ["nft", "delete", "table", *FIREWALL_TABLE],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=CLI_TIMEOUT,
                check=False,
            )


def read_text(name: str, path: str) -> str:
    """The text of ``path`` inside instance ``name`` (by ``cat``: ``incus file pull`` reads
    files of /proc as empty)."""
    return _incus("exec", name, "--", "cat", path).stdout


def time_exec(name: str, n: int) -> list[float]:
    """Time ``n`` round trips of ``incus exec NAME -- true`` (seconds each).

    Raises:
        IncusError: if one of them fails.
    """
    times: list[float] = []
    for _ in range(n):
        start = time.monotonic()
        _incus("exec", name, "--", "true")
        times.append(time.monotonic() - start)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Import a rootfs, time launches and exec round trips, print the medians."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("rootfs", type=Path, nargs="?", help="root filesystem directory to import")
    parser.add_argument("--alias", required=True, help="image alias to create or replace")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/lib/pti-incus-scratch/work"),
        help="where image tarballs are built (default: %(default)s)",
    )
    parser.add_argument("-n", type=int, default=5, help="launches to time (default: 5)")
    parser.add_argument("--exec-n", type=int, default=30, help="exec round trips (default: 30)")
    parser.add_argument(
        "--systemd", action="store_true", help="ready = systemctl is-system-running"
    )
    parser.add_argument("--no-import", action="store_true", help="use the existing alias")
    parser.add_argument(
        "--privileged", action="store_true", help="launch with security.privileged=true"
    )
    args = parser.parse_args(argv)

    reason = incus_available()
    if reason is not None:
        parser.exit(2, f"incus is not usable: {reason}\n")
    if not args.no_import:
        if args.rootfs is None:
            parser.error("give ROOTFS, or --no-import to use the existing alias")
        start = time.monotonic()
        import_rootfs(args.rootfs, args.alias, workdir=args.workdir)
        print(f"import: {time.monotonic() - start:.2f} s")
    if args.systemd:
        ready_cmd, ready_output = SYSTEMD_READY_CMD, SYSTEMD_READY_OUTPUT
    else:
        ready_cmd, ready_output = EXEC_READY_CMD, None
    launch_args = ["-c", "security.privileged=true"] if args.privileged else []
    phases = time_launch_phases(
        args.alias, args.n, ready_cmd=ready_cmd, ready_output=ready_output,
        launch_args=launch_args,
    )  # fmt: skip
    launch_s = [t.launched for t in phases]
    ready_s = [t.ready for t in phases]
    print(f"launch returned: median {statistics.median(launch_s):.3f} s  {_fmt(launch_s)}")
    print(f"launch to ready: median {statistics.median(ready_s):.3f} s  {_fmt(ready_s)}")
    with launched(
        args.alias, ready_cmd=ready_cmd, ready_output=ready_output, launch_args=launch_args
    ) as name:
        execs = time_exec(name, args.exec_n)
    print(f"exec round trip: median {statistics.median(execs) * 1000:.1f} ms  "
          f"min {min(execs) * 1000:.1f} max {max(execs) * 1000:.1f}")  # fmt: skip
    return 0


def _fmt(values: Sequence[float]) -> str:
    """``[a, b, ...]`` with three decimals."""
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
