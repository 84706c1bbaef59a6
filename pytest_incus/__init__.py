"""pytest-incus: real system containers, app containers and VMs as pytest fixtures."""

from pytest_incus.errors import (
    AgentError,
    ConfigError,
    ExecError,
    ExecTimeoutError,
    ImageError,
    IncusError,
    InstanceStartError,
    NotRunningError,
    UnavailableError,
    UnknownUserError,
    WaitTimeoutError,
)
from pytest_incus.factory import InstanceFactory
from pytest_incus.images.store import Image, ImageStore
from pytest_incus.instance import FileInfo, Instance
from pytest_incus.settings import Settings
from pytest_incus.spec import InstanceSpec
from pytest_incus.values import (
    AccelMode,
    CommandRecord,
    ExecResult,
    InstanceState,
    Keep,
    Kind,
    VmInit,
)

__all__ = [
    "AccelMode",
    "AgentError",
    "CommandRecord",
    "ConfigError",
    "ExecError",
    "ExecResult",
    "ExecTimeoutError",
    "FileInfo",
    "Image",
    "ImageError",
    "ImageStore",
    "IncusError",
    "Instance",
    "InstanceFactory",
    "InstanceSpec",
    "InstanceStartError",
    "InstanceState",
    "Keep",
    "Kind",
    "NotRunningError",
    "Settings",
    "UnavailableError",
    "UnknownUserError",
    "VmInit",
    "WaitTimeoutError",
]
