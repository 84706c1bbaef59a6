"""The ``pytest-incus`` command: doctor, images, ls, shell, rm, reap."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_incus import network, registry
from pytest_incus.errors import IncusError
from pytest_incus.factory import InstanceFactory
from pytest_incus.images import vm as vm_images
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.owners import reap_server, server_instances
from pytest_incus.runtimes import accel
from pytest_incus.runtimes.container import unprivileged_unavailable
from pytest_incus.runtimes.protocol import Runtime
from pytest_incus.settings import (
    BACKEND_CHOICES,
    DEFAULT_IMAGE_SERVER,
    DEFAULT_MIRROR,
    DEFAULT_PROJECT,
    Settings,
    default_cache_dir,
)

DOCTOR_DEADLINE = 30.0


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        cache_dir=Path(args.cache_dir).absolute(),
        mirror=args.mirror,
        image_server=args.image_server,
        insecure_registries=frozenset(args.insecure_registry),
        subnet=args.subnet,
        backend=args.backend,
        remote=args.remote,
        project=args.project,
    )


def _local(settings: Settings, kind: str) -> Runtime:
    """This host's own runtime of ``kind`` (what doctor checks)."""
    return registry.default_runtimes(settings).get("local", kind)


def _print_progress(message: str) -> None:
    print(f"pytest-incus: {message}", file=sys.stderr, flush=True)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TiB"


def cmd_doctor(args: argparse.Namespace) -> int:
    """Really start a busybox container (with a deadline), probe VMs and host-only networks,
    and say what this host can run."""
    settings = _settings(args)
    problems = 0
    print(f"cache directory: {settings.cache_dir}")
    reason = _local(settings, "container").unavailable()
    if reason is None:
        reason = _try_container(settings, privileged=False)
        if reason is not None:
            privileged = _try_container(settings, privileged=True)
            if privileged is None:
                print("container: privileged containers work; unprivileged ones do not:")
                print(f"  {reason}")
                reason = None
                problems += 1
    if reason is None:
        print("container: ok (a busybox container started and ran a command)")
    else:
        print(f"container: cannot run: {reason}")
        problems += 1
    problems += _doctor_vm(settings)
    reason = _local(settings, "app").unavailable()
    if reason is None:
        print("app: ok (liblxc, lxc-execute, skopeo and umoci present)")
    else:
        print(f"app: cannot run: {reason}")
        problems += 1
    problems += _doctor_network(settings)
    return 1 if problems else 0


def _doctor_network(settings: Settings) -> int:
    """Say whether host-only networks work here (the network module really makes one and
    removes it again); 1 if they do not."""
    try:
        reason = network.probe(settings)
    except IncusError as exc:  # say a subnet that cannot work here: the doctor goes on
        reason = str(exc)
    if reason is None:
        print("network: ok (a bridge, its DNS server and firewall table made and removed)")
    else:
        print(f"network: cannot run: {reason}")
        return 1
    return 0


def _doctor_vm(settings: Settings) -> int:
    """Say whether VMs can run and with which accelerator: the verdict VMs use, what it rests
    on, and a KVM probe run now where a VM image's kernel is cached; 1 if VMs cannot run."""
    reason = _local(settings, "vm").unavailable()
    if reason is not None:
        print(f"vm: cannot run: {reason}")
        return 1
    kernel = _cached_vm_kernel(settings)
    recorded = accel.cached_verdict(settings.cache_dir)
    if kernel is None:
        print(
            "kvm: not probed: the probe boots a VM image's Linux kernel under KVM, and no VM "
            "image is cached yet (the first VM probes; or: pytest-incus images build "
            "debian/12 --kind vm, then doctor again)"
        )
    else:
        now = accel.probe_kvm(settings.cache_dir / "probe", kernel)
        print(f"kvm probe now: {'works' if now.works else 'does not work'}: {now.describe()}")
        if recorded is None:
            recorded = accel.record(settings.cache_dir, now, kernel)
    if recorded is None:
        print("vm: ok (qemu-system-x86_64 and qemu-img present; KVM not judged yet)")
        return 0
    state = "KVM works" if recorded.works else "KVM does not work"
    print(f"kvm verdict VMs use: {state}: {recorded.describe()}")
    if recorded.works:
        print("vm: ok (qemu-system-x86_64 and qemu-img present; VMs use KVM)")
    else:
        print(
            "vm: ok (qemu-system-x86_64 and qemu-img present; VMs run under TCG emulation, "
            "much slower than KVM; --incus-accel=kvm would fail)"
        )
    return 0


def _cached_vm_kernel(settings: Settings) -> Path | None:
    """The kernel of a cached VM image (the newest), to probe KVM with; None if none."""
    entries = [e for e in ImageStore(settings).list() if e.kind == "vm"]
    if not entries:
        return None
    return vm_images.boot_kernel(max(entries, key=lambda e: e.created).path)


def _try_container(settings: Settings, *, privileged: bool) -> str | None:
    """Start a busybox container and run a command in it; None if that worked, else why not."""
    if not privileged and (reason := unprivileged_unavailable()):
        return reason
    outcome: list[str | None] = []

    def attempt() -> None:
        factory = InstanceFactory(settings, ImageStore(settings, progress=_print_progress))
        try:
            inst = factory.launch(
                kind="container",
                image="busybox",
                privileged=privileged,
                boot_timeout=DOCTOR_DEADLINE,
            )
            result = inst.exec(["echo", "ok"], timeout=DOCTOR_DEADLINE)
            outcome.append(None if result.stdout.strip() == "ok" else f"exec said {result!r}")
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")
        finally:
            factory.close()

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(DOCTOR_DEADLINE + 10)
    if worker.is_alive():
        return f"starting a busybox container took longer than {DOCTOR_DEADLINE:.0f}s"
    return outcome[0] if outcome else "the check ended without a result"


def cmd_images(args: argparse.Namespace) -> int:
    """List, build or prune cached images."""
    settings = _settings(args)
    store = ImageStore(settings, progress=_print_progress)
    if args.action == "list":
        for image in store.list():
            made_from = ""
            if image.base:
                what = {"vm": "VM disk made", "vm-boot": "saved boot of the VM"}.get(
                    image.kind, "uid-shifted copy" if ".shift" in image.key else "derived"
                )
                made_from = f" ({what} from {image.base})"
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(image.created))
            print(
                f"{image.ref:24} {image.kind:10} {_human(image.size):>9}  {created}  "
                f"{image.path}{made_from}"
            )
        downloads = [p for p in store.downloads() if not p.name.startswith(".")]
        if downloads:
            size = sum(p.stat().st_size for p in downloads)
            print(
                f"{'(downloads)':24} {'files':10} {_human(size):>9}  {len(downloads)} files "
                f"of images: entries in {downloads[0].parent}"
            )
        return 0
    if args.action == "build":
        if not args.images:
            print("pytest-incus images build: name at least one image", file=sys.stderr)
            return 2
        packages = [p for p in args.packages.split(",") if p.strip()]
        for name in args.images:
            if packages:
                image = store.derive(name, packages=packages, kind=args.kind)
            else:
                image = store.get(name, args.kind)
            kernel = f", kernel {image.kernel_release}" if image.kernel_release else ""
            print(f"{image.ref} ({image.kind}): {image.path} ({_human(image.size)}{kernel})")
        return 0
    in_use = {r.image for r in registry.records(settings)}
    keys_in_use = {img.key for img in store.list() if img.ref in in_use}
    removed: list[Image] = []
    for name in args.images or [None]:
        removed += store.prune(name, in_use=keys_in_use)
    for image in removed:
        print(f"removed {image.ref} ({image.path})")
    if keys_in_use:
        print(f"kept images in use by existing instances: {', '.join(sorted(in_use))}")
    return 0


def _server(settings: Settings) -> IncusClient:
    """The Incus server of ``--backend=incus``, checked (UnavailableError saying why not)."""
    client = IncusClient.from_settings(settings)
    client.check()
    return client


def cmd_ls(args: argparse.Namespace) -> int:
    """List the instances this tool created that still exist (with ``--backend=incus``, also
    those of every host on the Incus server, found by their ``user.pytest-incus.*`` keys)."""
    settings = _settings(args)
    if settings.backend == "incus":
        client = _server(settings)
        for found in server_instances(client):
            owner = (
                "kept"
                if found.kept
                else (
                    "orphaned"
                    if found.orphaned
                    else f"pid {found.owner.pid if found.owner else '?'}"
                )
            )
            print(
                f"{found.name:16} {found.kind:10} {found.image:24} {found.created[:19]}  "
                f"{owner} on {found.owner_host.split('/', 1)[0]}, at {client.remote}"
                + (f" ({found.location})" if found.location not in ("", "none") else "")
            )
        return 0
    for record in registry.records(settings):
        owner = (
            "kept"
            if record.kept
            else (
                f"pid {record.owner.pid}" if record.owner and record.owner.alive() else "orphaned"
            )
        )
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        print(f"{record.name:16} {record.kind:10} {record.image:24} {created}  {owner}")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    """Open a shell (or run a command) inside an instance."""
    settings = _settings(args)
    record = registry.read_record(settings.instances_dir / args.name)
    if record is None:
        print(f"no instance named {args.name!r} (see pytest-incus ls)", file=sys.stderr)
        return 1
    runtime = registry.default_runtimes(settings).get(record.backend, record.kind)
    return runtime.shell(args.name, record.directory, args.command or None)


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete instances by name, whoever owns them."""
    settings = _settings(args)
    status = 0
    for name in args.names:
        record = registry.read_record(settings.instances_dir / name)
        if record is None:
            print(f"no instance named {name!r}", file=sys.stderr)
            status = 1
            continue
        registry.remove_instance(settings, name, record.kind, backend=record.backend)
        print(f"deleted {name}")
    network.sweep(settings)  # a network whose last instance that was
    return status


def cmd_reap(args: argparse.Namespace) -> int:
    """Delete what crashed runs left: instances whose owning process is gone."""
    settings = _settings(args)
    removed = registry.reap(settings, include_kept=args.kept)
    if settings.backend == "incus":
        removed += reap_server(_server(settings), include_kept=args.kept)
    for name in removed:
        print(f"reaped {name}")
    if not removed:
        print("nothing to reap")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``pytest-incus``."""
    parser = argparse.ArgumentParser(prog="pytest-incus", description=__doc__)
    parser.add_argument(
        "--cache-dir",
        default=str(default_cache_dir()),
        help="image cache and instance directory (default %(default)s)",
    )
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror for builds")
    parser.add_argument(
        "--image-server",
        default=DEFAULT_IMAGE_SERVER,
        help="simplestreams server of images:<distro>/<release> names (default %(default)s)",
    )
    parser.add_argument(
        "--subnet",
        default=None,
        metavar="NET/PREFIX",
        help="IPv4 range of the host-only networks, as --incus-subnet (default: chosen "
        "automatically)",
    )
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="an OCI registry to reach over plain HTTP (repeatable)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="local",
        help="ls, reap: also the instances of this backend (incus: an Incus server's, found by "
        "their user.pytest-incus.* keys)",
    )
    parser.add_argument(
        "--remote",
        default=None,
        metavar="SOCKET|https://HOST:PORT",
        help="the Incus server of --backend=incus (default: Incus's own unix socket)",
    )
    parser.add_argument("--project", default=DEFAULT_PROJECT, help="its Incus project")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check what this host can run").set_defaults(func=cmd_doctor)
    images = sub.add_parser("images", help="list, build or prune cached images")
    images.add_argument("action", choices=("list", "build", "prune"))
    images.add_argument("images", nargs="*", help="image names (build, prune)")
    images.add_argument(
        "--kind",
        choices=("container", "vm", "app"),
        default="container",
        help="build: the kind of instance the image is for (default container)",
    )
    images.add_argument(
        "--packages",
        default="",
        metavar="PKG[,PKG...]",
        help="build: a derived image with these packages installed (comma-separated); "
        "prints its ref, which works as image=",
    )
    images.set_defaults(func=cmd_images)
    sub.add_parser("ls", help="instances that still exist").set_defaults(func=cmd_ls)
    shell = sub.add_parser("shell", help="a shell inside an instance")
    shell.add_argument("name")
    shell.add_argument(
        "command", nargs=argparse.REMAINDER, help="run this instead of a login shell"
    )
    shell.set_defaults(func=cmd_shell)
    rm = sub.add_parser("rm", help="delete instances by name (kept ones too)")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=cmd_rm)
    reap = sub.add_parser("reap", help="delete instances whose owning process is gone")
    reap.add_argument("--kept", action="store_true", help="also delete kept instances")
    reap.set_defaults(func=cmd_reap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytest-incus`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except IncusError as exc:
        print(f"pytest-incus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
