"""Application containers: an OCI image's program run on liblxc, as Incus runs them.

An app is a container (``container.py``: the same overlay on the cached, uid-shifted image, the
same config, rootfs check and exec server) whose first process is the image's program, started
by ``lxc-execute``: liblxc puts its small ``init.lxc`` at PID 1, which runs the program and
ends the container with the program's exit code as ``lxc-execute``'s own. ``lxc-execute`` is our
child: its stdout and stderr (the app's) go to ``app.log`` (``logs()``), its exit is ``wait()``.

From the image config: Entrypoint and Cmd (the marker's ``command`` replaces both), Env (the
marker's ``env`` is added over it), WorkingDir, and User, resolved through the image's own
``/etc/passwd`` and ``/etc/group``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

from pytest_incus.errors import (
    ConfigError,
    InstanceStartError,
    NotRunningError,
    WaitTimeoutError,
)
from pytest_incus.images.ref import OCI_PREFIXES
from pytest_incus.images.rootfs import inside
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.runtimes import process
from pytest_incus.runtimes.container import (
    Container,
    ContainerRuntime,
)
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import ExecRequest, ExecResult, NetworkAttachment

LOG = "app.log"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNNING_POLL = 0.005
STOP_WAIT = 5.0  # seconds for lxc-execute to end once its container is stopped


class AppRuntime(ContainerRuntime):
    """Makes application containers from OCI images."""

    kind = "app"

    def check(self, spec: InstanceSpec) -> None:
        """Reject what apps cannot do yet (the container checks), and non-OCI images."""
        super().check(spec)
        if not spec.image.startswith(OCI_PREFIXES):
            raise ConfigError(
                f"image {spec.image!r}: kind='app' runs OCI images; name one as "
                "docker://HOST/NAME:TAG, oci:/PATH/TO/LAYOUT:TAG or oci-archive:/PATH.tar"
            )

    def unavailable(self) -> str | None:
        """Why this host cannot run apps (what containers need, and the OCI tools), or None."""
        if reason := super().unavailable():
            return reason
        missing = [tool for tool in ("lxc-execute", "skopeo", "umoci") if not shutil.which(tool)]
        if missing:
            return f"{', '.join(missing)} missing: apt-get install lxc skopeo umoci"
        return None

    def create(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        network: NetworkAttachment | None,
    ) -> App:
        """Fetch (or find) the image and prepare the app's overlay and LXC config."""
        lower, hook = self.prepare(spec, name, directory, self.context.images)
        return App(spec, name, directory, lower, hook, network)

    def check_image(self, name: str, image: Image, lower: Image, images: ImageStore) -> None:
        """Nothing to check: an app runs its own program, not the image's /sbin/init (whether
        the image has that program, ``App`` checks)."""


def user_ids(rootfs: Path, user: str) -> tuple[int, int]:
    """uid and gid of an OCI ``User`` ("name", "uid", "name:group", "uid:gid"), looked up in
    the image's own passwd and group files (read as files of the image, never the host's)."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")

    def lookup(table: str, key: str) -> list[str] | None:
        path = rootfs / "etc" / table
        if path.is_symlink() or not path.is_file():
            return None
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and key in (fields[0], fields[2]):
                return fields
        return None

    if name.isdigit():
        uid, gid = int(name), int(name)
        entry = lookup("passwd", name)
        if entry:
            gid = int(entry[3])
    else:
        entry = lookup("passwd", name)
        if entry is None:
            raise InstanceStartError(f"the image's user {name!r} is not in its /etc/passwd")
        uid, gid = int(entry[2]), int(entry[3])
    if group:
        if group.isdigit():
            gid = int(group)
        elif (found := lookup("group", group)) is not None:
            gid = int(found[2])
        else:
            raise InstanceStartError(f"the image's group {group!r} is not in its /etc/group")
    return uid, gid


def find_program(rootfs: Path, program: str, path_env: str, cwd: str) -> str | None:
    """The path, as the app sees it, of the program ``program`` names (a path, or a name looked
    up in ``path_env``, as execvp does), if ``rootfs`` has it as an executable file."""
    if "/" in program:
        candidates = [program if program.startswith("/") else f"{cwd or '/'}/{program}"]
    else:
        candidates = [f"{d or '.'}/{program}" for d in path_env.split(":")]
    for candidate in candidates:
        found = inside(rootfs, candidate if candidate.startswith("/") else f"/{candidate}")
        if found is not None and found.is_file() and os.stat(found).st_mode & 0o111:
            return candidate
    return None


class App(Container):
    """One application container."""

    def __init__(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        image: Image,
        hook: Path,
        network: NetworkAttachment | None = None,
    ) -> None:
        if image.app is None:
            raise InstanceStartError(f"image {spec.image!r} has no OCI config recorded")
        self.config = image.app
        self.argv = list(spec.command or (*image.app.entrypoint, *image.app.cmd))
        if not self.argv:
            raise InstanceStartError(
                f"image {spec.image!r} names no program (no Entrypoint or Cmd): "
                "give one with command=[...]"
            )
        # init.lxc fails silently (exit code 255, nothing on stderr) on a program it cannot
        # exec: say which one, and where it was looked for
        search = {**self._image_env(), **spec.env}.get("PATH", DEFAULT_PATH)
        program = self.argv[0]
        if find_program(image.rootfs, program, search, image.app.working_dir) is None:
            where = f"in PATH={search}" if "/" not in program else "at that path"
            raise InstanceStartError(
                f"image {spec.image!r} has no program {program!r} {where} (an executable "
                "file); give command=[...] naming a program the image has"
            )
        self._execute: subprocess.Popen[bytes] | None = None
        self._exit_code: int | None = None  # of the last run, once collected
        self._log: IO[bytes] | None = None
        super().__init__(spec, name, directory, image, hook, network)

    def _extra_config(self) -> list[str]:
        uid, gid = user_ids(self.image.rootfs, self.config.user)
        # the loopback interface up, as container engines give it (a system container's init
        # brings it up itself; an app's program does not)
        lines = ["lxc.net.0.flags = up", f"lxc.init.uid = {uid}", f"lxc.init.gid = {gid}"]
        if self.config.working_dir:
            lines.append(f"lxc.init.cwd = {self.config.working_dir}")
        env = self._image_env()
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(self.spec.env)
        lines += [f"lxc.environment = {key}={value}" for key, value in env.items()]
        return lines

    def start(self) -> None:
        """Start the program with ``lxc-execute``; ready once its container runs (or the
        program has already ended)."""
        deadline = time.monotonic() + self.spec.boot_timeout
        self._reap_execute()
        self._exit_code = None
        self._record_cgroups()
        self._stage_mounts()
        self._log = open(self.directory / LOG, "ab")  # noqa: SIM115 (kept for the app's life)
        lxcpath = str(self.directory.parent)
        # --quiet: lxc-execute is also the container's monitor, and liblxc's own errors would
        # go to the app's stderr, i.e. its logs() (each exec's attach makes liblxc 5.0.2 log
        # 'Unsupported config key "lxc.seccomp"' there); they still go to lxc.log
        self._execute = subprocess.Popen(
            ["lxc-execute", "--quiet", "--name", self.name, "--lxcpath", lxcpath, "--", *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        while not self._c.running:
            if self._execute.poll() is not None:
                return  # it ran and ended already: wait() and logs() tell
            if time.monotonic() > deadline:
                raise self._start_error(
                    f"lxc-execute did not start {self.argv!r} within "
                    f"boot_timeout={self.spec.boot_timeout}s"
                )
            time.sleep(RUNNING_POLL)

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command in the running app, with the image's Env under the request's."""
        return super().exec(dataclasses.replace(request, env={**self._image_env(), **request.env}))

    def _image_env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.env if "=" in item)

    def running(self) -> bool:
        """True while the app's container runs."""
        return super().running() and self._execute is not None and self._execute.poll() is None

    def wait(self, timeout: float | None) -> int:
        """Wait for the program to end; its exit code (WaitTimeoutError past ``timeout``)."""
        if self._execute is None:
            if self._exit_code is not None:
                return self._exit_code
            raise NotRunningError(f"wait(): app {self.name} was never started; start() it")
        try:
            return self._execute.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise WaitTimeoutError(
                f"wait(timeout={timeout}): app {self.name} ({self.argv!r}) still runs after "
                f"{timeout}s; wait longer, or stop() it",
                exc=exc,
            ) from exc

    def stop(self, timeout: float, force: bool) -> None:
        """Stop the app's container (its program gets the halt signal, then is killed)."""
        super().stop(timeout, force)
        self._reap_execute()

    def destroy(self) -> None:
        """Kill the app and remove its cgroups (the directory goes with the caller)."""
        super().destroy()
        self._reap_execute()

    def _reap_execute(self) -> None:
        if self._execute is not None:
            try:
                self._execute.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                process.kill_tree(self._execute.pid)  # our own child, by pid
                self._execute.wait()
            self._exit_code = self._execute.returncode
            self._execute = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def logs(self) -> str:
        """The app's stdout and stderr, as it wrote them."""
        try:
            return (self.directory / LOG).read_text(errors="replace")
        except OSError:
            return ""
