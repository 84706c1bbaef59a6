"""Who owns an instance: the process that launched it, named by pid and start time.

A pid alone is reused by the kernel; pid plus the process's start time (in clock ticks since
boot, from ``/proc/PID/stat``) names one process for the life of the machine. An instance whose
owner is gone was left by a killed run and may be reaped; one whose owner lives is never touched.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Owner:
    """The process that owns an instance."""

    pid: int
    start_time: int

    @classmethod
    def current(cls) -> Owner:
        """This process."""
        pid = os.getpid()
        start = process_start_time(pid)
        assert start is not None
        return cls(pid, start)

    @classmethod
    def from_dict(cls, data: Any) -> Owner | None:
        """Parse a record; None for a missing or malformed one."""
        try:
            return cls(int(data["pid"]), int(data["start_time"]))
        except (TypeError, KeyError, ValueError):
            return None

    def to_dict(self) -> dict[str, int]:
        """The record, for JSON."""
        return asdict(self)

    def alive(self) -> bool:
        """True while this very process still runs (not merely a process with its pid)."""
        return process_start_time(self.pid) == self.start_time
