"""--incus-keep: what failed tests used stays, with a working `pytest-incus shell` hint."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

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


# What a test used, beyond its `instance`: the inner module labels each instance (tags/LABEL
# holds its name) so the outer test knows which is which.
USED_HEADER = (
    INNER_HEADER
    + '''
TAGS = pathlib.Path(__file__).parent / "tags"

def tag(instance, label):
    record(instance)
    TAGS.mkdir(exist_ok=True)
    (TAGS / label).write_text(instance.name)
    return instance

class Holder:
    """A fixture value that hides its instance from a look at the test's fixture values."""
    def __init__(self, instance):
        self.instance = instance
'''
)

LAUNCHED_MODULE = (
    USED_HEADER
    + """
def test_launches_and_fails(instance_factory):
    tag(instance_factory.launch(kind="container", image="busybox"), "failed")
    assert False, "fails on purpose"

def test_launches_and_passes(instance_factory):
    tag(instance_factory.launch(kind="container", image="busybox"), "passed")

@pytest.fixture
def broken(instance_factory):
    tag(instance_factory.launch(kind="container", image="busybox"), "setup")
    raise RuntimeError("the fixture fails after launching")

def test_setup_fails(broken):
    pass
"""
)


def tags(root: Path) -> dict[str, str]:
    """Label -> instance name, as the inner module's ``tag()`` wrote them."""
    return {p.name: p.read_text() for p in (root / "tags").iterdir()}


def hinted(result: pytest.RunResult) -> list[str]:
    """The instances whose ``pytest-incus shell`` line the run printed, in order."""
    found = [m.groups() for line in result.outlines if (m := HINT.search(line))]
    assert all(kept == shell for kept, _, shell in found), found
    return [kept for kept, _, _ in found]


def assert_kept_running(settings: Settings, name: str) -> None:
    """``name`` is listed as kept and answers a command through ``pytest-incus shell``."""
    assert listed(settings)[name].endswith("kept")
    shown = run_cli(settings.cache_dir, "shell", name, "--", "echo", "ok")
    assert (shown.returncode, shown.stdout) == (0, "ok\n"), shown.stderr


def assert_removed(settings: Settings, name: str) -> None:
    """Nothing of ``name`` is left: not listed, no directory, process, mount or cgroup."""
    assert name not in listed(settings)
    assert registry.leftovers(settings, name) == []


def remove_kept(settings: Settings, names: list[str]) -> None:
    """Delete kept instances as a user would, and check that nothing of them is left."""
    removed = run_cli(settings.cache_dir, "rm", *names)
    assert removed.returncode == 0, removed.stderr
    for name in names:
        assert_removed(settings, name)


def test_keep_failed_keeps_what_a_failed_test_launched(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_launched=LAUNCHED_MODULE)
    result = pytester.runpytest_subprocess(*args, "--incus-keep=failed", timeout=180)
    result.assert_outcomes(passed=1, failed=1, errors=1)
    made = tags(pytester.path)
    # a failure in the test and one in its setup both keep what was launched, each named once
    assert sorted(hinted(result)) == sorted([made["failed"], made["setup"]])
    for label in ("failed", "setup"):
        assert_kept_running(settings, made[label])
    assert_removed(settings, made["passed"])  # deleted at the end of the session, as usual

    # another run's start-of-session reap leaves kept instances alone
    pytester.makepyfile(test_other="def test_nothing():\n    pass\n")
    pytester.runpytest_subprocess(*args, "test_other.py", timeout=120).assert_outcomes(passed=1)
    assert_kept_running(settings, made["failed"])
    assert_kept_running(settings, made["setup"])
    remove_kept(settings, [made["failed"], made["setup"]])


FIXTURES_MODULE = (
    USED_HEADER
    + """
FAIL = {fail}

@pytest.fixture(scope="module")
def server(instance_factory):
    inst = tag(instance_factory.launch(kind="container", image="busybox"), "server")
    yield inst
    inst.delete()

@pytest.fixture(scope="module")
def held(instance_factory):
    inst = tag(instance_factory.launch(kind="container", image="busybox"), "held")
    yield Holder(inst)
    inst.delete()

@pytest.fixture(scope="module")
def other(instance_factory):
    inst = tag(instance_factory.launch(kind="container", image="busybox"), "other")
    yield inst
    inst.delete()

def test_first(server, held, other):
    server.write_file("/root/token", "server\\n")

def test_uses_them(server, held):
    # `server` is one of its fixture values; `held` only through a method call
    held.instance.exec(["true"], check=True)
    assert not FAIL, "fails on purpose"

def test_last():
    pass
"""
)


@pytest.mark.parametrize("fail", [True, False], ids=["failing", "passing"])
def test_keep_failed_keeps_the_module_fixtures_a_failed_test_used(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
    fail: bool,
) -> None:
    pytester.makepyfile(test_fixtures=FIXTURES_MODULE.format(fail=fail))
    result = pytester.runpytest_subprocess(*args, "--incus-keep=failed", timeout=180)
    made = tags(pytester.path)
    if not fail:
        # with every test passing, the fixtures' delete() deletes
        result.assert_outcomes(passed=3)
        assert hinted(result) == []
        for name in made.values():
            assert_removed(settings, name)
        return
    result.assert_outcomes(passed=2, failed=1)
    # kept although their fixtures called delete() at the end of the module
    assert sorted(hinted(result)) == sorted([made["server"], made["held"]])
    for label in ("server", "held"):
        assert_kept_running(settings, made[label])
    shown = run_cli(settings.cache_dir, "shell", made["server"], "--", "cat", "/root/token")
    assert shown.stdout == "server\n", shown.stderr
    assert_removed(settings, made["other"])  # used by a passing test only

    pytester.makepyfile(test_other="def test_nothing():\n    pass\n")
    pytester.runpytest_subprocess(*args, "test_other.py", timeout=120).assert_outcomes(passed=1)
    assert_kept_running(settings, made["server"])
    remove_kept(settings, [made["server"], made["held"]])


EVERYTHING_MODULE = (
    USED_HEADER
    + """
@pytest.fixture(scope="module")
def server(instance_factory):
    inst = tag(instance_factory.launch(kind="container", image="busybox"), "server")
    yield inst
    inst.delete()

@pytest.mark.instance(kind="container", image="busybox")
def test_instance(instance, server):
    tag(instance, "instance")

def test_launches(instance_factory):
    inst = tag(instance_factory.launch(kind="container", image="busybox"), "launched")
    inst.delete()

def test_fails(instance_factory):
    tag(instance_factory.launch(kind="container", image="busybox"), "failed")
    assert False, "fails on purpose"
"""
)


def test_keep_always_keeps_everything_a_test_used(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_everything=EVERYTHING_MODULE)
    result = pytester.runpytest_subprocess(*args, "--incus-keep=always", timeout=180)
    result.assert_outcomes(passed=2, failed=1)
    made = tags(pytester.path)
    assert len(made) == 4
    assert hinted(result) == [made["failed"]]
    for name in made.values():
        assert_kept_running(settings, name)
    remove_kept(settings, list(made.values()))


def test_keep_never_keeps_nothing(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_everything=EVERYTHING_MODULE, test_launched=LAUNCHED_MODULE)
    result = pytester.runpytest_subprocess(*args, "--incus-keep=never", timeout=180)
    result.assert_outcomes(passed=3, failed=2, errors=1)
    assert hinted(result) == []
    assert len(inner_instances.names()) == 7
    for name in inner_instances.names():
        assert_removed(settings, name)
