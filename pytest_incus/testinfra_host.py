"""``Instance.testinfra``: a pytest-testinfra host whose commands run through ``exec``.

testinfra's modules (``package``, ``service``, ``file``, ``process``, ``socket``, ...) each
build a shell command and read its exit status and output through their host's backend. The
backend here hands each command to ``Instance.exec`` as a ``str`` (run by ``/bin/sh -c``, as
testinfra's docker and lxc backends do), so the modules work the same on every kind and
backend, with no ``incus`` or ``docker`` command and no ssh. Output is kept as raw bytes, so
``host.file(path).content`` is the file's exact bytes; text is decoded as UTF-8 with errors
replaced, as ``ExecResult.stdout`` is.

Users: commands run as root (``exec``'s default), or as the ``user`` given to ``host_for``
(through ``exec(user=...)``, so on every kind). testinfra's ``with host.sudo(user):`` wraps the
commands of its block in ``su`` (the images have no sudo; root needs no password for ``su``),
with ``/bin/sh`` as the shell, so it also works for system users whose shell is ``nologin``.

pytest-testinfra is an optional dependency (``pip install 'pytest-incus[testinfra]'``): it is
imported when the first host is made, and a ConfigError says how to install it when it is not
there.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pytest_incus.errors import ConfigError

if TYPE_CHECKING:
    import testinfra.backend.base
    import testinfra.host

    from pytest_incus.instance import Instance

# the connection type testinfra reports (``host.backend.get_connection_type()``) and the
# scheme of the host's pytest id, "incus://NAME"
CONNECTION = "incus"


def host_for(instance: Instance, *, user: str | int | None = None) -> testinfra.host.Host:
    """A new ``testinfra.host.Host`` whose commands run inside ``instance`` through
    ``instance.exec``, as ``user`` (a name or a uid; default root).

    Built as testinfra builds its own hosts (``testinfra.host.get_host``): a backend named
    after the instance, a Host on it, and the Host handed back to the backend. ConfigError when
    pytest-testinfra is not installed.
    """
    __tracebackhide__ = True
    _require_testinfra()
    import testinfra.host

    backend = _backend_class()(instance, user=user)
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host


def _require_testinfra() -> None:
    __tracebackhide__ = True
    try:
        import testinfra.host  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"instance.testinfra needs pytest-testinfra, which is not installed ({exc}); "
            "install it with: pip install 'pytest-incus[testinfra]'",
            exc=exc,
        ) from exc


@functools.cache
def _backend_class() -> type[testinfra.backend.base.BaseBackend]:
    """The backend class, made once testinfra is known to be importable (its base class is
    testinfra's, which the extra brings)."""
    from testinfra.backend.base import BaseBackend, CommandResult

    class ExecBackend(BaseBackend):  # type: ignore[misc]  # testinfra ships no type hints
        """A testinfra backend that runs every command with ``Instance.exec``."""

        NAME = CONNECTION

        def __init__(self, instance: Instance, *, user: str | int | None = None) -> None:
            super().__init__(instance.name)
            self.instance = instance
            self.user = user

        def __repr__(self) -> str:  # shown in testinfra's assertion messages
            return f"<{CONNECTION} backend of {self.instance.kind} {self.instance.name}>"

        def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
            """Run ``command`` (with ``args`` quoted into its ``%s``, as testinfra does)
            through ``/bin/sh -c`` inside the instance; never raises for a non-zero exit."""
            __tracebackhide__ = True
            cmd = self.get_command(command, *args)
            result = self.instance.exec(cmd, user=self.user, check=False)
            return self.result(
                result.exit_code, self.encode(cmd), result.stdout_bytes, result.stderr_bytes
            )

        def get_sudo_command(self, command: str, sudo_user: str | None) -> str:
            # su, not sudo: root (exec's default) switches without a password, and the
            # images have su (util-linux, busybox); -s: system users' shell is nologin
            return str(self.quote("su -s /bin/sh -c %s %s", command, sudo_user or "root"))

        def get_encoding(self) -> str:
            # what the plugin decodes with everywhere (ExecResult.stdout); testinfra's own
            # guess runs Python inside, which busybox images do not have
            return "utf-8"

        def decode(self, data: bytes) -> str:
            return data.decode("utf-8", "replace")

        def encode(self, data: str) -> bytes:
            return data.encode("utf-8")

    return ExecBackend
