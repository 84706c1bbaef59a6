"""--incus-vm-snapshots and its ini form reach the settings of a run (what the VM runtime reads
to choose between resuming a boot snapshot and booting; tests/integration/test_vm_snapshot.py
shows both at work)."""

from __future__ import annotations

from pathlib import Path

import pytest

INNER = """
def test_setting(instance_factory):
    assert instance_factory.settings.vm_snapshots is {expected}
"""


def _run(pytester: pytest.Pytester, cache: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        f"--incus-cache-dir={cache}", "-p", "no:cacheprovider", *args, timeout=120
    )


@pytest.mark.parametrize(
    ("ini", "args", "expected"),
    [
        ("", (), True),
        ("", ("--incus-vm-snapshots=off",), False),
        ("incus_vm_snapshots = off", (), False),
        ("incus_vm_snapshots = off", ("--incus-vm-snapshots=on",), True),
    ],
)
def test_option_and_ini(
    pytester: pytest.Pytester,
    scratch_cache: Path,
    ini: str,
    args: tuple[str, ...],
    expected: bool,
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(INNER.format(expected=expected))
    _run(pytester, scratch_cache, *args).assert_outcomes(passed=1)


def test_a_bad_ini_value_stops_the_run(pytester: pytest.Pytester, scratch_cache: Path) -> None:
    pytester.makeini("[pytest]\nincus_vm_snapshots = sometimes\n")
    pytester.makepyfile(INNER.format(expected=True))
    result = _run(pytester, scratch_cache)
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*incus_vm_snapshots = 'sometimes'; use on or off*"])
