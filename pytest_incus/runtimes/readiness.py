"""Readiness of a systemd guest, the same rule for every kind: ``systemctl is-system-running``
says ``running`` or ``degraded``."""

from __future__ import annotations

import time
from collections.abc import Callable

from pytest_incus.errors import ExecTimeoutError, IncusError, InstanceStartError
from pytest_incus.values import ExecRequest, ExecResult

READY_STATES = ("running", "degraded")


def wait_for_systemd(
    exec_: Callable[[ExecRequest], ExecResult],
    running: Callable[[], bool],
    start_error: Callable[[str], InstanceStartError],
    *,
    deadline: float,
    boot_timeout: float,
    poll: float,
) -> None:
    """Poll ``systemctl is-system-running --wait`` through ``exec_`` until systemd has
    finished booting; ``start_error(what)`` for an instance that stops, a channel that fails,
    or the deadline."""
    last = ""
    while (left := deadline - time.monotonic()) > 0:
        if not running():
            raise start_error("it stopped while systemd was booting")
        request = ExecRequest(
            ("systemctl", "is-system-running", "--wait"), {}, "/", None, None, left
        )
        try:
            result = exec_(request)
        except ExecTimeoutError:
            break
        except IncusError as exc:
            raise start_error(f"no command could run while it booted: {exc}") from exc
        state = result.stdout.strip()
        last = (result.stdout + result.stderr).strip()
        if state in READY_STATES:
            return
        if state == "stopping":
            break
        # "offline" only means systemctl cannot reach the manager yet (early boot, before its
        # private socket exists): keep polling until the deadline
        time.sleep(poll)
    raise start_error(
        f"systemd did not finish booting within {boot_timeout}s (is-system-running said "
        f"{last!r}); raise boot_timeout or look at the console log below"
    )
