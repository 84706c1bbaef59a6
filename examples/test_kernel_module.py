"""A kernel module tested the way a kernel developer would: built on the host against the
headers of exactly the kernel that the VM image boots, then loaded in a fresh VM.

The VM image records its kernel release (``image_store.get(..., kind="vm").kernel_release``);
``make demo`` installs ``linux-headers-<that release>`` on the host (scripts/kernel-headers.sh).
The VM boots with ``init="agent"``: straight into the guest agent, no systemd, the fastest start.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_incus import Instance

HELLO_C = r"""
#include <linux/init.h>
#include <linux/module.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pytest-incus example module");

static int __init hello_init(void)
{
	pr_info("pytest-incus hello: loaded\n");
	return 0;
}

static void __exit hello_exit(void)
{
	pr_info("pytest-incus hello: unloaded\n");
}

module_init(hello_init);
module_exit(hello_exit);
"""


@pytest.fixture(scope="session")
def hello_ko(image_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hello.ko, built for the kernel release of the debian/12 VM image."""
    release = image_store.get("debian/12", kind="vm").kernel_release
    headers = Path(f"/lib/modules/{release}/build")
    if not headers.is_dir():
        pytest.fail(f"no headers for kernel {release}: apt-get install linux-headers-{release}")
    source = tmp_path_factory.mktemp("hello")
    (source / "hello.c").write_text(HELLO_C)
    (source / "Makefile").write_text("obj-m := hello.o\n")
    subprocess.run(
        ["make", "-C", str(headers), f"M={source}", "modules"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return source / "hello.ko"


@pytest.mark.instance(kind="vm", image="debian/12", init="agent")
def test_hello_module_loads_and_unloads(instance: Instance, hello_ko: Path) -> None:
    release = instance.exec(["uname", "-r"], check=True).stdout.strip()
    # built for exactly the kernel the VM runs: the module's vermagic starts with its release
    assert f"vermagic={release} ".encode() in hello_ko.read_bytes()

    instance.push(hello_ko, "/root/hello.ko")
    instance.exec(["insmod", "/root/hello.ko"], check=True)
    assert "pytest-incus hello: loaded" in instance.exec(["dmesg"]).stdout
    assert instance.exec("grep -q '^hello ' /proc/modules").ok

    instance.exec(["rmmod", "hello"], check=True)
    assert "pytest-incus hello: unloaded" in instance.exec(["dmesg"]).stdout
    assert not instance.exec("grep -q '^hello ' /proc/modules").ok
