"""``debian/<release>`` images: debootstrap minbase with systemd as init.

The source of ``debian/<number>`` and ``debian/<codename>`` names: containers get a minbase
with systemd, VMs a root filesystem of their own with the kernel and the agent's needs (see
images/vm.py, which makes the disk from it).
"""

from __future__ import annotations

from pathlib import Path

from pytest_incus.errors import ConfigError
from pytest_incus.images import debootstrap, vm
from pytest_incus.images.ref import DEBIAN_NUMBERS, DEBIAN_RELEASES, ImageRef
from pytest_incus.images.source import NOT_APP, Built, Context, Version, default_version

PACKAGES = ("systemd-sysv", "python3-minimal")
RECIPE = "2"  # bump when the build changes: cached entries of another recipe are rebuilt

# Units that cannot work in a container (kernel modules, kernel filesystems, consoles) and
# only slow down boot or, failing in an unprivileged container, make it "degraded".
_MASKED_UNITS = (
    "systemd-remount-fs.service",
    "systemd-journald-audit.socket",
    "getty-static.service",
    "console-getty.service",
    "systemd-networkd-wait-online.service",
    "systemd-modules-load.service",
    "modprobe@.service",
    "e2scrub_reap.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)


class DebianSource:
    """``debian/<release>``: built locally with debootstrap from the configured mirror."""

    name = "debian"

    def parse(self, image: str) -> ImageRef | None:
        """``debian/12`` or ``debian/bookworm``; ConfigError for a release it does not know."""
        if not image.startswith("debian/"):
            return None
        release = image.split("/", 1)[1]
        codename = DEBIAN_RELEASES.get(release, release)
        if codename not in DEBIAN_NUMBERS:
            known = ", ".join(f"debian/{n} (debian/{c})" for n, c in DEBIAN_RELEASES.items())
            raise ConfigError(f"unknown Debian release in image {image!r}; known: {known}")
        return ImageRef(image, self.name, f"debian-{codename}", release=codename)

    def problem(self, ref: ImageRef, form: str, context: Context) -> str | None:
        """Containers and VMs; no apps."""
        return NOT_APP if form == "app" else None

    def resolve(self, ref: ImageRef, form: str, context: Context) -> Version:
        """Always its own build; the recipe says which."""
        return default_version(ref, form, vm.ROOTFS_RECIPE if form == "vm-rootfs" else RECIPE)

    def build(self, ref: ImageRef, version: Version, rootfs: Path, context: Context) -> Built:
        """Debootstrap the release: a container's minbase, or a VM's root filesystem."""
        assert ref.release is not None
        mirror, progress = context.settings.mirror, context.progress
        if version.key == ref.vm_root_key:
            return Built(vm.build_rootfs(ref.release, rootfs, mirror, progress))
        debootstrap.run(ref.release, rootfs, mirror, PACKAGES, progress, what=ref.name)
        _tune(rootfs)
        return Built("systemd")


def _tune(rootfs: Path) -> None:
    """Make the rootfs boot quickly and cleanly as a container."""
    for unit in _MASKED_UNITS:
        link = rootfs / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (rootfs / "etc/hostname").write_text("debian\n")
    # apt's package lists and caches are not needed to run tests and make the image bigger
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*.deb"):
            entry.unlink()
