"""One instance on an Incus server: the incus backend's ``Machine``.

The instance is created on the server at its first ``start()`` (POST /1.0/instances, in the
client's project, on ``--incus-target`` if given), from the source the images module gives, with
the spec's limits as Incus config keys, the ``user.pytest-incus.*`` keys of ``owners``, the
spec's mounts as disk devices and its network as a nic (``networks``). Then each ``start()`` is
PUT .../state start, and readiness follows the rule of every kind: a systemd init is ready when
``systemctl is-system-running`` says running or degraded (``runtimes.readiness``), any other init
at once, an app as soon as it runs.

Commands go through ``incus.exec``, files through ``incus.files``. Server errors are translated
here, once: an instance gone from the server is NotRunningError, a name taken ConfigError, a
type the server cannot run UnavailableError with Incus's own words.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_incus.errors import (
    ConfigError,
    IncusError,
    InstanceStartError,
    NotRunningError,
    ServerError,
    UnavailableError,
    WaitTimeoutError,
    tail,
)
from pytest_incus.incus import exec as incus_exec
from pytest_incus.incus import files, owners
from pytest_incus.incus.images import APP_EXIT, APP_LOG
from pytest_incus.ownership import Owner
from pytest_incus.runtimes import mounts, readiness
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import ExecRequest, ExecResult, NetworkAttachment, Stat

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient
    from pytest_incus.incus.images import Source
    from pytest_incus.incus.networks import Placement
    from pytest_incus.incus.runtime import IncusRuntime

log = logging.getLogger("pytest_incus")

READY_POLL = 0.05
LIVE = ("Running", "Stopping", "Freezing", "Frozen")  # statuses of an instance not yet down
MOUNT_PREFIX = "pti-mount"  # the disk devices of the spec's mounts
NO_IDMAP = "idmapping abilities are required"  # Incus, of a filesystem it cannot idmap
STATE_POLL = 0.05
# seconds a start error waits for the console of an init that ended: its container is still
# going down then, and Incus's console endpoint fails until the log file has what init printed
CONSOLE_SETTLE = 5.0
INSIDE_TIMEOUT = 60.0  # seconds for one file operation run inside (stat, cat, chmod, readlink)
# Incus asks for cgroup:mixed, which liblxc ignores in a cgroup namespace (it leaves the
# mounts to the container's init): an init that is not systemd (busybox's) would see an empty
# /sys/fs/cgroup, and no limits. Forced, as the local backend's containers have them.
CGROUP_MOUNT = "lxc.mount.auto = cgroup:mixed:force"
INIT_EXEC_FAILED = 'Failed to exec "/sbin/init"'  # liblxc's words, in its log
# What PID 1 is, for an image whose init the plugin did not build: its comm, and the name of
# the program it runs. The comm alone says "init" while systemd, run as /sbin/init, has not
# renamed itself yet (seen on a loaded machine); /proc/1/exe names the program from the
# start. readlink where there is one; the comm with shell builtins only, in any POSIX sh.
INIT_PROBE = 'read c < /proc/1/comm; e=$(readlink /proc/1/exe 2>/dev/null); echo "$c ${e##*/}"'


def refused_type(exc: ServerError) -> bool:
    """True if Incus refused the instance type itself (no driver for it on the server)."""
    return "is not supported on this server" in str(exc)


def refused_target(exc: ServerError) -> bool:
    """True if Incus refused ``?target=`` (--incus-target): no such cluster member or group,
    or a server that is not a cluster (Incus 6.0's words; 404 or 400)."""
    text = str(exc)
    return (
        "Target only allowed when clustered" in text
        or ("Cluster member" in text and "not found" in text)
        or ("Cluster group" in text and "doesn't exist" in text)
    )


def name_taken(exc: ServerError) -> bool:
    """True if Incus refused a create because the name is taken (Incus 6.0 says so with a
    database error and status 500, not 409)."""
    text = str(exc)
    return exc.status == 409 or "UNIQUE constraint failed" in text or "already exists" in text


def _idmap_base(instance: dict[str, Any]) -> tuple[int, int] | None:
    """(host uid of root inside, ids mapped) of an unprivileged container, from Incus's
    ``volatile.idmap.next`` (the map its next start uses); None if it has none."""
    raw = (instance.get("config") or {}).get("volatile.idmap.next", "")
    with contextlib.suppress(ValueError, TypeError, KeyError):
        for entry in json.loads(raw or "[]"):
            if entry.get("Isuid") and entry.get("Nsid") == 0:
                return int(entry["Hostid"]), int(entry["Maprange"])
    return None


class IncusMachine:
    """One instance on an Incus server."""

    def __init__(
        self, runtime: IncusRuntime, spec: InstanceSpec, name: str, directory: Path
    ) -> None:
        self.runtime = runtime
        self.spec = spec
        self.name = name
        self.directory = directory  # the local record's; nothing of the instance is here
        self.owner = Owner.current()
        self._source: Source | None = None
        self._created = False
        self._placement: Placement | None = None  # on its network, as placed
        self.network: NetworkAttachment | None = None
        """Its place on its network (``Instance.network``), once started: the Incus bridge,
        the host side of its veth pair (a new one at every start), address, MAC."""
        self._started_once = False
        self._console = b""  # the console log as read so far (see logs())

    @property
    def client(self) -> IncusClient:
        """The server's client."""
        return self.runtime.client

    @property
    def _path(self) -> str:
        return f"/1.0/instances/{self.name}"

    @property
    def _where(self) -> str:
        return f"{self.spec.kind} {self.name} on Incus server {self.client.remote}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """The one translation of server errors for this instance: gone -> NotRunningError."""
        try:
            yield
        except ServerError as exc:
            if exc.status == 404 or "Instance not found" in str(exc):
                raise NotRunningError(
                    f"{self._where}: {what}: the instance is gone from the server (deleted "
                    "outside the plugin?); launch a new one",
                    exc=exc,
                ) from exc
            raise

    # -- creation ---------------------------------------------------------------------------

    def _request(self, source: Source) -> dict[str, Any]:
        """The body of POST /1.0/instances."""
        spec = self.spec
        config: dict[str, str] = {}
        if spec.cpus is not None:
            # CPUs 0 to N-1, as the local backend pins them (a bare count would let Incus
            # balance them over the server's CPUs: which ones the instance sees would vary)
            config["limits.cpu"] = f"0-{spec.cpus - 1}"
        if spec.memory is not None:
            config["limits.memory"] = str(spec.memory)  # bytes: Incus takes a plain number
        if spec.processes is not None and spec.kind != "vm":
            config["limits.processes"] = str(spec.processes)
        if spec.kind != "vm":
            config["security.privileged"] = "true" if spec.privileged else "false"
        for key, value in spec.env.items():
            config[f"environment.{key}"] = value
        config.update(source.config)
        if spec.kind != "vm":
            raw = [config.get("raw.lxc", "").rstrip("\n"), CGROUP_MOUNT]
            config["raw.lxc"] = "\n".join(line for line in raw if line)
        config.update(owners.owner_config(spec.kind, spec.image, self.owner))
        devices: dict[str, dict[str, str]] = {}
        for i, (host, inside) in enumerate(sorted(spec.mounts.items())):
            # the source is a path of the SERVER's: on this host's own Incus that is this
            # host's path, as the local backend's mounts are; on a remote server it must exist
            # there
            disk = {"type": "disk", "source": host, "path": inside, "readonly": "true"}
            if not spec.privileged:
                # idmapped, so that the host's root-owned files are root's inside, as the
                # local backend's mounts are; where the filesystem cannot be idmapped (tmpfs
                # here), start() falls back to a plain bind (see _unshift_mounts)
                disk["shift"] = "true"
            devices[f"{MOUNT_PREFIX}{i}"] = disk
        return {
            "name": self.name,
            "type": "virtual-machine" if spec.kind == "vm" else "container",
            "source": source.source,
            "config": config,
            "devices": devices,
        }

    def _create(self, deadline: float) -> None:
        if self.spec.kind == "vm" and (reason := self.runtime.vm_refusal()):
            raise UnavailableError(f"cannot launch kind='vm' {self.name}: {reason}")
        if self._status() is not None:
            raise self._taken()
        self._source = self.runtime.images.source(self.spec)
        body = self._request(self._source)
        network = self.spec.network
        if network and network != "none":
            with self.runtime.incus_networks.placing(network, self.name) as placement:
                body["devices"]["eth0"] = placement.device
                raw = [body["config"].get("raw.lxc", ""), placement.raw_lxc]
                body["config"]["raw.lxc"] = "\n".join(line for line in raw if line)
                operation = self._post(body)
                self._await_record(operation, deadline)
            self._placement = placement
            self._wait_created(operation, deadline)
            files.write_file(
                self.client, self.name, "/etc/resolv.conf", placement.resolv_conf.encode(), 0o644
            )
        else:
            self._wait_created(self._post(body), deadline)
        self._created = True

    def _taken(self) -> ConfigError:
        return ConfigError(
            f"an instance named {self.name!r} already exists on Incus server "
            f"{self.client.remote}; choose another name, or remove it with: incus delete "
            f"--force {self.name}"
        )

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        params = {"target": self.runtime.settings.target} if self.runtime.settings.target else None
        try:
            return self.client.start("POST", "/1.0/instances", json=body, params=params)
        except ServerError as exc:
            raise self._create_error(exc) from exc

    def _create_error(self, exc: ServerError) -> IncusError:
        if name_taken(exc):
            return self._taken()
        target = self.runtime.settings.target
        if target and refused_target(exc):
            return self._target_error(target, exc)
        if refused_type(exc):
            return UnavailableError(
                f"cannot launch kind={self.spec.kind!r} {self.name}: Incus server "
                f"{self.client.remote} refused it: {exc}; run this kind on a server that "
                "supports it, or with --incus-backend=local",
                exc=exc,
            )
        return InstanceStartError(
            f"{self._where} (image {self.spec.image}): creating it failed: {exc}", exc=exc
        )

    def _target_error(self, target: str, exc: ServerError) -> ConfigError:
        """--incus-target names no member of the server's cluster: say which it has."""
        what = f"--incus-target={target}: cannot create {self.name} there"
        if "only allowed when clustered" in str(exc):
            return ConfigError(
                f"{what}: {exc}; the server is not a cluster: leave --incus-target out", exc=exc
            )
        try:
            urls = self.client.call("GET", "/1.0/cluster/members")
            members = ", ".join(str(url).rsplit("/", 1)[-1] for url in urls or [])
        except ServerError:
            members = "see `incus cluster list` there"  # it cannot tell now: not the point
        return ConfigError(
            f"{what}: {exc}; give one of its members ({members}) or a cluster group as "
            "@GROUP, or leave --incus-target out",
            exc=exc,
        )

    def _await_record(self, operation: dict[str, Any], deadline: float) -> None:
        """Return once the instance's record exists on the server (so its nic's address shows
        in the network's leases), or its creation has ended."""
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerError):
                self.client.call("GET", self._path)
                return
            done = self.client.wait(str(operation["id"]), timeout=0)
            if done.get("status") != "Running":
                return
            time.sleep(STATE_POLL)

    def _wait_created(self, operation: dict[str, Any], deadline: float) -> None:
        try:
            done = self.client.wait(
                str(operation["id"]), timeout=max(1.0, deadline - time.monotonic())
            )
        except ServerError as exc:
            raise self._create_error(exc) from exc
        if done.get("status") == "Running":
            raise self._start_error(
                f"Incus did not create it within boot_timeout={self.spec.boot_timeout}s "
                f"(operation {operation['id']} still runs)"
            )

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create it on the server (the first time), start it, wait until it is ready."""
        deadline = time.monotonic() + self.spec.boot_timeout
        if not self._created:
            self._create(deadline)
        try:
            with self._errors("starting it"):
                try:
                    self._put_start(deadline)
                except ServerError as exc:
                    if NO_IDMAP not in str(exc) or not self._unshift_mounts():
                        raise
                    self._put_start(deadline)
        except WaitTimeoutError as exc:
            raise self._start_error(
                f"Incus did not start it within boot_timeout={self.spec.boot_timeout}s"
            ) from exc
        except ServerError as exc:
            raise self._start_error(f"Incus could not start it: {exc}", lxc_log=True) from exc
        self._started_once = True
        self._attach()
        if self.spec.kind == "app":
            return  # ready as soon as it runs (or has run): wait() and logs() tell
        self._wait_ready(deadline)

    def _attach(self) -> None:
        """Set ``network`` from the started instance: its veth's host side and its MAC are
        Incus's choice (the rest is the placement's)."""
        placement = self._placement
        if placement is None:
            return
        # the instance's volatile keys, not its /state: that one fails while an app ends
        with self._errors("reading its network"):
            instance = self.client.call("GET", self._path) or {}
        config = instance.get("config") or {}
        self.network = NetworkAttachment(
            network=placement.network,
            bridge=placement.incus_network,  # an Incus bridge's interface has its name
            device=str(config.get("volatile.eth0.host_name", "")),
            address=placement.address,
            prefix=placement.prefix,
            gateway=placement.gateway,
            mac=str(config.get("volatile.eth0.hwaddr", "")),
        )

    def _put_start(self, deadline: float) -> None:
        self.client.call(
            "PUT",
            f"{self._path}/state",
            json={"action": "start", "timeout": -1},
            timeout=max(1.0, deadline - time.monotonic()),
        )

    def _unshift_mounts(self) -> bool:
        """Make the idmapped mounts plain read-only binds (a filesystem that cannot be
        idmapped refused them: the container's root then reads them as a stranger, as the
        local backend's do there); False if there was none to change."""
        instance = self.client.call("GET", self._path)
        devices = dict(instance.get("devices") or {})
        changed = False
        for key, device in devices.items():
            if key.startswith(MOUNT_PREFIX) and device.pop("shift", None) is not None:
                self._check_stranger_reads(device["source"], device["path"], instance)
                changed = True
        if changed:
            log.info("%s: its mounts cannot be idmapped; plain read-only binds", self._where)
            self.client.call("PATCH", self._path, json={"devices": devices})
        return changed

    def _check_stranger_reads(self, source: str, target: str, instance: dict[str, Any]) -> None:
        """InstanceStartError, as the local backend gives it, if the container's root (a
        stranger to the host's files without idmapping) may not read ``source``. Only when
        the server is this host (its unix socket): a remote server's files are not ours to
        look at, and Incus's own error says it there."""
        if self.client.remote.startswith(("http://", "https://")):
            return
        path = Path(source)
        base = _idmap_base(instance)
        with contextlib.suppress(OSError):
            if base is not None and not mounts._stranger_may_read(path, path.is_dir(), base):
                raise InstanceStartError(
                    f"cannot mount host path {source} at {target}: its filesystem "
                    f"({mounts._fstype(path)}) does not support idmapped mounts, and the "
                    f"container's root (uid {base[0]} on this host) may not "
                    f"{'list' if path.is_dir() else 'read'} it; make it readable by others "
                    f"(chmod o+r{'x' if path.is_dir() else ''}), or mount a copy of it on a "
                    "local filesystem"
                )

    def _wait_ready(self, deadline: float) -> None:
        shell = self._source.shell if self._source else None
        init = self._source.init if self._source else None
        if shell is not None:  # a first command: exec works (an init that exits fails it)
            request = ExecRequest((shell, "-c", INIT_PROBE), {}, "/", None, None, 10.0)
            try:
                said = self.exec(request).stdout.split()
            except IncusError as exc:
                raise self._start_error(
                    f"no command could run in it: {exc}", init_ended=True
                ) from exc
            if init is None:  # an image the plugin did not build: what runs as PID 1
                init = "systemd" if "systemd" in said else " ".join(said)
        if init == "systemd":
            readiness.wait_for_systemd(
                self.exec,
                self.running,
                self._start_error,
                deadline=deadline,
                boot_timeout=self.spec.boot_timeout,
                poll=READY_POLL,
            )
        elif not self.running():
            raise self._start_error(
                "its init exited at once; is its /sbin/init a working init?", init_ended=True
            )

    def _lxc_log(self) -> str:
        """The errors liblxc logged for the instance's last start (Incus keeps its
        ``lxc.log``, at every level): the lines of level ERROR, as the local backend's
        ``lxc.log`` has them; "" if there is none or no log."""
        try:
            response = self.client.request("GET", f"{self._path}/logs/lxc.log")
        except IncusError:
            return ""
        return "\n".join(line for line in response.text.splitlines() if " ERROR " in line)

    def _start_error(
        self, what: str, *, lxc_log: bool = False, init_ended: bool = False
    ) -> InstanceStartError:
        """The error of a start that failed, with the console's tail; with ``lxc_log`` (Incus
        could not start it at all: its own error only says its forkstart failed), liblxc's
        errors too, which say why (``Failed to exec "/sbin/init"``). ``init_ended``: its init
        may have ended, so its console is waited for (``_settled_console``)."""
        errors = tail(self._lxc_log()) if lxc_log else ""
        if INIT_EXEC_FAILED in errors:
            what += "; is its /sbin/init a working init?"
        error = InstanceStartError(f"{self._where} (image {self.spec.image}): {what}")
        if errors:
            error.add_note("liblxc log:\n" + errors)
        console = ""
        with contextlib.suppress(IncusError):
            console = tail(self._settled_console() if init_ended else self.logs())
        error.add_note("console log:\n" + (console or "(empty: init printed nothing yet)"))
        return error

    def _settled_console(self) -> str:
        """The console log of a container whose init may have ended: read until it says
        something, or the container is down and its log was read once more, within
        CONSOLE_SETTLE. While it goes down the endpoint fails or says nothing yet, and an error
        made then would show an empty console instead of what init printed."""
        deadline = time.monotonic() + CONSOLE_SETTLE
        while True:
            down = self._status() not in LIVE
            console = self.logs()
            if console.strip() or down or time.monotonic() >= deadline:
                return console
            time.sleep(STATE_POLL)

    def _status(self) -> str | None:
        """The server's status of the instance ("Running", "Stopped", ...); None if gone."""
        # the instance, not its /state: that one gathers usage figures, and fails ("Invalid
        # PID", HTTP 500) while an app's container is ending
        try:
            instance = self.client.call("GET", self._path)
        except ServerError as exc:
            if exc.status == 404 or "not found" in str(exc).lower():
                return None
            raise
        if not isinstance(instance, dict):
            return None
        status = str(instance.get("status"))
        power = (instance.get("config") or {}).get("volatile.last_state.power")
        if status == "Stopped" and power == "RUNNING":
            # an init that ended by itself (poweroff -f): Incus says Stopped at once, then
            # Running again for about 0.6 s while it handles the stop, and only then Stopped
            # with last_state.power STOPPED; starting it before then fails
            return "Stopping"
        return status

    def running(self) -> bool:
        """True while the instance runs on the server (or is still going down)."""
        return self._created and self._status() in LIVE

    def stop(self, timeout: float, force: bool) -> None:
        """Shut down cleanly within ``timeout`` seconds (Incus sends the init's halt signal),
        then kill; or kill at once."""
        if not self._created:
            return
        with self._errors("stopping it"):
            if self._status() not in LIVE:
                return
            if not force:
                try:
                    self.client.call(
                        "PUT",
                        f"{self._path}/state",
                        json={"action": "stop", "timeout": max(1, round(timeout))},
                        timeout=timeout + 10,
                    )
                    return
                except (ServerError, WaitTimeoutError):
                    if self._status() not in LIVE:
                        return  # it stopped meanwhile (an app that ended, say)
            self.client.call(
                "PUT",
                f"{self._path}/state",
                json={"action": "stop", "force": True, "timeout": -1},
                timeout=owners.STOP_TIMEOUT,
            )

    def keep(self) -> None:
        """Mark it kept on the server (``--incus-keep``): ``reap_server`` (``pytest-incus
        reap`` from any host) leaves it, as the local record's mark makes the local reap do.
        Nothing if it was never created or is gone."""
        if not self._created:
            return
        with contextlib.suppress(NotRunningError), self._errors("marking it kept"):
            owners.mark_kept(self.client, self.name)

    def destroy(self) -> None:
        """Force stop and delete it on the server; nothing if it is already gone."""
        owners.delete_instance(self.client, self.name)
        self._created = False

    @property
    def ipv4(self) -> str | None:
        """Its address on its network, as the server reports it (the placed one until then);
        None for no network."""
        if self._placement is None:
            return None
        with contextlib.suppress(IncusError):
            state = self.client.call("GET", f"{self._path}/state")
            eth0 = ((state or {}).get("network") or {}).get("eth0") or {}
            for address in eth0.get("addresses") or []:
                if address.get("family") == "inet" and address.get("scope") == "global":
                    return str(address["address"])
        return self._placement.address

    def logs(self) -> str:
        """The console log: the messages of init, every boot's (Incus keeps it across
        restarts). For an app, its stdout and stderr, which its init wrapper appends to
        ``APP_LOG`` (``incus.images``), read through the files API (also once it stopped)."""
        if not self._created:
            return ""
        if self.spec.kind == "app":
            try:
                with self._errors("reading its log"):
                    return files.read_file(self.client, self.name, APP_LOG).decode(
                        "utf-8", "replace"
                    )
            except FileNotFoundError:
                return ""
        # Incus answers a running container's console with what was written since the last
        # read (liblxc's ring buffer, then moved to the log file), and a stopped one's with the
        # whole log file, every boot's: so what it says is added to what was read before,
        # unless it is that whole file (it starts with everything read so far). While a
        # container ends the endpoint may fail ("connection refused", HTTP 500): what was read
        # so far is the log then.
        try:
            response = self.client.request("GET", f"{self._path}/console")
        except ServerError:
            return self._console.decode("utf-8", "replace")
        data = response.content
        if self._console and data.startswith(self._console):
            self._console = data
        else:
            self._console += data
        return self._console.decode("utf-8", "replace")

    def wait(self, timeout: float | None) -> int:
        """An app: wait for its program to end (Incus then stops the container); its exit
        code, which the app's init wrapper records in ``APP_EXIT``."""
        if self.spec.kind != "app":
            raise ConfigError(
                f"{self.spec.kind} {self.name}: wait() is for kind='app' instances; a system "
                "container's init runs until it is stopped (use stop())"
            )
        if not self._started_once:
            raise NotRunningError(f"wait(): app {self.name} was never started; start() it")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._errors("waiting for it"):
            while self._status() in LIVE:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(
                        f"wait(timeout={timeout}): app {self.name} still runs after "
                        f"{timeout}s; wait longer, or stop() it"
                    )
                time.sleep(STATE_POLL)
            try:
                text = files.read_file(self.client, self.name, APP_EXIT).decode().strip()
                return int(text)
            except (FileNotFoundError, ValueError) as exc:
                raise IncusError(
                    f"app {self.name} has ended, but its exit code was not recorded in "
                    f"{APP_EXIT} (stopped from outside before its program ended?)",
                    exc=exc,
                ) from exc

    # -- inside -----------------------------------------------------------------------------

    def _need_running(self, what: str) -> None:
        if not self._created:
            raise NotRunningError(f"{self._where}: {what}: it was never started; start() it")

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command inside (``incus.exec``)."""
        self._need_running("exec")
        shell = self._source.shell if self._source else None
        with self._errors(f"exec {list(request.argv)!r}"):
            return incus_exec.run(
                self.client, self.name, request, shell=shell, read_file=self.read_file
            )

    @property
    def _inside(self) -> files.Inside | None:
        """What the files module runs as root inside (stat -c, cat of pseudo files, chmod of
        special bits, readlink): an exec through the wrapper's shell, as root (no passwd
        lookup, so one round trip); None without a shell, where the files API's answers
        stand."""
        shell = self._source.shell if self._source else None
        if shell is None:
            return None

        def inside(argv: Sequence[str]) -> ExecResult:
            request = ExecRequest(tuple(argv), {}, None, None, None, INSIDE_TIMEOUT)
            return incus_exec.run(
                self.client, self.name, request, shell=shell, read_file=self._api_read
            )

        return inside

    def _api_read(self, path: str) -> bytes:
        """A file's content through the files API alone (exec's user lookup: /etc files)."""
        return files.read_file(self.client, self.name, path)

    def read_file(self, path: str) -> bytes:
        """The content of ``path`` inside."""
        self._need_running("read_file")
        with self._errors(f"reading {path}"):
            return files.read_file(self.client, self.name, path, inside=self._inside)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace ``path`` inside."""
        self._need_running("write_file")
        with self._errors(f"writing {path}"):
            files.write_file(self.client, self.name, path, data, mode, inside=self._inside)

    def stat(self, path: str) -> tuple[Stat, Stat] | None:
        """(lstat, stat) of ``path`` inside, or None."""
        self._need_running("stat")
        with self._errors(f"stat {path}"):
            return files.stat(self.client, self.name, path, inside=self._inside)

    def sha256(self, path: str) -> str:
        """The sha256 of the file at ``path`` inside."""
        self._need_running("sha256")
        with self._errors(f"sha256 {path}"):
            return files.sha256(self.client, self.name, path, inside=self._inside)

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack a push's archive at ``dest`` inside."""
        self._need_running("push")
        with self._errors(f"pushing to {dest}"):
            files.put_archive(self.client, self.name, archive, dest, is_tree, inside=self._inside)

    def get_archive(self, path: str) -> bytes:
        """A tar of ``path`` inside."""
        self._need_running("pull")
        with self._errors(f"pulling {path}"):
            return files.get_archive(self.client, self.name, path, inside=self._inside)
