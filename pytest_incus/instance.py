"""``Instance``: what a test holds, the same for every kind.

Everything here is kind-independent: the shell-or-argv rule of ``exec``, ``check=True``, the
``docker cp``-like semantics of ``push``/``pull`` and ``file()`` checks. The kind-specific work
is done by the instance's ``Machine``.
"""

from __future__ import annotations

import io
import os
import stat as stat_module
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_incus.errors import ExecError
from pytest_incus.runtimes.protocol import Machine
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import ExecRequest, ExecResult, InstanceState, Stat


@dataclass(frozen=True)
class FileInfo:
    """A path inside an instance, pathlib-like. Ids are as the instance sees them.

    ``mode``, ``uid``, ``gid``, ``size``, ``sha256`` follow symlinks; ``is_symlink`` does not.
    For a missing path ``exists`` is False and the other attributes raise FileNotFoundError.
    """

    path: str
    _instance: Instance
    _stats: tuple[Stat, Stat] | None

    def _followed(self) -> Stat:
        if self._stats is None or not self.exists:  # missing, or a dangling symlink
            raise FileNotFoundError(2, f"no such file in {self._instance.name}", self.path)
        return self._stats[1]

    @property
    def exists(self) -> bool:
        """True if the path exists (a dangling symlink does not)."""
        return self._stats is not None and not (
            self._stats[0].is_symlink and self._stats[1] is self._stats[0]
        )

    @property
    def is_file(self) -> bool:
        """True for a regular file (after following symlinks)."""
        return self.exists and stat_module.S_ISREG(self._followed().mode)

    @property
    def is_dir(self) -> bool:
        """True for a directory (after following symlinks)."""
        return self.exists and stat_module.S_ISDIR(self._followed().mode)

    @property
    def is_symlink(self) -> bool:
        """True if the path itself is a symlink."""
        return self._stats is not None and self._stats[0].is_symlink

    @property
    def mode(self) -> int:
        """Permission bits (``stat.S_IMODE``)."""
        return stat_module.S_IMODE(self._followed().mode)

    @property
    def uid(self) -> int:
        """Owner uid as the instance sees it."""
        return self._followed().uid

    @property
    def gid(self) -> int:
        """Group gid as the instance sees it."""
        return self._followed().gid

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._followed().size

    @property
    def sha256(self) -> str:
        """Hex sha256 of the content."""
        self._followed()
        return self._instance.machine.sha256(self.path)

    def contains(self, text: str | bytes) -> bool:
        """True if the content contains ``text``."""
        self._followed()
        needle = text.encode() if isinstance(text, str) else text
        return needle in self._instance.read_file(self.path)


def _tar_filter(mode: int | None) -> Callable[[tarfile.TarInfo], tarfile.TarInfo]:
    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if mode is not None and info.isfile():
            info.mode = mode
        return info

    return owned_by_root


class Instance:
    """A running system container, app container or VM that a test drives.

    Commands and file methods work the same on every kind. Made by ``instance_factory.launch()``
    or the ``instance`` fixture; gone after ``delete()``.
    """

    def __init__(
        self,
        machine: Machine,
        spec: InstanceSpec,
        *,
        exec_timeout: float,
        on_delete: Callable[[Instance], None],
    ) -> None:
        self.machine = machine
        self.spec = spec
        self._exec_timeout = exec_timeout
        self._on_delete = on_delete
        self._state = InstanceState.RUNNING
        self.kept = False

    def __repr__(self) -> str:
        return f"<Instance {self.name} {self.kind} {self.image} {self._state.name}>"

    @property
    def name(self) -> str:
        """The instance's name (``pytest-incus shell NAME`` opens a shell in it)."""
        return self.machine.name

    @property
    def kind(self) -> str:
        """``container``, ``app`` or ``vm``."""
        return self.spec.kind

    @property
    def image(self) -> str:
        """The image name it was launched from."""
        return self.spec.image

    @property
    def state(self) -> InstanceState:
        """RUNNING, STOPPED or DELETED."""
        if self._state is InstanceState.RUNNING and not self.machine.running():
            self._state = InstanceState.STOPPED
        return self._state

    @property
    def directory(self) -> Path:
        """Where the instance's files live on the host (logs, overlay upper layer)."""
        return self.machine.directory

    # -- commands --------------------------------------------------------------------------

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run ``cmd`` inside: a str through ``/bin/sh -c``, a sequence as is.

        ``env`` is added over the user's default environment and the instance's ``env``;
        ``cwd`` defaults to the user's home; ``user`` (name or uid) to root. ``timeout``
        defaults to ``incus_exec_timeout`` (0: none); past it the command and everything it
        started are killed and ExecTimeoutError is raised. ``check=True`` raises ExecError on a
        non-zero exit.
        """
        if isinstance(cmd, str):
            argv: tuple[str, ...] = ("/bin/sh", "-c", cmd)
        else:
            argv = tuple(cmd)
            if not argv or not all(isinstance(a, str) for a in argv):
                raise TypeError(f"cmd must be a str or a non-empty sequence of str, got {cmd!r}")
        limit = self._exec_timeout if timeout is None else timeout
        request = ExecRequest(
            argv=argv,
            env={**self.spec.env, **(env or {})},
            cwd=cwd,
            user=user,
            input=input.encode() if isinstance(input, str) else input,
            timeout=limit if limit and limit > 0 else None,
        )
        result = self.machine.exec(request)
        if check and not result.ok:
            raise ExecError(
                f"{cmd!r} in {self.name} exited with {result.exit_code}; stderr:\n"
                f"{result.stderr.strip()[-2000:]}",
                cmd=cmd if isinstance(cmd, str) else list(cmd),
                exit_code=result.exit_code,
                stdout_bytes=result.stdout_bytes,
                stderr_bytes=result.stderr_bytes,
                duration=result.duration,
            )
        return result

    # -- files -----------------------------------------------------------------------------

    def push(
        self, local_path: str | os.PathLike[str], remote_path: str, *, mode: int | None = None
    ) -> None:
        """Copy a local file or tree into the instance, as ``docker cp`` does.

        A file becomes ``remote_path`` (or goes into it, if it is a directory); a directory
        becomes ``remote_path`` (merged into it if it exists). Missing parents are created,
        symlinks stay links, everything belongs to root inside; ``mode`` sets the mode of the
        file (of every file, for a tree).
        """
        local = Path(local_path)
        if not local.exists() and not local.is_symlink():
            raise FileNotFoundError(2, "no such local file to push", str(local))
        is_tree = local.is_dir() and not local.is_symlink()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(local, arcname="." if is_tree else local.name, filter=_tar_filter(mode))
        self.machine.put_archive(buffer.getvalue(), remote_path, is_tree)

    def pull(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        """Copy a file or tree out of the instance, as ``docker cp`` does.

        A file becomes ``local_path`` (or goes into it, if it is a directory); a directory
        becomes ``local_path`` (merged into it if it exists). Missing parents are created.
        """
        local = Path(local_path)
        archive = self.machine.get_archive(remote_path)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
            members = tar.getmembers()
            is_tree = bool(members) and members[0].name == "." and members[0].isdir()
            if is_tree or local.is_dir():
                target_dir = local
            else:
                target_dir = local.parent
                members[0].name = local.name
                if local.is_symlink() or local.exists():
                    local.unlink()
            target_dir.mkdir(parents=True, exist_ok=True)
            for member in members:
                tar.extract(member, target_dir, filter=_host_filter)

    def write_file(self, path: str, data: str | bytes, *, mode: int = 0o644) -> None:
        """Create or replace the file ``path`` inside (parents created), owned by root."""
        self.machine.write_file(path, data.encode() if isinstance(data, str) else data, mode)

    def read_file(self, path: str) -> bytes:
        """The content of the file ``path`` inside."""
        return self.machine.read_file(path)

    def read_text(self, path: str) -> str:
        """The content of the file ``path`` inside, as UTF-8 text."""
        return self.read_file(path).decode("utf-8", "replace")

    def file(self, path: str) -> FileInfo:
        """What is at ``path`` inside: ``exists``, ``is_file``, ``mode``, ``sha256``, ..."""
        return FileInfo(path, self, self.machine.stat(path))

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start a stopped instance and wait until it is ready."""
        if self._state is InstanceState.DELETED:
            raise RuntimeError(f"{self.name} was deleted")
        if not self.machine.running():
            self.machine.start()
        self._state = InstanceState.RUNNING

    def stop(self, timeout: float = 30, force: bool = False) -> None:
        """Shut down cleanly within ``timeout`` seconds (then kill), or kill with ``force``."""
        if self._state is InstanceState.DELETED:
            return
        self.machine.stop(timeout, force)
        self._state = InstanceState.STOPPED

    def restart(self) -> None:
        """Stop cleanly, then start and wait until ready."""
        self.stop()
        self.start()

    def delete(self) -> None:
        """Kill the instance and remove everything it had. Idempotent."""
        if self._state is InstanceState.DELETED:
            return
        self._state = InstanceState.DELETED
        self._on_delete(self)

    def logs(self) -> str:
        """The console log (containers, VMs) or the app's output (apps)."""
        return self.machine.logs()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the app's main process to end (kind="app") and return its exit code;
        TimeoutError past ``timeout`` seconds."""
        return self.machine.wait(timeout)


def _host_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Extract safely on the host: nothing outside ``dest``, no ownership from the instance."""
    checked = tarfile.tar_filter(member, dest)
    # None: leave ownership to the extracting user (typeshed does not know None is allowed)
    return checked.replace(uid=None, gid=None, uname=None, gname=None, deep=False)  # type: ignore[arg-type]
