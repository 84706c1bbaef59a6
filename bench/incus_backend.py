"""The incus backend: launch-to-ready and exec round trip against the local backend, Incus's own
REST exec and the ``incus`` command; and a ``-n 4`` run of 40 tests on the server.

One command, one run (as root, from the repository root)::

    python3 bench/incus_backend.py            # 15 launches and 200 exec round trips per column
    python3 bench/incus_backend.py --quick    # 3 launches and 20 exec round trips

Incus is the server that ``scripts/incus-setup.sh`` starts and its project ``pytest-incus``.
For each image (``busybox`` and ``debian/12`` by default), with the same image everywhere:

launch-to-ready
    incus backend
        ``InstanceFactory.launch(image=...)`` with ``backend="incus"`` (spec, record, image
        upload memo, POST /1.0/instances, start, readiness);
    local backend
        the same launch with the local backend (liblxc on this host), for context;
    incus command
        ``incus launch FINGERPRINT ptibench-<hex> --project pytest-incus`` of the very image
        the backend uploaded (``IncusImages.source(spec)``; checked against the backend
        instance's ``volatile.base_image``), then ``incus exec`` probes as
        ``incus_baseline.py`` polls them.

    Ready is, in every column, the same event: for busybox the first successful exec of
    ``true``; for systemd ``systemctl is-system-running`` saying running or degraded. The
    columns' launches run in rounds that rotate which goes first.
exec round trip of ``true``
    incus backend
        ``Instance.exec(["true"])`` (the backend's sh wrapper, websockets, the operation's wait);
    Incus REST
        Incus's own exec, the least a client must do: requests over the unix socket (the
        backend's ``UnixAdapter``, nothing else of it), POST .../exec with
        wait-for-websocket, the four websockets (websocket-client), a close frame on stdin,
        stdout and stderr read to their end, GET the operation's /wait;
    incus command
        ``incus exec NAME --project pytest-incus -- true``;
    local backend
        ``Instance.exec(["true"])`` on the local backend, for context.

    The three Incus columns exec in one instance (the backend's), the local one in its own;
    rounds rotate the order.
``-n 4`` run
    a scratch test file of 40 tests, each ``@pytest.mark.instance(image="busybox")`` with one
    exec, run by ``python -m pytest -n 4`` with ``--incus-backend=incus``, then with the local
    backend, wall time of each (no target: the figures and their ratio, for the README).

Targets (issue 13), ratios that must hold in every run: the incus backend's exec round trip at
most 1.5x Incus's own REST exec, and below the ``incus`` command's (ratio < 1.0). The exit
status is 1 when one fails, when a launch or a ``-n 4`` run fails, or when something is left
behind (on this host or on the server); 2 when Incus cannot be used here.

Everything this bench makes on the server is named ``ptibench-`` (its own launches) or is the
plugin's (``pti-``, reaped like any test run's), and is deleted before it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import incus_baseline as ib
import launch as lb
import requests
import websocket

from pytest_incus import fsutil, registry
from pytest_incus.errors import IncusError, InstanceStartError, UnavailableError
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import ImageStore
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.images import IncusImages
from pytest_incus.incus.transport import UNIX_BASE, UnixAdapter, default_socket
from pytest_incus.instance import Instance
from pytest_incus.settings import Settings, default_cache_dir
from pytest_incus.signals import RunSignals
from pytest_incus.spec import InstanceSpec

PROJECT = "pytest-incus"  # what scripts/incus-setup.sh makes for the suite
NAME_PREFIX = ib.NAME_PREFIX  # "ptibench-": the names of this bench's own launches
SCRATCH = Path("/var/lib/pti-bench")  # the -n 4 runs' test files (not /tmp: HOST.md)
DEFAULT_IMAGES = lb.DEFAULT_IMAGES
REST_RATIO_MAX = 1.5  # incus backend exec / Incus's own REST exec, at most
CLI_RATIO_MAX = 1.0  # incus backend exec / incus command exec, below
REST_TIMEOUT = 30.0  # seconds for each request and websocket of the raw REST exec
LAUNCH_DEADLINE = ib.LAUNCH_DEADLINE
XDIST_TIMEOUT = 1200.0  # seconds for one -n 4 run

LAUNCH_COLUMNS = ("backend", "local", "cli")
EXEC_COLUMNS = ("backend", "rest", "cli", "local")
HEADS = {
    "backend": "incus backend",
    "local": "local backend",
    "cli": "incus command",
    "rest": "Incus REST",
}


# -- Incus's own exec, measured with requests ------------------------------------------------


class RestExec:
    """Incus's exec API as a minimal client speaks it, over the unix socket.

    One session with the backend's ``UnixAdapter`` (the transport only: none of the
    backend's client, wrapper or readers), websockets connected with websocket-client on
    sockets of our own."""

    def __init__(self, socket_path: Path, project: str) -> None:
        self.socket_path = str(socket_path)
        self.params: dict[str, str | int] = {"project": project}
        self.session = requests.Session()
        self.session.mount(UNIX_BASE + "/", UnixAdapter(self.socket_path))

    def _websocket(self, op_id: str, secret: str) -> websocket.WebSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(REST_TIMEOUT)
            sock.connect(self.socket_path)
            return websocket.create_connection(
                f"ws://localhost/1.0/operations/{op_id}/websocket?secret={secret}",
                socket=sock,
                timeout=REST_TIMEOUT,
                skip_utf8_validation=True,
            )
        except BaseException:
            sock.close()
            raise

    def run(self, name: str, argv: Sequence[str]) -> int:
        """Run ``argv`` in instance ``name``; its exit code."""
        answer = self.session.post(
            f"{UNIX_BASE}/1.0/instances/{name}/exec",
            params=self.params,
            json={
                "command": list(argv),
                "wait-for-websocket": True,
                "interactive": False,
                "environment": {},
            },
            timeout=REST_TIMEOUT,
        )
        answer.raise_for_status()
        operation = answer.json()["metadata"]
        op_id, fds = operation["id"], operation["metadata"]["fds"]
        sockets: list[websocket.WebSocket] = []
        try:
            for key in ("control", "0", "1", "2"):
                sockets.append(self._websocket(op_id, fds[key]))
            # end of stdin; a command that is done already has had its stdin closed
            with contextlib.suppress(ConnectionError):
                sockets[1].send_close()
            for ws in sockets[2:]:
                _read_to_end(ws)
            done = self.session.get(
                f"{UNIX_BASE}/1.0/operations/{op_id}/wait",
                params={**self.params, "timeout": int(REST_TIMEOUT)},
                timeout=REST_TIMEOUT + 5,
            )
            done.raise_for_status()
            return int(done.json()["metadata"]["metadata"]["return"])
        finally:
            for ws in sockets:
                with contextlib.suppress(OSError, websocket.WebSocketException):
                    ws.close(timeout=0.2)

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()


def _read_to_end(ws: websocket.WebSocket) -> None:
    """Read a stream until the server closes it (``true`` prints nothing)."""
    while True:
        try:
            opcode, data = ws.recv_data()
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return  # closed without a close frame (or before our answer to its ping)
        if opcode == websocket.ABNF.OPCODE_CLOSE or not data:
            return


# -- the incus command -----------------------------------------------------------------------


def cli(*args: str, timeout: float = ib.CLI_TIMEOUT, check: bool = True) -> str:
    """``incus ARGS --project pytest-incus`` (before any ``--``); its stdout."""
    head, sep, tail = list(args), [], []
    if "--" in head:
        at = head.index("--")
        head, sep, tail = head[:at], ["--"], head[at + 1 :]
    return ib._incus(*head, "--project", PROJECT, *sep, *tail, timeout=timeout, check=check).stdout


def cli_ready(name: str, systemd: bool, deadline: float) -> None:
    """Poll ``incus exec`` until ``name`` is ready, as incus_baseline.py does."""
    cmd = ib.SYSTEMD_READY_CMD if systemd else ib.EXEC_READY_CMD
    while True:
        try:
            proc = ib._incus(
                "exec", name, "--project", PROJECT, "--", *cmd, timeout=10.0, check=False
            )
            if systemd:
                if proc.stdout.strip() in ib.SYSTEMD_READY_OUTPUT:
                    return
            elif proc.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} launched by the incus command was not ready in time")
        time.sleep(ib.POLL_INTERVAL)


def cli_delete(name: str) -> None:
    """``incus delete --force NAME``; nothing if it is gone already."""
    proc = ib._incus("delete", "--force", name, "--project", PROJECT, check=False)
    if proc.returncode != 0 and "not found" not in proc.stderr.lower():
        raise IncusError(f"could not delete {name}: {proc.stderr.strip()}")


# -- the bench -------------------------------------------------------------------------------


@dataclass
class ImageResult:
    """Everything measured for one image."""

    image: str
    launch: dict[str, lb.Series] = field(default_factory=dict)
    exec: dict[str, lb.Series] = field(default_factory=dict)


class Bench:
    """Both backends' factories, the server's client and the names of everything launched."""

    def __init__(self, cache: Path) -> None:
        self.local_settings = Settings(cache_dir=cache)
        self.incus_settings = Settings(cache_dir=cache, backend="incus", project=PROJECT)
        progress = lambda message: print(f"  {message}", flush=True)  # noqa: E731
        # a store per backend: the factory's runtimes take their settings (the backend's
        # project among them) from its store's
        self.store = ImageStore(self.local_settings, progress=progress)
        self.incus_store = ImageStore(self.incus_settings, progress=progress)
        self.local = InstanceFactory(self.local_settings, self.store)
        self.incus = InstanceFactory(self.incus_settings, self.incus_store)
        self.client = IncusClient.from_settings(self.incus_settings)
        self.rest = RestExec(default_socket(), PROJECT)
        self.names: list[str] = []  # the factories' instances and the ptibench- ones
        self.cli_alive: set[str] = set()
        self.failures: list[str] = []

    def init(self, image: str) -> str:
        """The image's init ("systemd" or another)."""
        return str(self.store.get(image, "container").init)

    def fingerprint(self, image: str) -> str:
        """The fingerprint of the image the backend uploaded for ``image``."""
        spec = InstanceSpec.parse("container", image, {}, where="bench").with_defaults(
            max_processes=self.incus_settings.max_processes,
            network=self.incus_settings.default_network,
        )
        source = IncusImages(self.client, self.incus_store).source(spec).source
        return str(source["fingerprint"])

    def launch(self, factory: InstanceFactory, image: str) -> tuple[float, Instance]:
        """Launch through ``factory``; seconds until ready, and the instance."""
        start = time.perf_counter()
        instance = factory.launch(image=image)
        self.names.append(instance.name)
        if self.init(image) != "systemd":
            # launch() returns once a busybox init runs; ready = first successful exec
            while instance.exec(["true"]).exit_code != 0:
                time.sleep(ib.POLL_INTERVAL)
        return time.perf_counter() - start, instance

    def launch_cli(self, fingerprint: str, systemd: bool) -> tuple[float, str]:
        """``incus launch`` until ready; seconds and the instance's name (deleted by the
        caller, or by close())."""
        name = f"{NAME_PREFIX}{secrets.token_hex(4)}"
        self.names.append(name)
        self.cli_alive.add(name)
        start = time.perf_counter()
        cli("launch", fingerprint, name, timeout=LAUNCH_DEADLINE)
        cli_ready(name, systemd, time.monotonic() + LAUNCH_DEADLINE)
        return time.perf_counter() - start, name

    def drop_cli(self, name: str) -> None:
        """Delete a ``ptibench-`` instance."""
        cli_delete(name)
        self.cli_alive.discard(name)

    def time_launch(self, column: str, image: str, fingerprint: str) -> float | None:
        """One timed launch-to-ready in ``column``, deleted again; None if a start failed."""
        if column == "cli":
            seconds, name = self.launch_cli(fingerprint, self.init(image) == "systemd")
            self.drop_cli(name)
            return seconds
        factory = self.incus if column == "backend" else self.local
        try:
            seconds, instance = self.launch(factory, image)
        except InstanceStartError as exc:
            # counted and reported as a failure, not retried: a flaky start is a bug
            first = str(exc).splitlines()[0]
            print(f"  a {HEADS[column]} launch of {image} failed: {first}", flush=True)
            self.failures.append(f"{HEADS[column]} {image}: {first}")
            return None
        instance.delete()
        return seconds

    def measure_launches(self, image: str, n: int, fingerprint: str) -> dict[str, lb.Series]:
        """``n`` launch-to-ready times per column, in rounds that rotate the order."""
        series = {column: lb.Series() for column in LAUNCH_COLUMNS}
        for i in range(n):
            k = i % len(LAUNCH_COLUMNS)
            for column in LAUNCH_COLUMNS[k:] + LAUNCH_COLUMNS[:k]:
                seconds = self.time_launch(column, image, fingerprint)
                if seconds is not None:
                    series[column].values.append(seconds)
        return series

    def measure_execs(self, image: str, n: int) -> dict[str, lb.Series]:
        """``n`` round trips of ``true`` per column, in rounds that rotate the order."""
        series = {column: lb.Series() for column in EXEC_COLUMNS}
        with contextlib.ExitStack() as stack:
            _, remote = self.launch(self.incus, image)
            stack.callback(remote.delete)
            _, local = self.launch(self.local, image)
            stack.callback(local.delete)
            name = remote.name
            timed: dict[str, Callable[[], object]] = {
                "backend": lambda: remote.exec(["true"], check=True),
                "rest": lambda: _zero(self.rest.run(name, ["true"]), "REST exec"),
                "cli": lambda: cli("exec", name, "--", "true"),
                "local": lambda: local.exec(["true"], check=True),
            }
            for run in timed.values():  # warm-up: connections, page cache
                run()
            for i in range(n):
                k = i % len(EXEC_COLUMNS)
                for column in EXEC_COLUMNS[k:] + EXEC_COLUMNS[:k]:
                    start = time.perf_counter()
                    timed[column]()
                    series[column].values.append(time.perf_counter() - start)
        return series

    def run_image(self, image: str, launches: int, execs: int) -> ImageResult:
        """Every measurement of one image."""
        result = ImageResult(image)
        print(f"{image}: preparing (upload check, fingerprint, warm-up launches)", flush=True)
        _, first = self.launch(self.incus, image)  # uploads the image if the server lacks it
        try:
            base = self.client.call("GET", f"/1.0/instances/{first.name}")["config"]
            used = str(base.get("volatile.base_image", ""))
        finally:
            first.delete()
        fingerprint = self.fingerprint(image)
        if used != fingerprint:
            raise SystemExit(
                f"bench: the backend launched {image} from image {used}, but "
                f"IncusImages.source() says {fingerprint}"
            )
        print(f"  {image} on the server: image {fingerprint[:12]}", flush=True)
        for column in LAUNCH_COLUMNS:
            self.time_launch(column, image, fingerprint)  # warm-up, not counted
        print(f"{image}: launches ({', '.join(HEADS[c] for c in LAUNCH_COLUMNS)})", flush=True)
        result.launch = self.measure_launches(image, launches, fingerprint)
        print(
            f"{image}: exec round trips ({', '.join(HEADS[c] for c in EXEC_COLUMNS)})",
            flush=True,
        )
        result.exec = self.measure_execs(image, execs)
        return result

    def leftovers(self) -> list[str]:
        """What any instance of this run left, on this host or on the server."""
        found = []
        for name in self.names:
            found += [f"{name}: {what}" for what in registry.leftovers(self.local_settings, name)]
        found += [f"{name}: on the server" for name in server_leftovers(self.client, self.names)]
        return found

    def close(self) -> None:
        """Delete whatever is still alive (after an error)."""
        for name in sorted(self.cli_alive):
            with contextlib.suppress(IncusError, subprocess.TimeoutExpired):
                self.drop_cli(name)
        self.incus.close()
        self.local.close()
        self.rest.close()


def _zero(code: int, what: str) -> None:
    if code != 0:
        raise IncusError(f"{what} of true exited {code}")


def server_leftovers(client: IncusClient, names: Sequence[str]) -> list[str]:
    """Which of ``names`` still exist on the server (in the project)."""
    listing = client.call("GET", "/1.0/instances")
    there = {str(url).rstrip("/").rsplit("/", 1)[-1].split("?")[0] for url in listing or []}
    return sorted(set(names) & there)


# -- the -n 4 runs ---------------------------------------------------------------------------

TEST_FILE = '''\
"""{tests} tests on busybox, one exec each (written by bench/incus_backend.py)."""

from pathlib import Path

import pytest

NAMES = Path({names!r})


@pytest.mark.parametrize("i", range({tests}))
@pytest.mark.instance(image="busybox")
def test_one_exec(instance, i):
    (NAMES / instance.name).touch()  # for the bench's leftover check
    assert instance.exec(["true"]).exit_code == 0
'''


@dataclass
class XdistRun:
    """One ``-n WORKERS`` run of the scratch tests."""

    backend: str
    seconds: float
    ok: bool
    summary: str
    names: list[str]


@contextlib.contextmanager
def scratch_tests(tests: int) -> Iterator[Path]:
    """A scratch directory with the test file (and an ini, so it is its own rootdir)."""
    directory = SCRATCH / f"xdist-{secrets.token_hex(4)}"
    (directory / "names").mkdir(parents=True)
    try:
        (directory / "pytest.ini").write_text("[pytest]\n")
        test = TEST_FILE.format(tests=tests, names=str(directory / "names"))
        (directory / "test_forty.py").write_text(test)
        yield directory
    finally:
        fsutil.remove_tree(directory)


def xdist_run(directory: Path, backend: str, workers: int, cache: Path, tests: int) -> XdistRun:
    """``python -m pytest -n WORKERS`` of the scratch tests on ``backend``, timed."""
    for old in (directory / "names").iterdir():
        old.unlink()
    argv = [
        *(sys.executable, "-m", "pytest", "-n", str(workers), "-p", "no:cacheprovider", "-q"),
        *(f"--incus-backend={backend}", f"--incus-cache-dir={cache}"),
        *([f"--incus-project={PROJECT}"] if backend == "incus" else []),
        "test_forty.py",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=XDIST_TIMEOUT,
        check=False,
    )
    seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    ok = done.returncode == 0 and f"{tests} passed" in summary
    if not ok:
        print(done.stdout[-3000:] + done.stderr[-2000:], flush=True)
    names = sorted(p.name for p in (directory / "names").iterdir())
    return XdistRun(backend, seconds, ok, summary, names)


# -- report ----------------------------------------------------------------------------------


def _ratio(mine: lb.Series, theirs: lb.Series) -> float | None:
    if not mine.values or not theirs.values:
        return None
    return mine.median / theirs.median


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def print_table(results: Sequence[ImageResult]) -> None:
    """Medians [min-max] per image, measurement and column, then the ratios."""
    print()
    print(
        f"{'image':<10} {'measurement':<16} "
        + " ".join(f"{HEADS[c]:>20}" for c in EXEC_COLUMNS)
        + f" {'backend/REST':>13} {'backend/cmd':>12} {'backend/local':>14}"
    )
    for result in results:
        for label, table in (("launch-to-ready", result.launch), ("exec round trip", result.exec)):
            cells = [table[c].describe() if c in table else "-" for c in EXEC_COLUMNS]
            backend = table["backend"]
            ratios = [
                _ratio(backend, table[c]) if c in table else None for c in ("rest", "cli", "local")
            ]
            print(
                f"{result.image:<10} {label:<16} "
                + " ".join(f"{c:>20}" for c in cells)
                + f" {_fmt_ratio(ratios[0]):>13} {_fmt_ratio(ratios[1]):>12}"
                + f" {_fmt_ratio(ratios[2]):>14}"
            )
    print("(medians, [min-max] in ms)")


def verdicts(result: ImageResult) -> list[lb.Verdict]:
    """The targets of issue 13 for one image: the exec ratios."""
    backend = result.exec["backend"]
    found = []
    for column, limit, strict in (("rest", REST_RATIO_MAX, False), ("cli", CLI_RATIO_MAX, True)):
        ratio = _ratio(backend, result.exec[column])
        text = f"{result.image} exec round trip incus-backend/{HEADS[column].replace(' ', '-')}"
        if ratio is None:
            found.append(lb.Verdict(False, f"{text}: no figures", True))
            continue
        ok = ratio < limit if strict else ratio <= limit
        found.append(lb.Verdict(ok, f"{text} {ratio:.2f} {'<' if strict else '<='} {limit}", True))
    return found


def print_xdist(runs: Sequence[XdistRun], tests: int, workers: int) -> None:
    """The -n runs' wall times and their ratio."""
    print()
    print(f"-n {workers} run of {tests} busybox tests, one exec each (wall time)")
    for run in runs:
        print(f"  {run.backend + ' backend':<14} {run.seconds:7.2f} s   {run.summary}")
    by = {run.backend: run for run in runs}
    if "incus" in by and "local" in by:
        print(f"  incus/local {by['incus'].seconds / by['local'].seconds:.2f}x (no target)")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--launches", type=int, default=15, help="launches per column")
    parser.add_argument("--execs", type=int, default=200, help="exec round trips per column")
    parser.add_argument("--quick", action="store_true", help="3 launches, 20 exec round trips")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), metavar="IMAGE")
    parser.add_argument("--tests", type=int, default=40, help="tests of the -n run")
    parser.add_argument("--workers", type=int, default=4, help="xdist workers of the -n run")
    parser.add_argument("--no-xdist", action="store_true", help="skip the -n runs")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="image cache (default: the plugin's)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.launches, args.execs = 3, 20
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and the targets; 1 if a target fails, 2 if Incus is not
    usable."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (system containers need it)", file=sys.stderr)
        return 2
    cache = args.cache_dir or default_cache_dir()
    bench = Bench(cache)
    try:
        bench.client.check()
    except UnavailableError as exc:
        print(f"bench: Incus cannot be used: {exc}", file=sys.stderr)
        bench.rest.close()
        return 2
    print(
        f"pytest-incus incus-backend bench: {args.launches} launches and {args.execs} exec round"
        f" trips per column and image; server {bench.client.remote}, project {PROJECT}; "
        f"{lb._machine()}; cache {cache}",
        flush=True,
    )
    run_signals = RunSignals()
    run_signals.install()
    results: list[ImageResult] = []
    runs: list[XdistRun] = []
    try:
        for image in args.images:
            results.append(bench.run_image(image, args.launches, args.execs))
        if not args.no_xdist:
            with scratch_tests(args.tests) as directory:
                for backend in ("incus", "local"):
                    print(
                        f"-n {args.workers} run of {args.tests} tests, {backend} backend",
                        flush=True,
                    )
                    run = xdist_run(directory, backend, args.workers, cache, args.tests)
                    runs.append(run)
                    bench.names += run.names
    finally:
        run_signals.hold()
        try:
            bench.close()
        finally:
            run_signals.restore()
    print_table(results)
    if runs:
        print_xdist(runs, args.tests, args.workers)
    print(f"after the run: {lb._machine()}")
    print()
    failed = False
    for result in results:
        for verdict in verdicts(result):
            print(f"{'PASS' if verdict.ok else 'FAIL'}  {verdict.text}")
            failed = failed or not verdict.ok
    for run in runs:
        if not run.ok:
            print(f"FAIL  the -n {args.workers} run on the {run.backend} backend: {run.summary}")
            failed = True
    for failure in bench.failures:
        print(f"FAIL  a launch failed: {failure}")
        failed = True
    left = bench.leftovers()
    if left:
        print("FAIL  leftovers after the run:\n  " + "\n  ".join(left))
        failed = True
    else:
        print(f"PASS  nothing left behind by the {len(bench.names)} instances of this run")
    bench.client.close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
