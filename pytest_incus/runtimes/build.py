"""The builder of derived images over liblxc (``images.derived.Builder``).

A build runs in a privileged system container (``container.py``: its config writer, rootfs
check hook, exec server and teardown) on the unshifted base rootfs, with two differences from
a test instance:

- it shares the host's network namespace (``HostNetwork``: ``lxc.net.0.type = none``), so
  that the package manager reaches the mirrors the host reaches, through the host's own
  routes and resolver; nothing is bridged, routed or NATed. The host's ``/etc/resolv.conf``
  is bound read-only over the image's while the build runs, so the image keeps its own;
- its init is not the image's: a build needs no systemd, and no service may start (they
  would run in the host's network namespace). PID 1 is ``sleep infinity`` (``BUILD_INIT``),
  the exec server runs the steps and collects their orphans, and a ``policy-rc.d`` (written
  and removed by the steps, see ``images/derived.py``) keeps package scripts from starting
  services.

The changes go to the overlay's upper directory under the work directory. Once the steps are
done the container is stopped, and the result is flattened into the staging rootfs: a
read-only overlay of upper over base (the kernel applies the whiteouts and opaque directories
of the upper) copied with ``cp -a``, then unmounted. Whatever happens, interrupts included,
the container is destroyed, the mount is gone and the work directory removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pytest_incus import fsutil, tools
from pytest_incus.errors import ExecTimeoutError, ImageError, IncusError, tail
from pytest_incus.images import derived
from pytest_incus.images.store import Image
from pytest_incus.runtimes.container import Container, HostNetwork, _hook_path
from pytest_incus.settings import DEFAULT_MAX_PROCESSES
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import ExecRequest, Kind

log = logging.getLogger("pytest_incus")

# PID 1 of a build container: no init of the image (see the module docstring), only a
# program that waits, which every distribution has (coreutils' and busybox's sleep both take
# "infinity"). liblxc splits the value at spaces and knows no quotes: no shell script here.
BUILD_INIT = "/bin/sleep infinity"
BUILD_INIT_FLAVOUR = "build"  # not "systemd" or "busybox": ready once a command runs
START_TIMEOUT = 60.0  # seconds for the build container to start and run a first command
FLATTEN_TIMEOUT = 1800.0  # seconds for the copy of the result
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
NAME_PREFIX = "pti-build-"
MERGED = "merged"  # below the work directory: the read-only overlay that is copied
OUTPUT_LINES = 40  # of a failed step's output, in the error


class BuildContainer(Container):
    """A container for one image build: the host's network, no init of the image."""

    def _extra_config(self) -> list[str]:
        return [f"lxc.init.cmd = {BUILD_INIT}"]

    def _reap_orphans(self) -> bool:
        # sleep at PID 1 collects no orphans: the exec server does
        return True


def _host_resolv_conf() -> str:
    try:
        return HOST_RESOLV_CONF.read_text()
    except OSError as exc:
        log.warning("cannot read %s (%s): image builds get no resolver", HOST_RESOLV_CONF, exc)
        return ""


class ContainerBuilder:
    """Builds derived images in privileged containers on the host's network (see the module
    docstring): the ``derived.Builder`` over liblxc. ``cache_dir`` is the image cache's (the
    rootfs check hook is copied there)."""

    def __init__(self, cache_dir: Path, *, start_timeout: float = START_TIMEOUT) -> None:
        self.cache_dir = cache_dir
        self.start_timeout = start_timeout

    def build(
        self,
        base: Image,
        steps: Sequence[derived.Step],
        rootfs: Path,
        *,
        work: Path,
        progress: derived.Progress,
    ) -> None:
        """Run ``steps`` in a build container on ``base`` and leave base + changes in
        ``rootfs`` (see ``derived.Builder.build``). The image's init is not booted (see the
        module docstring)."""
        try:
            work.mkdir(mode=0o755)
        except OSError as exc:
            raise ImageError(
                f"cannot make the work directory {work} of an image build: {exc}; check the "
                "cache directory's free space and permissions (and that no other build uses it)",
                exc=exc,
            ) from exc
        try:
            upper = self._run(base, steps, work, progress)
            progress("derived image: copying the result")
            flatten(base.rootfs, upper, rootfs, work / MERGED)
        finally:
            self.reap(work)

    def _run(
        self,
        base: Image,
        steps: Sequence[derived.Step],
        work: Path,
        progress: derived.Progress,
    ) -> Path:
        """Run ``steps`` in a container of ``work``; the overlay upper directory it leaves."""
        name = NAME_PREFIX + secrets.token_hex(4)
        directory = work / name
        directory.mkdir(mode=0o755)
        spec = InstanceSpec(
            kind=Kind.CONTAINER,
            image=base.ref,
            privileged=True,  # on the unshifted base: the entry is unshifted like every image
            processes=DEFAULT_MAX_PROCESSES,
            boot_timeout=self.start_timeout,
            name=name,
        )
        lower = dataclasses.replace(base, init=BUILD_INIT_FLAVOUR)  # its init is not booted
        network = HostNetwork(_host_resolv_conf())
        with _as_image_error("preparing the build container"):
            machine = BuildContainer(
                spec, name, directory, lower, _hook_path(self.cache_dir), network
            )
        try:
            progress(f"derived image: starting the build container {name}")
            with _as_image_error("starting the build container"):
                machine.start()
            for number, step in enumerate(steps, 1):
                progress(f"derived image: [{number}/{len(steps)}] {step.what}")
                run_step(machine, step)
            with _as_image_error("stopping the build container"):
                machine.stop(0, force=True)
        finally:
            machine.destroy()
        return directory / "upper"

    @staticmethod
    def reap(work: Path) -> None:
        """Remove all of a build in work directory ``work``: its container (stopped, its
        monitor and cgroups gone), the mount of its result, and ``work`` itself. For a build
        that ended, and for the leftover of a run that was killed."""
        if not work.exists():
            return
        for directory in sorted(work.glob(NAME_PREFIX + "*")):
            Container.teardown(directory.name, directory)
        fsutil.remove_tree(work)  # detaches the mount of the result first


@contextlib.contextmanager
def _as_image_error(what: str) -> Iterator[None]:
    """An IncusError of the build container in the block (start, stop) becomes an
    ImageError saying it was the build's, with the original's notes."""
    try:
        yield
    except ImageError:
        raise
    except IncusError as exc:
        error = ImageError(f"building a derived image: {what} failed: {exc}", exc=exc)
        for note in getattr(exc, "__notes__", ()):
            error.add_note(note)
        raise error from exc


def run_step(machine: Container, step: derived.Step) -> None:
    """Run one build step (``/bin/sh -c``, stderr with stdout, so the error shows them in
    their order); ImageError with its command, exit code and output tail unless it exits 0
    within its timeout."""
    # the step's command runs by `/bin/sh -c` exactly as given, after its stderr is joined
    argv = ("/bin/sh", "-c", 'exec 2>&1; exec /bin/sh -c "$1"', "pytest-incus-build", step.command)
    request = ExecRequest(argv, dict(step.env), "/", None, None, step.timeout)
    started = time.monotonic()
    try:
        result = machine.exec(request)
    except ExecTimeoutError as exc:
        raise ImageError(
            f"building a derived image: {step.what} ran past its deadline of "
            f"{step.timeout:.0f}s and was killed: {step.command}\nits output:\n"
            + _output(exc.stdout),
            exc=exc,
        ) from exc
    except IncusError as exc:
        raise ImageError(
            f"building a derived image: {step.what} could not run ({exc}): {step.command}",
            exc=exc,
        ) from exc
    if result.exit_code != 0:
        raise ImageError(
            f"building a derived image: {step.what} failed (exit code {result.exit_code}, "
            f"after {time.monotonic() - started:.1f}s): {step.command}\nits output:\n"
            + _output(result.stdout),
        )


def _output(text: str) -> str:
    return tail(text, OUTPUT_LINES) or "(no output)"


def flatten(base_rootfs: Path, upper: Path, rootfs: Path, merged: Path) -> None:
    """Copy ``upper`` over ``base_rootfs``, as an overlay shows them, into ``rootfs``: a
    read-only overlay of the two as lower layers (the kernel applies the whiteouts and
    opaque directories of ``upper``) is mounted on ``merged``, copied with ``cp -a``
    (owners, modes, links, xattrs) and unmounted, on error too."""
    merged.mkdir(mode=0o755)
    tools.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"ro,lowerdir={upper}:{base_rootfs}",
            str(merged),
        ],
        what=f"mounting the result of an image build on {merged}",
        error=ImageError,
        fix="the kernel must support overlayfs (it runs every container)",
        timeout=60,
    )
    try:
        tools.run(
            ["cp", "-a", "--", f"{merged}/.", str(rootfs)],
            what=f"copying the result of an image build into {rootfs}",
            error=ImageError,
            fix="check the free space of the cache directory",
            timeout=FLATTEN_TIMEOUT,
        )
    finally:
        fsutil.unmount_below(merged)
    _keep_image_resolv_conf(base_rootfs, rootfs)


def _keep_image_resolv_conf(base_rootfs: Path, rootfs: Path) -> None:
    """An image without ``/etc/resolv.conf`` stays without one: the empty file that liblxc
    made to bind the host's over goes (the image's own, if it has one, was never written)."""
    made = rootfs / "etc" / "resolv.conf"
    original = base_rootfs / "etc" / "resolv.conf"
    missing = not original.exists() and not original.is_symlink()
    if missing and made.is_file() and made.stat().st_size == 0:
        made.unlink()
