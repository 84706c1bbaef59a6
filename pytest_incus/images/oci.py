"""OCI images: resolve with skopeo, fetch into one shared OCI layout, unpack with umoci.

Layout below the cache directory::

    oci/layout/           one OCI image layout shared by every image: blobs stored once by
                          digest, so two images sharing a base layer hold it once
    oci/layout.lock       held while skopeo copies into the layout

An image reference (``docker://``, ``oci:``, ``oci-archive:``, ``docker-archive:``) is first
resolved to its manifest digest (:func:`resolve`); the store keys the unpacked entry by that
digest, so a moved tag makes a new entry and an unchanged one is never fetched again.
:func:`fetch` copies the pinned image into the layout under a tag named after the digest and
unpacks it with ``umoci unpack`` (run as root, owners kept). :func:`remove_from_layout`
untags pruned images and deletes the blobs no other image needs.

Credentials and trust are skopeo's own: it runs with this process's environment, so it reads
the login from containers' auth.json (``REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers``,
``~/.config/containers``) or docker's ``~/.docker/config.json``, and trusts the CAs of the
system, of ``SSL_CERT_FILE`` and of ``/etc/containers/certs.d/HOST:PORT/``. Registries named
insecure are reached without checking their certificate, or over plain HTTP. What skopeo says
when that fails is turned into an error that says what to do (:func:`_access_error`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from pytest_incus import fsutil
from pytest_incus.errors import ImageError
from pytest_incus.images.ref import OCI_PREFIXES, ImageRef
from pytest_incus.images.source import NOT_APP, Built, Context, Version

log = logging.getLogger("pytest_incus")

INSPECT_TIMEOUT = 120.0
COPY_TIMEOUT = 3600.0
LOCK_TIMEOUT = 3600.0

_UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "network is unreachable",
    "no route to host",
    "connection reset",
)
_AUTH = ("unauthorized", "authentication required", "denied", "invalid username/password")
# Go's TLS errors: "x509: certificate signed by unknown authority", "x509: certificate is
# valid for ..., not ...", "tls: failed to verify certificate: ..."
_TLS = ("x509: ", "tls: failed to verify")
_CREDENTIALS = (
    "skopeo reads them from containers' auth.json ($REGISTRY_AUTH_FILE, "
    "$XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json; "
    "`skopeo login {registry}` writes it) and from docker's ~/.docker/config.json"
)
_FATAL = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
# what skopeo inspect puts before every error of a registry, a parse error or not
_INSPECT_PREFIX = re.compile(r'^Error parsing image name "[^"]*": ')


@dataclass(frozen=True)
class AppConfig:
    """What the app runtime needs from an image's OCI config (``config`` of the image)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    digest: str = ""  # the manifest digest the entry was unpacked from
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The form recorded in the entry's image.json."""
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "digest": self.digest,
            "labels": dict(self.labels),
        }

    @classmethod
    def from_json(cls, data: Any) -> AppConfig:
        """Read the recorded form back; TypeError/ValueError when it is not one."""
        if not isinstance(data, dict):
            raise TypeError("app config is not an object")
        return cls(
            entrypoint=_strings(data.get("entrypoint")),
            cmd=_strings(data.get("cmd")),
            env=_strings(data.get("env")),
            working_dir=str(data.get("working_dir") or ""),
            user=str(data.get("user") or ""),
            digest=str(data.get("digest") or ""),
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        )

    @classmethod
    def from_oci(cls, config: Any, digest: str) -> AppConfig:
        """From an OCI image config blob (its ``config`` object holds the runtime fields)."""
        inner = config.get("config") if isinstance(config, dict) else None
        inner = inner if isinstance(inner, dict) else {}
        return cls(
            entrypoint=_strings(inner.get("Entrypoint")),
            cmd=_strings(inner.get("Cmd")),
            env=_strings(inner.get("Env")),
            working_dir=str(inner.get("WorkingDir") or ""),
            user=str(inner.get("User") or ""),
            digest=digest,
            labels={str(k): str(v) for k, v in (inner.get("Labels") or {}).items()},
        )


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class Resolved:
    """An image reference pinned to its manifest digest."""

    name: str  # as the user wrote it
    digest: str  # "sha256:<hex>"

    @property
    def key(self) -> str:
        """The cache key of the unpacked entry."""
        return "oci-" + self.digest.split(":", 1)[-1][:16]

    @property
    def layout_tag(self) -> str:
        """The tag of this image inside the shared layout."""
        return self.digest.replace(":", "-")

    @property
    def pinned(self) -> str:
        """The reference skopeo copies: by digest for registries, as written otherwise."""
        if self.name.startswith("docker://"):
            repo = self.name[len("docker://") :].split("@", 1)[0]
            last = repo.rsplit("/", 1)
            if ":" in last[-1]:
                repo = repo.rsplit(":", 1)[0]
            return f"docker://{repo}@{self.digest}"
        return self.name


def registry_of(name: str) -> str | None:
    """The registry host[:port] of a ``docker://`` reference; None for other transports."""
    if not name.startswith("docker://"):
        return None
    first = name[len("docker://") :].split("/", 1)[0]
    if "/" in name[len("docker://") :] and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _repository(name: str) -> str:
    """``docker://HOST/REPO`` without its tag or digest."""
    rest = name.split("@", 1)[0]
    head, _, last = rest.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else rest


def _tag(name: str) -> str:
    rest = name.split("@", 1)[0]
    last = rest.rpartition("/")[2]
    return last.split(":", 1)[1] if ":" in last else "latest"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageError(
            f"OCI images need {name} on the host and it is not installed; "
            f"install it with: apt-get install {name}"
        )
    return path


def require_tools() -> None:
    """ImageError saying what to install when skopeo or umoci is missing."""
    _tool("skopeo")
    _tool("umoci")


def _run(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(
            f"{' '.join(args)} did not finish within {timeout:.0f}s; "
            "check that the registry answers",
            exc=exc,
        ) from exc


def _tls_args(name: str, insecure: frozenset[str], flag: str) -> list[str]:
    registry = registry_of(name)
    return [f"{flag}=false"] if registry is not None and registry in insecure else []


def _last_line(stderr: str) -> str:
    """What a tool said last; of skopeo's log line ``time=... level=fatal msg="..."``, the
    message alone."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    match = _FATAL.search(lines[-1])
    if match is None:
        return lines[-1]
    try:
        said = str(json.loads(f'"{match.group(1)}"'))  # Go quotes as JSON does, mostly
    except ValueError:
        said = match.group(1)
    return _INSPECT_PREFIX.sub("", said)


def resolve(name: str, insecure: frozenset[str] = frozenset()) -> Resolved:
    """Pin ``name`` to its manifest digest (one ``skopeo inspect``), or a clear ImageError."""
    skopeo = _tool("skopeo")
    args = [skopeo, "inspect", *_tls_args(name, insecure, "--tls-verify")]
    proc = _run([*args, "--format", "{{.Digest}}", name], INSPECT_TIMEOUT)
    digest = proc.stdout.strip()
    if proc.returncode == 0 and digest.startswith("sha256:"):
        return Resolved(name, digest)
    raise _inspect_error(name, proc.stderr, insecure)


def _inspect_error(name: str, stderr: str, insecure: frozenset[str]) -> ImageError:
    text = stderr.lower()
    said = _last_line(stderr)
    registry = registry_of(name)
    if registry is not None:
        if error := _access_error(name, registry, text, said):
            return error
        if "manifest unknown" in text or "not found" in text or "name unknown" in text:
            return _missing_error(name, insecure, said)
    elif "no descriptor found for reference" in text:
        return ImageError(
            f"image {name!r}: the OCI layout has no image with that tag ({said}); "
            "check the tag after the last ':'"
        )
    elif "no such file or directory" in text:
        return ImageError(f"image {name!r}: no such OCI layout or archive ({said}); check the path")
    return ImageError(f"image {name!r} cannot be inspected with skopeo: {said}")


def _access_error(name: str, registry: str, text: str, said: str) -> ImageError | None:
    """The error for a registry that cannot be reached, trusted or logged into; None when
    skopeo's ``text`` (lower case) says none of these."""
    if any(s in text for s in _UNREACHABLE):
        return ImageError(
            f"image {name!r}: registry {registry} cannot be reached ({said}); "
            "check that it runs and that the host and port are right"
        )
    if "http response to https client" in text:
        return ImageError(
            f"image {name!r}: registry {registry} speaks plain HTTP, not HTTPS; "
            f"if you trust it, name it with --incus-insecure-registry={registry}"
        )
    if any(s in text for s in _TLS):
        return ImageError(
            f"image {name!r}: the TLS certificate of registry {registry} is not trusted "
            f"({said}); trust the CA that signed it: put it in "
            f"/etc/containers/certs.d/{registry}/ca.crt, or point SSL_CERT_FILE at a bundle "
            "that holds it, or add it to the host's CAs (update-ca-certificates); or, if you "
            f"trust this registry without checking, name it with "
            f"--incus-insecure-registry={registry}"
        )
    if any(s in text for s in _AUTH):
        return _login_error(name, registry, said)
    return None


def _login_error(name: str, registry: str, said: str) -> ImageError:
    """A refused login: tell missing credentials from wrong ones (``skopeo login
    --get-login`` names the user skopeo has credentials of, reading the same files)."""
    where = _CREDENTIALS.format(registry=registry)
    proc = _run([_tool("skopeo"), "login", "--get-login", registry], INSPECT_TIMEOUT)
    user = proc.stdout.strip() if proc.returncode == 0 else ""
    if not user:
        return ImageError(
            f"image {name!r}: registry {registry} refused the login: no credentials for "
            f"{registry} were found ({said}); {where} (some registries also answer so for a "
            "repository that does not exist)"
        )
    return ImageError(
        f"image {name!r}: registry {registry} refused the login of user {user!r} ({said}); "
        f"the credentials stored for {registry} are wrong or expired; correct them: {where}"
    )


def _missing_error(name: str, insecure: frozenset[str], said: str) -> ImageError:
    """Tell a missing repository from a wrong tag: ask the registry for the repository's tags."""
    repo = _repository(name)
    args = [_tool("skopeo"), "list-tags", *_tls_args(name, insecure, "--tls-verify"), repo]
    proc = _run(args, INSPECT_TIMEOUT)
    if proc.returncode != 0:
        return ImageError(
            f"image {name!r}: repository {repo[len('docker://') :]} does not exist in the "
            f"registry ({said}); check its name, or push the image first"
        )
    try:
        tags = [str(t) for t in json.loads(proc.stdout).get("Tags") or []]
    except (ValueError, AttributeError):
        tags = []
    shown = ", ".join(sorted(tags)[:20]) or "none"
    return ImageError(
        f"image {name!r}: repository {repo[len('docker://') :]} has no tag {_tag(name)!r}; "
        f"its tags are: {shown}"
    )


def layout_dir(cache_dir: Path) -> Path:
    """The OCI layout shared by every image of the cache."""
    return cache_dir / "oci" / "layout"


def copy_to_layout(
    image: Resolved, cache_dir: Path, insecure: frozenset[str] = frozenset()
) -> Path:
    """Copy ``image`` into the shared layout (blobs already there are reused); its path.

    The caller holds :func:`layout_lock`.
    """
    skopeo = _tool("skopeo")
    layout = layout_dir(cache_dir)
    args = [
        skopeo,
        "copy",
        "--quiet",
        *_tls_args(image.name, insecure, "--src-tls-verify"),
        image.pinned,
        f"oci:{layout}:{image.layout_tag}",
    ]
    proc = _run(args, COPY_TIMEOUT)
    if proc.returncode != 0:
        said = _last_line(proc.stderr)
        # resolved a moment ago, but the registry may have gone, or refuse the blobs
        registry = registry_of(image.name)
        if registry and (error := _access_error(image.name, registry, proc.stderr.lower(), said)):
            raise error
        raise ImageError(
            f"image {image.name!r}: skopeo could not fetch {image.digest} into the cache "
            f"({said}); check the registry and the disk space of {layout}"
        )
    return layout


def layout_lock(cache_dir: Path) -> filelock.FileLock:
    """The lock held while the shared layout is written or read (copy, then unpack)."""
    lock_dir = layout_dir(cache_dir).parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(lock_dir / "layout.lock", timeout=LOCK_TIMEOUT)


def _tagged(layout: Path) -> dict[str, str]:
    """Tag -> manifest digest of every tagged image in ``layout`` (its index.json)."""
    index = fsutil.read_json(layout / "index.json")
    found = {}
    for desc in (index or {}).get("manifests") or []:  # umoci writes null for no image
        tag = desc.get("annotations", {}).get("org.opencontainers.image.ref.name")
        if tag is not None:
            found[str(tag)] = str(desc["digest"])
    return found


def layout_tags(cache_dir: Path) -> set[str]:
    """The tags of the images in the shared layout."""
    return set(_tagged(layout_dir(cache_dir)))


def read_config(layout: Path, tag: str) -> dict[str, Any]:
    """The OCI image config of the image tagged ``tag`` in ``layout``."""
    if (digest := _tagged(layout).get(tag)) is not None:
        manifest = json.loads(_blob(layout, digest).read_text())
        config: dict[str, Any] = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
        return config
    raise ImageError(f"the OCI layout {layout} has no image tagged {tag!r} after the copy")


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def unpack(layout: Path, tag: str, rootfs: Path) -> None:
    """Unpack the image into ``rootfs`` (an empty directory), keeping owners."""
    umoci = _tool("umoci")
    bundle = rootfs.parent / "bundle"
    proc = _run([umoci, "unpack", "--image", f"{layout}:{tag}", str(bundle)], COPY_TIMEOUT)
    if proc.returncode != 0:
        fsutil.remove_tree(bundle)
        raise ImageError(
            f"umoci could not unpack {tag} from {layout} ({_last_line(proc.stderr)}); "
            "remove the cache's oci directory if it is damaged, and retry"
        )
    rootfs.rmdir()
    (bundle / "rootfs").rename(rootfs)
    fsutil.remove_tree(bundle)


def fetch(
    image: Resolved, cache_dir: Path, rootfs: Path, insecure: frozenset[str] = frozenset()
) -> AppConfig:
    """Fetch ``image`` into the shared layout and unpack it into ``rootfs``; its config."""
    require_tools()  # before a long copy, not after
    with layout_lock(cache_dir):
        layout = copy_to_layout(image, cache_dir, insecure)
        config = read_config(layout, image.layout_tag)
        unpack(layout, image.layout_tag, rootfs)
    try:
        return AppConfig.from_oci(config, image.digest)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ImageError(
            f"image {image.name!r}: its OCI config cannot be read ({exc}); its Entrypoint, "
            "Cmd and Env must be lists of strings: check how the image was built",
            exc=exc,
        ) from exc


def remove_from_layout(cache_dir: Path, tags: Collection[str]) -> None:
    """Untag ``tags`` in the shared layout, then delete the blobs that no tag needs any more.

    Blobs that images still tagged share (a common base layer) stay. A tag already gone is
    no error. Without umoci (removed since the images were fetched) the blobs stay, with a
    warning.
    """
    layout = layout_dir(cache_dir)
    if not (layout / "index.json").exists():
        return
    umoci = shutil.which("umoci")
    if umoci is None:
        log.warning("umoci is not installed: the blobs of pruned images stay in %s", layout)
        return
    with layout_lock(cache_dir):
        for tag in sorted(set(tags) & _tagged(layout).keys()):
            _edit_layout(layout, umoci, "rm", "--image", f"{layout}:{tag}")
        _edit_layout(layout, umoci, "gc", "--layout", str(layout))


def _edit_layout(layout: Path, *args: str) -> None:
    proc = _run(args, COPY_TIMEOUT)
    if proc.returncode != 0:
        raise ImageError(
            f"umoci {' '.join(args[1:])} failed ({_last_line(proc.stderr)}); if the cache's "
            f"OCI layout is damaged, remove {layout.parent}: its images are fetched again"
        )


class OciSource:
    """OCI references in skopeo's transport syntax, for kind="app": a tag is resolved to its
    manifest digest, and the entry is keyed by the digest (an updated tag is a new entry)."""

    name = "oci"

    def parse(self, image: str) -> ImageRef | None:
        """``docker://``, ``oci:``, ``oci-archive:`` and ``docker-archive:`` references."""
        if not image.startswith(OCI_PREFIXES):
            return None
        return ImageRef(image, self.name, "oci-" + hashlib.sha256(image.encode()).hexdigest()[:16])

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """Apps only."""
        return None if form == "app" else NOT_APP

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """Ask the registry (or read the layout or archive) for the manifest's digest."""
        require_tools()
        resolved = resolve(ref.name, context.settings.insecure_registries)
        return Version(resolved.key, detail=resolved)

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Fetch the blobs into the shared layout and unpack the image."""
        settings = context.settings
        config = fetch(version.detail, settings.cache_dir, rootfs, settings.insecure_registries)
        return Built("app", app=config)
