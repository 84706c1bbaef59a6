"""--incus-keep: failed tests' instances stay, with a working `pytest-incus shell` hint."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances, cli_command, run_cli

from pytest_incus import registry
from pytest_incus.settings import Settings

TOKEN = "kept-4f1d"

KEEP_MODULE = (
    INNER_HEADER
    + f"""
@pytest.mark.instance(kind="container", image="busybox")
def test_fails(instance):
    record(instance)
    instance.write_file("/root/token", "{TOKEN}\\n")
    assert False, "fails on purpose"

@pytest.mark.instance(kind="container", image="busybox")
def test_passes(instance):
    record(instance)
    instance.write_file("/root/token", "passing\\n")
"""
)

HINT = re.compile(r"instance (\S+) is kept: (pytest-incus (?:--cache-dir \S+ )?shell (\S+))$")


def listed(settings: Settings) -> dict[str, str]:
    """The instances ``pytest-incus ls`` shows: name -> its line."""
    result = run_cli(settings.cache_dir, "ls")
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line for line in result.stdout.splitlines()}


def test_keep_failed(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_keep=KEEP_MODULE)
    result = pytester.runpytest_subprocess(*args, "--incus-keep=failed", timeout=180)
    result.assert_outcomes(passed=1, failed=1)
    hints = [m for line in result.outlines if (m := HINT.search(line))]
    assert len(hints) == 1, result.stdout.str()
    kept, command, shell_name = hints[0].groups()
    assert kept == shell_name
    names = inner_instances.names()
    assert kept in names and len(names) == 2
    passed = next(name for name in names if name != kept)

    # the failing test's instance stays, the passing one's is gone
    assert listed(settings)[kept].endswith("kept")
    assert passed not in listed(settings)
    assert registry.leftovers(settings, passed) == []

    # the hinted command gets into that very instance, with a command or on stdin
    argv = shlex.split(command)
    assert argv[0] == "pytest-incus"
    argv[0] = cli_command()
    direct = subprocess.run(
        [*argv, "--", "cat", "/root/token"], capture_output=True, text=True, timeout=60
    )
    assert (direct.returncode, direct.stdout) == (0, f"{TOKEN}\n"), direct.stderr
    piped = subprocess.run(
        argv, input="cat /root/token; exit 3\n", capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 3 and f"{TOKEN}\n" in piped.stdout, piped.stderr

    # another run's session start does not reap a kept instance
    pytester.makepyfile(test_other="def test_nothing():\n    pass\n")
    pytester.runpytest_subprocess(*args, "test_other.py", timeout=120).assert_outcomes(passed=1)
    assert kept in listed(settings)

    removed = run_cli(settings.cache_dir, "rm", kept)
    assert removed.returncode == 0 and removed.stdout == f"deleted {kept}\n", removed.stderr
    assert kept not in listed(settings)
    assert registry.leftovers(settings, kept) == []


def test_keep_always(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_keep=KEEP_MODULE)
    result = pytester.runpytest_subprocess(*args, "--incus-keep=always", timeout=180)
    result.assert_outcomes(passed=1, failed=1)
    names = inner_instances.names()
    assert len(names) == 2
    assert set(names) <= set(listed(settings))
    for name in names:
        shown = run_cli(settings.cache_dir, "shell", name, "--", "cat", "/root/token")
        assert shown.returncode == 0 and shown.stdout in (f"{TOKEN}\n", "passing\n")
    removed = run_cli(settings.cache_dir, "rm", *names)
    assert removed.returncode == 0, removed.stderr
    for name in names:
        assert registry.leftovers(settings, name) == []


def test_keep_never_is_the_default(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_keep=KEEP_MODULE)
    result = pytester.runpytest_subprocess(*args, timeout=180)
    result.assert_outcomes(passed=1, failed=1)
    assert not any(HINT.search(line) for line in result.outlines)
    names = inner_instances.names()
    assert len(names) == 2
    for name in names:
        assert registry.leftovers(settings, name) == []
