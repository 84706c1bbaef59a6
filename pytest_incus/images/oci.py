"""OCI images: resolve with skopeo, fetch into one shared OCI layout, unpack with umoci.

Layout below the cache directory::

    oci/layout/           one OCI image layout shared by every image: blobs stored once by
                          digest, so two images sharing a base layer hold it once
    oci/layout.lock       held while skopeo copies into the layout

An image reference (``docker://``, ``oci:``, ``oci-archive:``, ``docker-archive:``) is first
resolved to its manifest digest (:func:`resolve`); the store keys the unpacked entry by that
digest, so a moved tag makes a new entry and an unchanged one is never fetched again.
:func:`fetch` copies the pinned image into the layout under a tag named after the digest and
unpacks it with ``umoci unpack`` (run as root, owners kept).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from pytest_incus import fsutil
from pytest_incus.errors import ImageError

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
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


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
        if any(s in text for s in _AUTH):
            return ImageError(
                f"image {name!r}: registry {registry} refused the login ({said}); "
                "put valid credentials in containers' auth.json (skopeo login) or "
                "docker's config.json"
            )
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
        raise ImageError(
            f"image {image.name!r}: skopeo could not fetch {image.digest} into the cache "
            f"({_last_line(proc.stderr)}); check the registry and the disk space of {layout}"
        )
    return layout


def layout_lock(cache_dir: Path) -> filelock.FileLock:
    """The lock held while the shared layout is written or read (copy, then unpack)."""
    lock_dir = layout_dir(cache_dir).parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(lock_dir / "layout.lock", timeout=LOCK_TIMEOUT)


def read_config(layout: Path, tag: str) -> dict[str, Any]:
    """The OCI image config of the image tagged ``tag`` in ``layout``."""
    index = fsutil.read_json(layout / "index.json")
    for desc in (index or {}).get("manifests", []):
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(_blob(layout, desc["digest"]).read_text())
            config: dict[str, Any] = json.loads(
                _blob(layout, manifest["config"]["digest"]).read_text()
            )
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
    return AppConfig.from_oci(config, image.digest)
