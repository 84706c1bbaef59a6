"""Virtual machines on QEMU, driven over QMP, with a guest agent for commands and files.

Each instance is a qcow2 overlay (``<instance>/disk.qcow2``) on the cached image's disk (through
a hard link, ``<instance>/base.qcow2``, so a rebuilt image never slides under it), booted
straight into the image's kernel and initrd (or the user's ``kernel=``/``initrd=``). QEMU is our
child process (``qemu.QemuProcess``); its serial console goes to ``<instance>/console.log``, QMP
to ``<instance>/qmp.sock``, and the guest agent's virtio-serial port
(``org.qemu.guest_agent.0``) to ``<instance>/qga.sock``, where ``AgentClient`` talks to it.

Ready means: the agent answers, and for ``init="systemd"`` also ``systemctl is-system-running
--wait`` (run through the agent) says running or degraded. The guest runs with ``panic=-1`` and
QEMU with ``-no-reboot``, so a kernel panic or a failing init ends QEMU at once and the start
fails fast with the console tail instead of waiting out ``boot_timeout``. (A reboot inside the
guest therefore stops the VM; use ``instance.restart()``.)

On a network (``create(..., network=attachment)``), the VM's virtio NIC is plugged into a tap
device on the network's bridge, made by ``pytest_incus.network.make_tap`` before QEMU starts
(and again at a restart if it is gone; removing it is the network module's). Every VM's NIC
has the same placeholder MAC, and its machine shape names a placeholder tap, so bridged VMs of
one shape share one boot snapshot; once the guest is ready, on every path (boot, resume,
restart, and the boot that saved a snapshot, after the save), the agent gives it its own MAC,
address, DNS server and host name (``AgentClient.configure_network``, guest_agent/network.py)
before ``start()`` returns. No snapshot ever holds an instance's MAC or address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from guest_agent.network import PLACEHOLDER_MAC
from pytest_incus import fsutil, network
from pytest_incus.agent.client import AgentClient
from pytest_incus.errors import (
    AgentError,
    ConfigError,
    IncusError,
    InstanceStartError,
    tail,
)
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.network import links
from pytest_incus.runtimes import accel, qemu, readiness, snapshot
from pytest_incus.runtimes.local import LocalRuntime
from pytest_incus.spec import VM_INITS, InstanceSpec
from pytest_incus.values import (
    AccelMode,
    ExecRequest,
    ExecResult,
    NetworkAttachment,
    Stat,
    VmInit,
)

log = logging.getLogger("pytest_incus")

MIB = 1024**2
DEFAULT_MEMORY = 1024 * MIB
MIN_MEMORY = 128 * MIB
DEFAULT_CPUS = 1
QMP_DEADLINE = 10.0  # seconds for QEMU to come up and answer QMP
AGENT_SLICE = 0.5  # connect to the agent in slices this long, to notice QEMU's death
STOP_GRACE = 5.0  # seconds for QEMU to quit over QMP before it is killed
READY_POLL = 0.05
DISK = "disk.qcow2"
BASE = "base.qcow2"  # a hard link to the image's disk: see _pin
BOOT_DISK = "boot.qcow2"  # a hard link to a boot snapshot's disk (runtimes/snapshot.py)
SAVE_DEADLINE = 60.0  # seconds to save a booted VM as a boot snapshot
RESUME_DEADLINE = 30.0  # seconds for a VM to resume from a boot snapshot and answer
WARM_UP = ExecRequest(("true",), {}, None, None, None, 30.0)
SETTLE = ExecRequest(("udevadm", "settle", "--timeout=30"), {}, None, None, None, 40.0)
CONSOLE = "console.log"
AGENT_SOCKET = "qga.sock"
AGENT_PORT = "org.qemu.guest_agent.0"
# A VM on a network boots with the NIC's MAC PLACEHOLDER_MAC, and its machine shape names the
# tap SHAPE_TAP, whatever its own are: bridged VMs of one shape then share one boot snapshot,
# and the agent gives each guest its own MAC and address once it is ready (_join_network).
SHAPE_TAP = "ptit-shape"

_announced: set[str] = set()
_announce_lock = threading.Lock()


class KvmFailure(InstanceStartError):
    """KVM stopped a booting guest with an internal error (``VirtualMachine.start`` falls back
    to TCG, or says that KVM cannot work)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # what QEMU said, in one line


class VmRuntime(LocalRuntime):
    """Makes QEMU virtual machines."""

    kind = "vm"

    def check(self, spec: InstanceSpec) -> None:
        """Reject what a VM can never do: impossible sizes, paths that do not exist (an
        image without a kernel is the image store's to reject)."""
        if spec.init not in VM_INITS:
            raise ConfigError(f"init={spec.init!r}; use one of {', '.join(map(repr, VM_INITS))}")
        if spec.cpus is not None and spec.cpus > (os.cpu_count() or 1):
            raise ConfigError(f"cpus={spec.cpus} but this host has only {os.cpu_count()} CPUs")
        if spec.memory is not None and spec.memory < MIN_MEMORY:
            raise ConfigError(
                f"memory={spec.memory} bytes is too little for a VM; give at least 128MiB"
            )
        for key, value in (("kernel", spec.kernel), ("initrd", spec.initrd)):
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{key}={value!r}: no such file")

    def unavailable(self) -> str | None:
        """Why this host cannot run VMs (QEMU missing), or None."""
        return accel.qemu_missing()

    def create(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        network: NetworkAttachment | None,
    ) -> VirtualMachine:
        """Choose the accelerator, get the VM image and make the instance's overlay disk."""
        images = self.context.images
        settings = self.context.settings
        for sock in (AGENT_SOCKET, qemu.QMP_SOCKET):
            if not qemu.socket_path_ok(directory / sock):
                raise InstanceStartError(
                    f"VM {name}: the socket path {directory / sock} is too long for a unix "
                    "socket; choose a shorter --incus-cache-dir"
                )
        image = images.get(spec.image, "vm")
        try:
            # the probe boots the image's own kernel: what proves KVM is a Linux guest
            chosen = accel.choose(
                settings.accel, settings.cache_dir, vm_images.boot_kernel(image.path)
            )
        except IncusError as exc:
            raise InstanceStartError(f"VM {name}: {exc}") from exc
        if chosen.name is AccelMode.TCG and settings.accel is AccelMode.AUTO:
            _announce(
                f"VMs run under TCG (emulation, much slower than KVM): {chosen.reason}",
                self.context.progress,
            )
        _make_overlay(name, directory, _pin(image.disk, directory / BASE))
        return VirtualMachine(spec, name, directory, image, chosen, images, network)

    def reap(self, name: str, directory: Path) -> None:
        """Kill the QEMU a dead run left for ``name`` (only if still that process)."""
        qemu.kill_recorded(directory)
        _remove_runtime_files(directory)

    def shell(self, name: str, directory: Path, command: list[str] | None) -> int:
        """Run ``command`` in VM ``name`` through its agent, or read commands line by line.

        There is no terminal in the guest (the agent runs commands with pipes, not a pty): with
        no ``command``, each line typed is run by ``/bin/sh -c`` on its own, so ``cd`` and
        variables do not carry over to the next line, and full-screen programs do not work.
        """
        if qemu.recorded_pid(directory) is None:
            raise IncusError(f"VM {name} is not running")
        client = AgentClient(directory / AGENT_SOCKET, name=f"VM {name}")
        try:
            client.connect(time.monotonic() + 10)
        except AgentError as exc:
            raise IncusError(
                f"cannot reach the agent of VM {name} ({exc}); is a test run still using it?"
            ) from exc
        try:
            if command:
                return _run_shell_line(client, command)
            return _shell_loop(client, name)
        finally:
            client.close()


def _run_shell_line(client: AgentClient, argv: list[str]) -> int:
    request = ExecRequest(tuple(argv), {"TERM": "dumb"}, None, None, None, None)
    result = client.exec(request)
    sys.stdout.buffer.write(result.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    sys.stderr.flush()
    return result.exit_code


def _shell_loop(client: AgentClient, name: str) -> int:
    print(
        f"VM {name}: commands run through the guest agent, one line at a time by /bin/sh -c "
        "(no terminal: cd and variables do not carry over). Ctrl-D leaves.",
        file=sys.stderr,
    )
    status = 0
    while True:
        try:
            line = input(f"{name}# ")
        except EOFError:
            print(file=sys.stderr)
            return status
        if line.strip():
            status = _run_shell_line(client, ["/bin/sh", "-c", line])


def _announce(message: str, progress: Callable[[str], None]) -> None:
    """Say ``message`` once per process (on the terminal, through ``progress``)."""
    with _announce_lock:
        if message in _announced:
            return
        _announced.add(message)
    progress(message)


def _pin(disk: Path, link: Path) -> Path:
    """A hard link to the image's ``disk`` in the instance directory, the overlay's backing file.

    QEMU opens the backing file by name at every start: if the image were rebuilt or pruned
    meanwhile, a restart would put this instance's overlay on another disk (and corrupt its
    filesystem). The link keeps this very disk for the instance's life. Where a link cannot be
    made (another filesystem), the image's own path is used."""
    try:
        os.link(disk, link)
    except OSError as exc:
        log.info("cannot hard-link %s into %s (%s); the overlay names the image", disk, link, exc)
        return disk
    return link


def _identity(path: Path) -> list[int]:
    """Which file ``path`` is: device and inode (the same for every hard link to it)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


def _make_overlay(name: str, directory: Path, backing: Path) -> None:
    """A fresh ``<directory>/disk.qcow2`` on ``backing``.

    A backing file in the same directory is named relatively, so the overlay can move to a
    boot snapshot with a link to the same backing file beside it."""
    overlay = directory / DISK
    overlay.unlink(missing_ok=True)
    named = backing.name if backing.parent == directory else str(backing)
    argv = [accel.QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", named]
    made = subprocess.run([*argv, str(overlay)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        raise InstanceStartError(
            f"VM {name}: qemu-img could not make the overlay disk {overlay} on "
            f"{backing}: {made.stderr.strip()}"
        )


def _remove_runtime_files(directory: Path) -> None:
    for leftover in (AGENT_SOCKET, qemu.QMP_SOCKET, qemu.RECORD, DISK, BOOT_DISK, BASE):
        (directory / leftover).unlink(missing_ok=True)


class VirtualMachine:
    """One QEMU virtual machine."""

    def __init__(
        self,
        spec: InstanceSpec,
        name: str,
        directory: Path,
        image: Image,
        chosen: accel.Accel,
        images: ImageStore,
        network: NetworkAttachment | None = None,
    ) -> None:
        self.spec = spec
        self.network = network
        self.name = name
        self.directory = directory
        self.image = image
        self.accel = chosen
        self._images = images
        self._qemu: qemu.QemuProcess | None = None
        self._agent: AgentClient | None = None
        self._started_before = False

    # -- configuration -------------------------------------------------------------------

    def kernel_cmdline(self) -> str:
        """The kernel command line: the image's, then ours, then the user's ``kernel_args``."""
        # panic=-1 with QEMU's -no-reboot: a panicking guest ends QEMU at once
        return vm_images.kernel_cmdline(self.spec.init, extra=f"panic=-1 {self.spec.kernel_args}")

    def qemu_argv(
        self, directory: Path | None = None, name: str | None = None, tap: str | None = None
    ) -> list[str]:
        """QEMU's command line for this instance (for another directory, name and tap device:
        the same machine elsewhere, which is how boot snapshots tell machine shapes apart)."""
        d = directory or self.directory
        spec = self.spec
        memory = spec.memory or DEFAULT_MEMORY
        # the image's unpacked ELF kernel when it has one (booted through PVH: no
        # self-decompression, 0.8-1.1 s less under TCG), else its bzImage
        kernel = spec.kernel or str(vm_images.boot_kernel(self.image.path))
        argv = [qemu.QEMU, "-name", f"pytest-incus {name or self.name}", "-nodefaults"]
        argv += ["-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot"]
        argv += ["-machine", qemu.MACHINE, *self.accel.qemu_args, *qemu.firmware_args()]
        argv += ["-smp", str(spec.cpus or DEFAULT_CPUS), "-m", f"{-(-memory // MIB)}M"]
        argv += ["-kernel", kernel, "-append", self.kernel_cmdline()]
        if spec.initrd is not None:
            argv += ["-initrd", spec.initrd]
        elif spec.kernel is None:
            argv += ["-initrd", str(self.image.initrd)]
        # with kernel= alone there is no initrd: the kernel must have its virtio drivers built in
        argv += ["-drive", f"file={d / DISK},format=qcow2,if=virtio,cache=writeback"]
        argv += ["-chardev", f"file,id=console,path={d / CONSOLE},append=on"]
        argv += ["-serial", "chardev:console"]
        argv += ["-device", "virtio-serial-pci"]
        argv += ["-chardev", f"socket,id=qga0,path={d / AGENT_SOCKET},server=on,wait=off"]
        argv += ["-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}"]
        argv += ["-qmp", f"unix:{d / qemu.QMP_SOCKET},server=on,wait=off"]
        if self.network is None:
            argv += ["-nic", "none"]
        else:
            # the tap exists (_make_tap): QEMU only opens it. romfile= skips the NIC's option
            # ROM (PXE), which a VM booted with -kernel never runs. No announcements after a
            # resume, by QEMU (RARP) or the guest: they would come from the placeholder MAC,
            # and cost the resumed guest 20 ms (measured under TCG)
            tap = tap or self.network.device
            nic = f"virtio-net-pci,netdev=net0,mac={PLACEHOLDER_MAC},romfile=,guest_announce=off"
            argv += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no"]
            argv += ["-device", nic, "-global", "migration.announce-rounds=0"]
        return argv

    def machine_shape(self) -> list[str]:
        """The command line that names this VM's boot snapshot: ``qemu_argv`` without what is
        this instance's own (its directory, name and tap device)."""
        return self.qemu_argv(Path("/instance"), "instance", SHAPE_TAP)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the VM and wait until the guest is ready (see the module docstring): the
        first start resumes a boot snapshot when it can (runtimes/snapshot.py), every other
        one boots. A guest that KVM stops with an internal error is booted again under TCG
        (with ``--incus-accel=auto``; see ``_fall_back_to_tcg``)."""
        first, self._started_before = not self._started_before, True
        try:
            self._start(first)
        except KvmFailure as failure:
            self._fall_back_to_tcg(failure, first)
            self._start(first)

    def _start(self, first: bool) -> None:
        deadline = time.monotonic() + self.spec.boot_timeout
        self._kill()  # what is left of a previous boot that ended by itself (a poweroff inside)
        self._make_tap(first)
        if not (first and self._snapshot_allowed() and self._resume_snapshot(deadline)):
            self._boot(deadline)
        self._join_network()

    # -- the network ---------------------------------------------------------------------

    def _make_tap(self, first: bool) -> None:
        """The tap device QEMU plugs the VM's NIC into, on the network's bridge: made at the
        first start (in place of one a crashed launch left), and again at a restart if it is
        gone (the network module removes it when the instance leaves the network)."""
        attachment = self.network
        if attachment is None or (not first and links.exists(attachment.device)):
            return
        try:
            network.make_tap(attachment)
        except IncusError as exc:
            raise InstanceStartError(
                f"VM {self.name}: cannot plug it into network {attachment.network!r}: making "
                f"its tap device {attachment.device} on bridge {attachment.bridge} failed: {exc}",
                exc=exc,
            ) from exc

    def _join_network(self) -> None:
        """Give the ready guest its own place on its network (guest_agent/network.py): its
        MAC (never the placeholder it booted with, nor the one of a saved boot), address, DNS
        server and host name. Done after every boot and resume, and after a boot snapshot
        was saved, never before: no snapshot holds an instance's address."""
        attachment = self.network
        if attachment is None:
            return
        assert self._agent is not None
        try:
            with self._watching():
                try:
                    self._agent.configure_network(attachment, self.name)
                except AgentError as exc:
                    error = self._start_error(
                        f"configuring its network interface ({attachment.address}/"
                        f"{attachment.prefix}, MAC {attachment.mac}) through the guest agent "
                        f"failed: {exc}"
                    )
                    error.exc = exc
                    raise error from exc
        except BaseException:
            self._kill()
            raise

    def _fall_back_to_tcg(self, failure: KvmFailure, first: bool) -> None:
        """After KVM stopped this guest: with ``auto``, record KVM as broken on this host,
        say so once, and make this VM a TCG one (a fresh disk, if nothing had run on it); with
        a forced ``kvm``, a clear error."""
        settings = self._images.settings
        if settings.accel is not AccelMode.AUTO:
            raise InstanceStartError(
                f"VM {self.name}: --incus-accel=kvm was asked, but KVM stopped the guest: "
                f"{failure.reason}. KVM does not run Linux guests on this host; use "
                "--incus-accel=auto (it then runs VMs under TCG) or --incus-accel=tcg"
            ) from failure
        detail = f"a Linux guest (VM {self.name}) under KVM stopped: {failure.reason}"
        self.accel = accel.mark_broken(settings.cache_dir, detail)
        log.warning("VM %s: %s; booting it again under TCG", self.name, detail)
        _announce(
            f"KVM stopped a Linux guest ({failure.reason}) although the KVM probe passed: "
            "VMs run under TCG from now on (emulation, much slower than KVM), and this host's "
            f"verdict in {settings.cache_dir / accel.CACHE_FILE} says so until it reboots",
            self._images.progress,
        )
        self._console_note(f"KVM stopped this guest ({failure.reason}); booting it under TCG")
        if first:
            (self.directory / BOOT_DISK).unlink(missing_ok=True)
            _make_overlay(self.name, self.directory, self.directory / BASE)

    def _console_note(self, text: str) -> None:
        """A line of ours in the console log, between what the guest wrote."""
        with contextlib.suppress(OSError), open(self.directory / CONSOLE, "a") as console:
            console.write(f"pytest-incus: {text}\n")

    @contextlib.contextmanager
    def _watching(self) -> Iterator[None]:
        """Watch the guest while the block waits on it (``qemu.GuestWatch``): when the guest
        stopped for good, the block's failure becomes one that says so (``KvmFailure`` for a
        KVM internal error)."""
        assert self._qemu is not None
        with qemu.GuestWatch(self._qemu) as watch:
            try:
                yield
            except (IncusError, OSError) as exc:
                if watch.reason is None:
                    raise
                if watch.kvm_error and self.accel.name is AccelMode.KVM:
                    raise self._start_error(watch.reason, KvmFailure, reason=watch.reason) from exc
                raise self._start_error(watch.reason) from exc

    # -- boot snapshots --------------------------------------------------------------------

    def _snapshot_allowed(self) -> bool:
        spec = self.spec
        return (
            self._images.settings.vm_snapshots
            and spec.kernel is None
            and spec.initrd is None
            and vm_images.QEMU_GA_ARG not in spec.kernel_args.split()
            and (self.directory / BASE).exists()  # the snapshot's disk names it relatively
        )

    def _resume_snapshot(self, deadline: float) -> bool:
        """Start this VM from the boot snapshot of its shape: resume it, or, when there is
        none yet, boot and save one. False (with a warning) when the snapshot does not work,
        for the caller to boot instead."""
        shape = self.machine_shape()
        version = accel.qemu_version()
        try:
            entry = self._images.boot_snapshot(
                self.image,
                snapshot.variant(shape, version),
                lambda target: self._save(target, deadline),
            )
        except snapshot.SaveError as exc:
            log.warning("VM %s booted, but its boot could not be saved: %s", self.name, exc)
            if self.running() and self._agent is not None:
                return True
            self._kill()
            return False
        if self.running():
            return True  # booted and saved just now, and runs on
        record = fsutil.read_json(entry.path / vm_images.BOOT_RECORD)
        if not isinstance(record, dict) or record.get("base") != _identity(self.directory / BASE):
            # saved on another disk than this instance's: the image was rebuilt in between
            log.info("VM %s: boot snapshot %s is of another disk; booting", self.name, entry.path)
            return False
        try:
            self._link_snapshot_disk(entry)
            self._launch([*self.qemu_argv(), *snapshot.incoming(entry.path / vm_images.BOOT_STATE)])
            resume_deadline = min(deadline, time.monotonic() + RESUME_DEADLINE)
            assert self._qemu is not None
            with self._watching():
                self._qemu.connect_qmp(resume_deadline)
                snapshot.resume(self._qemu, resume_deadline)
                self._agent = self._connect_agent(resume_deadline)
                # no is-system-running here: the saved guest was ready (systemd running, udev
                # settled) when it was saved, and a resumed guest continues from that very state
                snapshot.refresh(self._agent)
        except KvmFailure:
            self._kill()  # KVM's fault, not the snapshot's: it stays
            raise
        except (IncusError, OSError) as exc:
            log.warning(
                "VM %s did not resume from the boot snapshot %s (%s); booting it instead",
                self.name,
                entry.path,
                exc,
            )
            self._kill()
            self._images.discard(entry)
            (self.directory / BOOT_DISK).unlink(missing_ok=True)
            _make_overlay(self.name, self.directory, self.directory / BASE)
            return False
        return True

    def _save(self, target: Path, deadline: float) -> None:
        """Make a boot snapshot in ``target``: boot this VM, save it with a copy of its disk
        overlay and a record of the image disk under it, and let it run on."""
        self._images.progress(
            f"VM image {self.spec.image}: first boot of this machine shape; saving it so that "
            "later VMs of the shape resume it instead of booting"
        )
        self._boot(deadline)
        assert self._qemu is not None and self._agent is not None
        try:
            # what every resumed VM does first, done once here: its code and files are then
            # loaded in the saved guest already (0.3 s less to the first exec under TCG)
            snapshot.refresh(self._agent)
            self._agent.exec(WARM_UP)
            if self.spec.init is VmInit.SYSTEMD:
                self._agent.exec(SETTLE)  # modules udev still loads would load in every resume
            save_deadline = min(deadline, time.monotonic() + SAVE_DEADLINE)
            snapshot.save(self._qemu, self.directory / DISK, target, save_deadline)
            # the disk it was saved on, and the command line of the shape it is the boot of
            record = {"base": _identity(self.directory / BASE), "shape": self.machine_shape()}
            fsutil.write_atomic(target / vm_images.BOOT_RECORD, json.dumps(record))
            with contextlib.suppress(OSError):
                shutil.copyfile(self.directory / CONSOLE, target / vm_images.BOOT_CONSOLE)
        except (IncusError, OSError) as exc:
            raise snapshot.SaveError(str(exc)) from exc
        finally:
            if self._qemu.alive():
                with contextlib.suppress(IncusError):
                    self._qemu.command("cont")

    def _link_snapshot_disk(self, entry: Image) -> None:
        """This instance's disk: an overlay on a link to the snapshot's disk, whose backing
        file (named relatively) is this instance's link to the same image disk."""
        boot_disk = self.directory / BOOT_DISK
        boot_disk.unlink(missing_ok=True)
        os.link(entry.disk, boot_disk)
        _make_overlay(self.name, self.directory, boot_disk)
        console = self.directory / CONSOLE
        if not console.exists():
            with contextlib.suppress(OSError):
                console.write_bytes((entry.path / vm_images.BOOT_CONSOLE).read_bytes())
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
        self._console_note(
            f"resumed from the boot saved at {saved} ({entry.path.name}): the lines above "
            "are that boot's, the lines below this VM's own"
        )

    # -- booting ---------------------------------------------------------------------------

    def _launch(self, argv: list[str]) -> None:
        try:
            self._qemu = qemu.QemuProcess.launch(argv, self.directory)
        except OSError as exc:
            raise self._start_error(f"QEMU could not be started: {exc}") from exc

    def _boot(self, deadline: float) -> None:
        """Boot QEMU and wait until the guest is ready."""
        self._launch(self.qemu_argv())
        assert self._qemu is not None
        try:
            with self._watching():
                self._connect_qmp(deadline)
                self._agent = self._connect_agent(deadline)
                if self.spec.init is VmInit.SYSTEMD:
                    self._wait_systemd(deadline)
        except BaseException:
            self._kill()
            raise

    def _connect_qmp(self, deadline: float) -> None:
        assert self._qemu is not None
        try:
            self._qemu.connect_qmp(min(deadline, time.monotonic() + QMP_DEADLINE))
        except IncusError as exc:
            if self._qemu.wait(time.monotonic() + 1):
                said = self._qemu.stderr().splitlines()[-1:] or ["nothing"]
                raise self._start_error(
                    f"QEMU exited at once (exit code {self._qemu.child.returncode}); it said: "
                    f"{said[0]}; check the kernel=/initrd= files and the options"
                ) from exc
            raise self._start_error(str(exc)) from exc

    def _connect_agent(self, deadline: float) -> AgentClient:
        """Connect to the guest agent; fail at once if QEMU ends, or at ``deadline``."""
        assert self._qemu is not None
        client = AgentClient(self.directory / AGENT_SOCKET, name=f"VM {self.name}")
        last: AgentError | None = None
        while True:
            if not self._qemu.alive():
                client.close()
                raise self._start_error("QEMU ended while the guest was booting")
            now = time.monotonic()
            if now >= deadline:
                client.close()
                raise self._start_error(
                    f"the guest agent did not answer within {self.spec.boot_timeout}s "
                    f"(last: {last}); raise boot_timeout or look at the console log below"
                )
            try:
                client.connect(min(deadline, now + AGENT_SLICE))
                return client
            except AgentError as exc:
                last = exc

    def _wait_systemd(self, deadline: float) -> None:
        readiness.wait_for_systemd(
            self.exec,
            self.running,
            self._start_error,
            deadline=deadline,
            boot_timeout=self.spec.boot_timeout,
            poll=READY_POLL,
        )

    def _start_error(
        self,
        what: str,
        error_class: Callable[..., InstanceStartError] = InstanceStartError,
        **fields: Any,
    ) -> InstanceStartError:
        """The start error of this VM (of ``error_class``, made with ``fields``): what went
        wrong, with QEMU's exit code and output and the console tail as notes."""
        error = error_class(
            f"VM {self.name} (image {self.spec.image}, init={self.spec.init}, "
            f"accel={self.accel.name}): {what}",
            **fields,
        )
        if self._qemu is not None:
            if not self._qemu.alive():
                error.add_note(f"QEMU exit code: {self._qemu.child.returncode}")
            said = tail(self._qemu.stderr())
            if said:
                error.add_note("QEMU said:\n" + said)
        console = tail(self.logs())
        error.add_note("console log:\n" + (console or "(empty: the guest printed nothing)"))
        return error

    def keep(self) -> None:
        """Nothing to add: this host's record of the instance (the factory's) says it."""

    @property
    def ipv4(self) -> str | None:
        """The address of its host-only network lease; None for no network."""
        return None if self.network is None else self.network.address

    def running(self) -> bool:
        """True while QEMU runs."""
        return self._qemu is not None and self._qemu.alive()

    def stop(self, timeout: float, force: bool) -> None:
        """Power the guest off (through the agent, else ACPI) within ``timeout``, then QMP
        quit, then kill our QEMU."""
        if self._qemu is None:
            return
        if self._qemu.alive() and not force:
            deadline = time.monotonic() + timeout
            if not self._ask_shutdown():
                with contextlib.suppress(IncusError):
                    self._qemu.command("system_powerdown", timeout=max(0.1, timeout))
            if not self._qemu.wait(deadline):
                log.warning("VM %s did not power off within %ss; quitting QEMU", self.name, timeout)
        self._kill()

    def _ask_shutdown(self) -> bool:
        """Ask the agent to power off; True if it took the request."""
        if self._agent is None:
            return False
        try:
            self._agent.shutdown("powerdown")
        except (AgentError, OSError):
            return False
        return True

    def _kill(self) -> None:
        """End QEMU: QMP quit, then SIGKILL of our own child; close the channels."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._qemu is None:
            return
        if self._qemu.alive() and not self._qemu.quit(time.monotonic() + STOP_GRACE):
            log.warning("QEMU of VM %s did not quit; killing pid %d", self.name, self._qemu.pid)
        self._qemu.kill()
        self._qemu.close()
        self._qemu = None
        for sock in (AGENT_SOCKET, qemu.QMP_SOCKET):
            (self.directory / sock).unlink(missing_ok=True)

    def destroy(self) -> None:
        """Kill QEMU and remove the overlay disk and sockets (the directory goes with the
        caller)."""
        self._kill()
        qemu.kill_recorded(self.directory)  # a QEMU that another process of ours started
        _remove_runtime_files(self.directory)

    def wait(self, timeout: float | None) -> int:
        """Not for VMs: their init runs until the VM stops."""
        raise ConfigError(
            f"VM {self.name}: wait() is for kind='app' instances; a VM runs until it is "
            "stopped (use stop())"
        )

    def logs(self) -> str:
        """The serial console log, every boot of this instance."""
        try:
            return (self.directory / CONSOLE).read_text(errors="replace")
        except OSError:
            return ""

    # -- running things inside -----------------------------------------------------------

    @property
    def agent(self) -> AgentClient:
        """The client of the guest agent (for tests of the agent itself)."""
        return self._client()

    def _client(self) -> AgentClient:
        if self._agent is None or not self.running():
            raise IncusError(f"VM {self.name} is not running; start() it first")
        return self._agent

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command inside, through the guest agent."""
        return self._client().exec(request)

    def read_file(self, path: str) -> bytes:
        """The content of ``path`` inside."""
        return self._client().read_file(path)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace ``path`` inside."""
        self._client().write_file(path, data, mode)

    def stat(self, path: str) -> tuple[Stat, Stat] | None:
        """(lstat, stat) of ``path`` inside, or None."""
        return self._client().stat(path)

    def sha256(self, path: str) -> str:
        """The sha256 of the file at ``path`` inside."""
        return self._client().sha256(path)

    def put_archive(self, archive: bytes, dest: str, is_tree: bool) -> None:
        """Unpack ``archive`` at ``dest`` inside."""
        self._client().put_archive(archive, dest, is_tree)

    def get_archive(self, path: str) -> bytes:
        """A tar of ``path`` inside."""
        return self._client().get_archive(path)
