"""Images on the real incusd of this machine: uploads by fingerprint, once; instances made from
them; apps run by the launcher; images: from a loopback simplestreams server.

Everything made on the server is named ``pti-im-...`` (instances) or comes from a private cache
(images, deleted afterwards); the shared cache's busybox and debian/12 uploads stay on the
server, as the cache they are.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from incus_helpers import TEST_PROJECT
from registry_helpers import build_image, image_of_rootfs
from simplestreams_helpers import ImageServer, build_tree, make_image

from pytest_incus import fsutil
from pytest_incus.errors import (
    ConfigError,
    InstanceStartError,
    ServerError,
    UnavailableError,
)
from pytest_incus.images.store import ImageStore
from pytest_incus.incus import images as incus_images
from pytest_incus.incus.client import IncusClient
from pytest_incus.incus.images import APP_EXIT, APP_LOG, APP_SHELL, IncusImages, Source
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec

ECHO_CONFIG = [
    "--config.cmd=sh",
    "--config.cmd=-c",
    "--config.cmd=echo out $GREETING from $(pwd) as $(id -un); echo err >&2; exit 3",
    "--config.env=GREETING=hello",
    "--config.workingdir=/srv",
    "--config.user=nobody",
]


# the test suite's project on this machine's Incus (scripts/incus-setup.sh makes it), as
# tests/incus/conftest.py's incus_client uses


class CountingClient(IncusClient):
    """The real client, counting the requests it makes (method, path)."""

    def __init__(self) -> None:
        super().__init__(project=TEST_PROJECT)
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.requests.append((method, path))
        return super().request(method, path, **kwargs)

    def uploads(self) -> int:
        return self.requests.count(("POST", "/1.0/images"))


@pytest.fixture
def client() -> Iterator[IncusClient]:
    with IncusClient(project=TEST_PROJECT) as c:
        c.check()
        yield c


@pytest.fixture
def private(scratch_cache: Path, client: IncusClient) -> Iterator[ImageStore]:
    """An image store of a private cache; the images uploaded from it are deleted after."""
    store = ImageStore(Settings(cache_dir=scratch_cache))
    yield store
    for memo in (scratch_cache / "incus").glob("*.json"):
        fingerprint = fsutil.read_json(memo)["fingerprint"]
        delete_image(client, fingerprint)


def delete_image(client: IncusClient, fingerprint: str) -> None:
    try:
        client.call("DELETE", f"/1.0/images/{fingerprint}")
    except ServerError as exc:
        if exc.status != 404:
            raise


def spec(image: str, kind: str = "container", **options: Any) -> InstanceSpec:
    return InstanceSpec.parse(kind, image, options, where="test_images")


@pytest.fixture
def instances(client: IncusClient) -> Iterator[list[str]]:
    """Names of the instances a test made (``pti-im-...``), deleted after it."""
    made: list[str] = []
    yield made
    for name in made:
        with contextlib.suppress(ServerError):  # stopped already
            client.call(
                "PUT", f"/1.0/instances/{name}/state", json={"action": "stop", "force": True}
            )
        client.call("DELETE", f"/1.0/instances/{name}")


def create(client: IncusClient, instances: list[str], source: Source) -> str:
    """Create and start an instance of ``source``; its name."""
    name = f"pti-im-{secrets.token_hex(4)}"
    body = {"name": name, "source": source.source, "config": source.config, "type": "container"}
    client.call("POST", "/1.0/instances", json=body, timeout=120)
    instances.append(name)
    client.call("PUT", f"/1.0/instances/{name}/state", json={"action": "start"}, timeout=60)
    return name


def status(client: IncusClient, name: str) -> str:
    # the instance, not its /state: that one fails (Invalid PID) while init is ending
    return str(client.call("GET", f"/1.0/instances/{name}")["status"])


def wait_status(client: IncusClient, name: str, wanted: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := status(client, name)) != wanted:
        assert time.monotonic() < deadline, f"{name} is {now}, not {wanted}, after {timeout}s"
        time.sleep(0.05)


def read(client: IncusClient, name: str, path: str) -> bytes:
    return bytes(
        client.request("GET", f"/1.0/instances/{name}/files", params={"path": path}).content
    )


def read_soon(client: IncusClient, name: str, path: str) -> bytes:
    """The file's content; empty while it does not exist yet (the app has not written it)."""
    try:
        return read(client, name, path)
    except ServerError as exc:
        if exc.status == 404:
            return b""
        raise


def test_an_image_is_uploaded_once_and_found_by_later_runs(
    private: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a packer killed midway left (its pid is no process's) goes with the next packing
    leftover = private.settings.cache_dir / "incus" / "busybox.container.999999999.tar"
    leftover.parent.mkdir()
    leftover.write_bytes(b"partial")
    first = CountingClient()
    source = IncusImages(first, private).source(spec("busybox"))
    assert first.uploads() == 1
    assert not leftover.exists()
    assert [p.name for p in leftover.parent.glob("*.tar")] == []  # its own tarball too
    fingerprint = source.source["fingerprint"]
    assert source.source == {"type": "image", "fingerprint": fingerprint}
    assert source.shell == "/bin/sh" and source.config == {}
    image = first.call("GET", f"/1.0/images/{fingerprint}")
    assert image["properties"]["pytest-incus.ref"] == "busybox"
    assert image["properties"]["description"] == "pytest-incus busybox"
    assert fingerprint in {i["fingerprint"] for i in IncusImages(first, private).uploaded()}

    # a later run (a fresh store and client): the memo gives the fingerprint, the server has it
    packs: list[Path] = []
    real_pack = incus_images.pack
    monkeypatch.setattr(
        incus_images,
        "pack",
        lambda rootfs, *a, **kw: packs.append(rootfs) or real_pack(rootfs, *a, **kw),
    )
    later = CountingClient()
    again = IncusImages(later, ImageStore(private.settings)).source(spec("busybox"))
    assert again == source
    assert later.uploads() == 0 and packs == []
    # and once this session knows the image is there, it does not ask again
    asked = len(later.requests)
    images = IncusImages(later, private)
    images.source(spec("busybox"))
    images.source(spec("busybox"))
    assert len(later.requests) == asked + 1

    # without the memo the entry is packed again, to the same fingerprint: nothing uploaded
    for memo in (private.settings.cache_dir / "incus").glob("*.json"):
        memo.unlink()
    third = CountingClient()
    assert IncusImages(third, ImageStore(private.settings)).source(spec("busybox")) == source
    assert third.uploads() == 0 and len(packs) == 1


def test_workers_that_start_together_upload_once(private: ImageStore) -> None:
    # as xdist workers do: each its own store and client, one cache; the entry's lock decides
    private.get("busybox")  # built before: the race is the upload's
    clients = [CountingClient() for _ in range(3)]
    results: list[Source] = []
    errors: list[BaseException] = []

    def launch(client: CountingClient) -> None:
        try:
            results.append(
                IncusImages(client, ImageStore(private.settings)).source(spec("busybox"))
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=launch, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(results) == 3 and len({r.source["fingerprint"] for r in results}) == 1
    assert sum(c.uploads() for c in clients) == 1


def test_packing_is_deterministic(private: ImageStore) -> None:
    entry = private.get("busybox")
    ref = private.check("busybox")
    metadata = incus_images.metadata_yaml(entry, ref, "x86_64")
    once = incus_images.pack(
        entry.rootfs, None, metadata=metadata, mtime=int(entry.created), extra=()
    )
    twice = incus_images.pack(
        entry.rootfs, None, metadata=metadata, mtime=int(entry.created), extra=()
    )
    assert once == twice
    # and in another process (another hash seed, another order of everything unordered)
    program = (
        "import sys; from pathlib import Path; from pytest_incus.incus.images import pack; "
        "print(pack(Path(sys.argv[1]), None, metadata=sys.argv[2].encode(), "
        "mtime=int(sys.argv[3]), extra=())[0])"
    )
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            program,
            str(entry.rootfs),
            metadata.decode(),
            str(int(entry.created)),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert other.stdout.strip() == once[0]
    later = incus_images.pack(
        entry.rootfs, None, metadata=metadata, mtime=int(entry.created) + 1, extra=()
    )
    assert later[0] != once[0]  # the mtimes are in it: a rebuilt entry is another image


def test_a_server_that_has_the_image_gets_no_upload(
    private: ImageStore, client: IncusClient
) -> None:
    # another host uploaded the same tarball: this one's first run finds it by fingerprint
    images = IncusImages(client, private)
    fingerprint = images.source(spec("busybox")).source["fingerprint"]
    for memo in (private.settings.cache_dir / "incus").glob("*.json"):
        memo.unlink()  # this host never knew
    counting = CountingClient()
    assert IncusImages(counting, ImageStore(private.settings)).source(spec("busybox")).source == {
        "type": "image",
        "fingerprint": fingerprint,
    }
    assert counting.uploads() == 0


@pytest.mark.parametrize("image", ["busybox", "debian/12"])
def test_an_instance_of_the_shared_images_runs(
    image: str, settings: Settings, client: IncusClient, instances: list[str]
) -> None:
    # the shared cache's images: uploaded once, left on the server for later runs
    source = IncusImages(client, ImageStore(settings)).source(spec(image))
    name = create(client, instances, source)
    assert status(client, name) == "Running"
    # the files API answers a symlink with its target: read the files themselves
    if image == "busybox":
        assert "ID=busybox" in read(client, name, "/etc/os-release").decode()
    else:
        assert read(client, name, "/etc/debian_version").startswith(b"12.")


@pytest.fixture
def layout(scratch_cache: Path) -> Path:
    """An OCI layout (in the private cache's directory) with ``echo``, a program that prints
    and exits 3, and ``plain``, busybox with no program."""
    work = scratch_cache / "layouts"
    build_image(work / "layout", "echo", files={"srv/.keep": ""}, config=ECHO_CONFIG)
    build_image(work / "layout", "plain")
    return work / "layout"


def test_an_app_runs_its_program_as_init(
    private: ImageStore, client: IncusClient, instances: list[str], layout: Path
) -> None:
    source = IncusImages(client, private).source(spec(f"oci:{layout}:echo", "app"))
    assert source.shell == "/bin/sh"  # the image's own
    assert source.config["environment.GREETING"] == "hello"
    name = create(client, instances, source)
    wait_status(client, name, "Stopped")
    assert read(client, name, APP_EXIT) == b"3\n"
    assert read(client, name, APP_LOG) == b"out hello from /srv as nobody\nerr\n"
    # a second run: the exit recorded again, the output appended
    client.call("PUT", f"/1.0/instances/{name}/state", json={"action": "start"}, timeout=60)
    wait_status(client, name, "Stopped")
    assert read(client, name, APP_LOG) == b"out hello from /srv as nobody\nerr\n" * 2
    assert read(client, name, APP_EXIT) == b"3\n"


def test_an_app_gets_its_command_env_loopback_and_stop_signal(
    private: ImageStore, client: IncusClient, instances: list[str], layout: Path
) -> None:
    images = IncusImages(client, private)
    words = ["sh", "-c", 'echo "$1|$2|$ADDED"; cat /sys/class/net/lo/operstate; exec sleep 300']
    command = [*words, "sh", "two words 'quoted' \"too\"", ""]
    app = spec(f"oci:{layout}:plain", "app", command=command, env={"ADDED": "x y"})
    name = create(client, instances, images.source(app))
    deadline = time.monotonic() + 30
    while b"unknown" not in read_soon(client, name, APP_LOG):
        assert time.monotonic() < deadline, read_soon(client, name, APP_LOG)
        time.sleep(0.05)
    assert read(client, name, APP_LOG) == b"two words 'quoted' \"too\"||x y\nunknown\n"
    started = time.monotonic()
    client.call(
        "PUT", f"/1.0/instances/{name}/state", json={"action": "stop", "timeout": 20}, timeout=60
    )
    assert time.monotonic() - started < 10  # the program got the stop signal, as SIGTERM
    assert read(client, name, APP_EXIT) == b"143\n"


def test_app_mistakes(private: ImageStore, client: IncusClient, layout: Path) -> None:
    images = IncusImages(client, private)
    with pytest.raises(InstanceStartError, match="names no program"):
        images.source(spec(f"oci:{layout}:plain", "app"))
    with pytest.raises(InstanceStartError, match="has no program 'curl'"):
        images.source(spec(f"oci:{layout}:plain", "app", command=["curl"]))
    with pytest.raises(ConfigError):
        images.source(spec("busybox", "app"))


def test_an_app_image_without_sh_gets_the_launchers(
    private: ImageStore, client: IncusClient, instances: list[str], scratch_cache: Path
) -> None:
    # an image of one static program and no /bin/sh, as distroless images are
    rootfs = scratch_cache / "bare"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "echo").write_bytes(Path("/bin/busybox").read_bytes())  # busybox's echo
    (rootfs / "echo").chmod(0o755)
    image_of_rootfs(scratch_cache / "bare-layout", "bare", rootfs, ["--config.cmd=/echo"])
    app = spec(f"oci:{scratch_cache / 'bare-layout'}:bare", "app", command=["/echo", "hi"])
    source = IncusImages(client, private).source(app)
    assert source.shell == APP_SHELL
    name = create(client, instances, source)
    wait_status(client, name, "Stopped")
    assert read(client, name, APP_LOG) == b"hi\n"
    assert read(client, name, APP_EXIT) == b"0\n"


def test_images_from_a_simplestreams_server(
    scratch_cache: Path, client: IncusClient, instances: list[str]
) -> None:
    distro = f"ptiim{secrets.token_hex(3)}"
    build_tree(scratch_cache / "tree", [make_image(scratch_cache / "work", os=distro, release="1")])
    with ImageServer(scratch_cache / "tree") as server:
        settings = Settings(cache_dir=scratch_cache, image_server=server.url)
        images = IncusImages(client, ImageStore(settings))
        source = images.source(spec(f"images:{distro}/1"))
        fingerprint = source.source["fingerprint"]
        assert source.source == {
            "type": "image",
            "mode": "pull",
            "server": server.url,
            "protocol": "simplestreams",
            "fingerprint": fingerprint,
        }
        assert not (scratch_cache / "downloads").exists()  # nothing downloaded here
        try:
            name = create(client, instances, source)
            assert f"ID={distro}" in read(client, name, "/etc/os-release").decode()
            # the server fetched it, from loopback
            assert [path for _, path, _ in server.requests if path.startswith("/images/")]
        finally:
            delete_image(client, fingerprint)  # the server's cached copy (the instance's stays)


def test_vms_are_not_uploaded(settings: Settings, client: IncusClient) -> None:
    with pytest.raises(UnavailableError, match="VM images are not uploaded"):
        IncusImages(client, ImageStore(settings)).source(spec("debian/12", "vm"))


def test_an_upload_the_server_refuses_is_an_image_error(
    private: ImageStore, client: IncusClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a tarball whose metadata.yaml names no architecture: Incus refuses it
    monkeypatch.setattr(incus_images, "metadata_yaml", lambda *a: b"properties: {}\n")
    with pytest.raises(incus_images.ImageError, match="uploading image busybox") as caught:
        IncusImages(client, private).source(spec("busybox"))
    assert isinstance(caught.value.exc, ServerError)
