"""The incus backend's runtimes and machines against the real incusd of this host, in the
suite's project (tests/incus/conftest.py).

Each test names its instances ``pti-rt-<hex>`` and deletes them at its end (the fixture
``made`` deletes whatever a failing test left). Images come from ``IncusImages`` on the shared
cache (busybox: uploaded once, then reused).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import build_image

from pytest_incus.errors import ConfigError, NotRunningError, UnavailableError, WaitTimeoutError
from pytest_incus.images.store import ImageStore
from pytest_incus.incus import owners
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.machine import IncusMachine
from pytest_incus.incus.networks import network_name
from pytest_incus.incus.runtime import IncusRuntime, incus_runtimes
from pytest_incus.ownership import Owner, process_start_time
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.settings import Settings, default_cache_dir
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import ExecRequest

SCRATCH = Path("/var/lib/pti-runtime")


@pytest.fixture(scope="module")
def runtimes(incus_client: IncusClient) -> Iterator[dict[str, IncusRuntime]]:
    """The incus backend's runtimes, on the shared image cache."""
    settings = Settings(
        cache_dir=default_cache_dir(), backend="incus", project=incus_client.project
    )
    context = RuntimeContext.of(ImageStore(settings))
    found = {r.kind: r for r in incus_runtimes(context) if isinstance(r, IncusRuntime)}
    assert sorted(found) == ["app", "container", "vm"]
    yield found
    found["container"].client.close()  # one client, shared by the three


@pytest.fixture(scope="module")
def client(runtimes: dict[str, IncusRuntime]) -> IncusClient:
    """The runtimes' client."""
    return runtimes["container"].client


@pytest.fixture
def made(client: IncusClient) -> Iterator[list[str]]:
    """Names of instances a test makes on the server: deleted at its end, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        owners.delete_instance(client, name)


def fresh(names: list[str]) -> str:
    """A new instance name of this test's, noted for deletion."""
    name = f"pti-rt-{secrets.token_hex(4)}"
    names.append(name)
    return name


def machine(
    runtime: IncusRuntime, names: list[str], tmp_path: Path, **options: object
) -> IncusMachine:
    """A machine of ``runtime`` of a busybox image (not started)."""
    options.setdefault("boot_timeout", 60)
    kind = options.pop("kind", runtime.kind)
    image = options.pop("image", "busybox")
    spec = InstanceSpec.parse(kind, image, options, where="test").with_defaults(
        max_processes=256, network="none"
    )
    runtime.check(spec)
    name = fresh(names)
    directory = tmp_path / name
    directory.mkdir()
    return runtime.create(spec, name, directory, None)


def run(m: IncusMachine, *argv: str) -> str:
    """Run ``argv`` in ``m``; its stdout (exit code 0 asserted)."""
    result = m.exec(ExecRequest(tuple(argv), {}, None, None, None, 30.0))
    assert result.exit_code == 0, result
    return result.stdout


def test_life_cycle_of_a_busybox_container(
    runtimes: dict[str, IncusRuntime], client: IncusClient, made: list[str], tmp_path: Path
) -> None:
    m = machine(
        runtimes["container"], made, tmp_path, env={"PTI_RT": "yes"}, memory="64MiB", cpus=1
    )
    assert not m.running()
    m.start()
    assert m.running()
    assert run(m, "echo", "hello") == "hello\n"
    assert m.ipv4 is None
    info = client.call("GET", f"/1.0/instances/{m.name}")
    config = info["config"]
    assert config["limits.memory"] == str(64 << 20)
    assert config["limits.cpu"] == "0-0"  # pinned as on the local backend
    assert run(m, "grep", "Cpus_allowed_list", "/proc/self/status").split()[1] == "0"
    assert config["limits.processes"] == "256"
    assert config["environment.PTI_RT"] == "yes"
    m.stop(10, False)
    assert not m.running()
    m.start()
    assert "PTI_RT=yes" in run(m, "env")
    m.stop(10, True)
    assert not m.running()
    m.destroy()
    assert m._status() is None  # gone from the server
    m.destroy()  # idempotent: an instance already gone is no error
    with pytest.raises(NotRunningError):
        m.exec(ExecRequest(("true",), {}, None, None, None, 10.0))


def test_the_instance_carries_the_owner_keys(
    runtimes: dict[str, IncusRuntime], client: IncusClient, made: list[str], tmp_path: Path
) -> None:
    m = machine(runtimes["container"], made, tmp_path)
    m.start()
    config = client.call("GET", f"/1.0/instances/{m.name}")["config"]
    me = Owner.current()
    assert config[owners.OWNER_HOST] == owners.this_host()
    assert config[owners.OWNER_HOST].endswith(
        Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    )
    assert config[owners.OWNER_PID] == str(me.pid)
    assert config[owners.OWNER_START] == str(me.start_time)
    assert config[owners.RUN_ID] == owners.run_id()
    assert config[owners.KIND] == "container"
    assert config[owners.IMAGE] == "busybox"
    records = {r.name: r for r in owners.server_instances(client)}
    record = records[m.name]
    assert (record.kind, record.image, record.owner) == ("container", "busybox", me)
    assert not record.orphaned  # its owner, this process, lives


def test_a_name_taken_on_the_server_is_a_config_error(
    runtimes: dict[str, IncusRuntime], made: list[str], tmp_path: Path
) -> None:
    first = machine(runtimes["container"], made, tmp_path)
    first.start()
    second = IncusMachine(first.runtime, first.spec, first.name, tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        second.start()
    assert first.running()  # the one that has the name is left alone


def dead_owner() -> Owner:
    """The owner record of a process that has ended (one started here for that)."""
    child = subprocess.Popen(["sleep", "60"])
    start = process_start_time(child.pid)
    assert start is not None
    child.kill()
    child.wait()
    owner = Owner(child.pid, start)
    assert not owner.alive()
    return owner


def test_reap_server_deletes_only_what_a_dead_owner_left(
    runtimes: dict[str, IncusRuntime], client: IncusClient, made: list[str], tmp_path: Path
) -> None:
    live = machine(runtimes["container"], made, tmp_path)
    dead = machine(runtimes["container"], made, tmp_path)
    dead.owner = dead_owner()
    other_host = machine(runtimes["container"], made, tmp_path)
    other_host.owner = dead.owner
    for m in (live, dead, other_host):
        m.start()
    # an instance of another host: its owner's liveness cannot be seen from here
    client.call(
        "PATCH",
        f"/1.0/instances/{other_host.name}",
        json={"config": {owners.OWNER_HOST: "elsewhere/0000"}},
    )
    removed = owners.reap_server(client, names=[live.name, dead.name, other_host.name])
    assert removed == [dead.name]
    assert dead._status() is None
    assert live.running() and other_host.running()


def test_a_kept_instance_of_a_dead_owner_stays_unless_asked(
    runtimes: dict[str, IncusRuntime], client: IncusClient, made: list[str], tmp_path: Path
) -> None:
    kept = machine(runtimes["container"], made, tmp_path)
    kept.owner = dead_owner()
    kept.keep()  # never created: nothing to mark, no error
    kept.start()
    kept.keep()
    records = {r.name: r for r in owners.server_instances(client)}
    assert records[kept.name].kept and records[kept.name].orphaned
    assert owners.reap_server(client, names=[kept.name]) == []
    assert kept.running()
    assert owners.reap_server(client, names=[kept.name], include_kept=True) == [kept.name]
    assert kept._status() is None
    kept.keep()  # gone: nothing to mark, no error


def test_reap_by_name_deletes_only_our_instances(
    runtimes: dict[str, IncusRuntime], client: IncusClient, made: list[str], tmp_path: Path
) -> None:
    runtime = runtimes["container"]
    ours = machine(runtime, made, tmp_path)
    ours.start()
    runtime.reap(ours.name, tmp_path)
    assert ours._status() is None
    runtime.reap(ours.name, tmp_path)  # already gone: nothing to do, no error


def test_a_vm_is_refused_with_incus_own_reason(
    runtimes: dict[str, IncusRuntime], made: list[str], tmp_path: Path
) -> None:
    runtime = runtimes["vm"]
    drivers = runtime.client.server()["environment"]["driver"]
    if "qemu" in drivers:
        pytest.skip(f"this Incus server runs VMs (drivers {drivers})")
    reason = runtime.unavailable()
    assert reason is not None and "vhost_vsock kernel module not loaded" in reason, reason
    # the check says it first, before any option Incus would not take (kernel_args here)
    spec = InstanceSpec.parse("vm", "debian/12", {"kernel_args": "quiet"}, where="test")
    with pytest.raises(UnavailableError, match="vhost_vsock kernel module not loaded"):
        runtime.check(spec)
    # and a machine made without the check refuses to start
    spec = InstanceSpec.parse("vm", "debian/12", {"boot_timeout": 60}, where="test")
    name = fresh(made)
    (tmp_path / name).mkdir()
    m = runtime.create(
        spec.with_defaults(max_processes=256, network="none"), name, tmp_path / name, None
    )
    with pytest.raises(UnavailableError, match="vhost_vsock kernel module not loaded"):
        m.start()
    assert m._status() is None  # nothing was left on the server


def test_options_incus_cannot_honour_are_config_errors(
    incus_client: IncusClient, runtimes: dict[str, IncusRuntime], tmp_path: Path
) -> None:
    # on a server that runs VMs: this one is taken as one (its refusal, once known, is what
    # a check says first: test_a_vm_is_refused_with_incus_own_reason)
    settings = Settings(
        cache_dir=default_cache_dir(), backend="incus", project=incus_client.project
    )
    context = RuntimeContext.of(ImageStore(settings))
    vm = next(r for r in incus_runtimes(context, client=lambda: incus_client) if r.kind == "vm")
    assert isinstance(vm, IncusRuntime)
    vm.server._vm_asked, vm.server._vm_refusal = True, None
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"")
    spec = InstanceSpec.parse("vm", "debian/12", {"kernel": str(kernel)}, where="test")
    with pytest.raises(ConfigError, match="kernel= is not supported"):
        vm.check(spec)
    vm.check(InstanceSpec.parse("vm", "debian/12", {"init": "agent"}, where="t"))
    spec = InstanceSpec.parse("container", "busybox", {"memory": "1MiB"}, where="test")
    with pytest.raises(ConfigError, match="too little"):  # the local runtime's own check
        runtimes["container"].check(spec)


def test_instances_on_one_network_reach_each_other_by_name(
    runtimes: dict[str, IncusRuntime], client: IncusClient, made: list[str], tmp_path: Path
) -> None:
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    net = f"rt{secrets.token_hex(3)}"
    a = machine(runtimes["container"], made, tmp_path, network=net)
    b = machine(runtimes["container"], made, tmp_path, network=net)
    try:
        a.start()
        b.start()
        assert a.ipv4 and b.ipv4 and a.ipv4 != b.ipv4
        assert f"{b.ipv4}" in run(a, "ping", "-c", "1", "-W", "2", b.name)
        assert run(a, "ip", "route").strip().startswith(f"{a.ipv4.rsplit('.', 1)[0]}.0/24")
        # the host reaches it on its address: nothing listens on port 9, so it answers with a
        # reset at once (an address the host could not reach would time out)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((a.ipv4, 9), timeout=5).close()
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding
        bridge = network_name(client.project, net)
        rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        assert bridge not in rules  # Incus added nothing to the host's firewall
    finally:
        for m in (a, b):
            m.destroy()
        runtimes["container"].networks.sweep()
    networks = [n["name"] for n in client.call("GET", "/1.0/networks", params={"recursion": 1})]
    assert network_name(client.project, net) not in networks


def test_a_systemd_image_is_ready_when_systemd_says_so(
    runtimes: dict[str, IncusRuntime], made: list[str], tmp_path: Path
) -> None:
    m = machine(runtimes["container"], made, tmp_path, image="debian/12")
    m.start()
    state = run(m, "systemctl", "is-system-running").strip()
    assert state in ("running", "degraded")


@pytest.fixture
def app_runtime(scratch_cache: Path, incus_client: IncusClient) -> Iterator[IncusRuntime]:
    """The app runtime of a private cache, holding an OCI layout with busybox; the images it
    uploads are deleted afterwards (they are of this test's private cache)."""
    build_image(scratch_cache / "layout", "app")
    settings = Settings(cache_dir=scratch_cache, backend="incus", project=incus_client.project)
    runtime = next(
        r
        for r in incus_runtimes(RuntimeContext.of(ImageStore(settings)))
        if isinstance(r, IncusRuntime) and r.kind == "app"
    )
    before = {i["fingerprint"] for i in runtime.client.call("GET", "/1.0/images?recursion=1")}
    yield runtime
    for image in runtime.client.call("GET", "/1.0/images?recursion=1"):
        if image["fingerprint"] not in before and str(scratch_cache) in str(
            image.get("properties", {}).get("description", "")
        ):
            runtime.client.call("DELETE", f"/1.0/images/{image['fingerprint']}")
    runtime.client.close()


def test_an_app_runs_its_program_and_wait_gives_its_exit_code(
    app_runtime: IncusRuntime, scratch_cache: Path, made: list[str], tmp_path: Path
) -> None:
    image = f"oci:{scratch_cache / 'layout'}:app"
    m = machine(
        app_runtime,
        made,
        tmp_path,
        image=image,
        env={"WHO": "app"},
        command=["/bin/sh", "-c", 'echo "out $WHO"; echo err >&2; exit 7'],
    )
    m.start()
    assert m.wait(30) == 7
    assert not m.running()
    assert "out app" in m.logs() and "err" in m.logs()
    long = machine(
        app_runtime, made, tmp_path, image=image, command=["/bin/busybox", "sleep", "30"]
    )
    long.start()
    assert long.running()
    with pytest.raises(WaitTimeoutError):
        long.wait(0.5)
    long.stop(5, True)
    assert not long.running()
