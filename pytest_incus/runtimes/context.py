"""What every runtime is given: one ``RuntimeContext`` (settings, images, progress).

Runtimes get it when they are made, instead of reaching for module-level state, so that a unit
test can hand a runtime fakes, and a new backend needs no change in the fixtures or the factory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_incus.settings import Settings

if TYPE_CHECKING:
    # annotations only: the image store imports runtimes (its builder), not the other way
    from pytest_incus.images.store import ImageStore


@dataclass(frozen=True)
class RuntimeContext:
    """The settings of the run, its image store, and where progress lines go."""

    settings: Settings
    images: ImageStore
    progress: Callable[[str], None]

    @classmethod
    def of(cls, images: ImageStore) -> RuntimeContext:
        """The context of a run whose image store is ``images`` (its settings and progress)."""
        return cls(images.settings, images, images.progress)
