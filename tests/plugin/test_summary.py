"""The terminal summary: instances launched per kind, images made; merged across xdist
workers; one line with ``-q``; nothing for a run that launched nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cache_args


def busybox_module(n: int) -> str:
    """An inner module of ``n`` tests, each on a busybox container of its own."""
    return (
        INNER_HEADER
        + f"""
@pytest.mark.parametrize("n", range({n}))
@pytest.mark.instance(kind="container", image="busybox")
def test_echo(instance, n):
    record(instance)
    assert instance.exec(f"echo {{n}}").stdout == f"{{n}}\\n"
"""
    )


def summary_lines(output: list[str]) -> list[str]:
    """The summary's lines among an inner run's output (not the progress lines of builds)."""
    progress = re.compile(r"pytest-incus: (building image |image .* built in )")
    return [
        line for line in output if line.startswith("pytest-incus:") and not progress.match(line)
    ]


COUNTS = re.compile(
    r"pytest-incus: (\d+) instances?: (\d+) container \(median (\d+(\.\d+)?) s, "
    r"slowest (\d+(\.\d+)?) s\)"
)


def test_counts_per_kind(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_three=busybox_module(3))
    result = pytester.runpytest_subprocess(*args, timeout=300)
    result.assert_outcomes(passed=3)
    counts = [m for line in summary_lines(result.outlines) if (m := COUNTS.fullmatch(line))]
    assert len(counts) == 1, result.outlines
    assert counts[0][1] == counts[0][2] == "3"
    assert float(counts[0][3]) <= float(counts[0][5])  # the median is not past the slowest
    assert len(inner_instances.names()) == 3


def test_workers_tallies_are_merged(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_four=busybox_module(4))
    result = pytester.runpytest_subprocess(*args, "-n", "2", timeout=300)
    result.assert_outcomes(passed=4)
    workers = inner_instances.workers()
    assert len(workers) == 4 and set(workers.values()) == {"gw0", "gw1"}
    counts = [m for line in summary_lines(result.outlines) if (m := COUNTS.fullmatch(line))]
    assert len(counts) == 1, result.outlines  # the controller's, not one per worker
    assert counts[0][1] == counts[0][2] == "4"


def test_a_fresh_cache_lists_the_image_it_built(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    pytester.makepyfile(test_one=busybox_module(1))
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), timeout=300)
    result.assert_outcomes(passed=1)
    lines = summary_lines(result.outlines)
    assert len(lines) == 2, result.outlines
    assert COUNTS.fullmatch(lines[0]) and lines[0].startswith("pytest-incus: 1 instance: ")
    # once: the uid-shifted copy that the unprivileged container runs on is not an image of
    # its own to the user
    assert re.fullmatch(r"pytest-incus: images built: busybox \(\d+(\.\d+)? s\)", lines[1])


def test_quiet_is_one_line(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    pytester.makepyfile(test_two=busybox_module(2))
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), "-q", timeout=300)
    result.assert_outcomes(passed=2)
    lines = summary_lines(result.outlines)
    assert len(lines) == 1, result.outlines
    assert re.fullmatch(
        r"pytest-incus: 2 instances \(2 container\); 1 image built \(\d+(\.\d+)? s\)", lines[0]
    )


def test_a_run_without_instances_has_no_summary(pytester: pytest.Pytester, args: list[str]) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=1)
    assert not [line for line in result.outlines if "pytest-incus" in line], result.outlines


SLOW_HOOK_CONFTEST = """
import time
from pytest_incus.images import busybox

def pytest_incus_build_image(config, ref, rootfs):
    if ref != "mine/slow":
        return None
    busybox.build(rootfs)
    time.sleep(3)  # an image that takes a while to make
    return True
"""


def test_a_launch_that_waits_for_its_image_does_not_count_the_build(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    pytester.makeconftest(SLOW_HOOK_CONFTEST)
    pytester.makepyfile(test_slow=busybox_module(1).replace('image="busybox"', 'image="mine/slow"'))
    result = pytester.runpytest_subprocess(*cache_args(scratch_cache), timeout=300)
    result.assert_outcomes(passed=1)
    lines = summary_lines(result.outlines)
    assert len(lines) == 2, result.outlines
    counts = COUNTS.fullmatch(lines[0])
    assert counts is not None, lines
    built = re.fullmatch(r"pytest-incus: images built: mine/slow \((\d+\.\d) s\)", lines[1])
    assert built is not None, lines
    assert float(built[1]) >= 3.0
    assert float(counts[5]) < 3.0  # the launch's own time, without the build's
