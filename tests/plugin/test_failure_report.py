"""The report of a failed test explains what happened in each instance it used."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances

SERVICE_MODULE = (
    INNER_HEADER
    + """
UNIT = '''[Unit]
Description=Broken on purpose
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo cannot open /etc/broken-4f1d.conf >&2; exit 3'
'''

@pytest.mark.instance(kind="container", image="debian/12")
def test_service_starts(instance):
    record(instance)
    instance.write_file("/etc/systemd/system/broken.service", UNIT)
    instance.exec("systemctl daemon-reload", check=True)
    started = instance.exec("systemctl start broken.service")
    assert started.ok, "broken.service did not start"

@pytest.mark.instance(kind="container", image="busybox")
def test_passes(instance):
    record(instance)
    assert instance.exec("true").ok
"""
)

SECTIONS_HOOK = """
def pytest_incus_failure_sections(instance):
    status = instance.exec("systemctl status broken.service --no-pager")
    return [("systemctl status broken", status.stdout)]
"""

VM_MODULE = (
    INNER_HEADER
    + """
@pytest.mark.instance(kind="vm", image="debian/12")
def test_module_loads(instance):
    record(instance)
    loaded = instance.exec(["modprobe", "no_such_module_4f1d"])
    assert loaded.ok, "the module did not load"
"""
)

TRACEBACK_MODULE = """
import pytest

@pytest.mark.instance(kind="container", image="busybox")
def test_checked(instance):
    instance.exec("echo oops >&2; exit 4", check=True)

@pytest.mark.instance(kind="container", image="busybox")
def test_missing(instance):
    instance.read_file("/no/such/file")
"""


def section(output: str, title: str) -> str:
    """The body of the report section whose header line names ``title``."""
    match = re.search(
        rf"^-+ {re.escape(title)} -+$\n(.*?)(?=^-+ .* -+$|^=+|\Z)", output, re.M | re.S
    )
    assert match, f"no section {title!r} in:\n{output}"
    return match.group(1)


def test_a_failed_container_test_shows_commands_units_journal_and_console(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_service=SERVICE_MODULE)
    pytester.makeconftest(SECTIONS_HOOK)
    result = pytester.runpytest_subprocess(*args, "--junitxml=junit.xml", timeout=300)
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    names = inner_instances.names()
    assert len(names) == 2
    failed = next(n for n in names if f"pytest-incus: container {n}" in output)
    passed = next(n for n in names if n != failed)
    assert passed not in output  # the passing test's instance gets no section

    body = section(output, f"pytest-incus: container {failed}")
    assert f"container {failed}, image debian/12: running" in body
    assert re.search(r"exit 0 +\d+\.\d{3} s  systemctl daemon-reload", body), body
    assert re.search(r"exit 1 +\d+\.\d{3} s  systemctl start broken.service", body), body
    assert re.search(r"failed units \(systemctl --failed\):\n  broken.service +loaded failed", body)
    unit_journal = body.split("journal of broken.service")[1].split("journal (last")[0]
    assert "cannot open /etc/broken-4f1d.conf" in unit_journal, body
    console = body.split("console log (last 25 lines):\n")[1].strip("\n").splitlines()
    assert console and all(line.strip() for line in console), body  # no blank lines
    assert "kernel log" not in body  # a container's kernel is the host's

    hooked = section(output, f"{failed}: systemctl status broken")
    assert "broken.service - Broken on purpose" in hooked

    cases = {c.get("name"): c for c in ET.parse(pytester.path / "junit.xml").iter("testcase")}
    for test, name, image in (
        ("test_service_starts", failed, "debian/12"),
        ("test_passes", passed, "busybox"),
    ):
        properties = [(p.get("name"), p.get("value")) for p in cases[test].iter("property")]
        assert properties == [("incus_instance", name), ("incus_image", image)]


def test_a_failed_vm_test_shows_the_failing_command_and_the_kernel_log(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_vm=VM_MODULE)
    result = pytester.runpytest_subprocess(*args, timeout=600)
    result.assert_outcomes(failed=1)
    (name,) = inner_instances.names()
    body = section(result.stdout.str(), f"pytest-incus: vm {name}")
    assert re.search(r"exit 1 +\d+\.\d{3} s  modprobe no_such_module_4f1d", body), body
    kernel = body.split("kernel log (dmesg, last 25 lines):\n")[1].split("\n\n")[0]
    assert re.search(r"^  \[ *\d+\.\d+\] ", kernel, re.M), body  # the guest kernel's lines
    console = body.split("console log (last 25 lines):\n")[1]
    assert console.strip() and console.strip() != "(empty)", body
    assert "failed units (systemctl --failed):" in body  # systemd runs in the guest


def test_the_traceback_shows_the_users_line_not_the_plugins(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_tb=TRACEBACK_MODULE)
    result = pytester.runpytest_subprocess(*args, timeout=180)
    result.assert_outcomes(failed=2)
    output = result.stdout.str()
    assert '>       instance.exec("echo oops >&2; exit 4", check=True)' in output
    assert "ExecError: 'echo oops >&2; exit 4' in" in output and "exited with 4" in output
    assert '>       instance.read_file("/no/such/file")' in output
    assert "FileNotFoundError" in output
    plugin_frames = [line for line in output.splitlines() if "pytest_incus/" in line]
    assert plugin_frames == [], output
