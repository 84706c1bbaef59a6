"""Images that plugins build: names a ``pytest_incus_build_image`` hook implementation knows."""

from __future__ import annotations

import re
from pathlib import Path

from pytest_incus.errors import ImageError
from pytest_incus.images.local import detect_init
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.source import Built, Context, Version, container_only, default_version

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/+-]*$")


class HookSource:
    """Any other plain name: built by the first hook implementation that returns True."""

    name = "hook"

    def parse(self, image: str) -> ImageRef | None:
        """A name of letters, digits and ``._/+-`` (asked last: every other source first)."""
        if not _NAME.match(image):
            return None
        return ImageRef(image, self.name, "hook-" + image.replace("/", "-"))

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """System containers only."""
        return container_only(form)

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """Always the same build."""
        return default_version(ref, form)

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Ask the hook."""
        if context.build_hook is not None and context.build_hook(ref.name, rootfs):
            return Built(detect_init(rootfs))
        raise ImageError(
            f"no builder knows image {ref.name!r}: no pytest_incus_build_image hook built it "
            "(none returned True for it); check the name, or make your hook build it"
        )
