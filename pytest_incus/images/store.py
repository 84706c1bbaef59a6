"""The image cache: entries built once, under a lock, visible only when complete.

Layout below the cache directory::

    images/<key>/rootfs/        the image's root filesystem (containers)
    images/<key>.vmroot/rootfs/ the root filesystem that VM images of <key> are made from
    images/<key>.vm/disk.qcow2  a VM image: its disk, vmlinuz and initrd.img (images/vm.py)
    images/<key>.vm.boot-<v>/   a VM's saved first boot for one machine shape <v>: its memory
                                and device state and its disk overlay (runtimes/snapshot.py)
    images/oci-<digest>/rootfs/ an OCI image unpacked by umoci, keyed by its manifest digest
                                (blobs live once in the shared layout: see images/oci.py)
    images/<key>/image.json     its record; written last, so it is the completion stamp
    images/<key>.lock           held while the entry is checked, built or removed
    images/builds.jsonl         one line per builder run, appended under the entry's lock
    staging/<key>.<pid>.<n>/    builds in progress; renamed to images/<key> when complete

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import filelock

from pytest_incus import fsutil
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images import busybox, debian, local, oci, shift, vm
from pytest_incus.images.ref import ImageRef, parse_ref
from pytest_incus.settings import Settings

log = logging.getLogger("pytest_incus")

RECORD = "image.json"
BUILD_LOG = "builds.jsonl"
LOCK_TIMEOUT = 3600.0

Progress = Callable[[str], None]
BuildHook = Callable[[str, Path], bool | None]
KINDS = ("container", "vm", "app")


@dataclass(frozen=True)
class Built:
    """What a builder reports about the entry it made (recorded in image.json)."""

    init: str
    kernel_release: str | None = None
    app: oci.AppConfig | None = None


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
    default, whether there is a ``build_hook``); ``progress`` shows long steps to the user.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        build_hook: BuildHook | None = None,
        hook_implemented: Callable[[], bool] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self._build_hook = build_hook
        self._hook_implemented = hook_implemented or (lambda: build_hook is not None)
        self.progress: Progress = progress or log.info
        """Shows a line to the user (pytest's terminal writer under pytest)."""
        self._seen: dict[str, Image] = {}

    # -- public API ------------------------------------------------------------------------

    def check(self, image: str) -> ImageRef:
        """Parse ``image``; ConfigError for a name that can never work, a name of nobody's
        included (a name for a ``pytest_incus_build_image`` hook when no plugin has one)."""
        ref = parse_ref(image)
        if ref.source == "hook" and not self._hook_implemented():
            raise ConfigError(
                f"image {image!r} is not a name pytest-incus knows (busybox, debian/<release>, "
                "an OCI reference for kind='app' or a rootfs path), and no plugin implements "
                "the pytest_incus_build_image hook to build it; check the name, or implement "
                "the hook in your conftest.py"
            )
        return ref

    def get(self, image: str, kind: str = "container") -> Image:
        """Ensure ``image`` is cached for ``kind`` and return it, building it if needed.

        A ``kind="vm"`` image (only ``debian/<release>``) is a disk, a kernel and an initrd.
        A ``kind="app"`` image is an OCI reference (``docker://``, ``oci:``, ``oci-archive:``)
        unpacked by umoci; its record carries the image config (``Image.app``).
        """
        if kind not in KINDS:
            raise ConfigError(
                f"image {image!r}: kind={kind!r} images are not supported yet; "
                f"this version builds images for {' and '.join(KINDS)}"
            )
        ref = self.check(image)
        if kind == "app" or ref.source == "oci":
            return self._get_app(ref, kind)
        if ref.source == "simplestreams":
            raise ConfigError(
                f"image {image!r}: {ref.source} images are not supported yet by this "
                "version; use busybox, debian/<release> or a rootfs path"
            )
        if kind == "vm":
            return self._get_vm(ref)
        cached = self._seen.get(ref.key)
        if cached is not None and (cached.path / RECORD).exists():
            return cached
        recipe = debian.RECIPE if ref.source == "debian" else ""
        entry = self._ensure(
            ref.key,
            lambda rootfs: Built(self._build(ref, rootfs)),
            ref=ref.name,
            kind=kind,
            recipe=recipe,
        )
        self._seen[ref.key] = entry
        return entry

    def _get_app(self, ref: ImageRef, kind: str) -> Image:
        if ref.source != "oci" or kind != "app":
            raise ConfigError(
                f"image {ref.name!r} with kind={kind!r}: OCI references (docker://, oci:, "
                "oci-archive:) are app images and app images are OCI references; "
                "use kind='app' with an OCI reference"
            )
        # a tag is resolved once per store (a session); the entry is keyed by the digest
        cached = self._seen.get(ref.key)
        if cached is not None and (cached.path / RECORD).exists():
            return cached
        oci.require_tools()
        insecure = self.settings.insecure_registries
        resolved = oci.resolve(ref.name, insecure)

        def make(rootfs: Path) -> Built:
            config = oci.fetch(resolved, self.settings.cache_dir, rootfs, insecure)
            return Built("app", app=config)

        entry = self._ensure(resolved.key, make, ref=ref.name, kind="app")
        self._seen[ref.key] = entry
        return entry

    def _get_vm(self, ref: ImageRef) -> Image:
        if ref.source != "debian":
            raise ConfigError(
                f"image {ref.name!r}: a VM needs an image with a kernel; kind='vm' builds "
                "debian/<release> images only"
            )
        assert ref.release is not None
        release = ref.release
        cached = self._seen.get(ref.vm_key)
        if cached is not None and (cached.path / RECORD).exists():
            return cached
        # two steps (see images/vm.py): the slow rootfs, then the disk with the agent
        root = self._ensure(
            ref.vm_root_key,
            lambda rootfs: Built(
                vm.build_rootfs(release, rootfs, self.settings.mirror, self.progress)
            ),
            ref=ref.name,
            kind="vm-rootfs",
            recipe=vm.ROOTFS_RECIPE,
        )

        def make(rootfs: Path) -> Built:
            return Built("systemd", vm.build(root.rootfs, rootfs.parent, rootfs, self.progress))

        entry = self._ensure(
            ref.vm_key,
            make,
            ref=ref.name,
            kind="vm",
            base=root.key,
            not_older_than=root.created,
            recipe=vm.recipe(),
        )
        self._seen[ref.vm_key] = entry
        return entry

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
        images still cached share. Pruning everything also removes incomplete entries and
        drops the images of the layout that no entry holds. Returns the removed entries.
        """
        ref = parse_ref(image) if image else None
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
                    fsutil.remove_tree(leftover)
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
    ) -> Image:
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
            return self._build_entry(key, make, ref=ref, kind=kind, base=base, recipe=recipe)

    def _remove_stale_staging(self, key: str) -> None:
        staging = self.settings.staging_dir
        if staging.is_dir():
            # exactly <key>.<pid>.<n>: not the staging of another key such as <key>.shift...
            pattern = re.compile(re.escape(key) + r"\.\d+\.\d+")
            for leftover in staging.iterdir():
                if not pattern.fullmatch(leftover.name):
                    continue
                log.warning("removing the leftover of an interrupted build: %s", leftover)
                fsutil.remove_tree(leftover)

    def _build_entry(
        self,
        key: str,
        make: Callable[[Path], Built],
        *,
        ref: str,
        kind: str,
        base: str | None,
        recipe: str,
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
        if base is None:
            self.progress(f"image {ref} built in {time.time() - started:.1f}s")
        entry = Image.load(self.settings.images_dir / key)
        assert entry is not None
        return entry

    def _build(self, ref: ImageRef, rootfs: Path) -> str:
        if ref.source == "busybox":
            return busybox.build(rootfs)
        if ref.source == "debian":
            assert ref.release is not None
            return debian.build(ref.release, rootfs, self.settings.mirror, self.progress)
        if ref.source == "local":
            assert ref.path is not None
            local.build(ref.path, rootfs)
            return local.detect_init(rootfs)
        if self._build_hook is not None and self._build_hook(ref.name, rootfs):
            return local.detect_init(rootfs)
        raise ImageError(
            f"no builder knows image {ref.name!r}: no pytest_incus_build_image hook built it "
            "(none returned True for it); check the name, or make your hook build it"
        )
