"""The run's tally of instances and images, and the terminal summary made from it.

One :class:`Tally` per process counts what the factory launched (per kind, with the launch
times) and what the image store made (built, downloaded, fetched, derived; boot snapshots
saved). Under pytest-xdist each worker keeps its own and sends it back to the controller with
the worker's output (``config.workeroutput``), where :class:`SummaryPlugin` merges them, so
that the summary covers the whole run::

    pytest-incus: 12 instances: 8 container (median 0.21 s, slowest 0.9 s), 4 vm (...)
    pytest-incus: images built: debian/12 (38.2 s); downloaded: images:alpine/3.20 (1.2 s)

With ``-q`` the summary is one line; a run that launched nothing and made no image has none.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import pytest

WORKER_OUTPUT = "pytest_incus_tally"  # the key of a worker's tally in its workeroutput

# how an image came to be, in the order the summary lists them
HOWS = ("built", "downloaded", "fetched", "derived", "copied")


class Tally:
    """What one run (or one xdist worker of it) launched and made.

    ``launched`` and ``image_made`` are called as things happen; ``to_data`` and ``merge``
    carry a worker's tally to the controller as plain JSON-able data.
    """

    def __init__(self) -> None:
        self._launches: dict[str, list[float]] = {}  # kind -> launch times, in seconds
        self._images: dict[tuple[str, str], float] = {}  # (image, how) -> seconds spent
        self._snapshots: list[str] = []  # the images whose boot snapshots were saved
        self._build_seconds = 0.0  # spent on images in this process (merged ones not)

    def launched(self, kind: str, seconds: float) -> None:
        """An instance of ``kind`` was ready ``seconds`` after its launch began."""
        # a plain str: a Kind is a str subclass, which xdist cannot send to the controller
        self._launches.setdefault(str(kind), []).append(seconds)

    def image_made(self, ref: str, how: str, seconds: float) -> None:
        """The image ``ref`` was made ``how`` (one of :data:`HOWS`) in ``seconds``; an image
        made in several steps (a VM image: its root filesystem, then its disk) is one entry,
        its steps' times added up."""
        self._add_image(ref, how, seconds)
        self._build_seconds += seconds

    def _add_image(self, ref: str, how: str, seconds: float) -> None:
        key = (ref, how)
        self._images[key] = self._images.get(key, 0.0) + seconds

    def snapshot_saved(self, ref: str) -> None:
        """A boot snapshot of the VM image ``ref`` was saved."""
        self._snapshots.append(ref)

    @property
    def build_seconds(self) -> float:
        """Seconds this process spent making images (what a launch that waited for its image
        leaves out of its launch time)."""
        return self._build_seconds

    def __bool__(self) -> bool:
        return bool(self._launches or self._images or self._snapshots)

    def to_data(self) -> dict[str, Any]:
        """The tally as JSON-able data, for :meth:`merge`."""
        return {
            "launches": {kind: list(times) for kind, times in self._launches.items()},
            "images": [[ref, how, seconds] for (ref, how), seconds in self._images.items()],
            "snapshots": list(self._snapshots),
        }

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add another tally's :meth:`to_data` (an xdist worker's) to this one."""
        for kind, times in data.get("launches", {}).items():
            self._launches.setdefault(str(kind), []).extend(float(t) for t in times)
        for ref, how, seconds in data.get("images", []):
            self._add_image(str(ref), str(how), float(seconds))  # not this process's time
        self._snapshots.extend(str(ref) for ref in data.get("snapshots", []))

    def lines(self, verbosity: int = 0) -> list[str]:
        """The summary's lines: none for an empty tally, one when ``verbosity`` < 0 (``-q``)."""
        if not self:
            return []
        if verbosity < 0:
            return [f"pytest-incus: {'; '.join(self._short())}"]
        lines = []
        if self._launches:
            per_kind = ", ".join(
                f"{len(times)} {kind} (median {_seconds(statistics.median(times))}, "
                f"slowest {_seconds(max(times))})"
                for kind, times in sorted(self._launches.items())
            )
            lines.append(f"pytest-incus: {_count(self._instances(), 'instance')}: {per_kind}")
        made = [
            f"{how}: " + ", ".join(f"{ref} ({_seconds(s)})" for ref, s in self._made(how))
            for how in self._hows()
        ]
        if made:
            made[0] = f"images {made[0]}"
        if self._snapshots:
            made.append(f"boot snapshots saved: {len(self._snapshots)}")
        if made:
            lines.append(f"pytest-incus: {'; '.join(made)}")
        return lines

    def _short(self) -> list[str]:
        parts = []
        if self._launches:
            kinds = ", ".join(f"{len(t)} {kind}" for kind, t in sorted(self._launches.items()))
            parts.append(f"{_count(self._instances(), 'instance')} ({kinds})")
        for how in self._hows():
            made = [seconds for _, seconds in self._made(how)]
            parts.append(f"{_count(len(made), 'image')} {how} ({_seconds(sum(made))})")
        if self._snapshots:
            parts.append(f"{_count(len(self._snapshots), 'boot snapshot')} saved")
        return parts

    def _instances(self) -> int:
        return sum(len(times) for times in self._launches.values())

    def _made(self, how: str) -> list[tuple[str, float]]:
        return [(ref, seconds) for (ref, h), seconds in self._images.items() if h == how]

    def _hows(self) -> list[str]:
        present = {how for _, how in self._images}
        return [how for how in (*HOWS, *sorted(present - set(HOWS))) if how in present]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _seconds(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"


class SummaryPlugin:
    """The hooks of the terminal summary: a worker hands its tally to xdist, the controller
    merges the workers' tallies, and the controller (or a run without xdist) writes it."""

    def __init__(self, config: pytest.Config, tally: Tally) -> None:
        self.config = config
        self.tally = tally

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """On an xdist worker: put the tally in the worker's output, which xdist sends to
        the controller once this hook has run."""
        output = getattr(session.config, "workeroutput", None)
        if output is not None:
            output[WORKER_OUTPUT] = self.tally.to_data()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        """On the controller: add the tally of a worker that finished (a worker that crashed
        sends none)."""
        data = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT)
        if isinstance(data, Mapping):
            self.tally.merge(data)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Write the summary (the controller's, or a run's without xdist)."""
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker: its tally goes to the controller
        lines = self.tally.lines(self.config.get_verbosity())
        if lines:
            terminalreporter.ensure_newline()
        for line in lines:
            terminalreporter.write_line(line)
