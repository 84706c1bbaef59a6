"""A pytest-xdist worker killed while its test holds instances: the same run reaps them at its
end, so the run leaves nothing behind (no instance, monitor, QEMU, cgroup, mount or claim)."""

from __future__ import annotations

import pytest
from leftover_helpers import assert_run_left_nothing
from plugin_helpers import INNER_HEADER, InnerInstances, run_cli

from pytest_incus.settings import Settings

# Each test kills its own worker (SIGKILL: no teardown at all) while it holds an instance.
KILLING_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.instance(kind="container", image="busybox")
def test_container(instance):
    record(instance)
    assert instance.exec("echo held").stdout == "held\\n"
    os.kill(os.getpid(), 9)

@pytest.mark.instance(kind="vm", image="debian/12", init="agent")
def test_vm(instance):
    record(instance)
    assert instance.exec("echo held").stdout == "held\\n"
    os.kill(os.getpid(), 9)

@pytest.mark.instance(kind="container", image="busybox")
def test_passes(instance):
    record(instance)
    assert instance.exec("true").ok
"""
)


def test_instances_of_a_killed_worker_are_reaped_by_the_same_run(
    pytester: pytest.Pytester,
    args: list[str],
    settings: Settings,
    inner_instances: InnerInstances,
) -> None:
    pytester.makepyfile(test_killing=KILLING_MODULE)
    result = pytester.runpytest_subprocess(*args, "-n", "2", timeout=300)
    output = result.stdout.str()
    assert "crashed" in output, output
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 2 and outcomes.get("passed") == 1, output
    workers = inner_instances.workers()
    assert len(workers) == 3, workers
    # the instances of both killed workers, of another worker and of the run's end
    assert_run_left_nothing(settings, workers)
    listed = run_cli(settings.cache_dir, "ls").stdout
    assert not any(name in listed for name in workers), listed
