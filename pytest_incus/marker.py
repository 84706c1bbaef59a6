"""The ``instance`` marker, parsed once at collection into a frozen ``InstanceMarker``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_incus.errors import ConfigError
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec, instance_id


@dataclass(frozen=True)
class InstanceMarker:
    """What a test's closest ``instance`` marker (or the ini defaults) asks for: one checked
    spec per (kind, image) pair, and whether lists asked for parametrization."""

    specs: tuple[InstanceSpec, ...]
    parametrized: bool

    @property
    def ids(self) -> list[str]:
        """The parametrization ids, ``<kind>-<image>`` (``vm-debian-12``)."""
        return [instance_id(spec.kind, spec.image) for spec in self.specs]

    @classmethod
    def of(cls, node: Any, settings: Settings) -> InstanceMarker:
        """Parse ``node``'s closest marker; ConfigError naming the test and the option."""
        marker = node.get_closest_marker("instance")
        if marker is None:
            spec = InstanceSpec.parse(
                settings.default_kind, settings.default_image, {}, where=node.nodeid
            )
            return cls((spec,), parametrized=False)
        if marker.args:
            raise ConfigError(
                f"{node.nodeid}: the instance marker takes keyword arguments only, "
                f"got positional {marker.args!r}; write kind=..., image=..."
            )
        options = dict(marker.kwargs)
        kinds = options.pop("kind", settings.default_kind)
        images = options.pop("image", settings.default_image)
        many = isinstance(kinds, (list, tuple)) or isinstance(images, (list, tuple))
        kinds = list(kinds) if isinstance(kinds, (list, tuple)) else [kinds]
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        specs = tuple(
            InstanceSpec.parse(kind, image, options, where=node.nodeid)
            for kind in kinds
            for image in images
        )
        if not specs:
            raise ConfigError(
                f"{node.nodeid}: the instance marker's kind and image lists must not be empty"
            )
        return cls(specs, parametrized=many)
