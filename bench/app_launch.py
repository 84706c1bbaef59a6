"""App launch: pytest-incus against LXC's own OCI template, on the same cached busybox image.

One command, one run (as root, from the repository root)::

    python3 bench/app_launch.py            # 15 launches per column
    python3 bench/app_launch.py --quick    # 3 launches: a smoke test

The image: the host's static busybox as an OCI image, built with umoci into a layout under the
cache directory. Both columns run its program, ``busybox true``, and end when it has run:

plugin
    ``InstanceFactory.launch(kind="app", image="oci:LAYOUT:TAG")`` (image already cached: the
    overlay on the unpacked, uid-shifted image, config, ``lxc-execute``), then ``wait()``.
lxc-oci
    what LXC ships for OCI images (HOST facts): ``lxc-create -t oci -- -u oci:LAYOUT:TAG``
    (it copies and unpacks the image for every container), then ``lxc-execute``.

The columns' runs alternate, so machine noise hits both alike. Targets (issue 4): the plugin at
least 3x faster than lxc-oci (a ratio, which must always hold: exit status 1 when it fails), and
at most 60 ms median (for a quiet machine; fails the run only with ``--strict``).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from registry_helpers import build_image

from pytest_incus import fsutil
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings, default_cache_dir

TAG = "bench"
PROGRAM = ["/bin/busybox", "true"]


def plugin_launch(factory: InstanceFactory, ref: str) -> float:
    """Seconds from launch() until the app's program has run."""
    started = time.perf_counter()
    app = factory.launch(kind="app", image=ref, command=PROGRAM)
    code = app.wait(timeout=60)
    took = time.perf_counter() - started
    app.delete()
    if code != 0:
        raise RuntimeError(f"the plugin's app exited {code}: {app.logs()}")
    return took


def lxc_oci_launch(lxcpath: Path, layout: Path) -> float:
    """Seconds from lxc-create -t oci until lxc-execute has run the program."""
    name = f"bench-oci-{secrets.token_hex(4)}"
    base = ["--name", name, "--lxcpath", str(lxcpath)]
    started = time.perf_counter()
    try:
        subprocess.run(
            ["lxc-create", *base, "--template", "oci", "--", "--url", f"oci:{layout}:{TAG}"],
            check=True,
            capture_output=True,
        )
        _check_rootfs(lxcpath / name)
        # the same network as the plugin's apps: none (LXC's default wants a bridge)
        execute = ["lxc-execute", *base, "--define", "lxc.net.0.type=empty", "--", *PROGRAM]
        subprocess.run(execute, check=True, capture_output=True)
        return time.perf_counter() - started
    finally:
        subprocess.run(["lxc-destroy", *base, "--force"], capture_output=True, check=False)


def _check_rootfs(container: Path) -> None:
    """Refuse to run a container whose rootfs is not its own directory (a container without
    one would run on the host's /)."""
    config = (container / "config").read_text()
    wanted = f"lxc.rootfs.path = dir:{container / 'rootfs'}"
    if wanted not in config.splitlines() or not (container / "rootfs" / "bin").is_dir():
        raise RuntimeError(f"{container}: lxc-oci wrote no rootfs of its own; not running it")


def main() -> int:
    """Run the benchmark and print the figures; 1 if the ratio target fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--launches", type=int, default=15, help="launches per column")
    parser.add_argument("--quick", action="store_true", help="3 launches: a smoke test")
    parser.add_argument("--strict", action="store_true", help="the absolute target fails too")
    args = parser.parse_args()
    runs = 3 if args.quick else args.launches

    settings = Settings(cache_dir=default_cache_dir())
    work = settings.cache_dir / f"bench-app-{secrets.token_hex(4)}"
    (work / "lxc").mkdir(parents=True)
    store = ImageStore(settings, progress=lambda message: print(f"  {message}", flush=True))
    factory = InstanceFactory(settings, store)
    layout = work / "layout"
    ref = f"oci:{layout}:{TAG}"
    try:
        build_image(layout, TAG, config=["--config.env=PATH=/bin"])
        plugin_launch(factory, ref)  # fetch, unpack and shift once: the image is cached
        lxc_oci_launch(work / "lxc", layout)  # warm-up
        times: dict[str, list[float]] = {"plugin": [], "lxc-oci": []}
        for _ in range(runs):
            times["plugin"].append(plugin_launch(factory, ref))
            times["lxc-oci"].append(lxc_oci_launch(work / "lxc", layout))
    finally:
        factory.close()
        store.prune(ref)
        fsutil.remove_tree(work)

    plugin = statistics.median(times["plugin"])
    baseline = statistics.median(times["lxc-oci"])
    print(f"\napp launch of a cached busybox image to its program's end ({runs} runs, medians)")
    for column, values in times.items():
        spread = f"[{min(values) * 1000:.1f}-{max(values) * 1000:.1f}]"
        print(f"  {column:8} {statistics.median(values) * 1000:8.1f} ms {spread}")
    print(f"  lxc-oci/plugin {baseline / plugin:.1f}x")
    ratio_ok = baseline >= 3 * plugin
    absolute_ok = plugin <= 0.060
    print(f"{'PASS' if ratio_ok else 'FAIL'}  lxc-oci/plugin {baseline / plugin:.1f} >= 3.0")
    print(
        f"{'PASS' if absolute_ok else 'FAIL'}  plugin {plugin * 1000:.1f} ms <= 60 ms (quiet machine)"
    )
    return 0 if ratio_ok and (absolute_ok or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
