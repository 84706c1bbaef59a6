"""Launch-to-ready and exec round trip: pytest-incus against raw liblxc and Incus.

One command, one run (as root, from the repository root)::

    python3 bench/launch.py            # 15 launches and 200 exec round trips per image
    python3 bench/launch.py --quick    # a small N, for a smoke test

For each image (``busybox`` and ``debian/12`` by default) it measures:

plugin
    ``InstanceFactory.launch()`` of pytest_incus, the path the fixtures take (spec, record,
    image cache, overlay, config, liblxc start, readiness), and ``Instance.exec(["true"])``.
raw liblxc
    the same container without the plugin around it: the same uid-shifted image rootfs from
    the cache, the same overlay, the same config file (written by the plugin's own config code,
    with its verify-rootfs mount hook and unprivileged idmap), then
    ``lxc-start`` (liblxc's own start command; the plugin starts containers the same way) and
    ``attach_wait(lxc.attach_run_command, ...)`` for every exec.
incus
    ``incus launch`` / ``incus exec`` of the same (unshifted) rootfs imported as an Incus image,
    through ``bench/incus_baseline.py``; skipped, saying why, when Incus cannot run here.

Launch-to-ready ends, for every column, at the same event: for a busybox image the first
successful exec of ``true``; for a systemd image ``systemctl is-system-running`` answering
``running`` or ``degraded``. The plugin's and raw liblxc's runs are interleaved (rounds that
alternate which goes first), so machine noise hits both alike; Incus's launches follow in a
block of their own (see ``Bench.measure_launches`` for why).

Targets (issue 2): busybox launch-to-ready <= 60 ms, debian/12 <= 0.4 s, exec round trip <=
5 ms (absolute figures, for a quiet machine); plugin within 1.5x of raw liblxc, and launch at
least 5x faster than Incus (ratios, which must always hold). The exit status is 1 when a ratio
target fails (or, with ``--strict``, any target) or when an instance left something behind.

Raw containers live in the plugin's instances directory with an owner record, so a killed
bench run is cleaned up by ``pytest-incus reap`` like any test run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import incus_baseline as ib

from pytest_incus import fsutil, registry
from pytest_incus.errors import IncusError, InstanceStartError
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.instance import Instance
from pytest_incus.ownership import Owner
from pytest_incus.runtimes import cgroups
from pytest_incus.runtimes.container import (
    ID_BASE,
    READY_POLL,
    Container,
    _hook_path,
    write_config,
)
from pytest_incus.settings import Settings, default_cache_dir
from pytest_incus.spec import InstanceSpec

DEFAULT_IMAGES = ("busybox", "debian/12")
SYSTEMD_READY = ("running", "degraded")
RAW_PREFIX = "ptibench-raw-"

LAUNCH_TARGETS = {"busybox": 0.060, "debian/12": 0.400}  # seconds, medians, quiet machine
EXEC_TARGET = 0.005  # seconds, median exec round trip, quiet machine
RAW_RATIO_MAX = 1.5  # plugin / raw liblxc, at most
INCUS_RATIO_MIN = 5.0  # incus / plugin launch, at least


# -- statistics ------------------------------------------------------------------------------


@dataclass
class Series:
    """Timings of one measurement, in seconds."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median."""
        return statistics.median(self.values)

    def describe(self) -> str:
        """``median [min-max]`` in ms."""
        if not self.values:
            return "-"
        return (
            f"{_ms(self.median)} [{_ms(min(self.values), unit=False)}-"
            f"{_ms(max(self.values), unit=False)}]"
        )


def _ms(seconds: float, *, unit: bool = True) -> str:
    value = seconds * 1000
    text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{text} ms" if unit else text


@dataclass
class ImageResult:
    """Everything measured for one image."""

    image: str
    launch: dict[str, Series] = field(default_factory=dict)
    exec: dict[str, Series] = field(default_factory=dict)
    incus_skipped: str | None = None


# -- raw liblxc ------------------------------------------------------------------------------


def _lxc() -> Any:
    import lxc

    return lxc


class RawContainer:
    """A container started with python-lxc directly, configured exactly as the plugin does.

    The directory and owner record are made by the constructor (not timed, so that a killed
    bench is reaped like a test run); :meth:`launch` is the timed part: overlay directories
    and config file (the plugin's own config code), ``lxc.Container``, a read-back of the
    rootfs setting, the start, and waiting until ready.
    """

    def __init__(self, settings: Settings, spec: InstanceSpec, lower: Image, hook: Path) -> None:
        self.settings = settings
        self.spec = spec
        self.lower = lower
        self.hook = hook
        self.name = f"{RAW_PREFIX}{secrets.token_hex(4)}"
        self.directory = settings.instances_dir / self.name
        self.directory.mkdir(parents=True)
        registry.write_record(
            self.directory, kind="container", image=spec.image, owner=Owner.current()
        )
        self.c: Any = None

    def _write_config(self) -> None:
        # the plugin's own config writer, so the two configs cannot drift apart (the file is
        # compared in check_same_config)
        write_config(self.spec, self.name, self.directory, self.lower, self.hook, [])

    def launch(self) -> None:
        """Write the config, start the container and wait until it is ready."""
        lxc = _lxc()
        deadline = time.monotonic() + self.spec.boot_timeout
        self._write_config()
        self.c = lxc.Container(self.name, str(self.settings.instances_dir))
        expected = f"overlay:{self.lower.rootfs}:{self.directory / 'upper'}"
        got = self.c.get_config_item("lxc.rootfs.path")
        if got not in (expected, expected.removeprefix("overlay:")):
            raise IncusError(f"{self.name}: LXC read rootfs {got!r}, expected {expected!r}")
        started = subprocess.run(
            ["lxc-start", "--name", self.name, "--lxcpath", str(self.settings.instances_dir)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            start_new_session=True,  # as the plugin starts it
        )
        if started.returncode != 0:
            raise IncusError(f"raw liblxc could not start {self.name}; see {self.directory}")
        if self.lower.init == "systemd":
            self._wait_systemd(deadline)
        else:
            self._wait_exec(deadline)

    def _wait_exec(self, deadline: float) -> None:
        while self.exec_true() != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no successful exec before the deadline")
            time.sleep(READY_POLL)

    def _wait_systemd(self, deadline: float) -> None:
        lxc = _lxc()
        argv = ["systemctl", "is-system-running", "--wait"]
        while True:
            read_fd, write_fd = os.pipe()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                self.c.attach_wait(lxc.attach_run_command, argv, stdout=write_fd, stderr=null)
            finally:
                os.close(write_fd)
                os.close(null)
                with os.fdopen(read_fd, "rb") as pipe:
                    state = pipe.read().decode(errors="replace").strip()
            if state in SYSTEMD_READY:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: systemd said {state!r} at the deadline")
            time.sleep(READY_POLL)

    def exec_true(self) -> int:
        """One exec round trip: ``true`` through ``attach_wait``; returns its wait status."""
        return int(self.c.attach_wait(_lxc().attach_run_command, ["true"]))

    def delete(self) -> None:
        """Stop it and remove its cgroups and directory, as the plugin does for its own."""
        try:
            Container.teardown(self.name, self.directory)
        finally:
            fsutil.remove_tree(self.directory)


# -- the two sides ---------------------------------------------------------------------------


class Bench:
    """Launches through the plugin and through raw liblxc, and times them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ImageStore(settings, progress=lambda msg: print(f"  {msg}", flush=True))
        self.factory = InstanceFactory(settings, self.store)
        self.hook = _hook_path(settings.cache_dir)
        self.names: list[str] = []  # every instance launched, checked for leftovers at the end
        self.failures: list[str] = []  # plugin launches that failed

    def lower(self, image: str) -> tuple[Image, Image]:
        """The cached image and its uid-shifted copy (built now if missing)."""
        base = self.store.get(image, "container")
        return base, self.store.shifted(base, ID_BASE)

    def raw(self, image: str) -> RawContainer:
        """A raw container of ``image``, not started yet."""
        # the same limits as the plugin's containers get (the default process limit too)
        spec = InstanceSpec.parse("container", image, {}, where="bench").with_defaults(
            max_processes=self.settings.max_processes, network="none"
        )
        raw = RawContainer(self.settings, spec, self.lower(image)[1], self.hook)
        self.names.append(raw.name)
        return raw

    def launch_plugin(self, image: str, **options: Any) -> tuple[float, Instance]:
        """Launch through the plugin (``options`` as ``launch()`` takes them); seconds until
        ready, and the instance."""
        start = time.perf_counter()
        instance = self.factory.launch(kind="container", image=image, **options)
        self.names.append(instance.name)
        if instance.machine.image.init != "systemd":
            # launch() returns once a busybox init runs; ready = first successful exec
            while instance.exec(["true"]).exit_code != 0:
                time.sleep(READY_POLL)
        return time.perf_counter() - start, instance

    def launch_raw(self, image: str) -> tuple[float, RawContainer]:
        """Launch through raw liblxc; seconds until ready, and the container."""
        raw = self.raw(image)
        try:
            start = time.perf_counter()
            raw.launch()
            return time.perf_counter() - start, raw
        except BaseException:
            raw.delete()
            raise

    def check_same_config(self, image: str) -> None:
        """Fail unless plugin and raw write the same config (names and paths aside)."""
        _, instance = self.launch_plugin(image)
        try:
            plugin_config = (instance.directory / "config").read_text()
            plugin_name = instance.name
        finally:
            instance.delete()
        _, raw = self.launch_raw(image)
        try:
            raw_config = (raw.directory / "config").read_text()
        finally:
            raw.delete()
        # each container's cgroup directory is named after its instance directory
        plugin_cgroups = cgroups.container_dir(plugin_name, instance.directory)
        raw_cgroups = cgroups.container_dir(raw.name, raw.directory)
        plugin_config = plugin_config.replace(plugin_cgroups, raw_cgroups)
        if plugin_config.replace(plugin_name, raw.name) != raw_config:
            raise SystemExit(
                f"bench: the raw liblxc config of {image} differs from the plugin's:\n"
                f"--- plugin\n{plugin_config}--- raw\n{raw_config}"
            )

    def _launch_once(self, side: str, image: str, incus: IncusSide | None) -> float | None:
        """One timed launch-to-ready on ``side``, deleted again; None if a plugin start failed."""
        if side == "incus":
            assert incus is not None
            return incus.launch_once()
        if side == "raw":
            seconds, container = self.launch_raw(image)
            container.delete()
            return seconds
        return self.time_plugin(image)

    def time_plugin(self, image: str, **options: Any) -> float | None:
        """One timed plugin launch-to-ready, deleted again; None if its start failed."""
        try:
            seconds, instance = self.launch_plugin(image, **options)
        except InstanceStartError as exc:
            # counted and reported as a failure, not retried: a flaky start is a bug
            first = str(exc).splitlines()[0]
            print(f"  a plugin launch of {image} failed: {first}", flush=True)
            self.failures.append(f"{image}: {first}")
            return None
        instance.delete()
        return seconds

    def measure_launches(
        self, image: str, n: int, incus: IncusSide | None, incus_n: int
    ) -> dict[str, Series]:
        """``n`` launch-to-ready times per side (``incus_n`` for incus): plugin and raw in
        rounds that alternate which goes first, then Incus's launches in a block of their own.

        Incus is not interleaved with the others because a launch right after an Incus one
        finds the machine's caches taken by Incus: it took 35-45 ms where the same busybox
        launch took 21-25 ms after a plugin or raw one (measured; a pause of 0.2-1 s in
        between did not help, nor did a sync). Interleaved, the plugin's and raw's medians
        fell on either side of that gap by chance, and the ratios with them."""
        series: dict[str, Series] = {"plugin": Series(), "raw": Series()}
        rounds = [["plugin", "raw"] if i % 2 == 0 else ["raw", "plugin"] for i in range(n)]
        if incus is not None:
            series["incus"] = Series()
            rounds += [["incus"]] * incus_n
        for order in rounds:
            for side in order:
                seconds = self._launch_once(side, image, incus)
                if seconds is not None:
                    series[side].values.append(seconds)
        return series

    def measure_execs(
        self, image: str, n: int, incus: IncusSide | None, incus_n: int
    ) -> dict[str, Series]:
        """``n`` exec round trips of ``true`` per side (``incus_n`` for incus), alternating,
        each side in one running instance."""
        series: dict[str, Series] = {"plugin": Series(), "raw": Series()}
        with contextlib.ExitStack() as stack:
            instance, container = stack.enter_context(self._both(image))
            timed: dict[str, Callable[[], object]] = {
                "plugin": lambda: instance.exec(["true"], check=True),
                "raw": lambda: _raw_true(container),
            }
            if incus is not None:
                name = stack.enter_context(incus.running())
                series["incus"] = Series()
                timed["incus"] = lambda: incus.exec_once(name)
            for i in range(max(n, incus_n if incus else 0)):
                for side, run in timed.items():
                    if i < (incus_n if side == "incus" else n):
                        start = time.perf_counter()
                        run()
                        series[side].values.append(time.perf_counter() - start)
        return series

    @contextlib.contextmanager
    def _both(self, image: str) -> Iterator[tuple[Instance, RawContainer]]:
        _, instance = self.launch_plugin(image)
        try:
            _, container = self.launch_raw(image)
            try:
                yield instance, container
            finally:
                container.delete()
        finally:
            instance.delete()

    def leftovers(self) -> list[str]:
        """What any instance of this run left behind."""
        found = []
        for name in self.names:
            found += [f"{name}: {what}" for what in registry.leftovers(self.settings, name)]
        return found

    def report_failures_and_leftovers(self) -> bool:
        """Print a FAIL line per failed launch and for what the instances left behind (else
        a PASS line); True if there was any."""
        for failure in self.failures:
            print(f"FAIL  a plugin launch failed: {failure}")
        left = self.leftovers()
        if left:
            print("FAIL  leftovers after the run:\n  " + "\n  ".join(left))
        else:
            print(f"PASS  nothing left behind by the {len(self.names)} instances of this run")
        return bool(self.failures or left)

    def close(self) -> None:
        """Delete whatever plugin instance is still alive (after an error)."""
        self.factory.close()


# -- incus -----------------------------------------------------------------------------------


def incus_alias(base: Image) -> str:
    """The Incus image alias for a cached image; it changes when the image is rebuilt."""
    return f"ptibench-{base.key}-{int(base.created)}".replace("/", "-").replace(".", "-")


def ensure_incus_image(base: Image, workdir: Path) -> str:
    """Import the cached image's rootfs into Incus once per build; returns the alias."""
    alias = incus_alias(base)
    listing = ib._incus("image", "alias", "list", "--format", "json").stdout
    names = [entry["name"] for entry in json.loads(listing)]
    if alias not in names:
        print(f"  importing {base.rootfs} into incus as {alias}", flush=True)
        ib.import_rootfs(base.rootfs, alias, workdir=workdir)
        stale_prefix = alias.rsplit("-", 1)[0] + "-"
        for name in names:
            if name.startswith(stale_prefix) and name != alias:
                ib._incus("image", "delete", name, check=False)
    return alias


class IncusSide:
    """The incus column for one image: its imported alias, readiness probe and the extra
    arguments of its ``incus launch`` (``--network NAME``, say)."""

    def __init__(self, base: Image, workdir: Path, launch_args: Sequence[str] = ()) -> None:
        self.alias = ensure_incus_image(base, workdir)
        self.launch_args = tuple(launch_args)
        if base.init == "systemd":
            self.ready: dict[str, Any] = {
                "ready_cmd": ib.SYSTEMD_READY_CMD,
                "ready_output": ib.SYSTEMD_READY_OUTPUT,
            }
        else:
            self.ready = {"ready_cmd": ib.EXEC_READY_CMD, "ready_output": None}

    def launch_once(self) -> float:
        """``incus launch`` until ready (the instance is deleted again)."""
        return ib.time_launch(self.alias, 1, **self.ready, launch_args=self.launch_args)[0]

    def running(self) -> contextlib.AbstractContextManager[str]:
        """A running, ready instance (its name), deleted on exit."""
        return ib.launched(self.alias, **self.ready, launch_args=self.launch_args)

    def exec_once(self, name: str) -> None:
        """One ``incus exec NAME -- true``."""
        ib.time_exec(name, 1)


def _raw_true(container: RawContainer) -> None:
    status = container.exec_true()
    if status != 0:
        raise IncusError(f"true in {container.name} returned wait status {status}")


# -- report ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    """One target checked."""

    ok: bool | None  # None: skipped
    text: str
    ratio: bool  # a ratio target (must always hold) rather than an absolute one


def _check(ok: bool | None, text: str, *, ratio: bool) -> Verdict:
    return Verdict(ok, text, ratio)


def verdicts(result: ImageResult) -> list[Verdict]:
    """The targets of issue 2 for one image."""
    image = result.image
    plugin_launch = result.launch["plugin"].median
    raw_launch = result.launch["raw"].median
    plugin_exec = result.exec["plugin"].median
    raw_exec = result.exec["raw"].median
    found = []
    limit = LAUNCH_TARGETS.get(image)
    if limit is not None:
        found.append(
            _check(
                plugin_launch <= limit,
                f"{image} launch-to-ready {_ms(plugin_launch)} <= {_ms(limit)} (quiet machine)",
                ratio=False,
            )
        )
    found.append(
        _check(
            plugin_exec <= EXEC_TARGET,
            f"{image} exec round trip {_ms(plugin_exec)} <= {_ms(EXEC_TARGET)} (quiet machine)",
            ratio=False,
        )
    )
    for what, mine, theirs in (
        ("launch-to-ready", plugin_launch, raw_launch),
        ("exec round trip", plugin_exec, raw_exec),
    ):
        ratio = mine / theirs
        found.append(
            _check(
                ratio <= RAW_RATIO_MAX,
                f"{image} {what} plugin/raw-liblxc {ratio:.2f} <= {RAW_RATIO_MAX}",
                ratio=True,
            )
        )
    if "incus" in result.launch:
        ratio = result.launch["incus"].median / plugin_launch
        found.append(
            _check(
                ratio >= INCUS_RATIO_MIN,
                f"{image} launch-to-ready incus/plugin {ratio:.1f} >= {INCUS_RATIO_MIN}",
                ratio=True,
            )
        )
    else:
        found.append(
            _check(
                None,
                f"{image} launch-to-ready incus/plugin >= {INCUS_RATIO_MIN}: "
                f"{result.incus_skipped}",
                ratio=True,
            )
        )
    return found


def print_table(results: Sequence[ImageResult]) -> None:
    """Medians [min-max] per image, measurement and column, then the ratios."""
    columns = ("plugin", "raw", "incus")
    heads = ("plugin", "raw liblxc", "incus")
    print()
    print(
        f"{'image':<10} {'measurement':<16} "
        + " ".join(f"{h:>22}" for h in heads)
        + f" {'plugin/raw':>11} {'incus/plugin':>13}"
    )
    for result in results:
        for label, table in (("launch-to-ready", result.launch), ("exec round trip", result.exec)):
            cells = [table[c].describe() if c in table else "skipped" for c in columns]
            raw_ratio = table["plugin"].median / table["raw"].median
            incus_ratio = (
                f"{table['incus'].median / table['plugin'].median:.1f}" if "incus" in table else "-"
            )
            print(
                f"{result.image:<10} {label:<16} "
                + " ".join(f"{c:>22}" for c in cells)
                + f" {raw_ratio:>11.2f} {incus_ratio:>13}"
            )
    print("(medians, [min-max] in ms)")
    for result in results:
        if result.incus_skipped:
            print(f"incus column skipped for {result.image}: {result.incus_skipped}")


def _machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Launch-to-ready and exec round trip of pytest-incus containers, against "
        "raw liblxc and Incus.",
    )
    parser.add_argument("-n", "--launches", type=int, default=15, help="launches per side")
    parser.add_argument("--execs", type=int, default=200, help="exec round trips per side")
    parser.add_argument("--incus-launches", type=int, default=None, help="default: --launches")
    parser.add_argument("--incus-execs", type=int, default=50, help="incus exec round trips")
    parser.add_argument("--quick", action="store_true", help="a small N (3 launches, 30 execs)")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), metavar="IMAGE")
    parser.add_argument("--no-incus", action="store_true", help="skip the incus column")
    parser.add_argument("--strict", action="store_true", help="absolute targets fail too")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="image cache (default: the plugin's)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.launches, args.execs, args.incus_execs = 3, 30, 10
    if args.incus_launches is None:
        args.incus_launches = args.launches
    return args


def run_image(
    bench: Bench, image: str, args: argparse.Namespace, incus_reason: str | None
) -> ImageResult:
    """Every measurement of one image."""
    result = ImageResult(image)
    print(f"{image}: preparing (image cache, config check, warm-up)", flush=True)
    base, _ = bench.lower(image)
    bench.check_same_config(image)  # also the warm-up launch of each side
    incus = None
    if incus_reason is None:
        incus = IncusSide(base, bench.settings.cache_dir / "bench")
        incus.launch_once()  # warm-up
    else:
        result.incus_skipped = incus_reason
    sides = "plugin, raw" + (", incus" if incus else "")
    after = ", then incus" if incus else ""
    print(f"{image}: launches (plugin and raw interleaved{after})", flush=True)
    result.launch = bench.measure_launches(image, args.launches, incus, args.incus_launches)
    print(f"{image}: exec round trips ({sides}), interleaved", flush=True)
    result.exec = bench.measure_execs(image, args.execs, incus, args.incus_execs)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and the targets; non-zero exit if a ratio target fails."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (system containers need it)", file=sys.stderr)
        return 2
    settings = Settings(cache_dir=args.cache_dir or default_cache_dir())
    incus_reason = "--no-incus given" if args.no_incus else ib.incus_available()
    print(
        f"pytest-incus launch bench: {args.launches} launches and {args.execs} exec round "
        f"trips per side and image; {_machine()}; cache {settings.cache_dir}",
        flush=True,
    )
    if incus_reason:
        print(f"incus column skipped: {incus_reason}", flush=True)
    bench = Bench(settings)
    results = []
    try:
        for image in args.images:
            results.append(run_image(bench, image, args, incus_reason))
    finally:
        bench.close()
    print_table(results)
    print(f"after the run: {_machine()}")
    print()
    failed = False
    for result in results:
        for verdict in verdicts(result):
            label = "SKIP" if verdict.ok is None else ("PASS" if verdict.ok else "FAIL")
            print(f"{label}  {verdict.text}")
            if verdict.ok is False and (verdict.ratio or args.strict):
                failed = True
    failed = bench.report_failures_and_leftovers() or failed
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
