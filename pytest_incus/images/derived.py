"""Derived images: a base image with packages installed by its own package manager, then
commands run, then files written (SPEC: Derived images).

This module knows what to do, not how to run it: :func:`build` detects the package manager in
the base rootfs, plans the build as a list of shell steps (:class:`Step`) and hands them to a
:class:`Builder`, the seam to a runtime (``runtimes/build.py`` runs them in a privileged
container on the host's network). The builder leaves base + changes as a plain tree in the
staging rootfs; the recipe's files are then written into that tree from the host.

No import of ``pytest_incus.runtimes`` here: the store imports this module, and the runtimes
import the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pytest_incus import fsutil
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.rootfs import inside
from pytest_incus.images.source import NOT_APP, Built, Context, Version, base_of
from pytest_incus.settings import DEFAULT_MIRROR
from pytest_incus.spec import package_names, strings

if TYPE_CHECKING:
    from pytest_incus.images.store import Image  # the store imports this module

Progress = Callable[[str], None]

# Bump when the build steps change (the commands, what is cleaned): entries built by another
# version of them are rebuilt (the store's ``recipe=``). Not part of ``Recipe.digest()``,
# which is the user's recipe only.
BUILD_RECIPE = "1"
STEP_TIMEOUT = 1800.0  # seconds for one step (an install of many packages on a slow mirror)
FILE_MODE = 0o644
# The environment of every step. LC_ALL=C: the package manager's messages in English, as the
# errors quote them ("Unable to locate package").
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "HOME": "/root",
}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "ftp_proxy", "all_proxy")
# A build-only directory inside the build container (scratch of the steps), removed by the
# last step. /run: the one place every distro keeps for runtime state, never shipped data.
SCRATCH = "/run/pytest-incus-build"
BUILD_WORK = "rootfs.build"  # the builder's work directory, beside the staging rootfs
POLICY_RC_D = "/usr/sbin/policy-rc.d"
POLICY_RC_D_SAVED = POLICY_RC_D + ".pytest-incus-saved"


# -- the recipe ------------------------------------------------------------------------------


def _file_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(
            f"files=: the instance path {path!r} must be an absolute path (a str starting "
            "with '/'), like files={'/etc/app.conf': '...'}"
        )
    normal = posixpath.normpath(path)
    if normal.startswith("//"):  # normpath keeps a leading '//'
        normal = "/" + normal.lstrip("/")
    if normal == "/":
        raise ConfigError(f"files=: {path!r} names the root directory, not a file")
    return normal


def _file_data(path: str, data: object) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raise ConfigError(
        f"files=: the content of {path!r} is of type {type(data).__name__}; give bytes or a str"
    )


@dataclass(frozen=True)
class Recipe:
    """What a derived image adds to its base: ``packages`` (sorted, each once: the set is
    what counts), ``run`` (shell commands, in order) and ``files`` ((instance path, content),
    sorted by path). Make one with :meth:`make`, which checks what users give."""

    packages: tuple[str, ...] = ()
    run: tuple[str, ...] = ()
    files: tuple[tuple[str, bytes], ...] = field(default=())

    @classmethod
    def make(
        cls,
        packages: Iterable[str] = (),
        run: Iterable[str] = (),
        files: Mapping[str, bytes | str] | None = None,
    ) -> Recipe:
        """The recipe of the ``packages``, ``run`` and ``files`` options; ConfigError for a
        wrong type, a package name that is none (spaces, a leading '-'), a relative path or
        two spellings of one path in ``files``."""
        names = package_names(packages)
        commands = strings(run, "run", "shell commands")
        for command in commands:
            if not command.strip():
                raise ConfigError("run=: an empty command; give shell commands, each a str")
        if files is None:
            files = {}
        if not isinstance(files, Mapping):
            raise ConfigError(
                f"files={files!r}: give a dict of instance path to content (bytes or str)"
            )
        written: dict[str, bytes] = {}
        for path, data in files.items():
            normal = _file_path(path)
            if normal in written:
                raise ConfigError(f"files=: {path!r} names {normal!r} again; give it once")
            written[normal] = _file_data(path, data)
        return cls(names, commands, tuple(sorted(written.items())))

    def __bool__(self) -> bool:
        return bool(self.packages or self.run or self.files)

    def describe(self) -> str:
        """One line for progress: ``packages nginx, curl; 2 commands; 1 file``."""
        parts = [f"packages {', '.join(self.packages)}"] if self.packages else []
        for items, what in ((self.run, "command"), (self.files, "file")):
            if items:
                parts.append(f"{len(items)} {what}{'s' if len(items) > 1 else ''}")
        return "; ".join(parts) or "nothing"

    def to_json(self) -> dict[str, Any]:
        """The recipe as JSON values (file contents in base64), for records and keys."""
        return {
            "packages": list(self.packages),
            "run": list(self.run),
            "files": {path: base64.b64encode(data).decode() for path, data in self.files},
        }

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        """The recipe :meth:`to_json` gave; ConfigError if ``data`` is not one."""
        try:
            files = {p: base64.b64decode(d, validate=True) for p, d in data["files"].items()}
            return cls.make(data["packages"], data["run"], files)
        except (KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise ConfigError(f"not a derived image recipe: {data!r:.200}") from exc

    def digest(self) -> str:
        """The hex sha256 of the recipe's canonical JSON: the same recipe, the same digest,
        in every process and version (it keys the derived image's cache entry)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# -- package managers ------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageManager:
    """One distribution's package manager: the shell commands that install packages (its
    index refreshed first) and that clean its caches and indexes afterwards, so that the
    derived image carries the packages, not the downloads."""

    name: str
    program: str  # what detection looks for in the rootfs
    update: str  # refresh the package index ("" if the install does it)
    install: str  # followed by the package names, quoted
    clean: str
    env: Mapping[str, str] = field(default_factory=dict)

    def install_command(self, packages: Sequence[str]) -> str:
        """The shell command that installs ``packages``."""
        return " ".join([self.install, *map(shlex.quote, packages)])


APT = PackageManager(
    name="apt",
    program="/usr/bin/apt-get",
    update="apt-get update",
    install="apt-get install -y --no-install-recommends",
    clean="apt-get clean && rm -rf /var/lib/apt/lists/*",
    # no debconf questions; and no service started (policy-rc.d does that part)
    env={"DEBIAN_FRONTEND": "noninteractive"},
)
DNF = PackageManager(
    name="dnf",
    program="/usr/bin/dnf",
    update="dnf makecache -y",
    install="dnf install -y --setopt=install_weak_deps=False",
    clean="dnf clean all",
)
APK = PackageManager(
    name="apk",
    program="/sbin/apk",
    update="apk update",
    install="apk add",
    clean="rm -rf /var/cache/apk/*",
)
PACMAN = PackageManager(
    name="pacman",
    program="/usr/bin/pacman",
    update="",
    # Arch supports no partial upgrade: refresh, upgrade and install in one transaction
    install="pacman -Syu --noconfirm --needed",
    clean="pacman -Scc --noconfirm && rm -rf /var/lib/pacman/sync/*",
)
ZYPPER = PackageManager(
    name="zypper",
    program="/usr/bin/zypper",
    update="zypper --non-interactive refresh",
    install="zypper --non-interactive install --no-recommends",
    clean="zypper --non-interactive clean --all",
)
MANAGERS = (APT, DNF, APK, PACMAN, ZYPPER)


def _executable(rootfs: Path, path: str) -> bool:
    found = inside(rootfs, path)
    return found is not None and found.is_file() and bool(found.stat().st_mode & 0o111)


def find(rootfs: Path) -> PackageManager | None:
    """The package manager of the image in ``rootfs``, found by its program in the image's
    own tree (paths resolved inside it, never on the host's ``/``), or None."""
    for manager in MANAGERS:
        # /usr/bin and /bin (or /sbin and /usr/sbin) are one directory in merged-/usr
        # images and two in others: look in both
        directory, name = posixpath.split(manager.program)
        other = (
            directory.removeprefix("/usr") if directory.startswith("/usr") else "/usr" + directory
        )
        if _executable(rootfs, manager.program) or _executable(rootfs, f"{other}/{name}"):
            return manager
    return None


def detect(rootfs: Path) -> PackageManager:
    """The package manager of the image in ``rootfs`` (see :func:`find`); ImageError if it
    has none of those pytest-incus knows."""
    if (manager := find(rootfs)) is not None:
        return manager
    known = ", ".join(f"{m.name} ({m.program})" for m in MANAGERS)
    raise ImageError(
        f"the image in {rootfs} has no package manager that pytest-incus knows (looked for "
        f"{known}), so packages= cannot be installed in it; install them with run=[...] "
        "commands, or derive from an image of a distribution with one of those"
    )


# -- planning the build ----------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a build: ``command`` run by ``/bin/sh -c`` as root in the build
    instance, with ``env`` (the whole environment), within ``timeout`` seconds. ``what``
    names it in progress lines and errors."""

    what: str
    command: str
    env: Mapping[str, str]
    timeout: float = STEP_TIMEOUT


def proxy_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The proxy settings of ``environ`` (http_proxy, https_proxy, no_proxy, ..., in either
    case), both spellings set, as package managers read one or the other."""
    found: dict[str, str] = {}
    for name in PROXY_VARIABLES:
        value = environ.get(name) or environ.get(name.upper())
        if value:
            found[name] = found[name.upper()] = value
    return found


# policy-rc.d exit status 101: "action forbidden" (invoke-rc.d, deb-systemd-invoke): the build
# installs services without starting them, as Docker builds of Debian do; the file is removed
# (the image's own put back, if it had one) by the last step
_POLICY_RC_D = (
    "#!/bin/sh\n# pytest-incus image build: no service starts during the build\nexit 101\n"
)


def _forbid_services() -> str:
    # only where /usr/sbin exists (every distribution with invoke-rc.d has it): a minimal
    # image without it gets no directory it did not have
    return (
        f"if [ -d /usr/sbin ]; then "
        f"if [ -e {POLICY_RC_D} ] || [ -L {POLICY_RC_D} ]; then "
        f"mv {POLICY_RC_D} {POLICY_RC_D_SAVED}; fi && "
        f"printf %s {shlex.quote(_POLICY_RC_D)} > {POLICY_RC_D} && chmod 0755 {POLICY_RC_D}; fi"
    )


def _allow_services() -> str:
    return (
        f"rm -f {POLICY_RC_D} && if [ -e {POLICY_RC_D_SAVED} ] || [ -L {POLICY_RC_D_SAVED} ]; "
        f"then mv {POLICY_RC_D_SAVED} {POLICY_RC_D}; fi"
    )


def apt_sources(rootfs: Path) -> list[str]:
    """The apt source files of the image in ``rootfs`` (as the instance sees their paths):
    ``/etc/apt/sources.list`` and ``sources.list.d/*.list`` and ``*.sources``."""
    found = []
    if (main := inside(rootfs, "/etc/apt/sources.list")) is not None and main.is_file():
        found.append("/etc/apt/sources.list")
    parts = inside(rootfs, "/etc/apt/sources.list.d")
    if parts is not None and parts.is_dir():
        for entry in sorted(parts.iterdir()):
            if entry.name.endswith((".list", ".sources")) and entry.is_file():
                found.append(f"/etc/apt/sources.list.d/{entry.name}")
    return found


def _names_mirror(rootfs: Path, path: str, mirror: str) -> bool:
    found = inside(rootfs, path)
    try:
        return found is not None and mirror in found.read_text(errors="replace")
    except OSError:
        return False


def apt_mirror_options(rootfs: Path, mirror: str) -> str:
    """apt-get options that make apt read the image's sources with the default Debian
    mirror replaced by ``mirror``, from copies in the build's scratch directory (the step
    that :func:`apt_mirror_setup` gives makes them); "" if nothing is to be replaced.

    Decision: the configured mirror (``--incus-mirror``) is used for the build only, and
    the image keeps its own sources. The mirror is a property of this host's network, like
    a proxy, not of the image: a derived image is keyed by (base image, recipe), so it must
    come out the same whichever mirror built it, and another host (or a later run with
    another mirror) that shares the cache gets the sources the base image had. A base image
    built by debootstrap from the configured mirror already names it, and is left alone.
    """
    if mirror.rstrip("/") == DEFAULT_MIRROR or not any(
        _names_mirror(rootfs, path, DEFAULT_MIRROR) for path in apt_sources(rootfs)
    ):
        return ""
    return (
        f"-o Dir::Etc::SourceList={SCRATCH}/apt/sources.list "
        f"-o Dir::Etc::SourceParts={SCRATCH}/apt/sources.list.d"
    )


def apt_mirror_setup(rootfs: Path, mirror: str) -> str:
    """The shell command that writes the copies of the image's apt sources with the default
    mirror replaced by ``mirror`` into the build's scratch directory (see
    :func:`apt_mirror_options`)."""
    target = mirror.rstrip("/")
    if "\n" in target:
        raise ConfigError(f"--incus-mirror={mirror!r}: a mirror URL has no newline")
    lines = [f"mkdir -p {SCRATCH}/apt/sources.list.d", f": > {SCRATCH}/apt/sources.list"]
    # the mirror's URL as a whole word: not the prefix of .../debian-security
    pattern = re.escape(DEFAULT_MIRROR).replace("/", "\\/")
    replacement = re.sub(r"([\\&/])", r"\\\1", target)
    expression = shlex.quote(f"s/{pattern}(\\/|[[:space:]]|$)/{replacement}\\1/g")
    for path in apt_sources(rootfs):
        copy = f"{SCRATCH}/apt/{path.removeprefix('/etc/apt/')}"
        lines.append(f"sed -E -e {expression} {shlex.quote(path)} > {shlex.quote(copy)}")
    return " && ".join(lines)


def plan(
    manager: PackageManager | None,
    recipe: Recipe,
    base_rootfs: Path,
    *,
    mirror: str,
    environ: Mapping[str, str],
) -> list[Step]:
    """The steps that build ``recipe`` on the image in ``base_rootfs`` with ``manager`` (None
    only for a recipe without packages):
    services forbidden, the index refreshed, the packages installed, the caches cleaned,
    the ``run`` commands, and the build's traces removed. ``environ`` gives the proxy
    settings (the host's environment); ``mirror`` the Debian mirror for apt."""
    env = {**BASE_ENV, **(manager.env if manager else {}), **proxy_env(environ)}
    steps = [Step("forbidding service starts", f"mkdir -p {SCRATCH} && {_forbid_services()}", env)]
    if recipe.packages:
        if manager is None:
            raise ImageError(f"packages={list(recipe.packages)!r} but no package manager")
        update, install = manager.update, manager.install_command(recipe.packages)
        if manager is APT and (options := apt_mirror_options(base_rootfs, mirror)):
            steps.append(
                Step(f"using the mirror {mirror}", apt_mirror_setup(base_rootfs, mirror), env)
            )
            update = f"apt-get {options} update"
            install = install.replace("apt-get ", f"apt-get {options} ", 1)
        if update:
            steps.append(Step(f"{manager.name}: refreshing the package index", update, env))
        names = " ".join(recipe.packages)
        steps.append(Step(f"{manager.name}: installing {names}", install, env))
        steps.append(Step(f"{manager.name}: cleaning its caches", manager.clean, env))
    for number, command in enumerate(recipe.run, 1):
        steps.append(Step(f"run[{number - 1}]: {command}", command, env))
    steps.append(
        Step("removing the build's traces", f"{_allow_services()} && rm -rf {SCRATCH}", env)
    )
    return steps


# -- the seam to a runtime -------------------------------------------------------------------


class Builder(Protocol):
    """Runs build steps in a build instance of a base image, and leaves the result as a
    plain tree. ``runtimes/build.py`` has the one over liblxc."""

    def build(
        self,
        base: Image,
        steps: Sequence[Step],
        rootfs: Path,
        *,
        work: Path,
        progress: Progress,
    ) -> None:
        """Run ``steps`` in order, each to its end within its timeout, in a build instance
        whose root is the cached image ``base`` (never written: the changes go to a layer
        under ``work``), and that reaches the host's network; then leave the merged result,
        base and changes, as a plain directory tree in the existing empty directory
        ``rootfs``. ``work`` is a directory for the builder (it makes it, it must not exist
        yet), removed before this returns. Shows one progress line per step.

        ImageError for a step that fails (its command, exit code and the tail of its
        output), runs past its timeout, or a build instance that cannot start. On any error
        or interrupt nothing of the build instance is left: no instance, process or mount,
        and ``work`` removed."""
        ...

    def reap(self, work: Path) -> None:
        """Remove everything a build left in ``work`` (of a builder that was killed)."""
        ...


# -- the build -------------------------------------------------------------------------------


def _where(rootfs: Path, path: Path) -> str:
    """``path`` (below ``rootfs``) as the instance sees it."""
    return "/" + str(path.relative_to(rootfs)) if path != rootfs else "/"


def write_file(rootfs: Path, path: str, data: bytes) -> None:
    """Write ``data`` at instance path ``path`` (absolute, normalized) of the tree ``rootfs``,
    mode 0644, owned by root, parents made (0755). Every step is resolved inside the tree: a
    symlink of the image leads within it, never to the host's files, as a write inside the
    instance would go. ImageError for a parent that is no directory, or a dangling link."""
    parent, name = posixpath.split(path)
    current = rootfs
    for part in [p for p in parent.split("/") if p]:
        step = current / part
        if step.is_symlink():
            followed = inside(rootfs, _where(rootfs, step))
            if followed is None:
                raise ImageError(
                    f"files=: cannot write {path}: {_where(rootfs, step)} is a symlink in the "
                    "image that leads nowhere; write the file where it should lead"
                )
            step = followed
        elif not step.exists():
            step.mkdir()
            os.chmod(step, 0o755)
        if not step.is_dir():
            raise ImageError(
                f"files=: cannot write {path}: {_where(rootfs, step)} is not a directory in "
                "the image"
            )
        current = step
    target = current / name
    if target.is_symlink():
        followed = inside(rootfs, _where(rootfs, target))
        if followed is None:
            raise ImageError(
                f"files=: cannot write {path}: it is a symlink in the image that leads "
                "nowhere; write the file where it should lead"
            )
        target = followed
    if target.is_dir():
        raise ImageError(f"files=: cannot write {path}: it is a directory in the image")
    # O_NOFOLLOW: the target was resolved above; nothing may swap a link in
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def build(
    base: Image,
    rootfs: Path,
    recipe: Recipe,
    *,
    mirror: str,
    progress: Progress,
    builder: Builder,
) -> None:
    """Build the derived image of ``recipe`` on the cached image ``base`` into the empty
    staging directory ``rootfs``: its package manager detected, the steps planned and run by
    ``builder`` (work directory ``<rootfs>.build``, beside it in the staging area, removed
    before this returns), then the recipe's files written into the result. ``mirror`` is the
    configured Debian mirror (used by apt during the build only: see
    :func:`apt_mirror_options`); proxies come from this process's environment.

    ImageError for an image without a known package manager (when packages are asked for), a
    package that does not exist or a command that fails (with the output), or a file that
    cannot be written. On error ``rootfs`` may hold a partial tree: the caller's staging
    directory goes as a whole."""
    # an image without a package manager can still be derived with run= and files= (and
    # with one, run= commands get its environment: apt's DEBIAN_FRONTEND)
    manager = detect(base.rootfs) if recipe.packages else find(base.rootfs)
    steps = plan(manager, recipe, base.rootfs, mirror=mirror, environ=os.environ)
    builder.build(base, steps, rootfs, work=rootfs.with_name(BUILD_WORK), progress=progress)
    for path, data in recipe.files:
        progress(f"derived image: writing {path}")
        try:
            write_file(rootfs, path, data)
        except OSError as exc:
            raise ImageError(f"files=: cannot write {path} into the image: {exc}", exc=exc) from exc


# -- the source ----------------------------------------------------------------------------

PREFIX = "derived:"
_NAME = re.compile(r"derived:([0-9a-f]{16}):(.+)")
RECIPES = "recipes"  # below the cache directory: <digest>.json, the recipe a name's digest means


def recipe_path(cache_dir: Path, digest: str) -> Path:
    """Where the recipe of a derived image name is kept (written by ``ImageStore.derive``)."""
    return cache_dir / RECIPES / f"{digest}.json"


def name(base: str, recipe: Recipe) -> str:
    """The image name of ``recipe`` on the image named ``base``: ``derived:<digest>:<base>``."""
    return f"{PREFIX}{recipe.digest()[:16]}:{base}"


def save_recipe(cache_dir: Path, recipe: Recipe) -> None:
    """Keep ``recipe`` where a later run (another worker) finds it by its name's digest."""
    path = recipe_path(cache_dir, recipe.digest()[:16])
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.write_atomic(path, json.dumps(recipe.to_json()))


class DerivedSource:
    """``derived:<digest>:<base>``, the names ``ImageStore.derive`` gives: ``base`` with the
    recipe of ``digest`` applied. An entry is keyed by the base entry's content (its
    fingerprint, digest or build) and the recipe, so a rebuilt or updated base gets a new
    derived entry, built once from it."""

    name = "derived"

    def parse(self, image: str) -> ImageRef | None:
        """A ``derived:`` name; its base is checked when it is resolved."""
        if not image.startswith(PREFIX):
            return None
        match = _NAME.fullmatch(image)
        if match is None:
            raise ConfigError(
                f"image {image!r}: a derived image's name is derived:<16 hex digits>:<base "
                "image>, as image_store.derive() returns it in Image.ref"
            )
        key = "derived-" + hashlib.sha256(image.encode()).hexdigest()[:16]
        return ImageRef(image, self.name, key)

    def _parts(self, ref: ImageRef, context: Context) -> tuple[ImageRef, Recipe]:
        match = _NAME.fullmatch(ref.name)
        assert match is not None
        digest, base = match.groups()
        data = fsutil.read_json(recipe_path(context.settings.cache_dir, digest))
        if data is None:
            raise ImageError(
                f"image {ref.name!r}: its recipe is not in the cache "
                f"({recipe_path(context.settings.cache_dir, digest)}; pruned?); derive it "
                "again with image_store.derive() or the packages= option"
            )
        return context.store.check(base), Recipe.from_json(data)

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """What the base can be made into, but no apps (an OCI image is not derived)."""
        if form == "app":
            return NOT_APP
        match = _NAME.fullmatch(ref.name)
        assert match is not None
        return context.store.problem(context.store.check(match[2]), form)

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """The base's entry in ``form`` (built if needed), and the key it gives the result."""
        base_ref, recipe = self._parts(ref, context)
        base = context.store.form(base_ref, form)
        digest = hashlib.sha256(f"{base_of(base)}\0{recipe.digest()}".encode()).hexdigest()
        key = f"derived-{digest[:16]}" + (".vmroot" if form == "vm-rootfs" else "")
        return Version(
            key,
            recipe=BUILD_RECIPE,
            base=base.key,
            not_older_than=base.created,
            detail=(base, recipe),
        )

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Run the recipe on the base in a build container with the host's network."""
        base, recipe = version.detail
        context.progress(f"deriving {ref.name} from {base.ref}: {recipe.describe()}")
        build(
            base,
            rootfs,
            recipe,
            mirror=context.settings.mirror,
            progress=context.progress,
            builder=context.builder(),
        )
        return Built(base.init, kernel_release=base.kernel_release)
