"""The public surface: each package's ``__init__`` is its API (httpx's
tests/test_exported_members.py). Names in DESIGN.md must be importable as
spelled there; every exported name must exist and be documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

CONTRACT = {
    "muxgate.replicas": {
        "multiplexed",
        "get_multiplexed_model_id",
        "deployment",
        "Request",
        "Response",
        "get_deployment_handle",
        "DeploymentHandle",
        "HandleError",
    },
    "muxgate.backends": {
        "load_state_dict",
        "load_safetensors",
        "load_torchscript",
        "load_exported_program",
        "load_pickled_module",
        "join_model_url",
        "BackendError",
        "ModelNotFoundError",
        "ModelFormatError",
        "StorageUnavailableError",
        "StorageAccessDeniedError",
    },
    "muxgate.gateway": {"serve", "load_config", "AppConfig", "Router", "AutoscalingConfig"},
}


@pytest.mark.parametrize("package", sorted(CONTRACT))
def test_contract_names_are_exported(package: str) -> None:
    module = importlib.import_module(package)
    assert CONTRACT[package] <= set(module.__all__)


@pytest.mark.parametrize("package", sorted(CONTRACT))
def test_every_exported_name_exists_and_is_documented(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__), "keep __all__ sorted"
    for name in module.__all__:
        member = getattr(module, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__module__.startswith(package), f"{name} comes from {member.__module__}"
            assert inspect.getdoc(member), f"{package}.{name} has no docstring"
