"""System containers on liblxc, through the ``lxc`` Python bindings.

Each instance is an overlayfs clone of a cached image: the image's rootfs (uid-shifted for
unprivileged containers) is the lower layer, ``<instance>/upper`` takes the writes. We write
the LXC config file ourselves and read the rootfs setting back before starting, and a mount hook
proves, before init runs, that the rootfs about to become ``/`` is that overlay (HOST hazard: a
container without a rootfs boots on the host's ``/``).

Commands and file operations go through an exec server that liblxc attach forks into the
container's namespaces once (``inside.serve``, ``server.py``), so paths always resolve inside
the container, and a command costs a spawn, not a fork of the whole calling process.
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_incus import fsutil
from pytest_incus.errors import (
    ConfigError,
    ExecTimeoutError,
    IncusError,
    InstanceStartError,
    setup_error,
    tail,
)
from pytest_incus.images import rootfs
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.runtimes import cgroups, inside, mounts, process, readiness
from pytest_incus.runtimes.liblxc import lxc_errors
from pytest_incus.runtimes.local import LocalRuntime
from pytest_incus.runtimes.server import ExecServer
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import ExecRequest, ExecResult, NetworkAttachment, Stat

log = logging.getLogger("pytest_incus")

ID_BASE = 1_000_000  # host uid/gid of root inside an unprivileged container
ID_COUNT = 65_536
READY_POLL = 0.02
# Measured (unprivileged, cgroup v1): debian/12 boots and runs commands at 24 MiB; at 20 MiB
# and below systemd or the exec server is killed, at 16 MiB liblxc's attach can hang, at
# 1 MiB liblxc fails to start it ("Sync wake failure"). busybox needs 4 MiB.
MIN_MEMORY = 32 << 20
STOP_GRACE = 5  # seconds (liblxc takes an int)
# overlayfs keeps whiteouts and opaque directories in user.overlay.* xattrs (kernel 5.11+), the
# ones a user namespace may set
UNPRIVILEGED_OVERLAY_OPTIONS = "userxattr"

CGROUPS_RECORD = "cgroups.json"  # where the container's cgroups may be, written before start
RESOLV_CONF = "resolv.conf"  # a networked container's /etc/resolv.conf, bound in

_HALT_SIGNALS = {"systemd": "SIGRTMIN+3", "busybox": "SIGUSR2"}


@dataclass(frozen=True)
class HostNetwork:
    """The network of a container that shares the host's network namespace (liblxc's
    ``lxc.net.0.type = none``): the host's interfaces, routes and resolver. Only for image
    builds (runtimes/build.py), which reach the package mirrors; test instances never get it.
    ``resolv_conf`` is the host's ``/etc/resolv.conf``, bound read-only over the image's
    while the container runs, so that the image's own file is what stays in it."""

    resolv_conf: str


def _lxc() -> Any:
    import lxc  # imported late: a host without liblxc can still collect and run other kinds

    return lxc


def _subid_ok(path: str) -> bool:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split(":")
        if len(parts) == 3 and parts[0] in ("root", "0"):
            start, count = int(parts[1]), int(parts[2])
            if start <= ID_BASE and start + count >= ID_BASE + ID_COUNT:
                return True
    return False


def unprivileged_unavailable() -> str | None:
    """Why unprivileged containers cannot start here, or None."""
    missing = [p for p in ("/etc/subuid", "/etc/subgid") if not _subid_ok(p)]
    if missing:
        return (
            f"{' and '.join(missing)} give root no range covering {ID_BASE}-"
            f"{ID_BASE + ID_COUNT - 1}, needed for unprivileged containers; run: usermod "
            f"--add-subuids {ID_BASE}-{ID_BASE + ID_COUNT - 1} --add-subgids "
            f"{ID_BASE}-{ID_BASE + ID_COUNT - 1} root (or use privileged=True)"
        )
    if not Path("/usr/bin/newuidmap").exists():
        return "newuidmap is missing, needed for unprivileged containers: apt-get install uidmap"
    return None


def check_reachable(spec: InstanceSpec, name: str, paths: dict[str, Path]) -> None:
    """ConfigError naming the directory that keeps an unprivileged container's root (uid
    ID_BASE on the host, no capabilities there) from one of ``paths`` (what they are -> path):
    liblxc would only say "Permission denied"."""
    if spec.privileged:
        return
    for what, path in paths.items():
        if found := fsutil.unsearchable(path, ID_BASE, ID_BASE):
            blocker, st = found
            raise ConfigError(
                f"{spec.kind} {name}: root of an unprivileged container is uid {ID_BASE} on the "
                f"host, and it cannot enter {blocker} (mode {stat.S_IMODE(st.st_mode):o}, owner "
                f"uid {st.st_uid}) on the way to its {what} {path}; use a cache directory that "
                "every user can reach (--incus-cache-dir, such as /var/cache/pytest-incus), or "
                f"let others search it (chmod o+x {blocker}), or use privileged=True"
            )


@functools.cache
def _hook_path(cache_dir: Path) -> Path:
    """The rootfs check hook, copied into the cache: an unprivileged container's hook runs as
    its root (a high uid on the host), which may not reach the installed package."""
    source = importlib.resources.files("pytest_incus") / "hooks" / "verify-rootfs"
    data = source.read_bytes()
    dest = cache_dir / "hooks" / "verify-rootfs"
    if not dest.exists() or dest.read_bytes() != data:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(dest.parent, 0o755)
        fsutil.write_atomic(dest, data, mode=0o755)
    return dest


def write_config(
    spec: InstanceSpec,
    name: str,
    directory: Path,
    image: Image,
    hook: Path,
    staged: Sequence[mounts.StagedMount],
    extra: Sequence[str] = (),
    network: NetworkAttachment | HostNetwork | None = None,
) -> None:
    """Write the LXC config file of container ``name`` in ``directory``, and make its overlay
    directories: the one config writer, used by ``Container`` and by the launch benchmark's
    raw liblxc column, so that the two cannot drift apart. ``hook`` is the rootfs check,
    ``staged`` the host paths the host mounts at each start (runtimes/mounts.py), ``extra``
    lines of kinds built on containers (apps), ``network`` its place on a host-only network
    or the host's own network for builds (see ``network_config``)."""
    d = directory
    for sub in ("upper", "work"):
        (d / sub).mkdir(exist_ok=True)
        if not spec.privileged:
            os.chown(d / sub, ID_BASE, ID_BASE)
    os.chmod(d, 0o755)
    os.chmod(d.parent, 0o755)
    rootfs = f"{image.rootfs}:{d / 'upper'}"
    host_root = os.stat("/")
    lines = [
        f"lxc.uts.name = {name}",
        f"lxc.rootfs.path = overlay:{rootfs}",
        *network_config(network, d),
        "lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed:force",
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.pty.max = 16",
        f"lxc.console.logfile = {d / 'console.log'}",
        f"lxc.log.file = {d / 'lxc.log'}",
        "lxc.log.level = ERROR",
        "lxc.apparmor.profile = unconfined",
        f"lxc.signal.halt = {_HALT_SIGNALS.get(image.init, 'SIGPWR')}",
        "lxc.hook.version = 1",
        f"lxc.hook.mount = {hook}",
        f"lxc.environment = PTI_HOST_ROOT={host_root.st_dev}:{host_root.st_ino}",
        f"lxc.environment = PTI_EXPECT_ROOTFS={rootfs}",
        f"lxc.environment = PTI_EXPECT_UPPER={d / 'upper'}",
    ]
    if not spec.privileged:
        lines += [
            f"lxc.idmap = u 0 {ID_BASE} {ID_COUNT}",
            f"lxc.idmap = g 0 {ID_BASE} {ID_COUNT}",
            # liblxc mounts the overlay inside the container's user namespace, where the
            # trusted.overlay.* xattrs of whiteouts and opaque directories cannot be set:
            # without this, removing a directory of the image and making it again fails
            # (EIO, EEXIST, EXDEV). liblxc adds these options to the overlay's own.
            f"lxc.rootfs.options = {UNPRIVILEGED_OVERLAY_OPTIONS}",
        ]
    if spec.cpus is not None:
        key = cgroups.config_key("cpuset", "cpuset.cpus", "cpuset.cpus")
        if key is None:
            raise InstanceStartError(f"cpus={spec.cpus}: this host has no cpuset cgroup")
        lines.append(f"{key} = 0-{spec.cpus - 1}")
    if spec.memory is not None:
        key = cgroups.config_key("memory", "memory.limit_in_bytes", "memory.max")
        if key is None:
            raise InstanceStartError("memory=: this host has no memory cgroup")
        lines.append(f"{key} = {spec.memory}")
    if spec.processes is not None:
        # without it a fork bomb inside fills the host's process table (pids.max is "max")
        key = cgroups.config_key("pids", "pids.max", "pids.max")
        if key is None:
            raise InstanceStartError(
                f"processes={spec.processes}: this host has no pids cgroup controller, so the "
                "number of processes of a container cannot be limited (and a fork bomb inside "
                "would fill the host's process table); enable it: a kernel with "
                "CONFIG_CGROUP_PIDS, and the pids controller mounted (cgroup v1) or enabled "
                "(cgroup v2)"
            )
        lines.append(f"{key} = {spec.processes}")
    # cgroups of its own, not liblxc's host-wide lxc.payload.<name> (see runtimes/cgroups.py)
    lines += cgroups.config_lines(cgroups.container_dir(name, d))
    # the staging paths, which the host mounts at each start (runtimes/mounts.py)
    lines += [entry.config_line() for entry in staged]
    lines += extra
    fsutil.write_atomic(d / "config", "\n".join(lines) + "\n")


def network_config(network: NetworkAttachment | HostNetwork | None, directory: Path) -> list[str]:
    """The LXC config lines of a container's network: none (loopback only); a veth pair
    whose host side joins the network's bridge, with the instance's MAC and static address,
    no gateway (so no default route); or, for image builds only, the host's own network
    namespace (``HostNetwork``). A networked container gets ``/etc/resolv.conf`` naming its
    DNS server, bound read-only from ``directory/resolv.conf`` as container engines do (the
    image's own file, or a symlink to a resolver it does not run, would name servers the
    instance cannot reach; and a bind leaves the image's file as it was)."""
    if network is None:
        return ["lxc.net.0.type = empty"]
    resolv = directory / RESOLV_CONF
    fsutil.write_atomic(resolv, network.resolv_conf)
    bind = f"lxc.mount.entry = {resolv} etc/resolv.conf none bind,ro,create=file 0 0"
    if isinstance(network, HostNetwork):
        # no network namespace of its own: nothing to configure, nothing routed or NATed
        return ["lxc.net.0.type = none", bind]
    interface = ipaddress.IPv4Network(f"{network.address}/{network.prefix}", strict=False)
    return [
        "lxc.net.0.type = veth",
        f"lxc.net.0.link = {network.bridge}",
        f"lxc.net.0.veth.pair = {network.device}",
        "lxc.net.0.name = eth0",
        f"lxc.net.0.hwaddr = {network.mac}",
        # with its broadcast address: liblxc would make a wrong one of a bare prefix
        f"lxc.net.0.ipv4.address = {network.address}/{network.prefix} {interface.broadcast_address}",
        "lxc.net.0.flags = up",
        bind,
    ]


class ContainerRuntime(LocalRuntime):
    """Makes system containers."""

    kind = "container"

    def check(self, spec: InstanceSpec) -> None:
        """Reject what containers cannot do yet."""
        if spec.cpus is not None and spec.cpus > (os.cpu_count() or 1):
            raise ConfigError(f"cpus={spec.cpus} but this host has only {os.cpu_count()} CPUs")
        if spec.memory is not None and spec.memory < MIN_MEMORY:
            raise ConfigError(
                f"memory={spec.memory} bytes is too little for a {self.kind}: give at least "
                f"{MIN_MEMORY >> 20}MiB (a debian/12 container needs about 24MiB to boot and "
                "run commands)"
            )

    def unavailable(self) -> str | None:
        """Why this host cannot run containers, or None."""
        if os.geteuid() != 0:
            return "system containers need root; run pytest as root"
        try:
            _lxc()
        except ImportError:
            return (
                "the lxc Python bindings are missing: apt-get install lxc lxc-dev pkg-config,"
                " then pip install lxc"
            )
        return None

    def create(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        network: NetworkAttachment | None,
    ) -> Container:
        """Prepare the overlay and LXC config of a new container."""
        lower, hook = self.prepare(spec, name, directory, self.context.images)
        return Container(spec, name, directory, lower, hook, network)

    def prepare(
        self, spec: InstanceSpec, name: str, directory: Path, images: ImageStore
    ) -> tuple[Image, Path]:
        """What a new instance of this kind is made of, checked before anything is written:
        the image layer its overlay goes on (uid-shifted for unprivileged instances) and the
        rootfs check hook."""
        if not spec.privileged and (reason := unprivileged_unavailable()):
            raise InstanceStartError(reason)
        image = images.get(spec.image, self.kind)
        lower = image if spec.privileged else images.shifted(image, ID_BASE)
        self.check_image(name, image, lower, images)
        hook = _hook_path(images.settings.cache_dir)
        check_reachable(spec, name, {"image": lower.rootfs, "directory": directory, "hook": hook})
        return lower, hook

    def check_image(self, name: str, image: Image, lower: Image, images: ImageStore) -> None:
        """InstanceStartError for a cached image that cannot boot: an init cut short."""
        if problem := rootfs.init_damage(lower.rootfs):
            # a copy cut short (a full disk, a killed build) boots as "Exec format error"
            raise InstanceStartError(
                f"container {name}: the cached image {image.ref} looks corrupt: {problem} in "
                f"{lower.rootfs}; remove it, and the next launch builds it again: "
                + images.settings.command(f"images prune {image.ref}")
            )

    def reap(self, name: str, directory: Path) -> None:
        """Kill what is left of container ``name`` and remove its cgroups."""
        Container.teardown(name, directory)

    def shell(self, name: str, directory: Path, command: list[str] | None) -> int:
        """Run a login shell (or ``command``) in container ``name`` on this terminal."""
        c = _lxc().Container(name, str(directory.parent))
        if not c.running:
            raise IncusError(f"container {name} is not running")
        argv = command or ["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l']
        env = {"TERM": os.environ.get("TERM", "xterm")}
        status_r, status_w = os.pipe()
        try:
            status = c.attach_wait(
                inside.run_command,
                (argv, env, None, None, status_w),
                env_policy=_lxc().LXC_ATTACH_CLEAR_ENV,
            )
        finally:
            os.close(status_w)
            problem = os.read(status_r, 65536)
            os.close(status_r)
        if problem:
            raise IncusError(f"cannot run {argv!r} in {name}: {json.loads(problem)['message']}")
        return os.waitstatus_to_exitcode(status) if status >= 0 else 1


class Container:
    """One system container."""

    def __init__(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        image: Image,
        hook: Path,
        network: NetworkAttachment | HostNetwork | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        self.directory = directory
        self.image = image
        self.network = network
        self._mounts = mounts.plan(spec.mounts, directory)
        self._write_config(hook)
        lxc = _lxc()
        with lxc_errors(f"container {name}: reading its config", InstanceStartError):
            self._c = lxc.Container(name, str(directory.parent))
            got = self._c.get_config_item("lxc.rootfs.path")
        self._server = ExecServer(
            self._c, name, lxc.LXC_ATTACH_CLEAR_ENV, reap_orphans=self._reap_orphans()
        )
        expected = f"overlay:{image.rootfs}:{directory / 'upper'}"
        if got not in (expected, expected.removeprefix("overlay:")):
            raise InstanceStartError(
                f"{name}: LXC read rootfs {got!r} from the config, expected "
                f"{expected!r}; refusing to start"
            )
        options = "" if spec.privileged else UNPRIVILEGED_OVERLAY_OPTIONS
        if (got := self._c.get_config_item("lxc.rootfs.options")) != options:
            raise InstanceStartError(
                f"{name}: LXC read rootfs options {got!r} from the config, expected {options!r}"
            )

    # -- configuration -------------------------------------------------------------------

    def _write_config(self, hook: Path) -> None:
        write_config(
            self.spec,
            self.name,
            self.directory,
            self.image,
            hook,
            self._mounts,
            self._extra_config(),
            self.network,
        )

    def _extra_config(self) -> list[str]:
        """More LXC config lines, for kinds built on this one (apps, build containers)."""
        return []

    def _reap_orphans(self) -> bool:
        """Whether the exec server collects the orphans of commands itself: for an init that
        collects them late (busybox init: only once a second)."""
        return self.image.init == "busybox"

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start, then wait until init has finished booting."""
        deadline = time.monotonic() + self.spec.boot_timeout
        self._record_cgroups()
        self._stage_mounts()
        # Started by lxc-start, not by the bindings' start(): that one forks this whole
        # process and (liblxc 5.0) moves the caller into the monitor's cgroup, which then has to
        # be undone in every hierarchy; the small lxc-start process takes both costs for us.
        try:
            result = subprocess.run(
                ["lxc-start", "--name", self.name, "--lxcpath", str(self.directory.parent)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
                start_new_session=True,  # what liblxc signals in its group is never the run
            )
        except subprocess.TimeoutExpired:
            raise self._start_error(
                f"lxc-start did not return within boot_timeout={self.spec.boot_timeout}s"
            ) from None
        if result.returncode != 0:
            error = self._start_error("liblxc could not start the container")
            if output := result.stderr.decode(errors="replace").strip():
                error.add_note("lxc-start said:\n" + tail(output))
            raise error
        if self.image.init == "systemd":
            self._wait_systemd(deadline)
        elif self.image.init != "busybox":
            self._check_exec_works()

    def _stage_mounts(self) -> None:
        """Mount the host paths of ``mounts`` on their staging paths, idmapped with this
        container's mapping if it is unprivileged; before liblxc copies the host's mounts."""
        mounts.stage(self._mounts, None if self.spec.privileged else (ID_BASE, ID_COUNT))

    def _record_cgroups(self) -> None:
        """Record where liblxc may make the container's cgroups, before they exist, so that
        teardown and reap find them (and remove nothing else)."""
        paths = cgroups.placements(cgroups.container_dir(self.name, self.directory))
        data = {"paths": [str(p) for p in paths]}
        fsutil.write_atomic(self.directory / CGROUPS_RECORD, json.dumps(data))

    def _check_exec_works(self) -> None:
        """For an init we know nothing of: ready at once, but only if it still runs and a
        command can be attached (an init that exits at once leaves a stopped container)."""
        request = ExecRequest(("true",), {}, "/", None, None, 10.0)
        try:
            self.exec(request)
        except IncusError as exc:
            raise self._start_error(
                f"no command can run in it ({exc}); is its /sbin/init a working init?"
            ) from exc
        if not self.running():
            raise self._start_error("its init exited at once; is its /sbin/init a working init?")

    def _wait_systemd(self, deadline: float) -> None:
        readiness.wait_for_systemd(
            self.exec,
            self.running,
            self._start_error,
            deadline=deadline,
            boot_timeout=self.spec.boot_timeout,
            poll=READY_POLL,
        )

    def _start_error(self, what: str) -> InstanceStartError:
        error = InstanceStartError(f"container {self.name} (image {self.spec.image}): {what}")
        lxc_log = tail(_read(self.directory / "lxc.log"))
        if lxc_log:
            error.add_note("liblxc log:\n" + lxc_log)
        if "Failed to run mount hooks" in lxc_log:
            # the hook's own words are logged by liblxc only at INFO level
            error.add_note(
                "the rootfs check (lxc.hook.mount verify-rootfs) refused to start the "
                "container: what would have become its / was not this instance's own overlay "
                "(or could not be verified), so nothing ran"
            )
        console = tail(self.logs())
        error.add_note("console log:\n" + (console or "(empty: init printed nothing yet)"))
        return error

    def keep(self) -> None:
        """Nothing to add: this host's record of the instance (the factory's) says it."""

    @property
    def ipv4(self) -> str | None:
        """The address of its host-only network lease; None for no network (or the host's,
        for image builds)."""
        return self.network.address if isinstance(self.network, NetworkAttachment) else None

    def running(self) -> bool:
        """True while the container runs."""
        self._server.reap()  # a container whose init ended waits for that zombie to go
        return bool(self._c.running)

    def stop(self, timeout: float, force: bool) -> None:
        """Shut down cleanly (the init's halt signal) within ``timeout``, then kill."""
        self._server.close()  # first: its zombie would keep the container from ending
        with lxc_errors(f"container {self.name}: stopping it"):
            if self._c.running:
                if force or not self._c.shutdown(max(1, round(timeout))):
                    self._c.stop()
                self._c.wait("STOPPED", STOP_GRACE)
        mounts.unstage(self.directory)
        cgroups.remove(recorded_cgroups(self.name, self.directory))

    def destroy(self) -> None:
        """Kill the container and remove its cgroups (the directory goes with the caller)."""
        self._server.close()
        self.teardown(self.name, self.directory)

    @staticmethod
    def teardown(name: str, directory: Path) -> None:
        """Kill container ``name`` (whoever started it) and remove its cgroups."""
        lxc = _lxc()
        if (directory / "config").exists():
            with lxc_errors(f"container {name}: stopping it"):
                c = lxc.Container(name, str(directory.parent))
                if c.running:
                    c.stop()
                    c.wait("STOPPED", STOP_GRACE)
        # after a failed start the monitor is still cleaning up when liblxc returns
        _end_monitor(name, directory.parent)
        mounts.unstage(directory)
        leftover = cgroups.remove(recorded_cgroups(name, directory))
        if leftover:
            log.warning("cgroups of container %s could not be removed: %s", name, leftover)

    def logs(self) -> str:
        """The console log."""
        return _read(self.directory / "console.log")

    def wait(self, timeout: float | None) -> int:
        """Not for system containers: their init runs until the container stops."""
        raise ConfigError(
            f"container {self.name}: wait() is for kind='app' instances; a system container's "
            "init runs until it is stopped (use stop())"
        )

    # -- running things inside -----------------------------------------------------------

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command inside, through the container's exec server (``inside.serve``)."""
        started = time.monotonic()
        argv = list(request.argv)
        message = {
            "op": "exec",
            "argv": argv,
            "env": dict(request.env),
            "cwd": request.cwd,
            "user": request.user,
        }
        try:
            outcome = self._server.request(message, request.input, request.timeout)
        except IncusError as exc:  # a new exec server could not be attached
            if note := self._at_process_limit():
                exc.add_note(note)
            raise
        duration = time.monotonic() - started
        if error := outcome.error:
            where = f"container {self.name}"
            if error["kind"] == "fork":
                raise IncusError(
                    f"{self.spec.kind} {self.name}: cannot start {argv!r}: no new process can "
                    f"be made in it ({error['message']}); "
                    + (self._at_process_limit() or "the host refused it")
                )
            if error["kind"] == "server":
                raise IncusError(f"{where}: {argv!r}: {error['message']}")
            raise setup_error(
                where,
                argv,
                errno=error.get("errno"),
                path=error.get("path"),
                user=error.get("user"),
            ) or IncusError(f"{where}: cannot run {argv!r}: {error['message']}")
        if outcome.timed_out:
            raise ExecTimeoutError(
                f"{argv!r} in {self.name} ran past its timeout of "
                f"{request.timeout}s and was killed with its descendants; raise timeout= "
                "(or incus_exec_timeout) if it needs longer",
                cmd=argv,
                exit_code=outcome.exit_code,
                stdout_bytes=outcome.stdout,
                stderr_bytes=outcome.stderr,
                duration=duration,
            )
        return ExecResult(outcome.exit_code, outcome.stdout, outcome.stderr, duration)

    def _at_process_limit(self) -> str | None:
        """What to say if the container has reached its process limit (the pids cgroup has
        refused a fork), or None."""
        cgroup = cgroups.payload(recorded_cgroups(self.name, self.directory), "pids")
        state = cgroups.processes(cgroup) if cgroup is not None else None
        if state is None or state.limit is None or not state.refused:
            return None
        return (
            f"it has reached its process limit of {state.limit} (processes={state.limit}; "
            f"{state.current} now, {state.refused} forks refused so far). Wait for some of "
            "its processes to end (a runaway command is killed with its descendants at its "
            "exec timeout), or give it more: processes= (ini incus_max_processes)"
        )

    def _operation(self, name: str, *args: Any, data: bytes | None = None) -> bytes:
        outcome = self._server.request({"op": name, "args": args}, data)
        if outcome.error:
            error = outcome.error
            if error["kind"] == "os":  # of the path refused (a parent in the way, say)
                raise OSError(error["errno"], error["message"], error.get("path") or str(args[0]))
            raise IncusError(
                f"container {self.name}: {name} {args[0]!r} failed: {error['message']}"
            )
        return outcome.stdout

    def read_file(self, path: str) -> bytes:
        """The content of ``path`` inside."""
        return self._operation("read", path)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace ``path`` inside."""
        self._operation("write", path, mode, data=data)

    def stat(self, path: str) -> tuple[Stat, Stat] | None:
        """(lstat, stat) of ``path`` inside, or None."""
        try:
            raw = json.loads(self._operation("stat", path))
        except (FileNotFoundError, NotADirectoryError):  # missing, as pathlib says
            return None
        lst = Stat(is_symlink=stat.S_ISLNK(raw["lstat"]["mode"]), **raw["lstat"])
        st = lst if raw["stat"] is None else Stat(is_symlink=False, **raw["stat"])
        return lst, st

    def sha256(self, path: str) -> str:
        """The sha256 of the file at ``path`` inside."""
        return self._operation("sha256", path).decode()

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack ``archive`` at ``dest`` inside (see ``inside.op_put``)."""
        self._operation("put", dest, is_tree, data=archive)

    def get_archive(self, path: str) -> bytes:
        """A tar of ``path`` inside (see ``inside.op_get``)."""
        return self._operation("get", path)


def _monitor_pids(name: str, lxcpath: Path) -> list[int]:
    """Host pids of the LXC monitor of container ``name`` ("[lxc monitor] LXCPATH NAME")."""
    wanted = f"[lxc monitor] {lxcpath} {name}"
    return [pid for pid, cmdline in process.cmdlines() if cmdline == wanted]


def _end_monitor(name: str, lxcpath: Path) -> None:
    """Wait for the monitor of a stopped container to exit; kill it past STOP_GRACE."""
    deadline = time.monotonic() + STOP_GRACE
    while pids := _monitor_pids(name, lxcpath):
        if time.monotonic() > deadline:
            log.warning("LXC monitor of %s did not exit; killing %s", name, pids)
            for pid in pids:
                process.kill_tree(pid)
            return
        time.sleep(0.005)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def recorded_cgroups(name: str, directory: Path) -> list[Path]:
    """The cgroups that container ``name`` in ``directory`` may have (see
    ``Container._record_cgroups``)."""
    recorded = fsutil.read_json(directory / CGROUPS_RECORD)
    if isinstance(recorded, dict) and isinstance(recorded.get("paths"), list):
        return [Path(p) for p in recorded["paths"]]
    if isinstance(recorded, list):  # the parents an older version recorded: liblxc's names
        return cgroups.legacy_paths(name, recorded)
    return cgroups.placements(cgroups.container_dir(name, directory))
