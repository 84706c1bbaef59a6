"""ini ``incus_max_processes``: the process limit of every container and app that does not
set ``processes`` itself, as the host reads it from the container's pids cgroup."""

from __future__ import annotations

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances

INNER = (
    INNER_HEADER
    + """
from pytest_incus.runtimes import cgroups, container

def pids_max(instance):
    recorded = container.recorded_cgroups(instance.name, instance.directory)
    return int((cgroups.payload(recorded, "pids") / "pids.max").read_text())

@pytest.mark.instance(image="busybox")
def test_default(instance, instance_factory):
    record(instance)
    assert instance_factory.settings.max_processes == 77
    assert instance.spec.processes == 77
    assert pids_max(instance) == 77

@pytest.mark.instance(image="busybox", processes=50)
def test_option_wins(instance):
    record(instance)
    assert pids_max(instance) == 50
"""
)


def test_the_ini_key_sets_the_default(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makeini("[pytest]\nincus_max_processes = 77\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=2)
    assert len(inner_instances.names()) == 2


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("0", "incus_max_processes = 0; give a whole number of processes, at least 1"),
        ("-3", "incus_max_processes = -3; give a whole number of processes, at least 1"),
        ("lots", "incus_max_processes = 'lots' is not a whole number of processes"),
        ("1.5", "incus_max_processes = '1.5' is not a whole number of processes"),
    ],
)
def test_a_bad_ini_value_stops_the_run(
    pytester: pytest.Pytester, args: list[str], value: str, said: str
) -> None:
    pytester.makeini(f"[pytest]\nincus_max_processes = {value}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {said}*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
