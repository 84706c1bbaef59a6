"""Container images from simplestreams servers (``images:``), as Incus reads them.

A server publishes ``streams/v1/index.json``, which names a products file (``images.json``)
for the datatype ``image-downloads``. There a product (``debian:12:default:amd64``) carries
its aliases (a comma-separated list: ``debian/12/default,debian/12,debian/bookworm``), its
architecture and its versions; each version's items are the files of one build::

    incus.tar.xz   (lxd.tar.xz on older servers) the metadata tarball: metadata.yaml,
                   templates; its combined_squashfs_sha256 / combined_rootxz_sha256 field is
                   the image's fingerprint with that rootfs: sha256(metadata bytes + rootfs
                   bytes), as Incus computes it
    squashfs       the rootfs as a squashfs (preferred: unsquashfs is fast)
    root.tar.xz    the rootfs as a tarball
    disk-kvm.img   a VM's disk (not ours: images: serves containers)

:func:`lookup` resolves an alias to one :class:`RemoteImage` (the newest version that has
container items), :func:`download` fetches and verifies its two files into a downloads
directory (cached by sha256, resumed with HTTP Range after a cut connection, retried on
transient errors), :func:`unpack` lays the rootfs out, :func:`read_metadata` reads
metadata.yaml. The store holds its entry lock around them; nothing here locks.

``requests`` failures are translated once, in :func:`_http_errors`: what means "the server
cannot be talked to" (refused, DNS, timeouts, cut connections, 5xx) becomes
:class:`ServerUnreachable`, which the retry loops retry and the store catches to fall back to
its cache; anything else (a certificate that is not trusted, a 404) is a plain ImageError.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import logging
import os
import platform
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from pytest_incus import tools
from pytest_incus.errors import ConfigError, ImageError
from pytest_incus.images.local import detect_init
from pytest_incus.images.ref import ImageRef
from pytest_incus.images.source import NOT_APP, Built, Context, Version
from pytest_incus.settings import DEFAULT_IMAGE_SERVER

log = logging.getLogger("pytest_incus")

INDEX_PATH = "streams/v1/index.json"

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 30.0  # seconds of silence in an open one
RETRIES = 3  # more tries after a transient failure (an attempt that made progress resets it)
BACKOFF = 0.25  # seconds before the first retry, doubled for each further one
PROGRESS_EVERY = 2.0  # seconds between progress lines
CHUNK = 1 << 16  # bytes per read of a download: what a cut connection loses at most
HASH_CHUNK = 1 << 20
UNPACK_TIMEOUT = 1800.0

METADATA_FTYPES = ("incus.tar.xz", "lxd.tar.xz")
# rootfs ftype -> the metadata item's field that holds the fingerprint of the pair; in order
# of preference
ROOTFS_FTYPES = {"squashfs": "combined_squashfs_sha256", "root.tar.xz": "combined_rootxz_sha256"}
VM_FTYPES = ("disk-kvm.img", "disk1.img", "uefi1.img")

# platform.machine() -> the architecture names of simplestreams (Debian's)
_ARCHES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "armhf",
    "armv8l": "armhf",
    "i386": "i386",
    "i686": "i386",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
}


class ServerUnreachable(ImageError):
    """The image server could not be talked to (refused, DNS, timeout, a cut connection or a
    5xx after retries): the store falls back to its newest cached version of the image."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of an image version on a server: ``path`` is relative to the server's URL."""

    ftype: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class RemoteImage:
    """An alias resolved on a server: the product, its chosen version, and the two files of
    its container image. ``fingerprint`` is the Incus fingerprint of the pair."""

    server: str
    alias: str
    product: str
    version: str
    fingerprint: str
    metadata: RemoteFile
    rootfs: RemoteFile


def arch_name(machine: str) -> str:
    """The architecture the kernel calls ``machine`` (x86_64, aarch64), as simplestreams
    names it (amd64, arm64, ...)."""
    return _ARCHES.get(machine.lower(), machine.lower())


def host_arch() -> str:
    """This host's architecture as simplestreams names it."""
    return arch_name(platform.machine())


# -- requests, translated once --------------------------------------------------------------


@contextlib.contextmanager
def _http_errors(what: str) -> Iterator[None]:
    """Turn the ``requests`` failures of the block (``what``: the URL and why) into ours:
    ServerUnreachable for those a later try may not have, ImageError for the others."""
    try:
        yield
    except requests.exceptions.SSLError as exc:  # before ConnectionError: it is one
        raise ImageError(
            f"{what}: the server's TLS certificate is not trusted: {exc}; give the CA that "
            "signed it in REQUESTS_CA_BUNDLE (or install it in the system's CAs)",
            exc=exc,
        ) from exc
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status >= 500:
            raise ServerUnreachable(
                f"{what}: the server answered {status}; it may be overloaded or down", exc=exc
            ) from exc
        raise ImageError(
            f"{what}: the server answered {status}; check --incus-image-server", exc=exc
        ) from exc
    except (
        requests.exceptions.ConnectionError,  # refused, DNS, connect and read timeouts
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,  # the connection was cut mid-body
        requests.exceptions.ContentDecodingError,
    ) as exc:
        raise ServerUnreachable(f"{what}: cannot talk to the server: {exc}", exc=exc) from exc
    except requests.exceptions.RequestException as exc:  # an invalid URL, too many redirects
        raise ImageError(f"{what}: {exc}; check --incus-image-server", exc=exc) from exc


def _retrying(attempt: Callable[[], Any], what: str) -> Any:
    """``attempt()``, tried again after a ServerUnreachable up to RETRIES times with backoff."""
    delay = BACKOFF
    for tries_left in range(RETRIES, -1, -1):
        try:
            return attempt()
        except ServerUnreachable as exc:
            if not tries_left:
                raise
            log.info("%s: %s; trying again in %.2fs", what, exc, delay)
        time.sleep(delay)  # backoff before a retry, not a wait for a condition
        delay *= 2
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _session(session: requests.Session | None) -> Iterator[requests.Session]:
    """The caller's session, or one of our own that is closed afterwards."""
    if session is not None:
        yield session
        return
    with requests.Session() as own:
        yield own


def _get(session: requests.Session, url: str, **kwargs: Any) -> requests.Response:
    """``session.get`` with our timeouts. ``verify`` is passed on: with ``trust_env``,
    requests would let REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override a CA file given as the
    session's ``verify``."""
    return session.get(
        url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), verify=session.verify, **kwargs
    )


def _url(server: str, path: str) -> str:
    return f"{server.rstrip('/')}/{path.lstrip('/')}"


def _get_json(session: requests.Session, server: str, path: str) -> Any:
    url = _url(server, path)

    def attempt() -> Any:
        with _http_errors(f"GET {url}"):
            response = _get(session, url)
            response.raise_for_status()
            body = response.content
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _not_simplestreams(server, f"{path} is not JSON ({exc})") from exc

    return _retrying(attempt, f"GET {url}")


# -- the index ------------------------------------------------------------------------------


def _not_simplestreams(server: str, why: str) -> ImageError:
    return ImageError(
        f"image server {server}: its index is not a simplestreams index: {why}; "
        f"--incus-image-server must name a simplestreams server (as {DEFAULT_IMAGE_SERVER})"
    )


def parse_index(doc: Any, *, server: str) -> str:
    """The path of the products file that ``doc`` (``streams/v1/index.json``) names for the
    datatype ``image-downloads``."""
    index = doc.get("index") if isinstance(doc, dict) else None
    if not isinstance(index, dict):
        raise _not_simplestreams(server, f"{INDEX_PATH} has no 'index' object")
    for entry in index.values():
        if isinstance(entry, dict) and entry.get("datatype") == "image-downloads":
            path = entry.get("path")
            if isinstance(path, str) and path:
                return path
            raise _not_simplestreams(server, "its image-downloads entry has no 'path'")
    raise _not_simplestreams(server, f"{INDEX_PATH} names no image-downloads products")


def _aliases(product: Mapping[str, Any]) -> list[str]:
    raw = product.get("aliases", "")
    parts = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return [str(a).strip().lower() for a in parts if str(a).strip()]


def _remote_file(server: str, where: str, item: Any) -> RemoteFile:
    try:
        return RemoteFile(
            ftype=str(item["ftype"]),
            path=str(item["path"]),
            sha256=str(item["sha256"]).lower(),
            size=int(item["size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _not_simplestreams(server, f"item {where} lacks ftype, path, sha256 or size") from exc


def _container_pair(
    server: str, where: str, items: Mapping[str, Any]
) -> tuple[RemoteFile, RemoteFile, str] | None:
    """(metadata, rootfs, fingerprint) of one version's items, or None if it has no
    container image."""
    by_ftype = {item.get("ftype"): item for item in items.values() if isinstance(item, dict)}
    meta = next((by_ftype[f] for f in METADATA_FTYPES if f in by_ftype), None)
    if meta is None:
        return None
    for ftype, field in ROOTFS_FTYPES.items():
        if ftype in by_ftype and isinstance(meta.get(field), str):
            return (
                _remote_file(server, f"{where} {meta.get('ftype')}", meta),
                _remote_file(server, f"{where} {ftype}", by_ftype[ftype]),
                meta[field].lower(),
            )
    return None


def _matches(alias: str, aliases: list[str]) -> int:
    """2 for an exact match, 1 for ``distro/release`` matching ``distro/release/default``,
    0 for none."""
    if alias in aliases:
        return 2
    return 1 if alias.count("/") == 1 and f"{alias}/default" in aliases else 0


def pick_image(doc: Any, *, server: str, alias: str, arch: str) -> RemoteImage:
    """The image that ``alias`` names for ``arch`` in ``doc`` (a products file): the matching
    product's newest version that has container items."""
    products = doc.get("products") if isinstance(doc, dict) else None
    if not isinstance(products, dict):
        raise _not_simplestreams(server, "its products file has no 'products' object")
    wanted = alias.strip().lower()
    candidates: list[tuple[int, str, dict[str, Any]]] = []
    other_arches: set[str] = set()
    known: set[str] = set()
    for name, product in products.items():
        if not isinstance(product, dict):
            raise _not_simplestreams(server, f"product {name!r} is not an object")
        aliases = _aliases(product)
        score = _matches(wanted, aliases)
        if product.get("arch") != arch:
            if score:
                other_arches.add(str(product.get("arch")))
            continue
        known.update(aliases)
        if score:
            candidates.append((score, name, product))
    if not candidates:
        raise _unknown_alias(server, alias, arch, known, other_arches)
    # an exact alias beats a /default one; a tie goes to the first product by name
    _, name, product = sorted(candidates, key=lambda c: (-c[0], c[1]))[0]
    versions = product.get("versions")
    if not isinstance(versions, dict):
        raise _not_simplestreams(server, f"product {name!r} has no 'versions' object")
    ftypes: set[str] = set()
    # version names sort as time: 20251201_05:24 on public servers, 202512010000 from
    # incus-simplestreams
    for version in sorted(versions, reverse=True):
        items = versions[version].get("items") if isinstance(versions[version], dict) else None
        if not isinstance(items, dict):
            raise _not_simplestreams(server, f"version {version} of {name!r} has no 'items'")
        pair = _container_pair(server, f"{name} {version}", items)
        if pair is not None:
            meta, rootfs, fingerprint = pair
            return RemoteImage(server, alias, name, version, fingerprint, meta, rootfs)
        ftypes.update(str(i.get("ftype")) for i in items.values() if isinstance(i, dict))
    vm_only = any(f in VM_FTYPES for f in ftypes)
    raise ImageError(
        f"image server {server}: {alias!r} ({name}) has no container image in any version"
        + (" (only VM images: a disk for QEMU)" if vm_only else f" (its files: {sorted(ftypes)})")
        + "; images: serves containers: pick an alias with a container image, or use kind='vm' "
        "with a debian/NN image"
    )


def _unknown_alias(
    server: str, alias: str, arch: str, known: set[str], other_arches: set[str]
) -> ImageError:
    if other_arches:
        return ImageError(
            f"image server {server}: {alias!r} has no image for the architecture {arch} (this "
            f"host's, unless asked otherwise), only for {', '.join(sorted(other_arches))}"
        )
    close = difflib.get_close_matches(alias.strip().lower(), sorted(known), n=6, cutoff=0.5)
    hint = (
        f"close ones: {', '.join(close)}"
        if close
        else f"it has {len(known)} aliases for {arch}, none close"
    )
    return ImageError(
        f"image server {server} has no image {alias!r} for {arch}; {hint}; "
        "aliases are distro/release[/variant], as `incus image list images:` shows them"
    )


def lookup(
    server: str,
    alias: str,
    *,
    arch: str | None = None,
    session: requests.Session | None = None,
) -> RemoteImage:
    """Resolve ``alias`` (``distro/release[/variant]``; ``distro/release`` also names the
    ``default`` variant) on ``server`` to the newest version that has a container image, for
    ``arch`` (default: this host's). ServerUnreachable if the server cannot be talked to."""
    arch = arch or host_arch()
    with _session(session) as s:
        products_path = parse_index(_get_json(s, server, INDEX_PATH), server=server)
        doc = _get_json(s, server, products_path)
    image = pick_image(doc, server=server, alias=alias, arch=arch)
    log.info("%s %s: %s version %s", server, alias, image.product, image.version)
    return image


# -- downloads ------------------------------------------------------------------------------


def _size(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


class _Meter:
    """Progress lines of one file: bytes, total and rate, at most every PROGRESS_EVERY
    seconds, and a final one."""

    def __init__(self, label: str, total: int, progress: Callable[[str], None]) -> None:
        self.label, self.total, self.progress = label, total, progress
        self.start = self.last = time.monotonic()
        self.fetched = 0  # in this call: resumed bytes are not part of the rate

    def line(self, have: int) -> str:
        rate = self.fetched / max(time.monotonic() - self.start, 1e-3)
        return f"{self.label}: {_size(have)} of {_size(self.total)}, {_size(rate)}/s"

    def update(self, have: int, n: int) -> None:
        self.fetched += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.progress(self.line(have))

    def done(self) -> None:
        self.progress(self.line(self.total))


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(HASH_CHUNK):
                digest.update(block)
    return digest.hexdigest()


def _fetch_once(
    session: requests.Session, url: str, part: Path, item: RemoteFile, meter: _Meter
) -> bool:
    """One GET of ``url`` into ``part``, from where it stopped (Range); True if the file is
    now whole. A cut connection is ServerUnreachable (or a short body, False)."""
    have = part.stat().st_size if part.exists() else 0
    if have > item.size:  # not the file we want: start again
        part.unlink()
        have = 0
    if have == item.size:
        return True
    headers = {"Range": f"bytes={have}-"} if have else {}
    with (
        _http_errors(f"GET {url}"),
        session.get(
            url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
        ) as response,
    ):
        if have and response.status_code == 416:  # the partial file is not a prefix
            part.unlink()
            return False
        response.raise_for_status()
        resumed = response.status_code == 206 and response.headers.get(
            "Content-Range", ""
        ).startswith(f"bytes {have}-")
        if have and not resumed:
            log.info("%s: the server ignored the Range; downloading it whole", url)
            have = 0
        with open(part, "ab" if have else "wb") as f:
            for block in response.iter_content(CHUNK):
                f.write(block)
                have += len(block)
                meter.update(have, len(block))
                if have > item.size:
                    break  # longer than the index says: the check below rejects it
    return have >= item.size


def _fetch_file(
    session: requests.Session,
    image: RemoteImage,
    item: RemoteFile,
    downloads_dir: Path,
    progress: Callable[[str], None],
) -> Path:
    """``item`` as ``downloads_dir/<sha256>`` if it is there (no request), else downloaded
    into a partial file beside it and checked against its sha256: the partial file is
    returned, for :func:`download` to keep once the pair matches the fingerprint. The partial
    file is named after the image too, so two images sharing this file never write one."""
    final = downloads_dir / item.sha256
    if final.exists() and final.stat().st_size == item.size:
        return final  # stored only after its sha256 was checked; the fingerprint checks again
    part = downloads_dir / f".{item.sha256}.{image.fingerprint[:16]}.part"
    url = _url(image.server, item.path)
    meter = _Meter(f"{image.alias} {item.ftype}", item.size, progress)
    tries_left, delay = RETRIES, BACKOFF
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _fetch_once(session, url, part, item, meter):
                break
            failure: ServerUnreachable | None = None
        except ServerUnreachable as exc:
            failure = exc
        if part.exists() and part.stat().st_size > before:
            tries_left, delay = RETRIES, BACKOFF  # it made progress: a fresh set of retries
        elif not tries_left:
            raise failure or ServerUnreachable(
                f"GET {url}: the connection keeps ending before the file's {item.size} bytes; "
                "try again later"
            )
        else:
            tries_left -= 1
        log.info("%s: cut at %d bytes (%s); resuming", url, before, failure or "short body")
        time.sleep(delay)  # backoff before a retry, not a wait for a condition
        delay *= 2
    got, size = _sha256(part), part.stat().st_size
    if got != item.sha256 or size != item.size:
        part.unlink()
        raise ImageError(
            f"image {image.alias} from {image.server}: {item.ftype} ({item.path}) has sha256 "
            f"{got} ({size} bytes), the index says {item.sha256} ({item.size} bytes); the "
            "file was removed; the server's copy is damaged or changed while it was read: "
            "try again later"
        )
    meter.done()
    return part


def download(
    image: RemoteImage,
    downloads_dir: Path,
    progress: Callable[[str], None],
    *,
    session: requests.Session | None = None,
) -> tuple[Path, Path]:
    """The metadata and rootfs files of ``image`` in ``downloads_dir`` (each named by its
    sha256; a file already there is reused without a request), each checked against its
    sha256 and the pair against the image's fingerprint. ``progress`` gets a line of bytes,
    total and rate every few seconds and at the end of each file. A mismatch is an
    ImageError, and what this call downloaded is removed: nothing is kept that did not
    verify. A partial download is kept only when the server could not be reached, to be
    resumed by a later call. Callers hold a lock around it."""
    downloads_dir.mkdir(parents=True, exist_ok=True)
    fetched: list[Path] = []  # this call's verified partial files
    try:
        with _session(session) as s:
            for item in (image.metadata, image.rootfs):
                fetched.append(_fetch_file(s, image, item, downloads_dir, progress))
        got = _sha256(*fetched)
        if got != image.fingerprint:
            raise ImageError(
                f"image {image.alias} from {image.server}: the fingerprint of "
                f"{image.metadata.ftype} + {image.rootfs.ftype} is {got}, the index says "
                f"{image.fingerprint}; the files were removed; the server's index does not "
                "match its files: try again later"
            )
    except ServerUnreachable:
        raise
    except ImageError:
        for path in fetched:
            if path.name.endswith(".part"):
                path.unlink(missing_ok=True)
        raise
    meta, rootfs = (downloads_dir / item.sha256 for item in (image.metadata, image.rootfs))
    for path, final in zip(fetched, (meta, rootfs), strict=True):
        if path != final:
            os.replace(path, final)
    return meta, rootfs


# -- unpacking ------------------------------------------------------------------------------


def unpack(image: RemoteImage, rootfs_file: Path, rootfs: Path) -> None:
    """Lay out the rootfs of ``image`` from ``rootfs_file`` (a squashfs or a root.tar.xz)
    into the existing, empty directory ``rootfs``: owners, modes and xattrs kept."""
    if image.rootfs.ftype == "squashfs":
        # -f: write into the existing directory; -n: no progress bar (-quiet is not in 4.4)
        argv = ["unsquashfs", "-f", "-n", "-d", str(rootfs), str(rootfs_file)]
        fix = "install squashfs-tools (apt-get install squashfs-tools)"
    else:
        argv = [
            *("tar", "-x", "-J", "-p", "--numeric-owner"),
            *("--xattrs", "--xattrs-include=*", "-f", str(rootfs_file), "-C", str(rootfs)),
        ]
        fix = "check the free space of the cache (df) and that xz-utils is installed"
    tools.run(
        argv,
        what=f"unpacking {image.alias} ({image.rootfs.ftype}, {rootfs_file}) with {argv[0]}",
        error=ImageError,
        fix=fix,
        timeout=UNPACK_TIMEOUT,
    )


def read_metadata(metadata_file: Path) -> dict[str, Any]:
    """The metadata.yaml of an image's metadata tarball (architecture, creation_date,
    properties: os, release, variant, description, ...), parsed."""
    try:
        with tarfile.open(metadata_file) as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.removeprefix("./") == "metadata.yaml"), None
            )
            f = tar.extractfile(member) if member is not None else None
            if f is None:
                raise ImageError(f"image metadata {metadata_file} has no metadata.yaml file")
            data = yaml.safe_load(f.read())
    except (OSError, tarfile.TarError, yaml.YAMLError) as exc:
        raise ImageError(
            f"cannot read the image metadata {metadata_file}: {exc}; remove it so that it is "
            "downloaded again",
            exc=exc,
        ) from exc
    if not isinstance(data, dict):
        raise ImageError(f"image metadata {metadata_file}: metadata.yaml is not a mapping")
    return data


PREFIX = "images:"
DOWNLOADS = "downloads"  # below the cache directory: verified files, named by their sha256


def downloads_dir(cache_dir: Path) -> Path:
    """Where downloaded image files are kept (see :func:`download`)."""
    return cache_dir / DOWNLOADS


@contextlib.contextmanager
def downloads_lock(cache_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """Held shared by builders from download to unpack (builds of different images run side
    by side), and exclusive by the prune that removes files no entry needs: so it never
    removes a file a build is about to unpack. (filelock has no shared mode.)"""
    directory = downloads_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def prune_downloads(cache_dir: Path, needed: set[str], *, partial: bool) -> list[Path]:
    """Remove the downloaded files whose sha256 is not ``needed``, and with ``partial`` the
    partial ones too (kept otherwise, to be resumed). Returns what it removed."""
    directory = downloads_dir(cache_dir)
    if not directory.is_dir():
        return []
    removed = []
    with downloads_lock(cache_dir, exclusive=True):
        for path in sorted(directory.iterdir()):
            if path.name == ".lock" or path.name in needed:
                continue
            if path.name.endswith(".part") and not partial:
                continue
            log.info("removing the download %s, which no cached image needs", path)
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class SimplestreamsSource:
    """``images:<distro>/<release>[/<variant>]``: from the simplestreams server of
    ``--incus-image-server``, keyed by the image's fingerprint, so that a new version on the
    server is a new entry. When the server cannot be reached, the newest cached entry of the
    name is used, with a warning."""

    name = "simplestreams"

    def parse(self, image: str) -> ImageRef | None:
        """``images:`` and an alias of two or three parts."""
        if not image.startswith(PREFIX):
            return None
        parts = image[len(PREFIX) :].split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ConfigError(
                f"image {image!r}: write images:<distro>/<release>[/<variant>], "
                "such as images:debian/12 or images:alpine/3.20/cloud"
            )
        return ImageRef(image, self.name, "images-" + "-".join(parts).lower())

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """System containers only, for now."""
        if form == "vm-rootfs":
            return (
                "a VM of an images: image is not supported yet; use kind='container', or "
                "image='debian/<release>' for a VM"
            )
        return NOT_APP if form == "app" else None

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """Ask the server for the alias's newest version; its fingerprint keys the entry."""
        server = context.settings.image_server
        try:
            remote = lookup(server, ref.name[len(PREFIX) :])
        except ServerUnreachable as exc:
            cached = [e for e in context.store.list() if e.ref == ref.name and e.kind == form]
            if not cached:
                raise ImageError(
                    f"image {ref.name!r}: {exc}; and no version of it is cached, so there is "
                    "nothing to fall back to: check --incus-image-server and the network"
                ) from exc
            newest = max(cached, key=lambda e: e.created)
            message = (
                f"image {ref.name!r}: {exc}; using the newest cached version "
                f"(fingerprint {newest.fingerprint}, cached {time.ctime(newest.created)})"
            )
            log.warning("%s", message)
            context.progress(f"warning: {message}")
            return Version(newest.key)
        return Version("images-" + remote.fingerprint[:24], detail=remote)

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Download (or find downloaded) the files, verify them, unpack the root filesystem."""
        remote: RemoteImage | None = version.detail
        if remote is None:  # the cached entry found offline went while we waited for its lock
            raise ImageError(
                f"image {ref.name!r}: the server cannot be reached and its cached version was "
                "removed meanwhile; retry when the server is reachable"
            )
        cache_dir = context.settings.cache_dir
        with downloads_lock(cache_dir, exclusive=False):
            _, rootfs_file = download(remote, downloads_dir(cache_dir), context.progress)
            unpack(remote, rootfs_file, rootfs)
        return Built(
            detect_init(rootfs),
            fingerprint=remote.fingerprint,
            downloads=(remote.metadata.sha256, remote.rootfs.sha256),
        )
