"""SIGTERM and SIGHUP end a run as Ctrl-C does: its instances are deleted, the exit status is 2.

CI systems cancel a job with SIGTERM (a closed terminal sends SIGHUP), whose default action
kills pytest on the spot and leaves every instance of the run running. While a run is
configured, both signals raise :class:`Terminated` (a ``KeyboardInterrupt``) in the main
thread instead: pytest then tears the run down exactly as after Ctrl-C (fixtures finalized,
the factory closed, a half-made instance removed by the launch that was cut short) and exits
with its interrupted status.

Only the first signal interrupts: the ones that follow while the run tears down are noted and
ignored, so that a second SIGTERM cannot cut that teardown short. The controller of a
pytest-xdist run passes the signal on to its workers (their pid and start time are known, so
that no other process can get it): each ends its own tests and deletes its own instances at
once, rather than when execnet gives up waiting on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from pytest_incus.ownership import Owner

log = logging.getLogger("pytest_incus")

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The run was asked to end by a signal (SIGTERM, SIGHUP): pytest ends it as for Ctrl-C."""


class RunSignals:
    """The SIGTERM and SIGHUP handlers of one run, between ``install()`` and ``restore()``."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._forward_to: set[Owner] = set()
        self._holding = False

    def install(self) -> None:
        """Handle the signals from now on; only in the main thread, where Python runs
        handlers (in another thread a run keeps the handlers it has)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before ``install()``."""
        while self._previous:
            signum, previous = self._previous.popitem()
            signal.signal(signum, previous)

    def hold(self) -> None:
        """From now on note the signals but do not interrupt: the run is tearing down
        already, which is all that a signal would ask for."""
        self._holding = True

    def forward_to(self, owner: Owner) -> None:
        """Pass the signal on to the process ``owner`` too (an xdist worker of this run)."""
        self._forward_to.add(owner)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None or self._holding:
            log.warning("%s received while the run tears down; finishing the teardown", sig.name)
            self.received = self.received or sig
            return
        self.received = sig
        for owner in self._forward_to:
            if owner.alive():  # that very process, not another with its pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(owner.pid, signum)
        raise Terminated(f"{sig.name} received: deleting this run's instances, as for Ctrl-C")
