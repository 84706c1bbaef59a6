"""The image cache: entries built once, under a lock, visible only when complete.

Layout below the cache directory::

    images/<key>/rootfs/        the image's root filesystem (containers)
    images/<key>.vmroot/rootfs/ the root filesystem that VM images of <key> are made from
    images/<key>.vm/disk.qcow2  a VM image: its disk, vmlinuz and initrd.img (images/vm.py)
    images/<key>.vm.boot-<v>/   a VM's saved first boot for one machine shape <v>: its memory
                                and device state and its disk overlay (runtimes/snapshot.py)
    images/oci-<digest>/rootfs/ an OCI image unpacked by umoci, keyed by its manifest digest
                                (blobs live once in the shared layout: see images/oci.py)
    images/images-<fp>/rootfs/  an ``images:`` image, keyed by its fingerprint (its files stay
                                in downloads/<sha256>: see images/simplestreams.py)
    images/derived-<d>/rootfs/  a derived image, keyed by its base's content and its recipe
                                (recipes/<digest>.json: what a derived:<digest>:... name means)
    images/<key>/image.json     its record; written last, so it is the completion stamp
    images/<key>.lock           held while the entry is checked, built or removed
    images/builds.jsonl         one line per builder run, appended under the entry's lock
    staging/<key>.<pid>.<n>/    builds in progress; renamed to images/<key> when complete

Which source makes an entry, and how a name resolves to its key, is the sources' business
(images/source.py, one module per source); the store keys, locks, stages and records.

A build killed midway leaves only a staging directory, which the next builder of that key
(holding the lock, so nobody else is building it) removes. An entry whose record is missing or
unreadable is corrupt: it is removed and rebuilt, with a warning.
"""

from __future__ import annotations

import builtins
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import filelock

from pytest_incus import fsutil
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images import oci, shift, simplestreams, sources, vm
from pytest_incus.images.derived import BUILD_WORK, Builder, Recipe, save_recipe
from pytest_incus.images.derived import name as derived_name
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.source import (
    BuildHook,
    Built,
    Context,
    ImageSource,
    Progress,
    container_builder,
)
from pytest_incus.settings import Settings
from pytest_incus.spec import KINDS
from pytest_incus.summary import Tally

log = logging.getLogger("pytest_incus")

RECORD = "image.json"
BUILD_LOG = "builds.jsonl"
LOCK_TIMEOUT = 3600.0

# how each source makes its images, as the run's summary says it (see summary.py)
HOW_MADE = {
    "busybox": "built",
    "debian": "built",
    "hook": "built",
    "simplestreams": "downloaded",
    "oci": "fetched",
    "derived": "derived",
    "local": "copied",
}


_counter = itertools.count()
_STAGING = re.compile(r".+\.(\d+)\.\d+")  # a staging directory: <key>.<builder's pid>.<n>


@dataclass(frozen=True)
class Image:
    """A complete cache entry."""

    ref: str
    kind: str
    key: str
    path: Path
    size: int
    created: float
    init: str  # "systemd", "busybox" or "other": how readiness is decided
    base: str | None = None  # the entry it was made from (uid-shifted copy; VM image's rootfs)
    recipe: str = ""  # version of the build steps; an entry of another recipe is rebuilt
    kernel_release: str | None = None  # a VM image's kernel (``uname -r`` in the guest)
    app: oci.AppConfig | None = None  # an app image's OCI config (Entrypoint, Cmd, Env, ...)
    fingerprint: str | None = None  # a downloaded image's, as its server computes it
    downloads: tuple[str, ...] = ()  # the download cache's files it was made from (sha256)

    @property
    def rootfs(self) -> Path:
        """A container image's root filesystem (the lower layer of every instance's overlay)."""
        return self.path / "rootfs"

    @property
    def disk(self) -> Path:
        """A VM image's disk (qcow2, ext4 on the whole disk): the base of instance overlays."""
        return self.path / vm.DISK

    @property
    def kernel(self) -> Path:
        """A VM image's kernel."""
        return self.path / vm.KERNEL

    @property
    def initrd(self) -> Path:
        """A VM image's initramfs (loads the virtio and ext4 modules, mounts /dev/vda)."""
        return self.path / vm.INITRD

    def _complete(self) -> bool:
        if self.kind == "vm":
            return all(p.is_file() for p in (self.disk, self.kernel, self.initrd))
        if self.kind == "vm-boot":
            saved = (self.disk, self.path / vm.BOOT_STATE, self.path / vm.BOOT_RECORD)
            return all(p.is_file() for p in saved)
        return self.rootfs.is_dir()

    @classmethod
    def load(cls, path: Path) -> Image | None:
        """The entry at ``path``, or None if it is incomplete or corrupt."""
        data = fsutil.read_json(path / RECORD)
        if not isinstance(data, dict):
            return None
        try:
            image = cls(
                ref=data["ref"],
                kind=data["kind"],
                key=data["key"],
                path=path,
                size=int(data["size"]),
                created=float(data["created"]),
                init=data["init"],
                base=data.get("base"),
                recipe=str(data.get("recipe", "")),
                kernel_release=data.get("kernel_release"),
                app=oci.AppConfig.from_json(data["app"]) if data.get("app") else None,
                fingerprint=data.get("fingerprint"),
                downloads=tuple(str(d) for d in data.get("downloads", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return image if image._complete() else None


def _layout_tag(entry: Image) -> str | None:
    """The tag of an OCI entry's image in the shared layout; None for other entries."""
    if entry.app is None or not entry.app.digest:
        return None
    return oci.Resolved(entry.ref, entry.app.digest).layout_tag


class ImageStore:
    """Builds, finds, lists and removes cached images.

    ``build_hook`` asks plugins to build names the store does not know itself (the
    ``pytest_incus_build_image`` hook), and ``hook_implemented`` says whether any plugin
    implements it (asked when a name is checked: conftest files load during collection; by
    default, whether there is a ``build_hook``); ``progress`` shows long steps to the user;
    ``tally`` counts the images made for the run's summary (the ones users wait for: not the
    uid-shifted copies, and a VM image once, as ``<name> (vm)``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        build_hook: BuildHook | None = None,
        hook_implemented: Callable[[], bool] | None = None,
        progress: Progress | None = None,
        image_sources: Sequence[ImageSource] = sources.DEFAULT,
        builder: Builder | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.settings = settings
        self.tally = tally if tally is not None else Tally()
        self._hook_implemented = hook_implemented or (lambda: build_hook is not None)
        self.progress: Progress = progress or log.info
        """Shows a line to the user (pytest's terminal writer under pytest)."""
        self._sources = tuple(image_sources)
        self._by_name = {source.name: source for source in self._sources}
        self._builder = builder
        self._context = Context(settings, self._show, self, self._get_builder, build_hook)
        self._seen: dict[object, Image] = {}  # resolved this session: (ref key, kind) -> entry

    def _show(self, message: str) -> None:
        self.progress(message)  # late-bound: callers may replace ``progress``

    def _get_builder(self) -> Builder:
        if self._builder is None:
            self._builder = container_builder(self.settings.cache_dir)
        return self._builder

    # -- public API ------------------------------------------------------------------------

    def check(self, image: str, kind: str | None = None) -> ImageRef:
        """Parse ``image``; ConfigError for a name that can never work (for ``kind``, when
        given), a name of nobody's included (a name for a ``pytest_incus_build_image`` hook
        when no plugin has one)."""
        ref = sources.parse_ref(image, self._sources)
        if ref.source == "hook" and not self._hook_implemented():
            raise ConfigError(
                f"image {image!r} is not a name pytest-incus knows (busybox, debian/<release>, "
                "images:<distro>/<release>, an OCI reference for kind='app' or a rootfs path), "
                "and no plugin implements the pytest_incus_build_image hook to build it; check "
                "the name, or implement the hook in your conftest.py"
            )
        if kind is not None:
            if kind not in KINDS:
                raise ConfigError(
                    f"image {image!r}: kind={kind!r} images are not supported yet; "
                    f"this version builds images for {', '.join(KINDS)}"
                )
            if problem := self.problem(ref, _form(kind)):
                raise ConfigError(f"image {image!r} with kind={kind!r}: {problem}")
        return ref

    def problem(self, ref: ImageRef, form: str) -> str | None:
        """Why ``ref``'s source cannot make it in ``form`` (see images/source.py), or None."""
        return self._by_name[ref.source].problem(ref, form, self._context)

    def get(self, image: str, kind: str = "container") -> Image:
        """Ensure ``image`` is cached for ``kind`` and return it, building it if needed.

        A name that moves (an OCI tag, an ``images:`` alias) is resolved once per store (a
        session). A ``kind="vm"`` image is a disk, a kernel and an initrd, made from the
        source's VM root filesystem. A ``kind="app"`` image is an OCI reference unpacked by
        umoci; its record carries the image config (``Image.app``).
        """
        ref = self.check(image, kind)
        if kind != "vm":
            return self.form(ref, kind)
        cached = self._seen.get((ref.key, kind))
        if cached is None or not (cached.path / RECORD).exists():
            cached = self._seen[(ref.key, kind)] = self._vm(ref, self.form(ref, "vm-rootfs"))
        return cached

    def derive(
        self,
        image: str,
        *,
        packages: Iterable[str] = (),
        run: Iterable[str] = (),
        files: Mapping[str, bytes | str] | None = None,
        kind: str = "container",
    ) -> Image:
        """The image derived from ``image``: ``packages`` installed by its own package
        manager, then the ``run`` commands (each by ``/bin/sh -c``), then ``files`` (instance
        path -> content) written; built once, in a build container that reaches the host's
        network, and cached by (base image, recipe) like any other image. Its ``ref`` works
        as ``image=`` (for the same ``kind``; a VM's is made from the base's VM root
        filesystem). ImageError with the package manager's output when a package does not
        exist or a command fails."""
        recipe = Recipe.make(packages, run, files)
        self.check(image, kind)  # the base: a name that can work for this kind
        save_recipe(self.settings.cache_dir, recipe)
        return self.get(derived_name(image, recipe), kind)

    def form(self, ref: ImageRef, form: str) -> Image:
        """The entry of ``ref`` in ``form`` (see images/source.py): resolved by its source
        once per store (a session; also when it is a derived image's base), and built if it
        is not cached."""
        cached = self._seen.get((ref.key, form))
        if cached is not None and (cached.path / RECORD).exists():
            return cached
        source = self._by_name[ref.source]
        version = source.resolve(ref, form, self._context)
        entry = self._ensure(
            version.key,
            lambda rootfs: source.build(ref, version, rootfs, self._context),
            ref=ref.name,
            kind=form,
            base=version.base,
            not_older_than=version.not_older_than,
            recipe=version.recipe,
            made=self._made(ref, form),
        )
        self._seen[(ref.key, form)] = entry
        return entry

    def _vm(self, ref: ImageRef, root: Image) -> Image:
        """The VM image made from the root filesystem entry ``root`` (see images/vm.py)."""

        def make(rootfs: Path) -> Built:
            return Built("systemd", vm.build(root.rootfs, rootfs.parent, rootfs, self.progress))

        return self._ensure(
            ref.vm_key,
            make,
            ref=ref.name,
            kind="vm",
            base=root.key,
            not_older_than=root.created,
            recipe=vm.recipe(),
            made=self._made(ref, "vm"),
        )

    def _made(self, ref: ImageRef, form: str) -> Callable[[float], None]:
        """What tallies a build of ``ref``'s entry in ``form``: a VM image's root filesystem
        and its disk add up to one image, ``<name> (vm)``."""
        label = f"{ref.name} (vm)" if form in ("vm", "vm-rootfs") else ref.name
        how = HOW_MADE.get(ref.source, "built")
        return lambda seconds: self.tally.image_made(label, how, seconds)

    def shifted(self, image: Image, base_id: int) -> Image:
        """A copy of ``image`` with every owner moved up by ``base_id``, for unprivileged use.

        Made once per image and cached; remade when the image is rebuilt.
        """
        key = f"{image.key}.shift{base_id}"
        cached = self._seen.get(key)
        if (
            cached is not None
            and cached.created >= image.created
            and (cached.path / RECORD).exists()
        ):
            return cached

        def make(rootfs: Path) -> Built:
            shift.copy_shifted(image.rootfs, rootfs, base_id)
            return Built(image.init, app=image.app)

        entry = self._ensure(
            key, make, ref=image.ref, kind=image.kind, base=image.key, not_older_than=image.created
        )
        self._seen[key] = entry
        return entry

    def boot_snapshot(self, image: Image, variant: str, make: Callable[[Path], None]) -> Image:
        """The saved first boot of VM ``image`` for one machine shape (``variant``: a digest of
        QEMU's command line), made by ``make(directory)`` if it is not cached yet.

        ``make`` leaves :data:`vm.BOOT_STATE`, :data:`vm.BOOT_RECORD` and :data:`vm.DISK` in the
        directory it is given (see runtimes/snapshot.py). The entry goes with its image:
        rebuilt when the image is, pruned with it.
        """

        def build(rootfs: Path) -> Built:
            rootfs.rmdir()  # a snapshot has no root filesystem of its own
            make(rootfs.parent)
            return Built(image.init, kernel_release=image.kernel_release)

        return self._ensure(
            f"{image.key}.boot-{variant}",
            build,
            ref=image.ref,
            kind="vm-boot",
            base=image.key,
            not_older_than=image.created,
            made=lambda seconds: self.tally.snapshot_saved(image.ref),
        )

    def discard(self, entry: Image) -> None:
        """Remove one entry (unusable, say; whatever needs it next makes it again)."""
        log.info("removing the cache entry %s", entry.path)
        with self._lock(entry.key):
            fsutil.remove_tree(entry.path)
        self._seen.pop(entry.key, None)

    def list(self) -> list[Image]:
        """Every complete entry, uid-shifted copies included."""
        images_dir = self.settings.images_dir
        if not images_dir.is_dir():
            return []
        found = (Image.load(p) for p in sorted(images_dir.iterdir()) if p.is_dir())
        return [image for image in found if image is not None]

    def prune(
        self, image: str | None = None, *, in_use: set[str] | None = None
    ) -> builtins.list[Image]:
        """Remove every entry, or those of ``image``; entries whose key is ``in_use`` stay.

        An OCI image's blobs go from the shared layout with its entry, but for those that
        images still cached share; downloaded files (``images:``) go when no entry needs them. Pruning everything also removes incomplete entries and
        drops the images of the layout that no entry holds. Returns the removed entries.
        """
        ref = sources.parse_ref(image, self._sources) if image else None
        removed = []
        untag = set()
        for entry in self.list():
            # an OCI entry is keyed by its digest: it matches the name it was fetched as
            if ref is not None and not (
                ref.keys() & {entry.key, entry.base} or entry.ref == ref.name
            ):
                continue
            if in_use and (entry.key in in_use or entry.base in in_use):
                continue
            with self._lock(entry.key):
                fsutil.remove_tree(entry.path)
            self._seen.pop(entry.key, None)
            removed.append(entry)
            if entry.base is None and (tag := _layout_tag(entry)):  # not a shifted copy
                untag.add(tag)
        if ref is None:
            self._remove_incomplete()
            # everything goes: also the tags of entries pruned by hand or by older versions
            cached = {tag for e in self.list() if (tag := _layout_tag(e))}
            untag |= oci.layout_tags(self.settings.cache_dir) - cached
        if untag:
            oci.remove_from_layout(self.settings.cache_dir, untag)
        needed = {sha for entry in self.list() for sha in entry.downloads}
        simplestreams.prune_downloads(self.settings.cache_dir, needed, partial=ref is None)
        return removed

    def _remove_incomplete(self) -> None:
        """Remove the entry directories that hold no complete entry (damaged ones, and those
        of an older layout: no ``get`` rebuilds them when their key is no longer asked for),
        and the staging directories of builders that died (their key may never be built
        again, so nobody else would remove them)."""
        staging = self.settings.staging_dir
        if staging.is_dir():
            for leftover in sorted(staging.iterdir()):
                built_by = _STAGING.fullmatch(leftover.name)
                if built_by and not os.path.exists(f"/proc/{built_by[1]}"):
                    log.info("removing the leftover of an interrupted build: %s", leftover)
                    self._remove_staging(leftover)
        images_dir = self.settings.images_dir
        if not images_dir.is_dir():
            return
        for path in sorted(images_dir.iterdir()):
            if not path.is_dir() or Image.load(path) is not None:
                continue
            with self._lock(path.name):
                if Image.load(path) is None:  # not completed meanwhile
                    log.info("removing the incomplete cache entry %s", path)
                    fsutil.remove_tree(path)

    def downloads(self) -> builtins.list[Path]:
        """The files of the download cache (``images:`` images' files, by sha256; partial
        ones start with a dot)."""
        directory = simplestreams.downloads_dir(self.settings.cache_dir)
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def builds(self) -> builtins.list[dict[str, object]]:
        """The record of every builder run: key, ref, pid, start and end time."""
        path = self.settings.images_dir / BUILD_LOG
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- building --------------------------------------------------------------------------

    def _lock(self, key: str) -> filelock.FileLock:
        self.settings.images_dir.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(self.settings.images_dir / f"{key}.lock", timeout=LOCK_TIMEOUT)

    def _ensure(
        self,
        key: str,
        make: Callable[[Path], Built],
        *,
        ref: str,
        kind: str,
        base: str | None = None,
        not_older_than: float = 0.0,
        recipe: str = "",
        made: Callable[[float], None] | None = None,
    ) -> Image:
        """The entry ``key``, built by ``make`` if it is not cached (or out of date); then
        ``made`` is called with the seconds the build took."""
        final = self.settings.images_dir / key

        def current(entry: Image | None) -> Image | None:
            if entry and entry.created >= not_older_than and entry.recipe == recipe:
                return entry
            return None

        if existing := current(Image.load(final)):
            return existing
        with self._lock(key):
            existing = Image.load(final)
            if current(existing):
                assert existing is not None
                return existing  # another process built it while we waited
            if final.exists():
                if existing is None:
                    log.warning("image cache entry %s is incomplete or corrupt; rebuilding", final)
                fsutil.remove_tree(final)
            self._remove_stale_staging(key)
            return self._build_entry(
                key, make, ref=ref, kind=kind, base=base, recipe=recipe, made=made
            )

    def _remove_staging(self, staging: Path) -> None:
        """Remove the staging directory of a build that died, and first what its build
        container left running (a derived image's: see images/derived.py)."""
        if (staging / BUILD_WORK).exists():
            self._get_builder().reap(staging / BUILD_WORK)
        fsutil.remove_tree(staging)

    def _remove_stale_staging(self, key: str) -> None:
        staging = self.settings.staging_dir
        if staging.is_dir():
            # exactly <key>.<pid>.<n>: not the staging of another key such as <key>.shift...
            pattern = re.compile(re.escape(key) + r"\.\d+\.\d+")
            for leftover in staging.iterdir():
                if not pattern.fullmatch(leftover.name):
                    continue
                log.warning("removing the leftover of an interrupted build: %s", leftover)
                self._remove_staging(leftover)

    def _build_entry(
        self,
        key: str,
        make: Callable[[Path], Built],
        *,
        ref: str,
        kind: str,
        base: str | None,
        recipe: str,
        made: Callable[[float], None] | None,
    ) -> Image:
        staging = self.settings.staging_dir / f"{key}.{os.getpid()}.{next(_counter)}"
        rootfs = staging / "rootfs"
        rootfs.mkdir(parents=True)
        os.chmod(self.settings.cache_dir, 0o755)  # unprivileged containers traverse it
        os.chmod(rootfs, 0o755)
        started = time.time()
        if base is None:
            self.progress(f"building image {ref} (once; later runs use the cache)")
        try:
            built = make(rootfs)
            record: dict[str, object] = {
                "ref": ref,
                "kind": kind,
                "key": key,
                "init": built.init,
                "base": base,
                "recipe": recipe,
                "created": time.time(),
                "size": fsutil.tree_size(staging),
                "kernel_release": built.kernel_release,
                "fingerprint": built.fingerprint,
                "downloads": list(built.downloads),
            }
            if built.app is not None:
                record["app"] = built.app.to_json()
            fsutil.write_atomic(staging / RECORD, json.dumps(record, indent=1))
            os.chmod(staging, 0o755)
            os.rename(staging, self.settings.images_dir / key)
        except BaseException as exc:
            fsutil.remove_tree(staging)
            if isinstance(exc, OSError):  # of the host's files (a full disk, say)
                raise ImageError(
                    f"building image {ref} into {staging} failed: {exc}; check the free space "
                    f"and the permissions of the cache directory {self.settings.cache_dir}",
                    exc=exc,
                ) from exc
            raise
        finally:
            with open(self.settings.images_dir / BUILD_LOG, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "key": key,
                            "ref": ref,
                            "pid": os.getpid(),
                            "started": started,
                            "ended": time.time(),
                        }
                    )
                    + "\n"
                )
        seconds = time.time() - started
        if base is None:
            self.progress(f"image {ref} built in {seconds:.1f}s")
        if made is not None:
            made(seconds)
        entry = Image.load(self.settings.images_dir / key)
        assert entry is not None
        return entry


def _form(kind: str) -> str:
    """The entry form an instance of ``kind`` needs from the image's source."""
    return "vm-rootfs" if kind == "vm" else kind
