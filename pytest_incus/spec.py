"""What an instance should be: the options of the marker and of ``launch()``, checked.

``InstanceSpec.parse`` is the one place that validates options; the marker (at collection) and
``instance_factory.launch()`` both go through it, so they reject the same mistakes the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_incus.errors import ConfigError
from pytest_incus.values import Kind, VmInit

KINDS = tuple(Kind)
NETWORKS = ("none", "bridged")  # the network option's own words; no network may be named so
VM_INITS = tuple(VmInit)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]{0,62}")
# A network's name. At most 15 long: an Incus bridge network is named as its bridge interface,
# and a Linux interface name has at most IFNAMSIZ - 1 = 15 bytes, so a suite whose names fit
# runs unchanged on the incus backend. Letters, digits and '-', starting with a letter: safe in
# file names, command arguments and messages without quoting (the local backend names its
# bridges itself, "pti...").
_NETWORK_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]{0,14}")
NETWORK_RULE = (
    '"none", "bridged", or the name of a network: a letter, then letters, digits or \'-\', '
    "at most 15 long"
)

# option -> (accepted types, kinds it applies to, human description)
_OPTIONS: dict[str, tuple[tuple[type, ...], tuple[str, ...], str]] = {
    "cpus": ((int,), KINDS, "a positive int"),
    "memory": ((str, int), KINDS, 'a size such as "512MiB" or "1GiB"'),
    "privileged": ((bool,), ("container", "app"), "a bool"),
    "env": ((dict,), KINDS, "a dict of str to str"),
    "network": ((str,), KINDS, NETWORK_RULE),
    "mounts": ((dict,), ("container", "app"), "a dict of host path to instance path"),
    "packages": ((list, tuple), ("container", "vm"), "a list of distro package names (str)"),
    "processes": ((int,), ("container", "app"), "a positive int"),
    "kernel": ((str, Path), ("vm",), "a path to a kernel image"),
    "initrd": ((str, Path), ("vm",), "a path to an initrd"),
    "kernel_args": ((str,), ("vm",), "a str"),
    "init": ((str,), ("vm",), '"systemd" or "agent"'),
    "command": ((list, tuple), ("app",), "a list of str"),
    "boot_timeout": ((int, float), KINDS, "a number of seconds"),
    "name": ((str,), KINDS, "a name of letters, digits and '-', starting with a letter"),
}


def parse_memory(value: str | int) -> int:
    """Bytes for ``"512MiB"``, ``"1GiB"``, ``"1.5G"`` or a plain int; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(value)
        return value
    m = _MEMORY.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(value)
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(value)
    return size


def network_problem(value: object) -> str | None:
    """None if ``value`` names a network (the ``network`` option, ini
    ``incus_default_network``): "none", "bridged" or a network's name; else what is wrong
    with it, to follow what was asked in a ConfigError."""
    if not isinstance(value, str):
        return f"is not a str; give {NETWORK_RULE}"
    if value in NETWORKS:
        return None
    if value.lower() in NETWORKS:  # "None" (Python's None?) would make a network of that name
        return f"is not a network; write {value.lower()!r} in lower case"
    if not _NETWORK_NAME.fullmatch(value):
        return f"is not a network; give {NETWORK_RULE}"
    return None


def strings(value: object, option: str, what: str) -> tuple[str, ...]:
    """``value`` as a tuple of str; ConfigError for a str alone (one item each, not one
    string: a common slip) or anything else. ``option`` and ``what`` name it in the message."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{option}={value!r}: give a list of {what}, like {option}=[...] (a str alone is "
            "not a list)"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{option}=: {item!r} is not a str; give a list of {what}")
    return items


def package_names(packages: object) -> tuple[str, ...]:
    """``packages`` (the option, or ``image_store.derive``'s argument) as a sorted tuple of
    names, each once; ConfigError for what :func:`strings` refuses, or a name that is none
    (empty, with spaces, or starting with '-', which a package manager reads as an option)."""
    names = strings(packages, "packages", "package names")
    for name in names:
        if not name or any(c.isspace() for c in name) or name.startswith("-"):
            raise ConfigError(
                f"packages=: {name!r} is not a package name (empty, with spaces, or starting "
                "with '-', which the package manager would read as an option); give one name "
                "per item, like packages=['nginx', 'curl']"
            )
    return tuple(sorted(set(names)))


def instance_id(kind: str, image: str) -> str:
    """The parametrization id of a kind/image pair: ``vm-debian-12``."""
    return f"{kind}-{image}".replace("/", "-").replace(":", "-")


@dataclass(frozen=True)
class InstanceSpec:
    """A checked description of one instance to launch."""

    kind: Kind
    image: str
    cpus: int | None = None
    memory: int | None = None  # bytes
    privileged: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    network: str | None = None  # None: the run's default (with_defaults)
    mounts: Mapping[str, str] = field(default_factory=dict)
    packages: tuple[str, ...] = ()  # installed into a derived image of `image`
    processes: int | None = None  # None: the run's default (with_defaults)
    kernel: str | None = None
    initrd: str | None = None
    kernel_args: str = ""
    init: VmInit = VmInit.SYSTEMD
    command: tuple[str, ...] | None = None
    boot_timeout: float = 60.0
    name: str | None = None

    @classmethod
    def parse(
        cls, kind: Any, image: Any, options: Mapping[str, Any], *, where: str
    ) -> InstanceSpec:
        """Check ``options`` for ``kind``/``image`` and build the spec.

        ``where`` names the test or call, so the error can point at it.
        Raises ConfigError naming the option and what it should be.
        """

        def bad(message: str) -> ConfigError:
            return ConfigError(f"{where}: {message}")

        if kind not in KINDS:
            raise bad(f"unknown kind {kind!r}; use one of {', '.join(map(repr, KINDS))}")
        if not isinstance(image, str) or not image:
            raise bad(f"image must be a non-empty str, got {image!r}")
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key not in _OPTIONS:
                raise bad(f"unknown option {key}={value!r}; known options: {', '.join(_OPTIONS)}")
            types, kinds, description = _OPTIONS[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise bad(f"option {key}={value!r} has the wrong type; it must be {description}")
            if kind not in kinds:
                raise bad(
                    f"option {key}= does not apply to kind={kind!r} (only to {', '.join(kinds)})"
                )
            values[key] = value
        for key in ("cpus", "processes"):
            if key in values and values[key] < 1:
                raise bad(f"option {key}={values[key]!r} must be at least 1")
        if "memory" in values:
            try:
                values["memory"] = parse_memory(values["memory"])
            except ValueError:
                raise bad(
                    f"option memory={values['memory']!r} is not a size; "
                    'write it like "512MiB" or "1GiB"'
                ) from None
        for key in ("env", "mounts"):
            if key in values and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in values[key].items()
            ):
                raise bad(f"option {key}= must map str to str, got {values[key]!r}")
        if "mounts" in values:
            for host, inside in values["mounts"].items():
                if not inside.startswith("/"):
                    raise bad(f"mounts: instance path {inside!r} must be absolute")
                if not Path(host).exists():
                    raise bad(f"mounts: host path {host!r} does not exist")
        if "network" in values and (problem := network_problem(values["network"])):
            raise bad(f"option network={values['network']!r} {problem}")
        if values.get("init", "systemd") not in VM_INITS:
            raise bad(
                f"option init={values['init']!r}; use one of {', '.join(map(repr, VM_INITS))}"
            )
        if "command" in values:
            if not values["command"] or not all(isinstance(a, str) for a in values["command"]):
                raise bad(f"option command={values['command']!r} must be a non-empty list of str")
            values["command"] = tuple(values["command"])
        if "packages" in values:
            try:
                values["packages"] = package_names(values["packages"])
            except ConfigError as exc:
                raise bad(f"option {exc}") from None
        if "boot_timeout" in values and values["boot_timeout"] <= 0:
            raise bad(f"option boot_timeout={values['boot_timeout']!r} must be positive")
        if "name" in values and not _NAME.fullmatch(values["name"]):
            raise bad(f"option name={values['name']!r}: {_OPTIONS['name'][2]}, at most 63 long")
        for key in ("kernel", "initrd"):
            if key in values:
                values[key] = str(values[key])
        if "init" in values:
            values["init"] = VmInit(values["init"])
        return cls(kind=Kind(kind), image=image, **values)

    def with_defaults(self, *, max_processes: int, network: str) -> InstanceSpec:
        """This spec with the run's defaults filled in where the options left them open:
        ``processes`` (for the kinds it applies to) from ini ``incus_max_processes``,
        ``network`` from ini ``incus_default_network``."""
        defaults: dict[str, Any] = {}
        if self.processes is None and self.kind in _OPTIONS["processes"][1]:
            defaults["processes"] = max_processes
        if self.network is None:
            defaults["network"] = network
        return replace(self, **defaults) if defaults else self
