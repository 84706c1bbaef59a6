"""``pytest --fixtures`` shows the plugin's three fixtures, documented, and nothing of its
plumbing."""

from __future__ import annotations

import re

import pytest


def test_fixtures_lists_the_three_public_fixtures_with_their_docstrings(
    pytester: pytest.Pytester, args: list[str]
) -> None:
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*args, "--fixtures", timeout=120)
    assert result.ret == 0
    output = result.stdout.str()
    ours = re.search(
        r"^-+ fixtures defined from pytest_incus\.\S+ -+$\n(.*?)(?=^-+ |^=+|\Z)",
        output,
        re.M | re.S,
    )
    assert ours, output
    listed = re.findall(r"^(\w+)(?: \[(\w+) scope\])? -- ", ours.group(1), re.M)
    assert sorted(listed) == [
        ("image_store", "session"),
        ("instance", ""),
        ("instance_factory", "session"),
    ], ours.group(1)
    for name in ("image_store", "instance_factory", "instance"):
        doc = re.search(rf"^{name}\b.* -- .*\n((?:    .*\n)+)", ours.group(1), re.M)
        assert doc and len(doc.group(1).split()) > 8, f"{name} has no docstring:\n{output}"
    assert "instance_target" not in output
    assert len(re.findall(r"fixtures defined from pytest_incus", output)) == 1
