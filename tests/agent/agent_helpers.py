"""Where the agent client's tests find an agent: one entry of TARGETS per fixture param.

An entry is a context manager that starts an agent somewhere and yields an ``AgentTarget``
(its socket, a directory inside where tests may write, and whether commands run as root
there). Adding a param (a VM booted with our agent, or with Debian's qemu-ga) is one more
function and one more entry.

On the host an agent runs only as an unprivileged user (uid 65534), with guest-shutdown and
friends blocked (HOST.md): never as root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wire_helpers import RawWire, accepts

import guest_agent
from pytest_incus.agent import AgentClient
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import ImageStore
from pytest_incus.settings import Settings, default_cache_dir
from pytest_incus.values import ExecRequest

__all__ = ["RawWire"]

SCRATCH_ROOT = Path("/var/cache/pytest-incus-tests")
NOBODY = 65534
HOST_PYTHON = "/usr/bin/python3"  # Debian's: uid 65534 cannot reach a python under /root
BLOCKED = "guest-shutdown"
QEMU_GA_ENV = "PTI_TEST_QEMU_GA"  # path of a qemu-ga binary: adds the host qemu-ga param
EXTERNAL_ENV = "PTI_TEST_AGENT_SOCKET"  # socket of an agent started by hand: adds "external"


@dataclass(frozen=True)
class AgentTarget:
    """A running agent as the tests see it."""

    socket_path: Path
    workdir: str  # a directory inside the guest where the tests may create files
    root: bool  # commands run as root inside (user switching and chown work)
    log: Path | None = None  # the agent's own output, for failure reports
    shutdown_blocked: bool = True  # started with --block-rpcs guest-shutdown
    extensions: bool = True  # False: the client uses only what a stock qemu-ga offers
    exec_bound: float = 0.5  # seconds: a trivial exec slower than this is a failure


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``condition`` to hold, polling, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory outside /tmp, owned by uid 65534 and closed to others."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    SCRATCH_ROOT.chmod(0o755)
    path = SCRATCH_ROOT / f"{prefix}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_agent(directory: Path) -> Path:
    """A copy of the guest_agent package that uid 65534 can read (as the VM image installs
    it); the PYTHONPATH to use."""
    lib = directory / "lib"
    shutil.copytree(
        Path(guest_agent.__file__).parent,
        lib / "guest_agent",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return lib


@contextlib.contextmanager
def run_as_nobody(argv: list[str], directory: Path, env: dict[str, str]) -> Iterator[Path]:
    """Run ``argv`` as uid 65534 in ``directory``; yields its log; kills it (by pid) after."""
    log = directory / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd=directory,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        yield log
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def ours_unprivileged_host() -> Iterator[AgentTarget]:
    """Our agent, run on the host as uid 65534 on a unix socket, guest-shutdown blocked."""
    with private_dir("agent") as directory:
        lib = copy_agent(directory)
        sock = directory / "qga.sock"
        work = directory / "work"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        argv = [HOST_PYTHON, "-m", "guest_agent", "--unix-listen", str(sock)]
        argv += ["--block-rpcs", BLOCKED]
        with run_as_nobody(argv, directory, {"PYTHONPATH": str(lib)}) as log:
            wait_until(lambda: accepts(sock), 10, f"the agent's socket {sock} to listen")
            yield AgentTarget(sock, str(work), root=False, log=log)


@contextlib.contextmanager
def qemu_ga_unprivileged_host() -> Iterator[AgentTarget]:
    """Debian's qemu-ga (the binary named by $PTI_TEST_QEMU_GA), run on the host as uid
    65534 on a unix socket, guest-shutdown blocked: the client's stock-agent path, fast."""
    binary = os.environ[QEMU_GA_ENV]
    with private_dir("qemu-ga") as directory:
        sock = directory / "qga.sock"
        work = directory / "work"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        argv = [binary, "-m", "unix-listen", "-p", str(sock), "-t", str(directory)]
        argv += ["-f", str(directory / "qga.pid"), "-b", BLOCKED]
        with run_as_nobody(argv, directory, {}) as log:
            wait_until(lambda: accepts(sock), 10, f"qemu-ga's socket {sock} to listen")
            yield AgentTarget(sock, str(work), root=False, log=log)


@contextlib.contextmanager
def _vm(what: str, **options: str) -> Iterator[AgentTarget]:
    """A debian/12 VM launched through the plugin, its agent's socket handed to the tests:
    the VM's own client lets go of the connection (it takes it back at its next request)."""
    settings = Settings(cache_dir=default_cache_dir())
    factory = InstanceFactory(settings, ImageStore(settings))
    try:
        instance = factory.launch(kind="vm", image="debian/12", **options)
        instance.machine.agent.close()
        yield AgentTarget(
            instance.machine.directory / "qga.sock",
            "/root/pti-agent-tests",
            root=True,
            shutdown_blocked=False,
            extensions=what == "ours",
            exec_bound=3.0,
        )
    finally:
        factory.close()


def vm_ours() -> contextlib.AbstractContextManager[AgentTarget]:
    """Our agent in a VM, as its first process (init="agent")."""
    return _vm("ours", init="agent")


def vm_qemu_ga() -> contextlib.AbstractContextManager[AgentTarget]:
    """Debian's stock qemu-ga in a systemd VM, chosen on the kernel command line."""
    return _vm("qemu-ga", kernel_args="pytest_incus.agent=qemu-ga")


TARGETS: dict[str, Callable[[], contextlib.AbstractContextManager[AgentTarget]]] = {
    "ours-unprivileged-host": ours_unprivileged_host,
    "vm-ours": vm_ours,
    "vm-qemu-ga": vm_qemu_ga,
}
if os.environ.get(QEMU_GA_ENV):
    TARGETS["qemu-ga-unprivileged-host"] = qemu_ga_unprivileged_host


def run(client: AgentClient, argv: list[str], **kwargs: object) -> tuple[int, str, str]:
    """exec through ``client``: (exit code, stdout, stderr)."""
    fields: dict[str, object] = {
        "env": {},
        "cwd": None,
        "user": None,
        "input": None,
        "timeout": 60.0,
    }
    fields.update(kwargs)
    result = client.exec(ExecRequest(argv=tuple(argv), **fields))  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


@contextlib.contextmanager
def external() -> Iterator[AgentTarget]:
    """An agent someone else started (a VM booted by hand): $PTI_TEST_AGENT_SOCKET, commands
    as root, tests writing under /root/pti-agent-tests. For trying a guest image quickly."""
    socket_path = Path(os.environ[EXTERNAL_ENV])
    yield AgentTarget(
        socket_path, "/root/pti-agent-tests", root=True, shutdown_blocked=False, exec_bound=3.0
    )


@contextlib.contextmanager
def external_stock() -> Iterator[AgentTarget]:
    """The agent of $PTI_TEST_AGENT_SOCKET, used as a stock qemu-ga (no pti-* extensions)."""
    with external() as target:
        yield dataclasses.replace(target, extensions=False)


if os.environ.get(EXTERNAL_ENV):
    TARGETS["external"] = external
    TARGETS["external-stock"] = external_stock
