"""Helpers of the plugin tests: inner test headers, the pytest-incus command, instance names."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pytest_incus import network, registry
from pytest_incus.settings import Settings

# Put at the top of an inner test module: record(instance) notes the instance's name in
# ./names/, so the outer test knows which instances the inner run launched.
INNER_HEADER = """\
import os, pathlib, time
import pytest

NAMES = pathlib.Path(__file__).parent / "names"

def record(instance):
    NAMES.mkdir(exist_ok=True)
    (NAMES / instance.name).write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
"""


def hold_module(options: str = "") -> str:
    """An inner test module whose test launches a busybox container (with the marker options
    ``options``, say ``name="x"``), says "ready" with its name, then holds it until the outer
    test creates "release" (or the inner deadline passes), and checks it still works."""
    marker = ", ".join(['kind="container"', 'image="busybox"', *([options] if options else [])])
    return (
        INNER_HEADER
        + f"""
HERE = pathlib.Path(__file__).parent

@pytest.mark.instance({marker})
def test_hold(instance):
    record(instance)
    (HERE / "ready").write_text(instance.name)
    deadline = time.monotonic() + 120
    while not (HERE / "release").exists():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.05)
    assert instance.exec("echo still here").stdout == "still here\\n"
"""
    )


def wait_until(condition: Callable[[], object], deadline: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"{what}: not after {deadline}s"
        time.sleep(0.05)


def cli_command() -> str:
    """The installed ``pytest-incus`` console command."""
    path = shutil.which("pytest-incus")
    assert path is not None, "pytest-incus is not installed (pip install -e .)"
    return path


def run_cli(
    cache: Path, *args: str, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``pytest-incus --cache-dir CACHE ARGS...``."""
    return subprocess.run(
        [cli_command(), "--cache-dir", str(cache), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


class InnerInstances:
    """The instances that inner runs in ``pytester.path`` recorded with ``record()``; whatever
    of them still exists when the test ends is removed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.caches: set[Path] = set()

    def names(self) -> list[str]:
        names_dir = self.root / "names"
        return sorted(p.name for p in names_dir.iterdir()) if names_dir.is_dir() else []

    def workers(self) -> dict[str, str]:
        """Instance name -> the xdist worker (or "main") that launched it."""
        return {name: (self.root / "names" / name).read_text() for name in self.names()}

    def cleanup(self) -> None:
        for cache in self.caches:
            settings = Settings(cache_dir=cache)
            for name in self.names():
                directory = settings.instances_dir / name
                if directory.exists():
                    record = registry.read_record(directory)
                    kind = record.kind if record else "container"
                    registry.remove_instance(settings, name, kind)
            network.sweep(settings)


# Plugins of this machine's Python that only slow every inner run down.
QUIET_PLUGINS = ["-p", "no:hypothesispytest", "-p", "no:benchmark"]


def cache_args(cache: Path) -> list[str]:
    """Arguments of an inner run on the cache ``cache``."""
    return [f"--incus-cache-dir={cache}", "-p", "no:cacheprovider", *QUIET_PLUGINS]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class InnerRun:
    """An inner pytest run in a session of its own (so that its process group is only it and
    its workers), its output in a file."""

    def __init__(self, root: Path, cache: Path, *extra: str) -> None:
        self.root = root
        self.log = open(root / "inner.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *cache_args(cache), "-q", *extra],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a run started in the background (`make test &`, a CI runner) inherits SIGINT
            # ignored, and Python then keeps it ignored: the inner run must get Ctrl-C's
            preexec_fn=_default_sigint,
        )

    def output(self) -> str:
        """What the run printed so far."""
        self.log.flush()
        return (self.root / "inner.log").read_text(errors="replace")

    def wait_for(self, *markers: str, deadline: float = 180) -> None:
        """Wait until the run's tests have written ``markers`` (it must still run)."""

        def written() -> bool:
            assert self.proc.poll() is None, f"the inner run ended early:\n{self.output()}"
            return all((self.root / m).exists() for m in markers)

        wait_until(written, deadline, f"the inner run did not write {markers}")

    def end(self, signum: int, group: bool, deadline: float = 60) -> tuple[int, float]:
        """Send ``signum`` to the run (its process group, or its main process only) and wait
        for it to exit: (exit status, seconds it took)."""
        started = time.monotonic()
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            os.kill(self.proc.pid, signum)
        status = self.proc.wait(timeout=deadline)
        return status, time.monotonic() - started

    def wait(self, deadline: float = 120) -> int:
        """Wait for the run to end by itself; its exit status."""
        return self.proc.wait(timeout=deadline)

    def stop(self) -> None:
        """Kill what is left of the run (only if a check failed before it ended)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()
