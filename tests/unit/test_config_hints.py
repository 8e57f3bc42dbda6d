"""Config errors point the way: "did you mean" for unknown fields, Ray Serve's names."""

from __future__ import annotations

from typing import Any

import pytest

from muxgate.gateway._config import parse_config
from muxgate.gateway._errors import ConfigError


def _deployment(**fields: Any) -> dict[str, Any]:
    return {"deployments": [{"name": "M", "import_path": "m:M", **fields}]}


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value.reason


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            _deployment(max_ongoing_request=4),
            "Object contains unknown field `max_ongoing_request` - at `$.deployments[0]`:"
            " did you mean `max_ongoing_requests`?",
        ),
        (
            _deployment(autoscaling={"min_replica": 0}),
            "Object contains unknown field `min_replica` - at `$.deployments[0].autoscaling`:"
            " did you mean `min_replicas`?",
        ),
        (
            _deployment(routing={"balance": 2}),
            "Object contains unknown field `balance` - at `$.deployments[0].routing`:"
            " did you mean `balance_factor`?",
        ),
        (
            {**_deployment(), "htp": {"port": 1}},
            "Object contains unknown field `htp`: did you mean `http`?",
        ),
    ],
)
def test_an_unknown_field_gets_the_nearest_known_name(data: dict[str, Any], expected: str) -> None:
    assert _error(data) == expected


def test_an_unknown_field_with_no_near_name_lists_the_known_ones() -> None:
    reason = _error(_deployment(zzzz=1))
    assert reason.startswith("Object contains unknown field `zzzz` - at `$.deployments[0]`;")
    assert "known fields: name, import_path, init_kwargs" in reason


def test_rays_autoscaling_config_is_taken_as_autoscaling() -> None:
    data = _deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 3})
    config = parse_config(data)
    scaling = config.deployments[0].autoscaling
    assert scaling is not None and (scaling.min_replicas, scaling.max_replicas) == (0, 3)
    # the caller's data is left as it was
    assert "autoscaling_config" in data["deployments"][0]
    # its inner fields are checked like ours
    assert "did you mean `max_replicas`" in _error(
        _deployment(autoscaling_config={"max_replica": 3})
    )


def test_both_names_at_once_is_refused() -> None:
    assert _error(_deployment(autoscaling={}, autoscaling_config={})) == (
        "`autoscaling_config` (Ray Serve's name) and `autoscaling` are the same field;"
        " give only `autoscaling` - at `$.deployments[0]`"
    )


@pytest.mark.parametrize("field", ["ray_actor_options", "user_config"])
def test_ray_fields_without_a_counterpart_say_what_to_do(field: str) -> None:
    reason = _error(_deployment(**{field: {}}))
    assert f"`{field}` is a Ray Serve field; " in reason


@pytest.mark.parametrize(
    ("field", "hint"),
    [
        ("http_options", "its name here is `http:`"),
        ("grpc_options", "the gateway serves HTTP only"),
        ("logging_config", "`muxgate serve --log-level`"),
    ],
)
def test_rays_top_level_fields_say_what_to_do(field: str, hint: str) -> None:
    reason = _error({field: {}, "deployments": [{"name": "M", "import_path": "m:M"}]})
    assert reason.startswith(f"Object contains unknown field `{field}`: `{field}` is a Ray")
    assert hint in reason


@pytest.mark.parametrize(
    "field", ["graceful_shutdown_timeout_s", "health_check_period_s", "health_check_timeout_s"]
)
def test_rays_deployment_settings_without_a_field_here_say_what_to_do(field: str) -> None:
    reason = _error(_deployment(**{field: 5}))
    assert f"`{field}` is a Ray Serve field; " in reason


def test_rays_applications_list_points_to_deployments() -> None:
    reason = _error({"applications": [{"import_path": "m:app"}]})
    assert "muxgate lists `deployments:` at the top level" in reason


def test_rays_older_names_point_to_the_current_ones() -> None:
    assert _error(_deployment(max_concurrent_queries=4)).endswith(
        "`max_concurrent_queries` is a Ray Serve field; its current name, here too, is"
        " `max_ongoing_requests`"
    )
    reason = _error(_deployment(autoscaling={"target_num_ongoing_requests_per_replica": 2}))
    assert reason.endswith("is `target_ongoing_requests`")


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("nevr", ": did you mean `never`?"),
        ("Never", ": did you mean `never`?"),
        ("bounded-load", ": did you mean `bounded_load`?"),
        ("sometimes", "; expected one of: bounded_load, never, priced"),
    ],
)
def test_a_value_outside_a_fields_set_gets_the_nearest_allowed_one(value: str, hint: str) -> None:
    assert _error(_deployment(routing={"spill": value})) == (
        f"Invalid enum value '{value}' - at `$.deployments[0].routing.spill`{hint}"
    )


def test_every_spill_rule_is_accepted() -> None:
    for rule in ("priced", "bounded_load", "never"):
        assert (
            parse_config(_deployment(routing={"spill": rule})).deployments[0].routing.spill == rule
        )


def test_an_import_path_without_a_colon_says_the_form_wanted() -> None:
    reason = _error({"deployments": [{"name": "M", "import_path": "torch_mlp.Model"}]})
    assert reason.endswith(
        " - at `$.deployments[0].import_path`: expected `module:Class`, e.g."
        " `torch_mlp:Model` (a colon before the class)"
    )


def test_an_import_path_naming_a_file_says_the_module_name() -> None:
    reason = _error({"deployments": [{"name": "M", "import_path": "torch_mlp.py:Model"}]})
    assert reason == (
        "import_path names a module, not a file: torch_mlp:Model, not torch_mlp.py:Model"
        " - at `$.deployments[0]`"
    )
