"""The pytest11 entry point: options, the ``instance`` marker, hooks and fixtures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_incus import fixtures, hookspecs, registry, signals
from pytest_incus.errors import ConfigError
from pytest_incus.factory import InstanceFactory
from pytest_incus.fixtures import CONFIG_ERRORS, FACTORY, MARKERS, SETTINGS, STORE
from pytest_incus.images.store import ImageStore
from pytest_incus.ownership import Owner, process_start_time
from pytest_incus.runtimes.context import RuntimeContext
from pytest_incus.runtimes.table import RuntimeTable
from pytest_incus.settings import (
    ACCEL_CHOICES,
    BACKEND_CHOICES,
    DEFAULT_EXEC_TIMEOUT,
    DEFAULT_IMAGE,
    DEFAULT_IMAGE_SERVER,
    DEFAULT_KIND,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_MIRROR,
    DEFAULT_NETWORK,
    DEFAULT_PROJECT,
    KEEP_CHOICES,
    Settings,
    default_cache_dir,
)
from pytest_incus.summary import SummaryPlugin, Tally

SIGNALS = pytest.StashKey[signals.RunSignals]()

MARKER_HELP = (
    "instance(kind='container', image=<incus_default_image>, **options): the instance that the "
    "`instance` fixture launches; lists for kind and image parametrize the test. Options: cpus, "
    "memory, privileged, env, network, mounts, processes, kernel, initrd, kernel_args, init, command, "
    "boot_timeout, name."
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Add the pytest_incus_* hook specifications."""
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The --incus-* options and incus_* ini keys."""
    group = parser.getgroup("incus", "pytest-incus: real instances as fixtures")
    group.addoption(
        "--incus-keep",
        choices=KEEP_CHOICES,
        default=None,
        help="keep instances after their test: never (default), failed, always",
    )
    group.addoption(
        "--incus-cache-dir",
        default=None,
        help=f"image cache and instance directory (default: ${{PYTEST_INCUS_CACHE_DIR}}"
        f" or {default_cache_dir()})",
    )
    group.addoption(
        "--incus-mirror",
        default=None,
        help=f"Debian mirror for debian/<release> images (default {DEFAULT_MIRROR})",
    )
    group.addoption(
        "--incus-image-server",
        default=None,
        metavar="URL",
        help="simplestreams image server of images:<distro>/<release> names "
        f"(default {DEFAULT_IMAGE_SERVER}); for a server with a private CA, point "
        "REQUESTS_CA_BUNDLE at the CA's certificate",
    )
    group.addoption(
        "--incus-subnet",
        default=None,
        metavar="NET/PREFIX",
        help="IPv4 range of the host-only networks, a /8 to a /24 (default: one that no route "
        "of this host uses, chosen once)",
    )
    group.addoption(
        "--incus-accel",
        choices=ACCEL_CHOICES,
        default=None,
        help="VM acceleration: auto (default: use KVM if it really runs a guest, else TCG), "
        "kvm or tcg",
    )
    group.addoption(
        "--incus-insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="an OCI registry to reach over plain HTTP or with an unverified certificate "
        "(repeatable)",
    )
    group.addoption(
        "--incus-vm-snapshots",
        choices=("on", "off"),
        default=None,
        help="on (default): a VM resumes a snapshot of the first boot of its image and shape, "
        "saved in the cache; off: every VM boots from scratch",
    )
    group.addoption(
        "--incus-backend",
        choices=BACKEND_CHOICES,
        default=None,
        help="where instances run: local (default: this host, the plugin as its own engine) or "
        "incus (an Incus server or cluster, over its REST API)",
    )
    group.addoption(
        "--incus-remote",
        default=None,
        metavar="SOCKET|https://HOST:PORT",
        help="the Incus server of --incus-backend=incus: a unix socket path (default: Incus's "
        "own) or https://HOST:PORT (with the incus command's client certificate, or "
        "--incus-client-cert/--incus-client-key)",
    )
    group.addoption(
        "--incus-project",
        default=None,
        help=f"the Incus project instances go in (default {DEFAULT_PROJECT})",
    )
    group.addoption(
        "--incus-target",
        default=None,
        metavar="MEMBER",
        help="the cluster member instances go on (default: the cluster places them)",
    )
    group.addoption(
        "--incus-client-cert",
        default=None,
        metavar="PATH",
        help="client certificate for an https remote (default: the incus command's own)",
    )
    group.addoption(
        "--incus-client-key",
        default=None,
        metavar="PATH",
        help="private key of --incus-client-cert",
    )
    group.addoption(
        "--incus-skip-unavailable",
        action="store_true",
        default=None,
        help="skip, instead of error, tests whose kind this host cannot run",
    )
    parser.addini(
        "incus_default_image",
        f"image when the marker names none ({DEFAULT_IMAGE})",
        default=DEFAULT_IMAGE,
    )
    parser.addini(
        "incus_default_kind",
        f"kind when the marker names none ({DEFAULT_KIND})",
        default=DEFAULT_KIND,
    )
    parser.addini(
        "incus_exec_timeout",
        f"default exec timeout in seconds, 0 for none ({DEFAULT_EXEC_TIMEOUT:g})",
        default=str(DEFAULT_EXEC_TIMEOUT),
    )
    parser.addini(
        "incus_default_network",
        "network when the marker names none: none (loopback only), bridged, or a network's "
        f"name ({DEFAULT_NETWORK})",
        default=DEFAULT_NETWORK,
    )
    parser.addini(
        "incus_max_processes",
        f"the most processes a container or app may have, unless its processes= option says "
        f"otherwise ({DEFAULT_MAX_PROCESSES})",
        default=str(DEFAULT_MAX_PROCESSES),
    )
    parser.addini("incus_keep", "ini form of --incus-keep", default="never")
    parser.addini("incus_cache_dir", "ini form of --incus-cache-dir", default="")
    parser.addini("incus_mirror", "ini form of --incus-mirror", default=DEFAULT_MIRROR)
    parser.addini(
        "incus_image_server", "ini form of --incus-image-server", default=DEFAULT_IMAGE_SERVER
    )
    parser.addini("incus_subnet", "ini form of --incus-subnet", default="")
    parser.addini("incus_accel", "ini form of --incus-accel", default="auto")
    parser.addini(
        "incus_insecure_registries",
        "ini form of --incus-insecure-registry: one HOST[:PORT] per line",
        type="linelist",
        default=[],
    )
    parser.addini("incus_vm_snapshots", "ini form of --incus-vm-snapshots (on|off)", default="on")
    parser.addini(
        "incus_skip_unavailable", "ini form of --incus-skip-unavailable", type="bool", default=False
    )
    parser.addini("incus_backend", "ini form of --incus-backend", default="local")
    parser.addini("incus_remote", "ini form of --incus-remote", default="")
    parser.addini("incus_project", "ini form of --incus-project", default=DEFAULT_PROJECT)
    parser.addini("incus_target", "ini form of --incus-target", default="")
    parser.addini("incus_client_cert", "ini form of --incus-client-cert", default="")
    parser.addini("incus_client_key", "ini form of --incus-client-key", default="")


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise ConfigError(f"incus_vm_snapshots = {value!r}; use on or off")
    return value == "on"


def _settings(config: pytest.Config) -> Settings:
    def option(name: str, ini: str) -> Any:
        value = config.getoption(name)
        return config.getini(ini) if value is None else value

    cache = option("incus_cache_dir", "incus_cache_dir")

    def path(name: str) -> Path | None:
        value = option(name, name)
        return Path(value).expanduser().absolute() if value else None

    try:
        timeout = float(config.getini("incus_exec_timeout"))
    except ValueError:
        raise ConfigError(
            f"incus_exec_timeout = {config.getini('incus_exec_timeout')!r} "
            "is not a number of seconds"
        ) from None
    try:
        max_processes = int(config.getini("incus_max_processes"))
    except ValueError:
        raise ConfigError(
            f"incus_max_processes = {config.getini('incus_max_processes')!r} is not a whole "
            f"number of processes (default {DEFAULT_MAX_PROCESSES})"
        ) from None
    return Settings(
        cache_dir=Path(cache).expanduser().absolute() if cache else default_cache_dir(),
        mirror=option("incus_mirror", "incus_mirror"),
        image_server=option("incus_image_server", "incus_image_server"),
        exec_timeout=timeout,
        max_processes=max_processes,
        default_image=config.getini("incus_default_image"),
        default_kind=config.getini("incus_default_kind"),
        keep=option("incus_keep", "incus_keep"),
        skip_unavailable=bool(option("incus_skip_unavailable", "incus_skip_unavailable")),
        accel=option("incus_accel", "incus_accel"),
        subnet=option("incus_subnet", "incus_subnet") or None,
        default_network=config.getini("incus_default_network"),
        vm_snapshots=_on_off(option("incus_vm_snapshots", "incus_vm_snapshots")),
        backend=option("incus_backend", "incus_backend"),
        remote=option("incus_remote", "incus_remote") or None,
        project=option("incus_project", "incus_project") or DEFAULT_PROJECT,
        target=option("incus_target", "incus_target") or None,
        client_cert=path("incus_client_cert"),
        client_key=path("incus_client_key"),
        insecure_registries=frozenset(
            [
                *config.getini("incus_insecure_registries"),
                *config.getoption("incus_insecure_registry"),
            ]
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, set up the image store and the instance factory, and the
    terminal summary of what they launched and made."""
    config.addinivalue_line("markers", MARKER_HELP)
    # the fixtures, and the collection and report hooks that feed them
    config.pluginmanager.register(fixtures, "incus-fixtures")
    settings = _settings(config)
    config.stash[SETTINGS] = settings
    config.stash[CONFIG_ERRORS] = []
    config.stash[MARKERS] = {}
    tally = Tally()
    config.pluginmanager.register(SummaryPlugin(config, tally), "incus-summary")
    store = ImageStore(
        settings,
        progress=_progress_writer(config),
        build_hook=lambda ref, rootfs: config.hook.pytest_incus_build_image(
            config=config, ref=ref, rootfs=rootfs
        ),
        hook_implemented=lambda: bool(config.hook.pytest_incus_build_image.get_hookimpls()),
        tally=tally,
    )
    config.stash[STORE] = store
    config.stash[FACTORY] = InstanceFactory(
        settings,
        store,
        RuntimeTable.default(RuntimeContext.of(store)),
        on_ready=lambda inst: config.hook.pytest_incus_instance_ready(instance=inst),
        tally=tally,
    )
    run_signals = signals.RunSignals()
    run_signals.install()
    config.stash[SIGNALS] = run_signals


def _progress_writer(config: pytest.Config) -> Any:
    """Show a progress line on the terminal, even with output captured or under xdist."""

    def write(message: str) -> None:
        capman = config.pluginmanager.getplugin("capturemanager")
        reporter = config.pluginmanager.getplugin("terminalreporter")
        with capman.global_and_fixture_disabled() if capman else _nothing():
            line = f"pytest-incus: {message}"
            if reporter is not None and not hasattr(config, "workerinput"):
                reporter.write_line(line)
            else:  # an xdist worker: its stderr is the terminal's
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

    return write


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Reap what killed runs left (only instances whose owning process is gone)."""
    registry.reap(session.config.stash[SETTINGS], runtimes=session.config.stash[FACTORY].runtimes)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Reap, once the run's workers are down, what the dead ones among them left (a worker
    killed by a test, say): a run leaves nothing behind. Instances of live processes (other
    runs, nested pytest runs) are never touched."""
    if not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist
        registry.reap(
            session.config.stash[SETTINGS], runtimes=session.config.stash[FACTORY].runtimes
        )


@pytest.hookimpl(optionalhook=True)
def pytest_testnodeready(node: Any) -> None:
    """An xdist worker is up: the controller passes SIGTERM and SIGHUP on to it."""
    try:  # execnet's remote info, which xdist fetched and cached when it set the node up
        local = node.gateway.spec.popen and not node.gateway.spec.via
        pid = int(node.gateway._rinfo().pid)
    except Exception:  # another gateway kind: its worker gets no forwarded signal
        return
    start = process_start_time(pid)
    if local and start is not None and SIGNALS in node.config.stash:
        node.config.stash[SIGNALS].forward_to(Owner(pid, start))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last resort after an interrupted session: delete what is still ours; then give back
    the signal handlers."""
    run_signals = config.stash.get(SIGNALS, None)
    if run_signals is not None:
        run_signals.hold()  # a signal now would only cut short the teardown it asks for
    try:
        factory = config.stash.get(FACTORY, None)
        if factory is not None:
            factory.close()
    finally:
        if run_signals is not None:
            run_signals.restore()
