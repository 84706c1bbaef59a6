"""``instance.testinfra`` without the extra: a ConfigError that says how to install it.

The integration tests (``tests/integration/test_testinfra.py``) run testinfra's modules on
real instances; what they cannot show is a host where pytest-testinfra is missing, which an
import that fails stands in for here.
"""

from __future__ import annotations

import sys

import pytest

from pytest_incus import ConfigError
from pytest_incus.testinfra_host import host_for


def test_a_missing_testinfra_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "testinfra.host", None)  # import testinfra.host fails
    with pytest.raises(ConfigError, match=r"pip install 'pytest-incus\[testinfra\]'") as info:
        host_for(None)  # type: ignore[arg-type]  # never reached: the import fails first
    assert isinstance(info.value.exc, ImportError)
