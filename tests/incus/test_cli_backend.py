"""``pytest-incus --backend=incus ls`` and ``reap``: the plugin's instances on the server, found
by their ``user.pytest-incus.*`` keys; a live run's are listed and never reaped, a dead run's
are reaped."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from incus_helpers import TEST_PROJECT

from pytest_incus import ImageStore, InstanceFactory
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.owners import delete_instance, server_instances
from pytest_incus.settings import Settings

# launches an instance and ends without deleting it: what a killed run leaves
KILLED_RUN = """
import os, sys
from pathlib import Path
from pytest_incus import ImageStore, InstanceFactory
from pytest_incus.settings import Settings
settings = Settings(cache_dir=Path(sys.argv[1]), backend="incus", project=sys.argv[2])
inst = InstanceFactory(settings, ImageStore(settings)).launch(image="busybox")
print(inst.name, flush=True)
os._exit(0)
"""


@pytest.fixture
def incus_settings(settings: Settings) -> Settings:
    return Settings(cache_dir=settings.cache_dir, backend="incus", project=TEST_PROJECT)


@pytest.fixture
def factory(incus_settings: Settings) -> Iterator[InstanceFactory]:
    made = InstanceFactory(incus_settings, ImageStore(incus_settings))
    yield made
    made.close()


def cli(settings: Settings, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_incus.cli", f"--cache-dir={settings.cache_dir}",
         "--backend=incus", f"--project={TEST_PROJECT}", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return result.stdout


def test_a_live_runs_instance_is_listed_and_never_reaped(
    factory: InstanceFactory, incus_settings: Settings, incus_client: IncusClient
) -> None:
    inst = factory.launch(image="busybox")
    listed = [line for line in cli(incus_settings, "ls").splitlines() if line.startswith(inst.name)]
    assert listed and f"pid {os.getpid()}" in listed[0], listed
    assert inst.name not in cli(incus_settings, "reap")
    assert inst.name in {record.name for record in server_instances(incus_client)}
    assert inst.exec(["true"]).ok


def test_a_dead_runs_instance_is_listed_orphaned_and_reaped(
    incus_settings: Settings, incus_client: IncusClient
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(incus_settings.cache_dir), TEST_PROJECT],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    name = run.stdout.split()[-1]
    try:
        (line,) = [ln for ln in cli(incus_settings, "ls").splitlines() if ln.startswith(name)]
        assert "orphaned" in line
        assert f"reaped {name}" in cli(incus_settings, "reap")
        assert name not in {record.name for record in server_instances(incus_client)}
    finally:  # whatever the checks said, nothing stays on the server
        if name in {record.name for record in server_instances(incus_client)}:
            delete_instance(incus_client, name)
