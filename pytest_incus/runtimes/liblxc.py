"""The boundary to liblxc's Python bindings: what they raise becomes an error of ours.

The bindings report most failures by their return values (False, -1), which the callers turn
into errors that say what to do; but they also raise ``RuntimeError`` (a container object that
cannot be made from its config), ``KeyError`` and ``ValueError`` (a config key or value they
refuse) and ``TypeError``. :func:`lxc_errors` maps those, for the block it wraps, to an
``IncusError`` class, the cause kept as ``__cause__`` and ``.exc``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from pytest_incus.errors import IncusError

_RAISED = (RuntimeError, KeyError, ValueError, TypeError, SystemError)


@contextlib.contextmanager
def lxc_errors(what: str, error: Callable[..., IncusError] = IncusError) -> Iterator[None]:
    """Turn what liblxc's bindings raise in the block into ``error``: "``what``: liblxc
    failed: ..."."""
    try:
        yield
    except _RAISED as exc:
        raise error(
            f"{what}: liblxc failed ({type(exc).__name__}: {exc}); its log (lxc.log in the "
            "instance directory) may say more",
            exc=exc,
        ) from exc
