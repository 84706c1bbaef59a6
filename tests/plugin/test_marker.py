"""The instance marker: checked at collection, and lists parametrize with SPEC's ids."""

from __future__ import annotations

import pytest
from plugin_helpers import INNER_HEADER, InnerInstances


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ('kind="container", image="busybox", colour="red"', "unknown option colour='red'"),
        ('image="busybox", cpus="2"', "option cpus='2' has the wrong type"),
        ('image="busybox", privileged=1', "option privileged=1 has the wrong type"),
        ('kind="jail", image="busybox"', "unknown kind 'jail'"),
        (
            '"container", "busybox"',
            "keyword arguments only, got positional ('container', 'busybox')",
        ),
        (
            'image="busybox", kernel="/boot/vmlinuz"',
            "option kernel= does not apply to kind='container'",
        ),
        ('image="debian/99"', "unknown Debian release in image 'debian/99'"),
        (
            'image="nosuch/1"',
            "image 'nosuch/1' is not a name pytest-incus knows (busybox, debian/<release>",
        ),
        ('image="busybox", memory="1MiB"', "too little for a container: give at least 32MiB"),
        ('image="busybox", processes=0', "option processes=0 must be at least 1"),
        ('image="busybox", processes="many"', "option processes='many' has the wrong type"),
        (
            'kind="vm", image="debian/12", processes=64',
            "option processes= does not apply to kind='vm' (only to container, app)",
        ),
        ('image="busybox", network="my_net"', "option network='my_net' is not a network; give"),
        ('image="busybox", network=None', "option network=None has the wrong type"),
    ],
)
def test_bad_marker_stops_the_run_with_one_line(
    pytester: pytest.Pytester, args: list[str], marker: str, expected: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        def test_fine():
            pass

        @pytest.mark.instance({marker})
        def test_bad(instance):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1, result.stderr.str()
    assert errors[0].startswith("ERROR: test_bad_marker_stops_the_run_with_one_line.py::test_bad: ")
    assert expected in errors[0]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes()  # nothing ran, not even the good test


def test_bad_marker_also_stops_a_run_that_does_not_use_instance(
    pytester: pytest.Pytester, args: list[str]
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.instance(image="busybox", memory="lots")
        def test_bad():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *::test_bad: option memory='lots' is not a size*"])


@pytest.mark.parametrize("value", ["-5", "nan", "soon"])
def test_an_exec_timeout_ini_that_is_no_number_of_seconds_stops_the_run(
    pytester: pytest.Pytester, args: list[str], value: str
) -> None:
    pytester.makeini(f"[pytest]\nincus_exec_timeout = {value}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*incus_exec_timeout = *{value}* is not a number of seconds*"])


@pytest.mark.parametrize(
    ("ini", "said"),
    [
        ("incus_subnet = 10.250.0.1/16", "--incus-subnet='10.250.0.1/16' has host bits set"),
        ("incus_subnet = 127.0.0.0/8", "--incus-subnet='127.0.0.0/8' overlaps 127.0.0.0/8"),
        ("incus_default_network = my_net", "incus_default_network = 'my_net' is not a network"),
    ],
)
def test_a_bad_network_ini_value_stops_the_run(
    pytester: pytest.Pytester, args: list[str], ini: str, said: str
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {said}*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_network_settings_from_ini_and_command_line(
    pytester: pytest.Pytester, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nincus_subnet = 10.251.0.0/16\nincus_default_network = ci-net\n")
    pytester.makepyfile(
        """
        import os

        def test_settings(instance_factory):
            settings = instance_factory.settings
            assert settings.subnet == os.environ["EXPECTED_SUBNET"]
            assert settings.default_network == "ci-net"
        """
    )
    monkeypatch.setenv("EXPECTED_SUBNET", "10.251.0.0/16")
    pytester.runpytest_subprocess(*args, timeout=120).assert_outcomes(passed=1)
    # the option wins over the ini key; the subnet is written canonically
    monkeypatch.setenv("EXPECTED_SUBNET", "10.252.0.0/16")
    result = pytester.runpytest_subprocess(
        *args, "--incus-subnet=10.252.0.0/255.255.0.0", timeout=120
    )
    result.assert_outcomes(passed=1)


MATRIX = (
    INNER_HEADER
    + """
@pytest.mark.instance(kind=["container", "vm"], image=["debian/11", "debian/12"])
def test_matrix(instance):
    record(instance)
    assert instance.kind == "container" and instance.image == "debian/12"
    assert "bookworm" in instance.exec("cat /etc/os-release").stdout
"""
)


def test_lists_parametrize_with_spec_ids(pytester: pytest.Pytester, args: list[str]) -> None:
    pytester.makepyfile(test_matrix=MATRIX)
    result = pytester.runpytest_subprocess(*args, "--collect-only", "-q", timeout=120)
    assert result.ret == pytest.ExitCode.OK
    ids = [line for line in result.outlines if line.startswith("test_matrix.py::")]
    assert ids == [
        "test_matrix.py::test_matrix[container-debian-11]",
        "test_matrix.py::test_matrix[container-debian-12]",
        "test_matrix.py::test_matrix[vm-debian-11]",
        "test_matrix.py::test_matrix[vm-debian-12]",
    ]


def test_k_selects_by_id(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_matrix=MATRIX)
    result = pytester.runpytest_subprocess(*args, "-k", "container-debian-12", timeout=120)
    result.assert_outcomes(passed=1, deselected=3)
    assert len(inner_instances.names()) == 1


# Every kind runs on this host: a host that cannot run VMs is simulated by the inner run's
# conftest, which makes the VM runtime say why not (what a host without QEMU would say).
NO_VMS_HERE = """
from pytest_incus.runtimes.vm import VmRuntime

VmRuntime.unavailable = lambda self: "qemu-system-x86_64 is missing (simulated)"
"""


def test_kind_that_cannot_run_errors_at_setup(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_matrix=MATRIX)
    pytester.makeconftest(NO_VMS_HERE)
    result = pytester.runpytest_subprocess(*args, "-k", "debian-12", timeout=120)
    result.assert_outcomes(passed=1, errors=1, deselected=2)
    result.stdout.fnmatch_lines(["ERROR test_matrix.py::test_matrix[[]vm-debian-12[]] - *"])
    result.stdout.re_match_lines([r".*UnavailableError: cannot launch kind='vm' here: .*missing"])


def test_kind_that_cannot_run_is_skipped_on_request(
    pytester: pytest.Pytester, args: list[str], inner_instances: InnerInstances
) -> None:
    pytester.makepyfile(test_matrix=MATRIX)
    pytester.makeconftest(NO_VMS_HERE)
    result = pytester.runpytest_subprocess(
        *args, "-k", "debian-12", "--incus-skip-unavailable", "-rs", timeout=120
    )
    result.assert_outcomes(passed=1, skipped=1, deselected=2)
    result.stdout.fnmatch_lines(["SKIPPED *kind='vm' cannot run here: *missing (simulated)*"])
