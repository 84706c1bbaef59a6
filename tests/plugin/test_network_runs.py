"""Networks under a parallel run and after a killed one: forty bridged containers on four
xdist workers get forty different addresses and each test reaches its own instance; the run
leaves no bridge, device, firewall table, DNS server or lease. A SIGKILLed run's bridged
instances and networks are all removed by ``pytest-incus reap``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from leftover_helpers import assert_run_left_nothing
from plugin_helpers import INNER_HEADER, InnerInstances, InnerRun, run_cli, wait_until

from pytest_incus import network
from pytest_incus.network import links
from pytest_incus.settings import Settings

TESTS = 40
SERVE_MODULE = (
    INNER_HEADER
    + """
import requests


@pytest.mark.parametrize("n", range(TESTS_PLACEHOLDER))
@pytest.mark.instance(kind="container", image="busybox", network="bridged")
def test_serve(instance, n):
    record(instance)
    (pathlib.Path(__file__).parent / "addresses").mkdir(exist_ok=True)
    (pathlib.Path(__file__).parent / "addresses" / instance.name).write_text(instance.ipv4)
    instance.exec(f"mkdir /www && echo {instance.name} > /www/index.html", check=True)
    instance.exec("busybox httpd -p 8080 -h /www", check=True)
    instance.wait_for_port(8080, timeout=20)
    reply = requests.get(f"http://{instance.ipv4}:8080/", timeout=10)
    assert reply.text == instance.name + "\\n"  # its own instance, no other
    if (pathlib.Path(__file__).parent / "hold").exists():
        (pathlib.Path(__file__).parent / f"held-{n}").write_text(str(os.getpid()))
        time.sleep(600)
""".replace("TESTS_PLACEHOLDER", str(TESTS))
)


def device_names(settings: Settings, names: list[str]) -> list[str]:
    """The host devices of the run's instances (and bridges of this cache) still present."""
    ours = {network.device_name(settings, name) for name in names}
    ours.add(network.bridge_name(settings, "bridged"))
    return [d for d in links.present() if d in ours]


def test_forty_bridged_instances_on_four_workers(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    settings = Settings(cache_dir=scratch_cache)
    pytester.makepyfile(test_serve_inner=SERVE_MODULE)
    run = InnerRun(pytester.path, scratch_cache, "-n", "4", "test_serve_inner.py")
    try:
        code = run.wait(300)
        output = run.output()
    finally:
        run.stop()
    assert code == 0, output[-5000:]
    assert f"{TESTS} passed" in output, output[-5000:]
    names = inner_instances.names()
    assert len(names) == TESTS
    addresses = [(pytester.path / "addresses" / n).read_text() for n in names]
    assert len(set(addresses)) == TESTS, sorted(addresses)  # no address given out twice
    assert len(set(inner_instances.workers().values())) > 1  # really in parallel
    assert_run_left_nothing(settings, names)
    assert network.leftovers(settings) == []
    assert device_names(settings, names) == []


def test_reap_after_a_killed_run(
    pytester: pytest.Pytester, scratch_cache: Path, inner_instances: InnerInstances
) -> None:
    inner_instances.caches.add(scratch_cache)
    settings = Settings(cache_dir=scratch_cache)
    pytester.makepyfile(test_serve_inner=SERVE_MODULE)
    (pytester.path / "hold").write_text("")
    run = InnerRun(pytester.path, scratch_cache, "-n", "2", "test_serve_inner.py")
    try:
        wait_until(
            lambda: len(list(pytester.path.glob("held-*"))) == 2,
            120,
            "the two workers did not both hold a bridged instance",
        )
        assert network.leftovers(settings) != []  # what the kill leaves
        # the whole run: its main process, and its workers (in sessions of their own)
        workers = [int(p.read_text()) for p in pytester.path.glob("held-*")]
        os.killpg(run.proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        run.proc.wait(timeout=30)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30, "dead")
    finally:
        run.stop()
    names = inner_instances.names()
    reaped = run_cli(scratch_cache, "reap")
    assert reaped.returncode == 0, reaped.stderr
    assert_run_left_nothing(settings, names)
    assert network.leftovers(settings) == []
    assert device_names(settings, names) == []
