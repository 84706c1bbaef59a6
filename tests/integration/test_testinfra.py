"""testinfra's modules on real instances through ``instance.testinfra``: a Debian 12 system
container and a Debian 12 VM (one launch each, the checks grouped by module), and a busybox
container (no systemd, no Python, busybox's own tools).

The Debian instances are of a derived image with procps (``ps``, ``sysctl``) and iproute2
(``ss``), which testinfra's process, sysctl and socket modules run; the minimal image has
neither.
"""

from __future__ import annotations

import hashlib

import pytest
from testinfra.host import Host

from pytest_incus import Instance
from pytest_incus.testinfra_host import host_for

PORT = 8123
# a listener on every address that accepts and closes connections, with the Python the
# minimal image has (python3-minimal: socket, no http.server); one line, as testinfra's
# service().systemd_properties reads ExecStart one line per property
LISTENER = (
    f"import socket; server = socket.create_server(('0.0.0.0', {PORT})); "
    "[server.accept()[0].close() for _ in iter(int, 1)]"
)
# bytes that are not UTF-8, a NUL, and text that is, for file().content
DATA = bytes(range(256)) + "café\n".encode()


@pytest.mark.instance(
    kind=["container", "vm"],
    image="debian/12",
    packages=["procps", "iproute2"],
    network="bridged",
    memory="1GiB",
)
def test_testinfra_modules_on_debian(instance: Instance) -> None:
    host = instance.testinfra
    assert instance.testinfra is host  # one host per instance
    assert host.backend.get_hostname() == instance.name
    assert host.backend.get_pytest_id() == f"incus://{instance.name}"
    assert host.system_info.distribution == "debian"
    assert host.system_info.release.startswith("12")

    check_command(host)
    check_package(host)
    check_user_and_group(host)
    check_file(instance, host)
    check_process_and_service(host)
    check_socket(instance, host)
    check_sysctl_and_mount_point(instance, host)
    check_users_of_commands(instance, host)


def check_command(host: Host) -> None:
    r = host.run("echo out; echo err >&2; exit 3")
    assert (r.rc, r.stdout, r.stderr, r.succeeded, r.failed) == (3, "out\n", "err\n", False, True)
    assert r.command == b"echo out; echo err >&2; exit 3"
    # arguments are quoted into the %s of the command, as testinfra does on every backend
    assert host.run("printf %s", "a b'; echo injected").stdout == "a b'; echo injected"
    assert host.check_output("echo %s", "hello  world") == "hello  world"
    assert host.run_expect([0, 3], "exit 3").rc == 3
    with pytest.raises(AssertionError, match="Unexpected exit code 1"):
        host.run_expect([0], "exit 1")
    with pytest.raises(AssertionError, match="Unexpected exit code 2"):
        host.check_output("echo partial; exit 2")
    missing = host.run("no-such-program-pti")
    assert missing.rc == 127 and "not found" in missing.stderr
    assert host.exists("sh") and not host.exists("no-such-program-pti")
    assert host.find_command("sysctl") in ("/usr/sbin/sysctl", "/sbin/sysctl")
    assert host.run("printf '\\377\\n'").stdout_bytes == b"\xff\n"


def check_package(host: Host) -> None:
    systemd = host.package("systemd")
    assert systemd.is_installed and systemd.version.startswith("252")
    assert host.package("procps").is_installed  # from the derived image
    assert not host.package("nginx").is_installed
    assert not host.package("no-such-package-pti").is_installed


def check_user_and_group(host: Host) -> None:
    root = host.user("root")
    assert (root.exists, root.uid, root.gid, root.group, root.home) == (True, 0, 0, "root", "/root")
    assert host.user().name == "root"  # who the commands run as
    www = host.user("www-data")
    assert (www.uid, www.gid, www.home, www.shell) == (33, 33, "/var/www", "/usr/sbin/nologin")
    assert not host.user("no-such-user-pti").exists

    host.run_expect([0], "useradd --create-home --groups users,www-data pti")
    pti = host.user("pti")
    assert pti.exists and pti.home == "/home/pti" and pti.group == "pti"
    assert set(pti.groups) == {"pti", "users", "www-data"}
    assert host.file("/home/pti").is_directory and host.file("/home/pti").user == "pti"

    assert host.group("www-data").exists and host.group("www-data").gid == 33
    assert host.group("nogroup").gid == 65534
    assert host.group("users").members == ["pti"]
    assert not host.group("no-such-group-pti").exists


def check_file(instance: Instance, host: Host) -> None:
    instance.write_file("/srv/pti/data.bin", DATA, mode=0o640)
    data = host.file("/srv/pti/data.bin")
    assert data.content == DATA  # exact bytes, NUL and invalid UTF-8 included
    assert data.size == len(DATA) and data.sha256sum == hashlib.sha256(DATA).hexdigest()
    assert data.exists and data.is_file and not data.is_directory and not data.is_symlink
    assert (data.mode, data.user, data.group, data.uid, data.gid) == (0o640, "root", "root", 0, 0)
    assert data.contains("café")

    host.run_expect([0], "chown www-data:nogroup /srv/pti/data.bin && chmod 4755 /srv/pti")
    assert (data.user, data.group) == ("www-data", "nogroup")
    directory = host.file("/srv/pti")
    assert directory.is_directory and not directory.is_file and directory.mode == 0o4755

    host.run_expect([0], "ln -s /srv/pti/data.bin /srv/pti/link")
    link = host.file("/srv/pti/link")
    assert link.is_symlink and link.linked_to == "/srv/pti/data.bin" and link.content == DATA
    assert sorted(directory.listdir()) == ["data.bin", "link"]

    instance.write_file("/srv/pti/text", "ünïcode\n")
    assert host.file("/srv/pti/text").content_string == "ünïcode\n"
    assert host.file("/etc/os-release").contains("bookworm")
    assert not host.file("/no/such/path-pti").exists


def check_process_and_service(host: Host) -> None:
    init = host.process.get(pid=1)
    assert init.comm == "systemd" and init.user == "root"
    journald = host.process.filter(comm="systemd-journal")  # comm is cut at 15 characters
    assert len(journald) == 1 and journald[0].args.startswith("/lib/systemd/systemd-journald")
    assert host.process.filter(comm="no-such-pti") == []

    service = host.service("systemd-journald")
    assert service.exists and service.is_running and service.is_enabled  # static: enabled
    target = host.service("remote-fs.target")
    assert target.is_enabled and target.is_running and not target.is_masked
    absent = host.service("pti-absent")
    assert not absent.exists and not absent.is_running


def check_socket(instance: Instance, host: Host) -> None:
    host.run_expect([0], "systemd-run --unit=pti-listener python3 -c %s", LISTENER)
    instance.wait_for_port(PORT)  # reached from the host, on the instance's address
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    assert not host.socket("tcp://0.0.0.0:8124").is_listening
    assert f"tcp://0.0.0.0:{PORT}" in host.socket.get_listening_sockets()
    listener = host.service("pti-listener")
    assert listener.is_running
    process = host.process.get(pid=int(listener.systemd_properties["MainPID"]))
    assert process.comm == "python3" and process.user == "root"
    assert process.args.startswith("/usr/bin/python3 -c import socket")

    host.run_expect([0], "systemctl stop pti-listener")
    assert not listener.is_running
    assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening


def check_sysctl_and_mount_point(instance: Instance, host: Host) -> None:
    assert host.sysctl("kernel.ostype") == "Linux"
    assert host.sysctl("kernel.osrelease") == host.check_output("uname -r")
    assert host.sysctl("kernel.pid_max") == int(host.file("/proc/sys/kernel/pid_max").content)

    root = host.mount_point("/")
    assert root.exists
    # the last mount on / is what the instance sees there: ext4 in a VM, a container's
    # overlay (local backend) or its storage pool's file system (Incus)
    seen = instance.exec(["awk", '$2 == "/" {fs = $3} END {print fs}', "/proc/mounts"])
    assert root.filesystem == seen.stdout.strip() != ""
    proc = host.mount_point("/proc")
    assert proc.exists and proc.filesystem == "proc"
    assert "/proc" in [point.path for point in host.mount_point.get_mountpoints()]
    assert not host.mount_point("/no/such/mount-pti").exists


def check_users_of_commands(instance: Instance, host: Host) -> None:
    # host.sudo(user) switches with su; as root (the default) it needs no password
    with host.sudo("www-data"):
        assert host.check_output("id -un") == "www-data"
        assert host.user().name == "www-data"
        with host.sudo():  # su from www-data asks for root's password: really www-data
            assert "Authentication failure" in host.run_expect([1], "id -un").stderr
    with host.sudo():
        assert host.check_output("id -un") == "root"
    assert host.check_output("id -un") == "root"

    nobody = host_for(instance, user="nobody")
    assert nobody.check_output("id -un") == "nobody" and nobody.user().name == "nobody"
    denied = nobody.run("cat /etc/shadow")
    assert denied.rc == 1 and "Permission denied" in denied.stderr


@pytest.mark.instance(kind="container", image="busybox")
def test_testinfra_on_busybox(instance: Instance) -> None:
    host = instance.testinfra
    assert host.check_output("echo %s", "busybox; echo no") == "busybox; echo no"
    r = host.run("echo err >&2; exit 5")
    assert (r.rc, r.stderr) == (5, "err\n")
    assert host.run("no-such-program-pti").rc == 127

    instance.write_file("/etc/pti.bin", DATA, mode=0o600)
    data = host.file("/etc/pti.bin")
    assert data.content == DATA and data.is_file and data.mode == 0o600
    assert data.user == "root" and data.size == len(DATA)
    assert host.file("/bin").is_directory
    assert host.file("/bin/sh").is_symlink and host.file("/bin/sh").linked_to == "/bin/busybox"
    assert host.mount_point("/proc").filesystem == "proc"
    with host.sudo("nobody"):  # busybox's su
        assert host.check_output("id -u") == "65534"
