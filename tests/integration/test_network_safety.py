"""Nothing of an instance on our bridge leaves the host, also where the host forwards IPv4
(``net.ipv4.ip_forward=1``, as on any host with Docker), and the plugin's firewall table is what
guarantees it (issue 11, item 7).

Measured in network and mount namespaces of the test's own (``netns_forwarding.py`` run under
``unshare --net --mount``, where forwarding is turned on and an "outside" namespace with a UDP
listener sits behind a veth pair), so the host's own forwarding, interfaces, routes and
firewall are never changed: the test checks that they were not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_incus import network
from pytest_incus.network import links, services

SCRIPT = Path(__file__).with_name("netns_forwarding.py")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
DEADLINE = 180.0  # the script takes about 12 s


def sys_mounts() -> list[str]:
    """This (the host's) mount namespace's mounts at and below /sys."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sorted(line for line in lines if f"{line.split()[4]}/".startswith("/sys/"))


def run_unshared(cache: Path, work: Path) -> dict[str, Any]:
    """Run the experiment in namespaces of its own; its result."""
    argv = ["unshare", "--net", "--mount", sys.executable, str(SCRIPT), str(cache), str(work)]
    script = subprocess.Popen(
        [*argv, str(os.getpid())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = script.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        script.terminate()  # the script ends what it started on SIGTERM
        out, err = script.communicate(timeout=60)
        pytest.fail(f"the experiment took more than {DEADLINE}s; its stderr:\n{err}")
    assert script.returncode == 0, f"the experiment failed:\n{err}"
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_nothing_of_an_instance_is_forwarded_off_a_forwarding_host(
    scratch_cache: Path, tmp_path: Path
) -> None:
    if reason := network.unavailable():
        pytest.skip(reason)
    forwarding, mounts = IP_FORWARD.read_text(), sys_mounts()

    result = run_unshared(scratch_cache, tmp_path)

    said = json.dumps(result, indent=1)
    print(said)  # the measured figures, shown with -rP
    cases = result["cases"]
    # the namespace forwarded, and writing that left the host's setting alone
    assert result["inside_ip_forward"] == "1", said
    assert result["host_ip_forward_during"] == forwarding.strip(), said
    assert result["sysfs_devices"] == ["lo"], said  # its own devices, not the host's
    # as launched: no default route, so nothing can even be sent out of the network
    assert result["default_routes"] == [], said
    assert cases["case0"]["sent"] == 0 and cases["case0"]["received"] == 0, said
    assert "Network is unreachable" in cases["case0"]["sender"], said
    # as the plugin sets the bridge up, with a default route added inside: nothing arrives
    assert result["bridge_forwarding"] == "0" and result["table_made"], said
    assert cases["case1"]["sent"] > 0 and cases["case1"]["received"] == 0, said
    # the bridge forwarding too (a later global ip_forward=1 write): the table still holds
    assert cases["case2"]["sent"] > 0 and cases["case2"]["received"] == 0, said
    # the control: without the table the same datagrams do arrive
    assert cases["case3"]["received"] == cases["case3"]["sent"] > 0, said
    # and the bridge's own forwarding=0 holds them without the table
    assert cases["case4"]["sent"] > 0 and cases["case4"]["received"] == 0, said
    assert result["received_total"] == cases["case3"]["received"], said
    # the factory cleaned up after a deleted table, and left nothing in the namespace
    assert "close_error" not in result and result["leftovers"] == [], said

    # the host: forwarding, mounts, devices and firewall as they were
    assert IP_FORWARD.read_text() == forwarding
    assert sys_mounts() == mounts
    for device in (result["bridge"], *result["link"]):
        assert not links.exists(device), f"{device} is on the host"
    assert result["bridge"] not in services.firewall_tables()
