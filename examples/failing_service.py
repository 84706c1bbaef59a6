"""A test that fails on purpose, to show what the report of a failed test explains.

Not collected by ``pytest examples`` (its name does not start with ``test_``); run it alone:

    pytest examples/failing_service.py

The service's config lacks its port, so the service fails to start and the test's assertion
fails. The report then has a section for the container: the commands the test ran with their
exit codes, the failed unit and its journal (the service's own traceback), the journal's tail
and the console's; and the section that ``pytest_incus_failure_sections`` in
``examples/conftest.py`` adds (``systemctl status greeter``).
"""

from __future__ import annotations

import pytest
from test_service import install_greeter

from pytest_incus import Instance


@pytest.mark.instance(image="debian/12", packages=["iproute2", "procps"])
def test_greeter_starts(instance: Instance) -> None:
    install_greeter(instance, "hello")
    instance.write_file("/etc/default/greeter", 'GREETING="no port"\n')  # the mistake

    instance.exec("systemctl start greeter")

    assert instance.testinfra.service("greeter").is_running
