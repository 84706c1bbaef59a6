"""--incus-insecure-registry and its ini form reach the image store of a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import Registry, pushed_busybox

INNER = """
import pytest

def test_pull(image_store):
    image = image_store.get("{ref}", kind="app")
    assert image.kind == "app" and (image.rootfs / "bin" / "busybox").exists()
"""


@pytest.fixture(scope="module")
def pushed() -> Iterator[tuple[Registry, str]]:
    """A busybox app image in a plain-HTTP registry on loopback: (registry, reference)."""
    with pushed_busybox("plugin/app:1") as (registry, ref, _):
        yield registry, ref


def test_option_names_the_registry(
    pytester: pytest.Pytester, pushed: tuple[Registry, str], scratch_cache: Path
) -> None:
    registry, ref = pushed
    pytester.makepyfile(INNER.format(ref=ref))
    cache = f"--incus-cache-dir={scratch_cache}"
    refused = pytester.runpytest_subprocess(cache, "-p", "no:cacheprovider", timeout=120)
    refused.assert_outcomes(failed=1)
    refused.stdout.fnmatch_lines(["*--incus-insecure-registry*"])
    allowed = pytester.runpytest_subprocess(
        cache, "-p", "no:cacheprovider", f"--incus-insecure-registry={registry.host}", timeout=120
    )
    allowed.assert_outcomes(passed=1)


def test_ini_key_names_the_registry(
    pytester: pytest.Pytester, pushed: tuple[Registry, str], scratch_cache: Path
) -> None:
    registry, ref = pushed
    pytester.makepyfile(INNER.format(ref=ref))
    pytester.makeini(f"[pytest]\nincus_insecure_registries =\n    {registry.host}\n")
    result = pytester.runpytest_subprocess(
        f"--incus-cache-dir={scratch_cache}", "-p", "no:cacheprovider", timeout=120
    )
    result.assert_outcomes(passed=1)
