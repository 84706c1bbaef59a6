"""Images of other sources: a cached ``images:`` container and a cached derived image, against a
cached ``debian/12`` launch.

One command, one run (as root, from the repository root)::

    python3 bench/image_launch.py            # 25 launches per column
    python3 bench/image_launch.py --quick    # a small N: a smoke test

Three columns of container launch-to-ready (systemd running, as ``launch.py`` times it), in
rounds that rotate which goes first, so that machine noise hits all three alike:

``debian/12``
    the image debootstrap builds, as every other bench launches it;
``images:debian/12/bench``
    the same root filesystem served by a simplestreams server on loopback: packed once as the
    Incus image tools pack it (a squashfs and a metadata tarball, indexed by Incus's own
    ``incus-simplestreams``), downloaded and verified once by the plugin, then cached by its
    fingerprint. The launch resolves the alias (one index request per session, as in a test
    run) and uses the cached entry;
``debian/12`` + ``packages=["hello"]``
    the derived image (built once: apt installs the ``hello`` package), launched by its ref.

The server's tree lives in ``<cache>/bench/simplestreams`` and is packed again only when the
``debian/12`` entry is rebuilt, so a bench run downloads nothing new on a warm cache.

Targets (issue 12), ratios that must hold in every run: each of the two launches within 1.1x
of the ``debian/12`` one. The exit status is 1 when one fails, when a launch fails, or when an
instance left something behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import launch as lb
from simplestreams_helpers import ImageServer

from pytest_incus import fsutil
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.settings import Settings, default_cache_dir
from pytest_incus.signals import RunSignals

BASE = "debian/12"
REMOTE = "images:debian/12/bench"
PACKAGES = ["hello"]
RATIO_MAX = 1.1  # each column / debian/12, at most


def pack_tree(base: Image, tree: Path) -> None:
    """Pack ``base``'s rootfs as an Incus split image into the simplestreams tree ``tree``
    (made again only when the entry is rebuilt: its time is in the tree's stamp)."""
    stamp = tree / "bench-source.json"
    if fsutil.read_json(stamp) == {"key": base.key, "created": base.created}:
        return
    fsutil.remove_tree(tree)
    work = tree.parent / "bench-pack"
    fsutil.remove_tree(work)
    tree.mkdir(parents=True)
    work.mkdir(parents=True)
    print(f"  packing {BASE} for the simplestreams server (once per build of {BASE})", flush=True)
    metadata = work / "metadata.yaml"
    metadata.write_text(
        "architecture: x86_64\n"
        f"creation_date: {int(base.created)}\n"
        "properties:\n"
        "  description: Debian 12 (pytest-incus bench)\n"
        "  os: debian\n  release: '12'\n  variant: bench\n  architecture: amd64\n"
    )
    with tarfile.open(work / "incus.tar.xz", "w:xz") as tar:
        tar.add(metadata, arcname="metadata.yaml")
    subprocess.run(
        ["mksquashfs", str(base.rootfs), str(work / "root.squashfs"), "-noappend", "-quiet"],
        check=True,
    )
    subprocess.run(
        ["incus-simplestreams", "add", str(work / "incus.tar.xz"), str(work / "root.squashfs")],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    fsutil.remove_tree(work)
    fsutil.write_atomic(stamp, json.dumps({"key": base.key, "created": base.created}))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=25, help="launches per column")
    parser.add_argument("--quick", action="store_true", help="3 launches per column")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.launches = 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table and the targets; non-zero exit if a target fails."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (containers need it)", file=sys.stderr)
        return 2
    cache = args.cache_dir or default_cache_dir()
    print(
        f"pytest-incus image bench: {args.launches} launches per column; {lb._machine()}; "
        f"cache {cache}",
        flush=True,
    )
    run_signals = RunSignals()
    run_signals.install()
    series = {name: lb.Series() for name in ("debian", "images", "derived")}
    try:
        with contextlib.ExitStack() as stack:
            base = ImageStore(Settings(cache_dir=cache)).get(BASE)  # packed for the server
            tree = cache / "bench" / "simplestreams"
            pack_tree(base, tree)
            server = stack.enter_context(ImageServer(tree))
            bench = lb.Bench(Settings(cache_dir=cache, image_server=server.url))
            stack.callback(bench.close)
            started = time.perf_counter()
            remote = bench.store.get(REMOTE)
            print(f"  {REMOTE}: {remote.key} ready in {time.perf_counter() - started:.1f}s")
            derived = bench.store.derive(BASE, packages=PACKAGES)
            print(f"  {BASE} + {PACKAGES}: {derived.ref}", flush=True)
            images = {"debian": BASE, "images": REMOTE, "derived": derived.ref}
            for name in images.values():  # uid-shifted copies and page cache, before timing
                bench.time_plugin(name)
            order = list(images)
            for i in range(args.launches):
                for column in order[i % 3 :] + order[: i % 3]:
                    seconds = bench.time_plugin(images[column])
                    if seconds is not None:
                        series[column].values.append(seconds)
            index_requests = sum(1 for r in server.requests if r[1].endswith("index.json"))
    finally:
        run_signals.hold()
        run_signals.restore()
    print()
    print(f"{'launch-to-ready (systemd running)':40} {'median [min-max]':>24}  ratio")
    for column, label in (
        ("debian", BASE),
        ("images", REMOTE),
        ("derived", f"{BASE} + packages={PACKAGES}"),
    ):
        ratio = series[column].median / series["debian"].median
        print(f"{label:40} {series[column].describe():>24}  {ratio:.2f}x")
    print(f"simplestreams index requests during the launches: {index_requests} (one per session)")
    print()
    failed = False
    for column in ("images", "derived"):
        ratio = series[column].median / series["debian"].median
        ok = ratio <= RATIO_MAX
        failed = failed or not ok
        print(
            f"{'PASS' if ok else 'FAIL'}  {column} launch {ratio:.2f}x of {BASE} "
            f"(target at most {RATIO_MAX}x)"
        )
    failed = bench.report_failures_and_leftovers() or failed
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
