"""Users and file permissions in a Debian 12 container."""

from __future__ import annotations

import pytest

from pytest_incus import Instance

pytestmark = pytest.mark.instance(image="debian/12")


def add_user(instance: Instance, name: str) -> int:
    """Create ``name`` with a home directory; returns its uid (as the container sees it)."""
    instance.exec(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    return int(instance.exec(["id", "-u", name], check=True).stdout)


def test_private_file_is_readable_by_its_owner_only(instance: Instance) -> None:
    alice = add_user(instance, "alice")
    add_user(instance, "bob")
    instance.write_file("/home/alice/secret.txt", "alice's secret\n", mode=0o600)
    instance.exec(["chown", "alice:alice", "/home/alice/secret.txt"], check=True)

    info = instance.file("/home/alice/secret.txt")
    assert info.is_file and info.mode == 0o600
    assert (info.uid, info.gid) == (alice, alice)

    mine = instance.exec(["cat", "/home/alice/secret.txt"], user="alice")
    assert mine.ok and mine.stdout == "alice's secret\n"

    theirs = instance.exec(["cat", "/home/alice/secret.txt"], user="bob")
    assert theirs.exit_code == 1 and "Permission denied" in theirs.stderr


def test_commands_run_as_the_user_in_their_home(instance: Instance) -> None:
    alice = add_user(instance, "alice")

    result = instance.exec("id -un; pwd; echo $HOME; touch made-by-me", user="alice", check=True)

    assert result.stdout.split() == ["alice", "/home/alice", "/home/alice"]
    assert instance.file("/home/alice/made-by-me").uid == alice
    # a uid works as well as a name; root may write where alice may not
    assert instance.exec(["touch", "/etc/nope"], user=alice).exit_code == 1
    assert instance.exec(["touch", "/etc/yes"]).ok


def test_setuid_program_keeps_its_bit(instance: Instance) -> None:
    # images of unprivileged containers are uid-shifted copies: setuid bits must survive that
    passwd = instance.file("/usr/bin/passwd")
    assert passwd.uid == 0 and passwd.mode & 0o4000
