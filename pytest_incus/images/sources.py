"""The image sources this version knows, in the order they are asked to claim a name."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_incus.errors import ConfigError
from pytest_incus.images.busybox import BusyboxSource
from pytest_incus.images.debian import DebianSource
from pytest_incus.images.derived import DerivedSource
from pytest_incus.images.hook import HookSource
from pytest_incus.images.local import LocalSource
from pytest_incus.images.oci import OciSource
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.simplestreams import SimplestreamsSource
from pytest_incus.images.source import ImageSource

# a plain name nobody else claims is a hook's: so the hook source comes last
DEFAULT: tuple[ImageSource, ...] = (
    BusyboxSource(),
    DebianSource(),
    SimplestreamsSource(),
    OciSource(),
    DerivedSource(),
    LocalSource(),
    HookSource(),
)


def parse_ref(image: str, sources: Sequence[ImageSource] = DEFAULT) -> ImageRef:
    """``image`` parsed by the first source that claims it; ConfigError if none does (or if
    the one that does finds it can never work)."""
    for source in sources:
        ref = source.parse(image)
        if ref is not None:
            return ref
    raise ConfigError(
        f"image {image!r} is not a name pytest-incus knows: use busybox, debian/<release>, "
        "images:<distro>/<release>, an OCI reference for kind='app', a rootfs path, or a name "
        "that a pytest_incus_build_image hook builds"
    )
