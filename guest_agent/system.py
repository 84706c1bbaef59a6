"""The guest's clock and random pool: what a guest resumed from a boot snapshot must not share
with the snapshot (or with the other guests resumed from it).

A guest restored from a snapshot wakes with the snapshot's wall clock and the snapshot's random
state: every guest restored from it would draw the same "random" numbers. The host sets the
clock (``guest-set-time``, as QEMU's own agent does) and hands in fresh bytes from its own
random source (``pti-add-entropy``), which are credited to the kernel's pool and followed by a
reseed, so the next read of ``/dev/urandom`` differs from guest to guest.
"""

from __future__ import annotations

import time

from guest_agent.errors import CommandError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    from typing import Any

# ioctls of random(4): RNDADDENTROPY = _IOW('R', 0x03, int[2]), RNDRESEEDCRNG = _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MAX_ENTROPY = 4096  # bytes per request; the pool itself is 256 bits


def set_time(args: dict[str, Any]) -> None:
    """``guest-set-time``: set the wall clock to ``time`` (ns since the epoch)."""
    if "time" not in args:
        raise CommandError(
            "guest-set-time without a time (read from the RTC) is not supported by this "
            "agent; pass time in nanoseconds since the epoch"
        )
    ns = args["time"]
    if not isinstance(ns, int) or ns <= 0:
        raise CommandError(f"guest-set-time: time must be a positive integer of ns, not {ns!r}")
    time.clock_settime_ns(time.CLOCK_REALTIME, ns)


def add_entropy(args: dict[str, Any]) -> None:
    """``pti-add-entropy``: credit ``data`` (base64) to the kernel's random pool and reseed."""
    import base64
    import binascii
    import fcntl
    import os
    import struct

    try:
        data = base64.b64decode(str(args["data"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CommandError(f"pti-add-entropy: data is not base64: {exc}") from None
    if not 0 < len(data) <= MAX_ENTROPY:
        raise CommandError(f"pti-add-entropy: give 1 to {MAX_ENTROPY} bytes, not {len(data)}")
    data += b"\0" * (-len(data) % 4)  # the kernel reads whole 32-bit words
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", 8 * len(data), len(data)) + data)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
