"""The image-source seam: the one protocol that every source of images implements.

A source owns one family of image names (``busybox``, ``debian/<release>``, ``images:...``, OCI
references, derived images, local rootfs paths, names a ``pytest_incus_build_image`` hook
builds). The store (images/store.py) asks each in turn to :meth:`ImageSource.parse` a name, then
asks the one that claimed it to :meth:`~ImageSource.resolve` the name to a :class:`Version` (the
cache entry that holds it: for a name that moves, like an OCI tag or a simplestreams alias, the
entry of what the name means now), and to :meth:`~ImageSource.build` that entry into a staging
directory when it is not cached. The store alone keys, locks, stages and records entries.

Forms: a source makes entries of some of these forms, for the kinds of instance:

- ``"container"``: a root filesystem for system containers;
- ``"app"``: an OCI image unpacked, with its config (kind="app");
- ``"vm-rootfs"``: a root filesystem with a kernel, that the store makes VM disks from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pytest_incus.images.ref import ImageRef
from pytest_incus.settings import Settings

if TYPE_CHECKING:
    from pytest_incus.images.derived import Builder
    from pytest_incus.images.oci import AppConfig
    from pytest_incus.images.store import Image, ImageStore

Progress = Callable[[str], None]
BuildHook = Callable[[str, Path], bool | None]
FORMS = ("container", "app", "vm-rootfs")

# why a source cannot make a form: the common cases' messages
NOT_APP = (
    "OCI references (docker://, oci:, oci-archive:) are app images and app images are OCI "
    "references; use kind='app' with an OCI reference"
)
NO_KERNEL = (
    "a VM needs an image with a kernel; kind='vm' builds debian/<release> images "
    "(and images derived from them) only"
)


def container_only(form: str) -> str | None:
    """The problem of a source that makes system container root filesystems only."""
    return {"app": NOT_APP, "vm-rootfs": NO_KERNEL}.get(form)


@dataclass(frozen=True)
class Built:
    """What a source reports about the entry it built (recorded in image.json)."""

    init: str  # "systemd", "busybox", "app" or "other": how readiness is decided
    kernel_release: str | None = None
    app: AppConfig | None = None
    fingerprint: str | None = None  # the content's identity where a server names one
    downloads: tuple[str, ...] = ()  # files of the download cache this entry was made from


@dataclass(frozen=True)
class Version:
    """What an image name resolves to now: the cache entry that holds it.

    An entry whose record is older than ``not_older_than`` (its ``base`` was rebuilt) or of
    another ``recipe`` (the build steps changed) is rebuilt. ``detail`` is the source's own
    (an OCI manifest digest, a simplestreams product version) for :meth:`ImageSource.build`.
    """

    key: str
    recipe: str = ""
    base: str | None = None
    not_older_than: float = 0.0
    detail: Any = None


@dataclass(frozen=True)
class Context:
    """What sources may use: the run's settings, the user's progress lines, the store itself
    (a derived image gets its base through it), the plugins' build hook, and what runs a
    derived image's build (made when first needed)."""

    settings: Settings
    progress: Progress
    store: ImageStore
    builder: Callable[[], Builder]
    build_hook: BuildHook | None = None


class ImageSource(Protocol):
    """One family of image names: parse, resolve to a version, build into staging."""

    name: str  # ImageRef.source of the names it claims

    def parse(self, image: str) -> ImageRef | None:
        """The parsed name if it is one of this source's (ConfigError if it is one but can
        never work), else None."""
        ...

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """Why this source cannot make ``ref`` in ``form`` (a ConfigError's message), or
        None."""
        ...

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """The entry that holds ``ref`` in ``form`` now (may ask a server)."""
        ...

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Build or fetch ``version`` into the empty staging directory ``rootfs`` (the
        entry's directory is its parent)."""
        ...


def default_version(ref: ImageRef, form: str, recipe: str = "") -> Version:
    """The version of a name that always means the same build: its own key."""
    return Version(ref.vm_root_key if form == "vm-rootfs" else ref.key, recipe=recipe)


def base_of(image: Image) -> str:
    """The identity of ``image``'s content, for entries made from it (derived images): the
    server's fingerprint or the OCI digest, else the entry and the time it was built."""
    if image.fingerprint:
        return image.fingerprint
    if image.app is not None and image.app.digest:
        return image.app.digest
    return f"{image.key}@{image.created!r}"


def container_builder(cache_dir: Path) -> Builder:
    """The builder of derived images over liblxc (runtimes/build.py), for the store of
    ``cache_dir`` when none is passed in."""
    # imported when a build needs it: the runtimes import the image store, which imports this
    from pytest_incus.runtimes.build import ContainerBuilder

    return ContainerBuilder(cache_dir)
