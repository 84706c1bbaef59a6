"""Images on an Incus server: what an instance is created from, as the server wants it.

:meth:`IncusImages.source` gives the ``source`` of ``POST /1.0/instances`` for a spec, with the
instance config the image needs and the path of a POSIX ``sh`` inside it:

- Images the plugin builds (``busybox``, ``debian/<release>``, derived images, local rootfs
  paths, names a build hook makes: whatever the image store caches as a container rootfs) are
  packed as an Incus *unified* image tarball (``metadata.yaml`` and ``rootfs/``) and uploaded
  once, by fingerprint. The tarball is deterministic (members in sorted order, every mtime the
  entry's build time, numeric owners, xattrs kept, no compression: the upload is local or on a
  LAN, and tar is what Incus unpacks fastest), so every worker and every later run computes the
  same fingerprint (the tarball's sha256, which Incus checks on upload). The fingerprint is
  memoised per cache entry in ``<cache>/incus/<key>.<form>.json`` (keyed by the entry's build
  time and the packing's version), so a later run asks the server ``GET /1.0/images/FP``
  without re-reading a 200 MB rootfs; an image the server has is never uploaded again, whoever
  uploaded it. Uploads happen under a lock per entry (``<cache>/incus/<key>.<form>.lock``), so
  the workers of one host upload an image once.
- ``images:<distro>/<release>[/variant]`` is a remote source for the server
  (``"mode": "pull"`` from ``--incus-image-server`` over simplestreams): nothing is downloaded
  here. The alias is resolved here, once per session, by the same rule as the local backend's
  (``distro/release`` names the ``default`` variant), and the server is given the fingerprint;
  if this host cannot reach the image server, the server is given the alias to resolve itself.
- OCI references (kind ``app``): Incus 6.0 has no OCI support, so the plugin's own unpacked app
  image is uploaded like a system image, with a small launcher added (see below) that runs the
  image's program as the container's init.

The app launcher, ``/.pytest-incus/`` in an app's image (owned by the image's user, so that
the program, which runs as that user, can write there):

- ``busybox``: the host's static busybox; ``sh``: a link to it, the ``shell`` of images that
  have no ``/bin/sh`` of their own;
- ``init``: a busybox ``sh`` script, the container's init (``raw.lxc``'s ``lxc.init.cmd``, run
  as the image's user in its working directory, as ``lxc.init.uid/gid/cwd`` say). It removes
  :data:`APP_EXIT`, sends the program's stdout and stderr to :data:`APP_LOG` (appended:
  every run's output, as the local backend's ``app.log``; the shell's own words, such as
  its "Terminated" of a program a stop ended, go to the console), runs the program (its
  argv base64-encoded on init's command line, word by word: liblxc splits ``lxc.init.cmd`` on
  spaces and knows no escapes), forwards the stop signals (SIGPWR, SIGTERM, SIGINT, SIGHUP) to
  it as SIGTERM, and when it ends writes its exit status to :data:`APP_EXIT` (a number and a
  newline; a shell's 128+N for a program killed by signal N). The container stops when init
  ends. No :data:`APP_EXIT` after a stop means the program was killed with its container.
  The program is a background job of that shell (so that init can forward signals while it
  waits), and POSIX shells start background jobs with SIGINT and SIGQUIT ignored: an app on
  this backend cannot be interrupted by those two (the local backend's init.lxc leaves them).
- ``hook``: ``lxc.hook.start``, run as root inside the container before init: brings the
  loopback interface up (as container engines do; a system container's own init does it).
  liblxc runs start hooks through the image's ``/bin/sh``, so images without one get no hook
  and keep their loopback down.

The program's environment is the image's Env, a default PATH, then the spec's ``env``, as the
instance's ``environment.*`` config (which Incus also gives every exec).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import filelock
import yaml

from pytest_incus import fsutil
from pytest_incus.errors import (
    ImageError,
    InstanceStartError,
    ServerError,
    UnavailableError,
)
from pytest_incus.images import simplestreams
from pytest_incus.images.busybox import host_busybox
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.rootfs import inside
from pytest_incus.images.store import Image, ImageStore

# the local app runtime's reading of an image: the same program lookup and the same User
from pytest_incus.runtimes.app import DEFAULT_PATH, find_program, user_ids
from pytest_incus.spec import InstanceSpec

if TYPE_CHECKING:
    from pytest_incus.incus.client import IncusClient

log = logging.getLogger("pytest_incus")

PACKING = "1"  # the tarball layout's version: another one is another fingerprint
LAUNCHER = "1"  # the app launcher's layout (its scripts' text counts by itself)
LOCK_TIMEOUT = 3600.0
UPLOAD_TIMEOUT = 3600.0  # seconds for the server to take an image in
REQUEST_TIMEOUT = 600.0  # of the upload request itself (the body is streamed)

APP_DIR = "/.pytest-incus"
APP_BUSYBOX = f"{APP_DIR}/busybox"
APP_SHELL = f"{APP_DIR}/sh"
APP_INIT = f"{APP_DIR}/init"
APP_HOOK = f"{APP_DIR}/hook"
APP_EXIT = f"{APP_DIR}/exit"
"""The app's exit status once it has ended: ``"<status>\\n"``; absent while it runs, and after
a stop that killed it."""
APP_LOG = f"{APP_DIR}/log"
"""The app's stdout and stderr, every run appended (what ``logs()`` shows)."""

_INIT_SCRIPT = f"""\
# init of a pytest-incus app on Incus: runs the program its arguments name (each base64 of one
# word, after an "x" so that no word is empty), logs, forwards stop signals, records the exit
# Only the program's output goes to the log: the shell's own (its "Terminated" when a stop's
# signal ends the program) goes to the console
B={APP_BUSYBOX}
$B rm -f {APP_EXIT}
n=$#
for word; do
  v=$(printf %s "${{word#x}}" | $B base64 -d; echo .)
  set -- "$@" "${{v%.}}"
done
shift $n
"$@" >>{APP_LOG} 2>&1 </dev/null &
child=$!
trap 'signalled=1; $B kill -TERM $child 2>/dev/null' PWR TERM INT HUP
while :; do
  signalled=
  wait $child
  status=$?
  [ -n "$signalled" ] || break  # else the wait was cut short: wait again for the status
done
echo $status > {APP_EXIT}.new && $B mv {APP_EXIT}.new {APP_EXIT}
"""

_HOOK_SCRIPT = f"""\
#!{APP_SHELL}
# lxc.hook.start of a pytest-incus app: the loopback interface up, as container engines do
{APP_BUSYBOX} ip link set lo up
"""


@dataclass(frozen=True)
class Source:
    """What an instance is created from: the ``source`` of ``POST /1.0/instances``, the
    instance config the image needs (an app's init and environment), and the path of a POSIX
    ``sh`` inside the instance (None if the image has none)."""

    source: dict[str, Any]
    config: dict[str, str]
    shell: str | None
    # the image's init as the plugin built it ("systemd", "busybox", "app"); None for an
    # image the server fetches itself (images:), whose init is looked at once it runs
    init: str | None = None


@dataclass(frozen=True)
class _Extra:
    """A file the tarball adds to an image's rootfs (the app launcher)."""

    path: str  # inside the rootfs, relative: ".pytest-incus/init"
    kind: bytes  # tarfile's type: REGTYPE, DIRTYPE, SYMTYPE
    data: bytes = b""
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    link: str = ""


class _Hashing:
    """A write-only file that hashes what goes through it to ``out`` (None: nowhere)."""

    def __init__(self, out: IO[bytes] | None) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)


def metadata_yaml(entry: Image, ref: ImageRef, architecture: str) -> bytes:
    """The ``metadata.yaml`` of ``entry``'s tarball (its creation date is the entry's build
    time, so that it is the same in every packing)."""
    meta = {
        "architecture": architecture,
        "creation_date": int(entry.created),
        "properties": {
            "description": f"pytest-incus {entry.ref}",
            "os": ref.source,
            "release": ref.release or "",
        },
    }
    return yaml.safe_dump(meta, sort_keys=True).encode()


def pack(
    rootfs: Path, out: IO[bytes] | None, *, metadata: bytes, mtime: int, extra: tuple[_Extra, ...]
) -> tuple[str, int]:
    """Write the unified image tarball of ``rootfs`` to ``out`` (None: only hash it); its
    fingerprint (sha256) and size.

    Deterministic: members in sorted order (``tarfile`` adds a directory's entries sorted),
    every mtime ``mtime``, numeric owners only, xattrs as PAX records; the contents of
    ``/dev`` left out (Incus leaves them out when it unpacks; the container gets its own).
    """
    sink = _Hashing(out)

    def member(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        relative = info.name[len("rootfs") :].lstrip("/")
        if relative.startswith("dev/"):
            return None
        info.mtime = mtime
        info.uname = info.gname = ""
        path = rootfs / relative
        records = dict(info.pax_headers)
        with contextlib.suppress(OSError):  # a file system without xattrs
            for name in sorted(os.listxattr(path, follow_symlinks=False)):
                value = os.getxattr(path, name, follow_symlinks=False)
                # tarfile writes a str of surrogates back as the bytes it came from
                records[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = records
        return info

    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        head = tarfile.TarInfo("metadata.yaml")
        head.size, head.mtime, head.mode = len(metadata), mtime, 0o644
        tar.addfile(head, io.BytesIO(metadata))
        tar.add(str(rootfs), arcname="rootfs", recursive=True, filter=member)
        for item in extra:
            info = tarfile.TarInfo(f"rootfs/{item.path}")
            info.type, info.mode, info.mtime = item.kind, item.mode, mtime
            info.uid, info.gid = item.uid, item.gid
            if item.kind == tarfile.SYMTYPE:
                info.linkname = item.link
            if item.kind == tarfile.REGTYPE:
                info.size = len(item.data)
                tar.addfile(info, io.BytesIO(item.data))
            else:
                tar.addfile(info)
    return sink.sha256.hexdigest(), sink.size


# -- apps -----------------------------------------------------------------------------------


def _encode(word: str) -> str:
    """One argv word for the launcher's command line: no space, no quote, never empty."""
    return "x" + base64.b64encode(word.encode()).decode()


def _has_sh(rootfs: Path) -> bool:
    found = inside(rootfs, "/bin/sh")
    return found is not None and found.is_file()


def _launcher(rootfs: Path, uid: int, gid: int) -> tuple[_Extra, ...]:
    """The launcher's files for an app image of ``rootfs`` whose program runs as uid:gid."""
    busybox = host_busybox()
    files = [
        _Extra(".pytest-incus", tarfile.DIRTYPE, mode=0o755, uid=uid, gid=gid),
        _Extra(".pytest-incus/busybox", tarfile.REGTYPE, busybox.read_bytes(), 0o755),
        _Extra(".pytest-incus/sh", tarfile.SYMTYPE, link="busybox", mode=0o777),
        _Extra(".pytest-incus/init", tarfile.REGTYPE, _INIT_SCRIPT.encode(), 0o644),
    ]
    if _has_sh(rootfs):
        files.append(_Extra(".pytest-incus/hook", tarfile.REGTYPE, _HOOK_SCRIPT.encode(), 0o755))
    return tuple(files)


def _launcher_version() -> str:
    """What an app image's launcher is made of: its version and the host's busybox (a new
    busybox is another tarball, so another fingerprint)."""
    st = host_busybox().stat()
    scripts = hashlib.sha256((_INIT_SCRIPT + _HOOK_SCRIPT).encode()).hexdigest()[:16]
    return f"{LAUNCHER}-{scripts}-{st.st_size}-{st.st_mtime_ns}"


# -- the images of one server ---------------------------------------------------------------


@dataclass(frozen=True)
class _Packing:
    """One way of packing one cache entry: ``form`` ("container" or "app"), ``version`` (a
    memo of another version is stale), and the files added to its rootfs."""

    form: str
    version: str
    extra: Callable[[], tuple[_Extra, ...]]


class IncusImages:
    """The images of the server ``client`` talks to, for the instances of a run whose image
    store (the local cache) is ``store``."""

    def __init__(self, client: IncusClient, store: ImageStore) -> None:
        self.client = client
        self.store = store
        self._present: dict[tuple[str, float, str], str] = {}  # checked this session
        self._remote: dict[str, dict[str, Any]] = {}  # images: aliases resolved this session

    @property
    def _incus_dir(self) -> Path:
        return self.store.settings.cache_dir / "incus"

    def source(self, spec: InstanceSpec) -> Source:
        """What an instance of ``spec`` is created from on the server, uploading the image
        first if the server does not have it yet. ConfigError for an image that cannot work
        for the kind, UnavailableError for a VM (not uploaded yet), ImageError when an image
        cannot be built, packed or uploaded, InstanceStartError for an app image that names
        no program it has."""
        ref = self.store.check(spec.image, spec.kind)
        if spec.kind == "vm":
            raise UnavailableError(
                f"image {spec.image!r}: VM images are not uploaded to Incus servers yet; run "
                "VMs with --incus-backend=local"
            )
        if ref.source == "simplestreams":
            return Source(self._remote_source(ref), {}, "/bin/sh")
        if spec.kind == "app":
            return self._app(spec, ref, self.store.get(spec.image, "app"))
        entry = self.store.get(spec.image, "container")
        packing = _Packing("container", PACKING, tuple)
        fingerprint = self._ensure(entry, ref, packing)
        shell = "/bin/sh" if _has_sh(entry.rootfs) else None
        return Source({"type": "image", "fingerprint": fingerprint}, {}, shell, init=entry.init)

    # -- images: --------------------------------------------------------------------------

    def _remote_source(self, ref: ImageRef) -> dict[str, Any]:
        alias = ref.name.split(":", 1)[1]
        if alias in self._remote:
            return self._remote[alias]
        server = self.store.settings.image_server
        source: dict[str, Any] = {
            "type": "image",
            "mode": "pull",
            "server": server,
            "protocol": "simplestreams",
        }
        try:
            image = simplestreams.lookup(server, alias, arch=self._arch())
        except simplestreams.ServerUnreachable as exc:
            # the Incus server may reach what this host cannot: let it resolve the alias
            log.warning("%s; the Incus server resolves %s itself", exc, ref.name)
            source["alias"] = alias
        else:
            source["fingerprint"] = image.fingerprint
        self._remote[alias] = source
        return source

    def _arch(self) -> str:
        """The server's architecture as simplestreams names it."""
        arches = self.client.server().get("environment", {}).get("architectures") or []
        kernel = str(arches[0]) if arches else os.uname().machine
        return simplestreams.arch_name(kernel)

    def _architecture(self) -> str:
        """The server's architecture as metadata.yaml names it (the kernel's name)."""
        arches = self.client.server().get("environment", {}).get("architectures") or []
        return str(arches[0]) if arches else os.uname().machine

    # -- apps -----------------------------------------------------------------------------

    def _app(self, spec: InstanceSpec, ref: ImageRef, entry: Image) -> Source:
        if entry.app is None:
            raise InstanceStartError(f"image {spec.image!r} has no OCI config recorded")
        config = entry.app
        argv = list(spec.command or (*config.entrypoint, *config.cmd))
        if not argv:
            raise InstanceStartError(
                f"image {spec.image!r} names no program (no Entrypoint or Cmd): "
                "give one with command=[...]"
            )
        env = dict(item.split("=", 1) for item in config.env if "=" in item)
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(spec.env)
        if find_program(entry.rootfs, argv[0], env["PATH"], config.working_dir) is None:
            where = f"in PATH={env['PATH']}" if "/" not in argv[0] else "at that path"
            raise InstanceStartError(
                f"image {spec.image!r} has no program {argv[0]!r} {where} (an executable "
                "file); give command=[...] naming a program the image has"
            )
        uid, gid = user_ids(entry.rootfs, config.user)
        packing = _Packing(
            "app", f"{PACKING}-{_launcher_version()}", lambda: _launcher(entry.rootfs, uid, gid)
        )
        fingerprint = self._ensure(entry, ref, packing)
        words = " ".join(_encode(word) for word in argv)
        lines = [f"lxc.init.cmd = {APP_BUSYBOX} sh {APP_INIT} {words}"]
        lines += [f"lxc.init.uid = {uid}", f"lxc.init.gid = {gid}"]
        if config.working_dir:
            lines.append(f"lxc.init.cwd = {config.working_dir}")
        if _has_sh(entry.rootfs):
            lines.append(f"lxc.hook.start = {APP_HOOK}")
        instance_config = {"raw.lxc": "\n".join(lines) + "\n"}
        instance_config.update({f"environment.{key}": value for key, value in env.items()})
        shell = "/bin/sh" if _has_sh(entry.rootfs) else APP_SHELL
        return Source(
            {"type": "image", "fingerprint": fingerprint}, instance_config, shell, init="app"
        )

    # -- uploads --------------------------------------------------------------------------

    def _ensure(self, entry: Image, ref: ImageRef, packing: _Packing) -> str:
        """The fingerprint of ``entry`` packed as ``packing`` says, uploaded to the server
        if it does not have it yet (once: under the entry's lock, and never when the server
        has it, whoever uploaded it)."""
        seen = (entry.key, entry.created, packing.form)
        if seen in self._present:
            return self._present[seen]
        memo = self._memo(entry, packing)
        if memo is None or not self._has(memo):
            self._incus_dir.mkdir(parents=True, exist_ok=True)
            lock = self._incus_dir / f"{entry.key}.{packing.form}.lock"
            with filelock.FileLock(lock, timeout=LOCK_TIMEOUT):
                memo = self._memo(entry, packing)  # another worker's, made while we waited
                if memo is None or not self._has(memo):
                    memo = self._pack_and_upload(entry, ref, packing)
        self._present[seen] = memo
        return memo

    def _memo_path(self, entry: Image, packing: _Packing) -> Path:
        return self._incus_dir / f"{entry.key}.{packing.form}.json"

    def _memo(self, entry: Image, packing: _Packing) -> str | None:
        """The fingerprint recorded for this build of ``entry`` and this packing, or None."""
        data = fsutil.read_json(self._memo_path(entry, packing))
        if (
            isinstance(data, dict)
            and data.get("created") == entry.created
            and data.get("version") == packing.version
            and isinstance(data.get("fingerprint"), str)
        ):
            return str(data["fingerprint"])
        return None

    def _has(self, fingerprint: str) -> bool:
        """True if the server (the client's project) has the image ``fingerprint``."""
        try:
            self.client.request("GET", f"/1.0/images/{fingerprint}")
        except ServerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _pack_and_upload(self, entry: Image, ref: ImageRef, packing: _Packing) -> str:
        """Pack ``entry`` into a tarball next to its memo, record the fingerprint, upload it
        if the server lacks it; the tarball is removed afterwards."""
        stem = f"{entry.key}.{packing.form}"
        for leftover in self._incus_dir.glob(f"{stem}.*.tar"):  # of a packer that was killed
            pid = leftover.name[len(stem) + 1 : -len(".tar")]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                leftover.unlink(missing_ok=True)
        tarball = self._incus_dir / f"{stem}.{os.getpid()}.tar"
        started = time.monotonic()
        metadata = metadata_yaml(entry, ref, self._architecture())
        try:
            with open(tarball, "wb") as out:
                fingerprint, size = pack(
                    entry.rootfs,
                    out,
                    metadata=metadata,
                    mtime=int(entry.created),
                    extra=packing.extra(),
                )
            memo = {
                "created": entry.created,
                "version": packing.version,
                "fingerprint": fingerprint,
                "size": size,
                "ref": entry.ref,
            }
            fsutil.write_atomic(self._memo_path(entry, packing), json.dumps(memo, indent=1))
            if not self._has(fingerprint):
                self._upload(entry, packing, tarball, fingerprint, size, started)
        except OSError as exc:  # of this host's files: the cache's disk, say
            raise ImageError(
                f"packing image {entry.ref} for the Incus server {self.client.remote} into "
                f"{tarball} failed: {exc}; check the free space and the permissions of "
                f"{self._incus_dir}",
                exc=exc,
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tarball.unlink()
        return fingerprint

    def _upload(
        self, entry: Image, packing: _Packing, tarball: Path, fp: str, size: int, started: float
    ) -> None:
        remote = self.client.remote
        self.store.progress(
            f"uploading image {entry.ref} to the Incus server at {remote} "
            f"({size / (1 << 20):.0f} MiB; once, later runs use it)"
        )
        properties = {
            "pytest-incus.ref": entry.ref,
            "pytest-incus.key": entry.key,
            "pytest-incus.form": packing.form,
            "pytest-incus.host": os.uname().nodename,
        }
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Incus-fingerprint": fp,
            "X-Incus-properties": urllib.parse.urlencode(properties),
        }
        try:
            with open(tarball, "rb") as body:
                answer = self.client.request(
                    "POST", "/1.0/images", data=body, headers=headers, timeout=REQUEST_TIMEOUT
                )
            operation = answer.json().get("metadata") or {}
            self._wait(str(operation["id"]), entry)
        except ServerError as exc:
            if self._has(fp):  # another host uploaded it meanwhile
                return
            raise ImageError(
                f"uploading image {entry.ref} ({fp[:12]}) to the Incus server at {remote} "
                f"failed: {exc}; check the server's free space (its storage pool and "
                "/var/lib/incus/images) and its log",
                exc=exc,
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(
                f"uploading image {entry.ref} to the Incus server at {remote}: the server's "
                f"answer is not an operation ({exc!r}); is {remote} an Incus server?",
                exc=exc,
            ) from exc
        self.store.progress(
            f"image {entry.ref} packed and uploaded to the Incus server at {remote} in "
            f"{time.monotonic() - started:.1f}s"
        )

    def _wait(self, operation_id: str, entry: Image) -> None:
        """Wait for the upload's operation to end (ServerError if it failed)."""
        deadline = time.monotonic() + UPLOAD_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImageError(
                    f"uploading image {entry.ref} to the Incus server at {self.client.remote}: "
                    f"the server did not take it in within {UPLOAD_TIMEOUT:.0f}s (operation {operation_id}); "
                    "check the server's load and log"
                )
            done = self.client.wait(operation_id, timeout=min(left, 60.0))
            if done.get("status") != "Running":
                return

    def uploaded(self) -> Iterator[dict[str, Any]]:
        """The images on the server that pytest-incus uploaded (any host's)."""
        images = self.client.call("GET", "/1.0/images", params={"recursion": "1"}) or []
        for image in images:
            if "pytest-incus.key" in (image.get("properties") or {}):
                yield image
