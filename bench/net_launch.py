"""Host-only networks: what a network costs at launch, and the HTTP round trip into instances.

One command, one run (as root, from the repository root)::

    python3 bench/net_launch.py            # 15 launches per container and app column, 5 per
                                           # VM column, 200 HTTP requests per server
    python3 bench/net_launch.py --quick    # a small N: a smoke test

Launch-to-ready of the plugin's instances on a host-only network ("bridged") against the same
launch with ``network="none"``, in rounds that alternate which goes first, so that machine noise
hits both alike:

containers (``busybox``, ``debian/12``)
    ready as in ``launch.py``: the first successful exec for busybox, systemd running for
    debian/12. Against Incus too: ``incus launch --network NAME`` of the same rootfs (imported
    as ``launch.py`` does) on a bridge that Incus manages (``incus_baseline.bridge_network``: no
    NAT, no routing, no default route offered), ready by the same probe, in a block of its own
    after the plugin's (``launch.py`` says why); skipped, saying why, when Incus cannot run
    here. Incus gives addresses only by DHCP and these rootfs run no DHCP client, so its
    instances are ready with their interface on the bridge but no address yet: if anything,
    that column is faster than what a user of Incus waits for. (Only containers have an
    Incus column, as in ``launch.py``: Incus's VMs are refused on hosts without vhost_vsock.)
apps
    the busybox OCI image of ``app_launch.py`` running ``busybox sleep``, until ``launch()``
    returns: its program runs (the SPEC's readiness of an app). Not until a program has ended,
    as ``app_launch.py`` times it (lxc-oci gives no earlier event): with a network, ``wait()``
    sees an app's end 12-60 ms later (measured), most likely liblxc removing the veth before
    ``lxc-execute`` exits; that is teardown, not readiness.
VMs (``debian/12``, ``init="agent"`` and ``init="systemd"``)
    until the first exec's answer, as in ``vm_launch.py``. Both columns resume the boot
    snapshot of their shape (saved, if missing, by a launch before the timed ones); the bridged
    VM gets its own address after the resume.

HTTP round trip: ``busybox httpd -f -p 8080 -h /srv/www`` in a bridged busybox container and
in a bridged ``debian/12`` VM (``init="agent"``; the host's static busybox pushed in), and for
reference on the host's loopback; then ``GET /`` from the host with ``requests``, each request
on a new connection (as ``requests.get`` makes one), the three servers in turns, in an order
reversed every other round; the medians.

The plugin's instances are on a network named ``bench`` with addresses from 10.251.0.0/17,
and Incus's bridge takes a /24 of 10.251.128.0/17: the bench's addresses stay in 10.251.0.0/16,
whatever other runs on the same cache directory use for ``"bridged"``. A named network is made
and attached by the same code as ``"bridged"``.

Targets (issue 11), ratios that must hold in every run: bridged launch-to-ready within 1.3x of
``network="none"`` for each container image, for apps and for each resumed VM; the bridged
container launch at least 5x faster than Incus's bridged launch of the same rootfs, per image.
The exit status is 1 when one fails, when a launch fails, or when an instance or a network
left something behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import app_launch
import incus_baseline as ib
import launch as lb
import requests
import vm_launch
from registry_helpers import build_image

from pytest_incus import fsutil, network
from pytest_incus.errors import IncusError
from pytest_incus.images.busybox import host_busybox
from pytest_incus.instance import Instance
from pytest_incus.network import links, subnet
from pytest_incus.settings import Settings, default_cache_dir
from pytest_incus.signals import RunSignals

NETWORK = "bench"  # the plugin's network of this bench
SUBNET = ipaddress.IPv4Network("10.251.0.0/17")  # the plugin's addresses
INCUS_RANGE = ipaddress.IPv4Network("10.251.128.0/17")  # Incus's bridge: one /24 of it
CONTAINER_IMAGES = lb.DEFAULT_IMAGES
VM_INITS = ("agent", "systemd")
NETWORK_RATIO_MAX = 1.3  # bridged / none, at most
INCUS_RATIO_MIN = lb.INCUS_RATIO_MIN  # incus bridged / plugin bridged, at least
HTTP_PORT = 8080
APP_PROGRAM = ["/bin/busybox", "sleep", "600"]  # runs until the app is deleted
PAGE = "<h1>pytest-incus network bench</h1>\n"
READY_DEADLINE = 30.0  # seconds for a server to listen
CLOSED_PORT = 9  # discard: no bench instance listens there


# -- launches --------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Launch-to-ready of one kind and image, with and without a network (and on Incus)."""

    label: str  # "busybox container", "app", 'vm init="agent"'
    series: dict[str, lb.Series] = field(default_factory=dict)  # "none", "bridged", "incus"
    incus_skipped: str | None = None  # why there is no incus column (None: not measured)
    # the targets are for containers and resumed VMs; an app's ratio is shown, and
    # fails the run only with --strict
    target: bool = True


class NetBench(lb.Bench):
    """``launch.py``'s bench (image store, factory, failures, leftovers), for every kind."""

    def launch_plugin(
        self, image: str, kind: str = "container", **options: Any
    ) -> tuple[float, Instance]:
        """Launch through the plugin; seconds until ready, and the instance. Ready: as
        ``launch.py`` says for containers; for apps when ``launch()`` returns (the program
        runs); for VMs when the first exec has answered, as in ``vm_launch.py``."""
        if kind == "container":
            return super().launch_plugin(image, **options)
        start = time.perf_counter()
        instance = self.factory.launch(kind=kind, image=image, **options)
        self.names.append(instance.name)
        if kind == "vm":
            instance.exec(["true"], check=True)
        return time.perf_counter() - start, instance

    def compare(
        self, comparison: Comparison, n: int, kind: str, image: str, **options: Any
    ) -> None:
        """``n`` launches per column, "none" and "bridged" in rounds that alternate which
        goes first; a launch that fails is counted (``failures``), not timed."""
        networks = {"none": "none", "bridged": NETWORK}
        for column in networks:
            comparison.series[column] = lb.Series()
        for i in range(n):
            for column in list(networks) if i % 2 == 0 else list(reversed(networks)):
                seconds = self.time_plugin(image, kind=kind, network=networks[column], **options)
                if seconds is not None:
                    comparison.series[column].values.append(seconds)

    def warm_up(self, kind: str, image: str, **options: Any) -> None:
        """One launch per column, not timed (images, boot snapshots and the bench's network
        made); the bridged one is checked to be host-only (see :func:`check_host_only`)."""
        for net in ("none", NETWORK):
            _, instance = self.launch_plugin(image, kind=kind, network=net, **options)
            try:
                if net != "none":
                    check_host_only(instance.name, instance.ipv4, instance.read_text)
            finally:
                instance.delete()


def default_routes(route_table: str) -> list[str]:
    """The default routes in the text of ``/proc/net/route`` (destination 00000000)."""
    return [line for line in route_table.splitlines()[1:] if line.split()[1:2] == ["00000000"]]


def check_host_only(name: str, address: str | None, read_text: Callable[[str], str]) -> None:
    """IncusError unless instance ``name`` has no default route (``read_text`` reads a file
    inside it) and, if ``address`` is given, that address is of the bench's plugin subnet and
    answers the host at once: a connection to a port where nothing listens is refused by the
    instance's kernel, which proves the address is up when launch-to-ready ends."""
    routes = default_routes(read_text("/proc/net/route"))
    if routes:
        raise IncusError(f"{name} has a default route, which no bench instance may have: {routes}")
    if address is None:
        return
    if ipaddress.IPv4Address(address) not in SUBNET:
        raise IncusError(f"{name} got the address {address}, outside the bench's {SUBNET}")
    try:
        socket.create_connection((address, CLOSED_PORT), timeout=5).close()
    except ConnectionRefusedError:
        pass  # the instance answered
    except OSError as exc:
        raise IncusError(
            f"{name} at {address} did not answer the host right after launch: {exc}"
        ) from exc


def run_container(
    bench: NetBench, image: str, args: argparse.Namespace, incus_net: str | None, reason: str
) -> Comparison:
    """The comparison of one container image, Incus's bridged launch included if it runs."""
    comparison = Comparison(f"{image} container")
    print(f"{comparison.label}: preparing (image cache, network, warm-up)", flush=True)
    base, _ = bench.lower(image)
    bench.warm_up("container", image)
    incus = None
    if incus_net is not None:
        incus = lb.IncusSide(base, bench.settings.cache_dir / "bench", ["--network", incus_net])
        with incus.running() as name:  # the warm-up
            check_host_only(name, None, lambda path: ib.read_text(name, path))
    else:
        comparison.incus_skipped = reason
    after = ", then incus bridged" if incus else ""
    print(f"{comparison.label}: launches (none and bridged interleaved{after})", flush=True)
    bench.compare(comparison, args.launches, "container", image)
    if incus is not None:
        comparison.series["incus"] = lb.Series(
            [incus.launch_once() for _ in range(args.incus_launches)]
        )
    return comparison


def run_app(bench: NetBench, args: argparse.Namespace) -> Comparison:
    """The comparison of an app: ``app_launch.py``'s busybox image, running until deleted."""
    comparison = Comparison("app", target=False)
    work = bench.settings.cache_dir / f"bench-net-app-{secrets.token_hex(4)}"
    ref = f"oci:{work / 'layout'}:{app_launch.TAG}"
    try:
        build_image(work / "layout", app_launch.TAG, config=["--config.env=PATH=/bin"])
        print("app: warm-up, then launches (none and bridged interleaved)", flush=True)
        bench.warm_up("app", ref, command=APP_PROGRAM)
        bench.compare(comparison, args.launches, "app", ref, command=APP_PROGRAM)
    finally:
        bench.store.prune(ref)
        fsutil.remove_tree(work)
    return comparison


def run_vm(bench: NetBench, init: str, args: argparse.Namespace) -> Comparison:
    """The comparison of a ``debian/12`` VM with ``init``, both columns resumed."""
    comparison = Comparison(f'vm init="{init}"')
    print(f"{comparison.label}: warm-up (saves the boot snapshot if missing)", flush=True)
    bench.warm_up("vm", vm_launch.IMAGE, init=init)
    print(f"{comparison.label}: launches (none and bridged interleaved)", flush=True)
    bench.compare(comparison, args.vm_launches, "vm", vm_launch.IMAGE, init=init)
    return comparison


def incus_address() -> ipaddress.IPv4Interface:
    """The host's address on Incus's bridge: ``.1`` of the first /24 of :data:`INCUS_RANGE`
    that no route of the host overlaps."""
    routes = subnet.host_routes()
    for cidr in subnet.networks(INCUS_RANGE):
        if not subnet.overlapping(cidr, routes, ()):
            return ipaddress.IPv4Interface(f"{cidr[1]}/{cidr.prefixlen}")
    raise IncusError(f"every /24 of {INCUS_RANGE} overlaps a route of this host")


# -- HTTP round trip -------------------------------------------------------------------------


def get_page(url: str) -> float:
    """Seconds of one ``GET url`` on a new connection; IncusError unless it gives PAGE."""
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: the servers are host-only
        start = time.perf_counter()
        response = session.get(url, timeout=10)
        took = time.perf_counter() - start
    if response.status_code != 200 or response.text != PAGE:
        raise IncusError(f"GET {url} gave {response.status_code}: {response.text[:200]!r}")
    return took


def serve(instance: Instance, busybox: str) -> str:
    """Start busybox httpd in ``instance`` (in the background, a session of its own), wait
    until it listens; its URL."""
    instance.write_file("/srv/www/index.html", PAGE)
    instance.exec(
        f"{busybox} setsid {busybox} httpd -f -p {HTTP_PORT} -h /srv/www"
        " </dev/null >/dev/null 2>&1 &",
        check=True,
    )
    instance.wait_for_port(HTTP_PORT, timeout=READY_DEADLINE)
    return f"http://{instance.ipv4}:{HTTP_PORT}/"


@contextlib.contextmanager
def loopback_server(scratch: Path) -> Iterator[str]:
    """The host's busybox httpd on a free loopback port, serving PAGE: its URL; ended (by
    its pid) on exit."""
    (scratch / "index.html").write_text(PAGE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [str(host_busybox()), "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(scratch)]
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise IncusError(f"busybox httpd did not listen on 127.0.0.1:{port}") from None
                time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=10)


def measure_http(bench: NetBench, n: int) -> dict[str, lb.Series]:
    """``n`` GETs per server: a bridged busybox container, a bridged VM, host loopback."""
    print("HTTP round trips: container, VM and loopback servers, in turns", flush=True)
    scratch = bench.settings.cache_dir / f"bench-net-http-{secrets.token_hex(4)}"
    scratch.mkdir(parents=True)
    urls: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as stack:
            _, container = bench.launch_plugin("busybox", network=NETWORK)
            stack.callback(container.delete)
            urls["container"] = serve(container, "/bin/busybox")
            _, vm = bench.launch_plugin(vm_launch.IMAGE, kind="vm", init="agent", network=NETWORK)
            stack.callback(vm.delete)
            vm.push(host_busybox(), "/usr/local/bin/busybox", mode=0o755)
            urls["vm"] = serve(vm, "/usr/local/bin/busybox")
            urls["loopback"] = stack.enter_context(loopback_server(scratch))
            for url in urls.values():
                get_page(url)  # the first request of each is not timed
            series = {server: lb.Series() for server in urls}
            for i in range(n):
                # the order reversed every other round: a request right after the VM's can find
                # QEMU still busy (TCG), so the container and loopback come after it equally often
                for server in list(urls) if i % 2 == 0 else list(reversed(urls)):
                    series[server].values.append(get_page(urls[server]))
    finally:
        fsutil.remove_tree(scratch)
    return series


# -- report ----------------------------------------------------------------------------------


def _ratio(mine: lb.Series, theirs: lb.Series) -> float | None:
    return mine.median / theirs.median if mine.values and theirs.values else None


def verdicts(comparison: Comparison) -> list[lb.Verdict]:
    """The targets of issue 11 for one comparison (all ratios)."""
    label, series = comparison.label, comparison.series
    found = []
    ratio = _ratio(series["bridged"], series["none"])
    text = f"{label} launch-to-ready bridged/none"
    found.append(
        lb.Verdict(False, f"{text}: a column has no successful launch", True)
        if ratio is None
        else lb.Verdict(
            ratio <= NETWORK_RATIO_MAX,
            f"{text} {ratio:.2f} <= {NETWORK_RATIO_MAX}",
            comparison.target,
        )
    )
    if "incus" not in series and comparison.incus_skipped is None:
        return found  # not a comparison with Incus
    text = f"{label} launch-to-ready incus-bridged/bridged"
    if "incus" not in series:
        found.append(
            lb.Verdict(None, f"{text} >= {INCUS_RATIO_MIN}: {comparison.incus_skipped}", True)
        )
        return found
    ratio = _ratio(series["incus"], series["bridged"])
    found.append(
        lb.Verdict(False, f"{text}: a column has no successful launch", True)
        if ratio is None
        else lb.Verdict(ratio >= INCUS_RATIO_MIN, f"{text} {ratio:.1f} >= {INCUS_RATIO_MIN}", True)
    )
    return found


def print_table(comparisons: Sequence[Comparison], http: dict[str, lb.Series], n: int) -> None:
    """Medians [min-max] per comparison and column, the ratios, then the HTTP round trips."""
    heads = {"none": "none", "bridged": "bridged", "incus": "incus bridged"}
    print()
    print(
        f"{'launch-to-ready':<22} "
        + " ".join(f"{h:>22}" for h in heads.values())
        + f" {'bridged/none':>13} {'incus/bridged':>14}"
    )
    for c in comparisons:
        cells = [c.series[k].describe() if k in c.series else "-" for k in heads]
        mine = _ratio(c.series["bridged"], c.series["none"])
        incus = _ratio(c.series["incus"], c.series["bridged"]) if "incus" in c.series else None
        print(
            f"{c.label:<22} "
            + " ".join(f"{cell:>22}" for cell in cells)
            + f" {'-' if mine is None else f'{mine:.2f}':>13}"
            + f" {'-' if incus is None else f'{incus:.1f}':>14}"
        )
    print("(medians, [min-max] in ms)")
    for c in comparisons:
        if c.incus_skipped:
            print(f"incus column skipped for {c.label}: {c.incus_skipped}")
    print(f"\nHTTP round trip, GET / from the host, a new connection each ({n} per server):")
    where = {
        "container": "busybox httpd in a bridged busybox container",
        "vm": 'busybox httpd in a bridged debian/12 VM (init="agent")',
        "loopback": "busybox httpd on the host's loopback (reference)",
    }
    for server, series in http.items():
        print(f"  {where[server]:<56} {series.describe():>22}")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--launches", type=int, default=15, help="container, app: per column")
    parser.add_argument("--vm-launches", type=int, default=None, help="VMs, per column (default 5)")
    parser.add_argument("--incus-launches", type=int, default=None, help="default: --launches")
    parser.add_argument("--requests", type=int, default=200, help="HTTP requests per server")
    parser.add_argument("--quick", action="store_true", help="a small N: 3 launches, 2 per VM")
    parser.add_argument("--no-incus", action="store_true", help="skip the incus column")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="image cache (default: the plugin's)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.launches = min(args.launches, 3)
        args.requests = min(args.requests, 20)
        args.vm_launches = args.vm_launches or 2
    args.vm_launches = args.vm_launches or 5
    if args.incus_launches is None:
        args.incus_launches = args.launches
    return args


def leftovers(bench: NetBench, incus_net: str | None) -> list[str]:
    """What this run's instances and networks left on the host."""
    found = bench.leftovers()
    bridge = network.bridge_name(bench.settings, NETWORK)
    found += [what for what in network.leftovers(bench.settings) if bridge in what]
    if incus_net is not None and links.exists(incus_net):
        found.append(f"incus network {incus_net} (its bridge)")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and the targets; non-zero exit if a target fails."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (bridges and containers need it)", file=sys.stderr)
        return 2
    settings = Settings(cache_dir=args.cache_dir or default_cache_dir(), subnet=str(SUBNET))
    reason = "--no-incus given" if args.no_incus else ib.incus_available()
    print(
        f"pytest-incus network bench: {args.launches} launches per container and app column, "
        f"{args.vm_launches} per VM column, {args.requests} HTTP requests per server; "
        f"{lb._machine()}; cache {settings.cache_dir}",
        flush=True,
    )
    if reason:
        print(f"incus column skipped: {reason}", flush=True)
    # SIGTERM and SIGHUP end the run as Ctrl-C does, through the finally blocks below: its
    # instances and Incus's network are deleted
    run_signals = RunSignals()
    run_signals.install()
    bench = NetBench(settings)
    print(vm_launch.accelerator(settings, bench.store), flush=True)
    comparisons: list[Comparison] = []
    incus_net = None
    try:
        with contextlib.ExitStack() as stack:
            if reason is None:
                address = incus_address()
                incus_net = stack.enter_context(ib.bridge_network(address))
                print(f"incus network {incus_net}: host address {address}", flush=True)
            for image in CONTAINER_IMAGES:
                comparisons.append(run_container(bench, image, args, incus_net, reason or ""))
        comparisons.append(run_app(bench, args))
        for init in VM_INITS:
            comparisons.append(run_vm(bench, init, args))
        http = measure_http(bench, args.requests)
    finally:
        run_signals.hold()  # a second signal must not cut the teardown short
        bench.close()
        run_signals.restore()
    print_table(comparisons, http, args.requests)
    print(f"after the run: {lb._machine()}")
    print()
    failed = False
    for comparison in comparisons:
        for verdict in verdicts(comparison):
            label = "SKIP" if verdict.ok is None else ("PASS" if verdict.ok else "FAIL")
            print(f"{label}  {verdict.text}")
            failed = failed or verdict.ok is False
    for failure in bench.failures:
        failed = True
        print(f"FAIL  a plugin launch failed: {failure}")
    left = leftovers(bench, incus_net)
    if left:
        failed = True
        print("FAIL  leftovers after the run:\n  " + "\n  ".join(left))
    else:
        print(f"PASS  nothing left behind by the {len(bench.names)} instances and the networks")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
