"""The one error a command handler raises to get a ``GenericError`` reply."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (slow under TCG)
if TYPE_CHECKING:
    from typing import Any


class CommandError(Exception):
    """A request that cannot be carried out; its message becomes the reply's ``desc``.

    ``errno`` is set for failures of the guest's filesystem (a missing path and the like), so
    the host can raise the matching OSError; ``path`` is the path it is about when that is not
    the request's own ``path`` argument (an exec's cwd). ``user`` is set when the request names
    a user that the guest's /etc/passwd does not have. The host raises the same error for these
    in every kind of instance (containers run this code too).
    """

    def __init__(
        self,
        desc: str,
        errno: int | None = None,
        *,
        path: str | None = None,
        user: str | None = None,
    ) -> None:
        super().__init__(desc)
        self.desc = desc
        self.errno = errno
        self.path = path
        self.user = user

    def details(self) -> dict[str, Any]:
        """The members of the error reply beyond ``desc``: errno, path and user, when set."""
        found: dict[str, Any] = {}
        for key in ("errno", "path", "user"):
            value = getattr(self, key)
            if value is not None:
                found[key] = value
        return found
