"""The benchmarks run to the end: each one, with the smallest N, on the run's cache.

They reach into the plugin (its config writer, its VM command line) to build their raw
baselines, so a change of the plugin can break them; this is where that shows, not in the
first ``make bench`` of a new machine. Their figures are not judged here (timed tests on a
shared machine prove nothing): only that each prints its verdicts and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_incus.settings import CACHE_ENV, Settings

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _run(script: str, *args: str, settings: Settings, timeout: float) -> str:
    # the plugin of this checkout, whatever another checkout may have installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, CACHE_ENV: str(settings.cache_dir), "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    said = done.stdout + done.stderr
    assert "Traceback" not in said, said
    # 0: every target met; 1: a target missed on this (shared, noisy) machine; anything else
    # is a crash or a usage error
    assert done.returncode in (0, 1), said
    return done.stdout


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("launch.py", ("-n", "1", "--execs", "3", "--images", "busybox", "--no-incus")),
        ("app_launch.py", ("-n", "1")),
    ],
)
def test_container_benchmarks_run_to_the_end(
    script: str, args: tuple[str, ...], settings: Settings
) -> None:
    out = _run(script, *args, settings=settings, timeout=300)
    assert "PASS" in out or "FAIL" in out, out


def test_vm_benchmark_runs_to_the_end(settings: Settings) -> None:
    out = _run(
        "vm_launch.py",
        *("--quick", "--runs", "1", "--cache-dir", str(settings.cache_dir)),
        settings=settings,
        timeout=900,
    )
    assert "agent exec round trip" in out and 'init="systemd"' in out, out


def test_network_benchmark_runs_to_the_end(settings: Settings) -> None:
    out = _run(
        "net_launch.py",
        *("--quick", "-n", "1", "--vm-launches", "1", "--requests", "3", "--no-incus"),
        *("--cache-dir", str(settings.cache_dir)),
        settings=settings,
        timeout=900,
    )
    assert "HTTP round trip" in out and 'vm init="systemd"' in out, out


def test_image_benchmark_runs_to_the_end(settings: Settings) -> None:
    out = _run(
        "image_launch.py",
        *("--launches", "1", "--cache-dir", str(settings.cache_dir)),
        settings=settings,
        timeout=600,
    )
    assert "images:debian/12/bench" in out and "index requests" in out, out


def test_incus_backend_benchmark_runs_to_the_end(settings: Settings) -> None:
    out = _run(
        "incus_backend.py",
        *("-n", "1", "--execs", "3", "--images", "busybox", "--tests", "4"),
        *("--cache-dir", str(settings.cache_dir)),
        settings=settings,
        timeout=600,
    )
    assert "incus-backend/Incus-REST" in out and "-n 4 run of 4 busybox tests" in out, out
    assert "nothing left behind" in out, out
