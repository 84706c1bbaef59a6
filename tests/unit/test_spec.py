"""InstanceSpec.parse and instance_id: the checks behind the marker and launch()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_incus import IncusError
from pytest_incus.errors import ConfigError
from pytest_incus.spec import InstanceSpec, instance_id, network_problem, parse_memory


def parse(kind: Any = "container", image: Any = "busybox", **options: Any) -> InstanceSpec:
    return InstanceSpec.parse(kind, image, options, where="test_x")


def test_defaults() -> None:
    spec = parse()
    assert (spec.kind, spec.image, spec.privileged) == ("container", "busybox", False)
    assert spec.cpus is None and spec.memory is None and spec.name is None
    assert spec.network is None  # the run's default, filled in by with_defaults


def test_config_error_is_an_incus_error_and_a_usage_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse(colour="red")
    assert isinstance(info.value, IncusError)
    assert isinstance(info.value, pytest.UsageError)


def test_unknown_option_names_the_test_and_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^test_x: unknown option colour='red'; known options"):
        parse(colour="red")


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"test_x: unknown kind 'jail'"):
        parse(kind="jail")


@pytest.mark.parametrize("image", ["", None, 12, ["busybox"]])
def test_image_must_be_a_non_empty_str(image: Any) -> None:
    with pytest.raises(ConfigError, match="image must be a non-empty str"):
        parse(image=image)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("cpus", "2"),
        ("cpus", 1.5),
        ("memory", 1.5),
        ("privileged", "yes"),
        ("privileged", 1),
        ("env", ["A=1"]),
        ("network", None),
        ("boot_timeout", "10"),
        ("name", 7),
        ("processes", "64"),
        ("processes", 64.0),
    ],
)
def test_wrong_type(option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"test_x: option {option}=.* has the wrong type"):
        parse(**{option: value})


@pytest.mark.parametrize("option", ["cpus", "memory", "boot_timeout", "processes"])
def test_a_bool_is_not_a_number(option: str) -> None:
    with pytest.raises(ConfigError, match=rf"option {option}=True has the wrong type"):
        parse(**{option: True})


def test_option_of_another_kind() -> None:
    with pytest.raises(ConfigError, match=r"option kernel= does not apply to kind='container'"):
        parse(kernel="/boot/vmlinuz")
    with pytest.raises(ConfigError, match=r"option command= does not apply to kind='container'"):
        parse(command=["sh"])
    with pytest.raises(ConfigError, match=r"option privileged= does not apply to kind='vm'"):
        parse(kind="vm", privileged=True)
    # a VM's guest has its own kernel and process table: the host's pids cgroup is not its
    with pytest.raises(
        ConfigError, match=r"^test_x: option processes= does not apply to kind='vm'"
    ):
        parse(kind="vm", processes=64)


@pytest.mark.parametrize("value", [0, -1, -1024])
def test_processes_must_be_positive(value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^test_x: option processes={value} must be at least 1"):
        parse(processes=value)


def test_processes_default_comes_from_the_run() -> None:
    assert parse().processes is None

    def defaults(spec: InstanceSpec) -> InstanceSpec:
        return spec.with_defaults(max_processes=500, network="none")

    assert defaults(parse()).processes == 500
    assert defaults(parse(processes=64)).processes == 64
    assert defaults(parse(kind="app", image="oci:/x:y")).processes == 500
    assert defaults(parse(kind="vm", image="debian/12")).processes is None


def test_options_of_their_kind_are_kept() -> None:
    vm = parse(kind="vm", kernel=Path("/boot/vmlinuz"), init="agent", kernel_args="quiet")
    assert (vm.kernel, vm.init, vm.kernel_args) == ("/boot/vmlinuz", "agent", "quiet")
    app = parse(kind="app", command=["sh", "-c", "true"], env={"A": "1"})
    assert app.command == ("sh", "-c", "true") and app.env == {"A": "1"}


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 1024**2),
        ("1GiB", 1024**3),
        ("1.5G", 1_500_000_000),
        ("64 kib", 64 * 1024),
        ("100", 100),
        (4096, 4096),
    ],
)
def test_memory_sizes(text: str | int, size: int) -> None:
    assert parse_memory(text) == size
    assert parse(memory=text).memory == size


@pytest.mark.parametrize("text", ["lots", "1TiB", "-1GiB", "0", "0MiB", "1 2 GiB", 0, -5])
def test_bad_memory_sizes(text: str | int) -> None:
    with pytest.raises(ConfigError, match=r"option memory=.* (is not a size|has the wrong)"):
        parse(memory=text)


def test_values_out_of_range() -> None:
    with pytest.raises(ConfigError, match="option cpus=0 must be at least 1"):
        parse(cpus=0)
    with pytest.raises(ConfigError, match="boot_timeout=0 must be positive"):
        parse(boot_timeout=0)
    with pytest.raises(ConfigError, match="network='wi fi'"):
        parse(network="wi fi")
    with pytest.raises(ConfigError, match="init='sysv'"):
        parse(kind="vm", init="sysv")
    with pytest.raises(ConfigError, match=r"command=.* non-empty list of str"):
        parse(kind="app", command=[])


def test_env_and_mounts_map_str_to_str(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="option env= must map str to str"):
        parse(env={"A": 1})
    with pytest.raises(ConfigError, match="instance path 'mnt' must be absolute"):
        parse(mounts={str(tmp_path): "mnt"})
    with pytest.raises(ConfigError, match=r"host path .* does not exist"):
        parse(mounts={str(tmp_path / "nope"): "/mnt"})
    assert parse(mounts={str(tmp_path): "/mnt"}).mounts == {str(tmp_path): "/mnt"}


@pytest.mark.parametrize("name", ["web", "a", "web-1", "W2", "a" * 63])
def test_good_names(name: str) -> None:
    assert parse(name=name).name == name


@pytest.mark.parametrize(
    "name", ["", "1web", "-web", "web_1", "web.1", "we b", "a" * 64, "web\n", "web\nx"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"option name=.*starting with a letter"):
        parse(name=name)


@pytest.mark.parametrize(
    ("kind", "image", "expected"),
    [
        ("container", "busybox", "container-busybox"),
        ("container", "debian/12", "container-debian-12"),
        ("vm", "debian/bookworm", "vm-debian-bookworm"),
        ("container", "images:alpine/3.20", "container-images-alpine-3.20"),
        ("app", "docker://host/name:tag", "app-docker---host-name-tag"),
    ],
)
def test_instance_id(kind: str, image: str, expected: str) -> None:
    assert instance_id(kind, image) == expected


@pytest.mark.parametrize("network", ["none", "bridged", "web", "web-1", "Backend2", "n" * 15])
def test_good_networks(network: str) -> None:
    assert parse(network=network).network == network
    assert parse(kind="vm", image="debian/12", network=network).network == network
    assert parse(kind="app", image="oci:/x:y", network=network).network == network


@pytest.mark.parametrize("network", ["", "1net", "-net", "my_net", "my.net", "n" * 16, "net\n"])
def test_bad_networks(network: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(network=network)
    assert str(info.value) == (
        f"test_x: option network={network!r} is not a network; give "
        '"none", "bridged", or the name of a network: a letter, then letters, digits or '
        "'-', at most 15 long"
    )


@pytest.mark.parametrize("network", ["None", "NONE", "Bridged"])
def test_the_reserved_words_in_another_case_are_no_names(network: str) -> None:
    # network="None" (Python's None in quotes?) must not quietly make a network of that name
    with pytest.raises(
        ConfigError,
        match=rf"option network='{network}' is not a network; write '{network.lower()}'",
    ):
        parse(network=network)


def test_network_is_a_str() -> None:
    with pytest.raises(
        ConfigError, match=r'option network=None has the wrong type; it must be "none", "bridged"'
    ):
        parse(network=None)


def test_network_default_comes_from_the_run() -> None:
    assert parse().with_defaults(max_processes=9, network="bridged").network == "bridged"
    assert parse(network="none").with_defaults(max_processes=9, network="bridged").network == (
        "none"
    )
    assert parse(network="web").with_defaults(max_processes=9, network="none").network == "web"
    vm = parse(kind="vm", image="debian/12").with_defaults(max_processes=9, network="db")
    assert (vm.network, vm.processes) == ("db", None)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("none", None),
        ("web-1", None),
        ("web_1", "is not a network; give"),
        ("NONE", "is not a network; write 'none' in lower case"),
        (7, "is not a str; give"),
    ],
)
def test_network_problem(value: object, problem: str | None) -> None:
    said = network_problem(value)
    if problem is None:
        assert said is None
    else:
        assert said is not None and said.startswith(problem)
