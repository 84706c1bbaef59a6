"""One mistake, one error: a table of mistakes run on every kind, the classes compared.

The kinds: a busybox system container, an app from an OCI image (a busybox system, so that it
has the same tools), a debian/12 VM with our agent (init="agent") and one with Debian's stock
qemu-ga (the client's fallback path). Each row says what the mistake must raise (exactly that
class, on every kind) and what its message must name.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_helpers import SCRATCH_ROOT, image_of_rootfs

from pytest_incus import (
    ConfigError,
    ExecError,
    ExecTimeoutError,
    Instance,
    InstanceFactory,
    NotRunningError,
    UnknownUserError,
    WaitTimeoutError,
    fsutil,
)
from pytest_incus.images import busybox
from pytest_incus.images.store import ImageStore
from pytest_incus.values import ExecResult

KINDS = ("container", "app", "vm", "vm-qemu-ga")
NOT_APPS = ("container", "vm", "vm-qemu-ga")


@pytest.fixture(scope="module")
def app_image(image_store: ImageStore) -> Iterator[str]:
    """An OCI image of a busybox system (every applet, /etc/passwd with nobody) whose program
    sleeps; its cache entries are pruned afterwards."""
    work = SCRATCH_ROOT / f"mistakes-{secrets.token_hex(4)}"
    (work / "rootfs").mkdir(parents=True)
    try:
        busybox.build(work / "rootfs")
        image_of_rootfs(
            work / "layout", "sys", work / "rootfs", ["--config.cmd=sleep", "--config.cmd=3600"]
        )
        ref = f"oci:{work / 'layout'}:sys"
        try:
            yield ref
        finally:
            image_store.prune(ref)
    finally:
        fsutil.remove_tree(work)


def _runs_here(factory: InstanceFactory, kind: str) -> bool:
    """Whether this run's backend can run ``kind`` (the Incus of the test machine runs no VMs:
    the comparison is then over the kinds it runs)."""
    return factory.runtime(kind.split("-", 1)[0]).unavailable() is None


def _launch(factory: InstanceFactory, kind: str, app_image: str) -> Instance:
    if kind == "container":
        return factory.launch(kind="container", image="busybox")
    if kind == "app":
        return factory.launch(kind="app", image=app_image)
    if kind == "vm":
        return factory.launch(kind="vm", image="debian/12", init="agent")
    return factory.launch(kind="vm", image="debian/12", kernel_args="pytest_incus.agent=qemu-ga")


@pytest.fixture(scope="module")
def instances(instance_factory: InstanceFactory, app_image: str) -> Iterator[dict[str, Instance]]:
    """One running instance of every kind, shared by the module."""
    launched = {}
    try:
        for kind in KINDS:
            if _runs_here(instance_factory, kind):
                launched[kind] = _launch(instance_factory, kind, app_image)
        assert "container" in launched and "app" in launched
        yield launched
    finally:
        for inst in launched.values():
            inst.delete()


@dataclass(frozen=True)
class Mistake:
    """One mistake: what it does, what it must raise (or "exit N"), what the error names."""

    name: str
    do: Callable[[Instance, Path], object]
    expect: type[BaseException] | str  # a class, "exit N" or "= VALUE" it returns
    says: tuple[str, ...] = ()
    filename: str | None = None  # an OSError's path
    kinds: tuple[str, ...] = KINDS


def _push_under_a_file(inst: Instance, tmp_path: Path) -> None:
    (tmp_path / "pushed").write_text("x")
    inst.push(tmp_path / "pushed", "/etc/passwd/pushed")


MISTAKES = [
    Mistake(
        "exec in a missing cwd",
        lambda i, _: i.exec("pwd", cwd="/pti/no/such/dir"),
        FileNotFoundError,
        says=("cwd",),
        filename="/pti/no/such/dir",
    ),
    Mistake(
        "exec in a cwd that is a file",
        lambda i, _: i.exec("pwd", cwd="/etc/passwd"),
        NotADirectoryError,
        says=("cwd",),
        filename="/etc/passwd",
    ),
    Mistake(
        "exec as an unknown user",
        lambda i, _: i.exec("true", user="pti-no-such-user"),
        UnknownUserError,
        says=("'pti-no-such-user'", "/etc/passwd"),
    ),
    Mistake("exec of a missing program", lambda i, _: i.exec(["pti-no-such-program"]), "exit 127"),
    Mistake(
        "exec past its timeout",
        lambda i, _: i.exec(["sleep", "30"], timeout=1),
        ExecTimeoutError,
        says=("timeout",),
    ),
    Mistake(
        "exec with check=True that fails", lambda i, _: i.exec("exit 3", check=True), ExecError
    ),
    Mistake(
        "exec with a negative timeout",
        lambda i, _: i.exec("true", timeout=-1),
        ConfigError,
        says=("timeout=-1", "0 for no limit"),
    ),
    Mistake(
        "exec of a cmd of the wrong type",
        lambda i, _: i.exec(42),  # type: ignore[arg-type]
        ConfigError,
        says=("cmd",),
    ),
    Mistake(
        "exec of an argv with a non-str",
        lambda i, _: i.exec(["echo", 1]),  # type: ignore[list-item]
        ConfigError,
        says=("cmd",),
    ),
    Mistake("exec of an empty argv", lambda i, _: i.exec([]), ConfigError, says=("cmd",)),
    Mistake(
        "exec with env values that are not str",
        lambda i, _: i.exec("true", env={"A": 1}),  # type: ignore[dict-item]
        ConfigError,
        says=("env",),
    ),
    Mistake(
        "read_file of a missing path",
        lambda i, _: i.read_file("/pti/missing"),
        FileNotFoundError,
        filename="/pti/missing",
    ),
    Mistake(
        "read_file of a directory",
        lambda i, _: i.read_file("/etc"),
        IsADirectoryError,
        filename="/etc",
    ),
    Mistake(
        "write_file under a file",
        lambda i, _: i.write_file("/etc/passwd/sub/file", "x"),
        NotADirectoryError,
        filename="/etc/passwd",
    ),
    Mistake("push under a file", _push_under_a_file, NotADirectoryError, filename="/etc/passwd"),
    Mistake(
        "pull of a missing path",
        lambda i, tmp: i.pull("/pti/missing", tmp / "pulled"),
        FileNotFoundError,
        filename="/pti/missing",
    ),
    Mistake(
        "file(missing).mode",
        lambda i, _: i.file("/pti/missing").mode,
        FileNotFoundError,
        filename="/pti/missing",
    ),
    Mistake(
        "file() of a path under a file", lambda i, _: i.file("/etc/passwd/x").exists, "= False"
    ),
    Mistake(
        "wait() of an instance that is not an app",
        lambda i, _: i.wait(1),
        ConfigError,
        says=("kind='app'",),
        kinds=NOT_APPS,
    ),
    Mistake(
        "wait() of an app past its timeout",
        lambda i, _: i.wait(timeout=0.2),
        WaitTimeoutError,
        says=("0.2",),
        kinds=("app",),
    ),
]


def outcome(mistake: Mistake, inst: Instance, tmp_path: Path) -> tuple[object, str]:
    """What ``mistake`` did on ``inst``: the class it raised (or "exit N", or "= VALUE" of what it returned), and
    what is wrong with the error beyond its class (empty when nothing)."""
    try:
        result = mistake.do(inst, tmp_path)
    except Exception as exc:
        problems = [f"says no {word!r}" for word in mistake.says if word not in str(exc)]
        if mistake.filename is not None and getattr(exc, "filename", None) != mistake.filename:
            problems.append(f"filename {getattr(exc, 'filename', None)!r}")
        return type(exc), "; ".join(problems) + (f" ({exc})" if problems else "")
    if isinstance(result, ExecResult):
        return f"exit {result.exit_code}", ""
    return f"= {result!r}", ""


def _name(value: object) -> str:
    return value.__name__ if isinstance(value, type) else str(value)


def test_the_same_mistake_raises_the_same_class_on_every_kind(
    instances: dict[str, Instance], tmp_path: Path
) -> None:
    wrong = []
    for mistake in MISTAKES:
        seen = {
            kind: outcome(mistake, instances[kind], tmp_path)
            for kind in mistake.kinds
            if kind in instances
        }
        for kind, (got, problem) in seen.items():
            if got != mistake.expect or problem:
                wrong.append(
                    f"{mistake.name} on {kind}: {_name(got)}, expected {_name(mistake.expect)}"
                    + (f"; {problem}" if problem else "")
                )
    assert not wrong, "\n".join(wrong)


@pytest.fixture
def fresh(instance_factory: InstanceFactory, app_image: str) -> Iterator[dict[str, Instance]]:
    """A fresh instance of each kind (the stock-agent VM left out: the life-cycle checks are
    the same for both agents), for tests that stop and delete them."""
    launched = {}
    try:
        for kind in ("container", "app", "vm"):
            if _runs_here(instance_factory, kind):
                launched[kind] = _launch(instance_factory, kind, app_image)
        yield launched
    finally:
        for inst in launched.values():
            inst.delete()


def _uses(tmp_path: Path) -> dict[str, Callable[[Instance], object]]:
    (tmp_path / "local").write_text("x")
    return {
        "exec": lambda i: i.exec("true"),
        "read_file": lambda i: i.read_file("/etc/passwd"),
        "write_file": lambda i: i.write_file("/root/x", "x"),
        "file": lambda i: i.file("/etc/passwd"),
        "push": lambda i: i.push(tmp_path / "local", "/root/local"),
        "pull": lambda i: i.pull("/etc/passwd", tmp_path / "passwd"),
    }


def _raised(use: Callable[[Instance], object], inst: Instance) -> BaseException | None:
    try:
        use(inst)
    except Exception as exc:
        return exc
    return None


def test_using_a_stopped_or_deleted_instance_says_so(
    fresh: dict[str, Instance], tmp_path: Path
) -> None:
    uses = _uses(tmp_path)
    wrong = []
    for when, words in (("stopped", ("stopped", "start()")), ("deleted", ("deleted",))):
        for kind, inst in fresh.items():
            inst.stop() if when == "stopped" else inst.delete()
            for use_name, use in uses.items():
                exc = _raised(use, inst)
                if type(exc) is not NotRunningError or not all(w in str(exc) for w in words):
                    wrong.append(f"{use_name} on a {when} {kind}: {type(exc).__name__}: {exc}")
    for kind, inst in fresh.items():
        exc = _raised(lambda i: i.start(), inst)
        if type(exc) is not NotRunningError or "deleted" not in str(exc):
            wrong.append(f"start() of a deleted {kind}: {type(exc).__name__}: {exc}")
    assert not wrong, "\n".join(wrong)


def test_an_app_whose_program_ended_says_it_stopped(
    instance_factory: InstanceFactory, app_image: str
) -> None:
    app = instance_factory.launch(kind="app", image=app_image, command=["true"])
    assert app.wait(timeout=30) == 0
    with pytest.raises(NotRunningError, match=r"stopped.*start\(\)"):
        app.exec("true")
    app.delete()


def test_a_container_at_the_memory_floor_boots_and_runs(instance_factory: InstanceFactory) -> None:
    from pytest_incus.runtimes.container import MIN_MEMORY

    inst = instance_factory.launch(image="debian/12", memory=MIN_MEMORY)
    assert inst.exec(["python3", "-c", "print(6 * 7)"]).stdout == "42\n"
    inst.delete()


@pytest.mark.parametrize("kind", ["container", "app"])
def test_too_little_memory_is_a_config_error_naming_the_floor(
    instance_factory: InstanceFactory, app_image: str, kind: str
) -> None:
    from pytest_incus.runtimes.container import MIN_MEMORY

    image = app_image if kind == "app" else "busybox"
    with pytest.raises(
        ConfigError, match=f"memory=1048576 bytes .* at least {MIN_MEMORY >> 20}MiB"
    ):
        instance_factory.launch(kind=kind, image=image, memory="1MiB")
