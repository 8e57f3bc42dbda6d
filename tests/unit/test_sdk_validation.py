"""Argument validation of the SDK decorators: exact exception types and messages."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from muxgate.replicas._deployment import (
    DeploymentOptions,
    deployment,
    get_deployment_options,
    is_deployment,
)
from muxgate.replicas._multiplex import multiplexed


async def load(model_id: str) -> str:
    return model_id


class NotALoader:
    pass


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (NotALoader, "@multiplexed decorates a function or method, not a class (NotALoader)."),
        (
            42,  # @multiplexed(42)
            "@multiplexed decorates a function or method, not int (its options are keywords:"
            " @multiplexed(max_num_models_per_replica=3)).",
        ),
        ("load", "@multiplexed decorates a function or method, not str."),
    ],
)
def test_multiplexed_refuses_what_is_not_a_loader(target: Any, message: str) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        multiplexed(target)


def test_multiplexed_names_the_option_meant() -> None:
    with pytest.raises(TypeError) as raised:
        multiplexed(max_num_models=3)  # type: ignore[call-overload]
    assert str(raised.value) == (
        "@multiplexed() got an unexpected keyword argument 'max_num_models':"
        " did you mean 'max_num_models_per_replica'?"
    )
    with pytest.raises(TypeError) as raised:
        multiplexed(cache=3)  # type: ignore[call-overload]
    assert str(raised.value).startswith(
        "@multiplexed() got an unexpected keyword argument 'cache': it takes"
        " max_num_models_per_replica, max_concurrent_loads,"
    )


def no_model_id(name: str) -> str:
    return name


def extra_argument(self: object, model_id: str, version: int) -> str:
    return model_id


def test_multiplexed_requires_a_model_id_argument() -> None:
    with pytest.raises(
        TypeError,
        match=re.escape(
            "no_model_id must take a single 'model_id' argument (after 'self' for a method), "
            "got (name)."
        ),
    ):
        multiplexed(no_model_id)
    with pytest.raises(TypeError, match=re.escape("got (self, model_id, version).")):
        multiplexed(max_num_models_per_replica=2)(extra_argument)


def keyword_only(*, model_id: str) -> str:
    return model_id


def method_keyword_only(self: object, *, model_id: str) -> str:
    return model_id


def var_positional(*model_id: str) -> str:
    return model_id[0]


def var_keyword(**model_id: str) -> str:
    return ""


@pytest.mark.parametrize(
    ("loader", "shown"),
    [
        (keyword_only, "*, model_id"),
        (method_keyword_only, "self, *, model_id"),
        (var_positional, "*model_id"),
        (var_keyword, "**model_id"),
    ],
)
def test_multiplexed_refuses_a_model_id_it_cannot_pass_positionally(
    loader: Any, shown: str
) -> None:
    # The id is passed positionally: refused here, not at the first load.
    expected = f"must take a single 'model_id' argument.*got \\({re.escape(shown)}\\)\\.$"
    with pytest.raises(TypeError, match=expected):
        multiplexed(loader)


@pytest.mark.parametrize(
    ("limit", "error", "message"),
    [
        (True, TypeError, "max_num_models_per_replica must be an int, got bool."),
        (2.0, TypeError, "max_num_models_per_replica must be an int, got float."),
        ("3", TypeError, "max_num_models_per_replica must be an int, got str."),
        (None, TypeError, "max_num_models_per_replica must be an int, got NoneType."),
        (0, ValueError, "max_num_models_per_replica must be -1 (no limit) or at least 1, got 0."),
        (-2, ValueError, "max_num_models_per_replica must be -1 (no limit) or at least 1, got -2."),
    ],
)
def test_multiplexed_validates_the_limit(limit: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        multiplexed(max_num_models_per_replica=limit)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        multiplexed(load, max_num_models_per_replica=limit)


def test_multiplexed_accepts_its_valid_forms() -> None:
    for limit in (-1, 1, 3, 1000):
        assert callable(multiplexed(load, max_num_models_per_replica=limit))
    assert callable(multiplexed(load))
    assert callable(multiplexed()(load))
    with pytest.raises(ValueError, match=r"^max_concurrent_loads must be at least 1, got 0\.$"):
        multiplexed(max_concurrent_loads=0)
    with pytest.raises(TypeError, match=r"^max_concurrent_loads must be an int, got bool\.$"):
        multiplexed(max_concurrent_loads=False)


@pytest.mark.anyio
async def test_the_model_id_must_be_a_non_empty_str() -> None:
    get = multiplexed(load)
    with pytest.raises(ValueError, match=r"^The model ID cannot be empty\.$"):
        await get("")
    with pytest.raises(TypeError, match=r"^The model ID must be a str, got int\.$"):
        await get(1)
    from muxgate.replicas import get_multiplexed_model_id

    with pytest.raises(TypeError) as raised:  # the parentheses left out
        await get(get_multiplexed_model_id)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "The model ID must be a str, got function (call it: get_multiplexed_model_id())."
    )


# -- deployment ------------------------------------------------------------------------------


def test_deployment_bare_and_with_options_returns_the_same_class() -> None:
    @deployment
    class Bare:
        pass

    class Configured:
        pass

    assert deployment(name="Custom", max_ongoing_requests=2, num_replicas=3)(Configured) is (
        Configured
    )
    assert get_deployment_options(Bare) == DeploymentOptions(name="Bare")
    options = get_deployment_options(Configured)
    assert options.name == "Custom"
    assert options.max_ongoing_requests == 2
    assert options.num_replicas == 3
    assert options.max_queued_requests == 1000
    assert options.graceful_shutdown_timeout_s == math.inf  # the gateway's request timeout
    assert is_deployment(Bare) and is_deployment(Configured)


def test_options_are_the_class_own_not_inherited() -> None:
    @deployment(name="Base", max_ongoing_requests=4)
    class Base:
        pass

    class Plain(Base):
        pass

    assert get_deployment_options(Plain) == DeploymentOptions(name="Plain")
    assert not is_deployment(Plain)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": ""}, ValueError, "name must be a non-empty str, got ''."),
        ({"name": 3}, TypeError, "name must be a non-empty str, got 3."),
        (
            {"max_ongoing_requests": 0},
            ValueError,
            "max_ongoing_requests must be at least 1, got 0.",
        ),
        (
            {"max_ongoing_requests": True},
            TypeError,
            "max_ongoing_requests must be an int, got bool.",
        ),
        (
            {"max_queued_requests": 0},
            ValueError,
            "max_queued_requests must be at least 1 or -1 (no limit), got 0.",
        ),
        ({"num_replicas": -1}, ValueError, "num_replicas must be at least 0, got -1."),
        (
            {"graceful_shutdown_timeout_s": "5"},
            TypeError,
            "graceful_shutdown_timeout_s must be a number, got str.",
        ),
        (
            {"graceful_shutdown_timeout_s": -1.0},
            ValueError,
            "graceful_shutdown_timeout_s must be >= 0, got -1.0.",
        ),
    ],
)
def test_deployment_validates_its_options(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        deployment(**kwargs)


@pytest.mark.parametrize(
    ("option", "where"),
    [
        ("autoscaling_config", "set `autoscaling:` for the deployment in the app config."),
        ("ray_actor_options", "replicas are local processes: give `num_cpus=` here."),
        (
            "max_replica",
            "it takes name, max_ongoing_requests, max_queued_requests, num_replicas,"
            " graceful_shutdown_timeout_s and num_cpus; the rest is set in the app config.",
        ),
    ],
)
def test_deployment_says_where_an_option_it_does_not_take_goes(option: str, where: str) -> None:
    """Ray Serve's ``@serve.deployment(autoscaling_config=...)`` and the like."""
    with pytest.raises(TypeError) as raised:
        deployment(**{option: {}})
    assert str(raised.value) == (
        f"@deployment() got an unexpected keyword argument {option!r}: {where}"
    )


def test_deployment_decorates_classes_only() -> None:
    with pytest.raises(
        TypeError,
        match=re.escape(
            "@deployment decorates a class, not function (function deployments are not supported)."
        ),
    ):
        deployment(load)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"^Expected a class, got function\.$"):
        get_deployment_options(load)  # type: ignore[arg-type]
    assert deployment(max_queued_requests=-1)(NotALoader) is NotALoader
    assert get_deployment_options(NotALoader).max_queued_requests == -1
