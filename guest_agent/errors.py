"""The one error a command handler raises to get a ``GenericError`` reply."""

from __future__ import annotations


class CommandError(Exception):
    """A request that cannot be carried out; its message becomes the reply's ``desc``.

    ``errno`` is set for failures of the guest's filesystem (a missing path and the like), so
    the host can raise the matching OSError.
    """

    def __init__(self, desc: str, errno: int | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.errno = errno
