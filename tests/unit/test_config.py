"""app.yaml / app.toml decoding and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from muxgate.gateway._config import AppConfig, load_config, parse_config
from muxgate.gateway._errors import ConfigError
from muxgate.gateway._policy import AutoscalingConfig

YAML = """
http: {host: 127.0.0.1, port: 8000}
deployments:
  - name: Model
    import_path: examples.torch_mlp:Model
    init_kwargs: {model_root: "file:///srv/models"}
    route_prefix: /
    max_ongoing_requests: 8
    max_queued_requests: 1000
    autoscaling:
      min_replicas: 0
      max_replicas: 8
      initial_replicas: 1
      target_ongoing_requests: 2
      upscale_delay_s: 2
      downscale_delay_s: 60
      downscale_to_zero_delay_s: 300
    routing: {balance_factor: 1.25, virtual_nodes: 64}
storage:
  s3: {endpoint_url: "http://127.0.0.1:9000"}
tracing: {exporter: otlp, endpoint: "http://127.0.0.1:4318"}
metrics: {per_model_labels: true}
"""


def dep(**over: Any) -> dict[str, Any]:
    return {"name": "M", "import_path": "pkg.mod:Cls", **over}


def error_of(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="app.yaml")
    return str(info.value)


def test_design_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(YAML)
    config = load_config(path)
    assert isinstance(config, AppConfig)
    (d,) = config.deployments
    assert d.name == "Model"
    assert isinstance(d.autoscaling, AutoscalingConfig)
    assert d.autoscaling.max_replicas == 8
    assert d.min_replicas == 0 and d.initial_replicas == 1
    assert d.routing.balance_factor == 1.25
    assert config.storage == {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert config.tracing.exporter == "otlp"
    assert config.metrics.per_model_labels is True
    assert config.app_dir == str(tmp_path)


def test_toml_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_text(
        '[http]\nport = 0\n[[deployments]]\nname = "M"\nimport_path = "a:B"\nnum_replicas = 2\n'
    )
    config = load_config(path)
    assert config.http.port == 0
    assert config.deployments[0].num_replicas == 2
    assert config.deployments[0].min_replicas == 2


def test_an_empty_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="the config is empty: it needs at least `deployments:`"):
        load_config(path)


def test_protocols_a_deployment_may_register_itself_are_not_typos() -> None:
    # The gateway never imports the deployment's code: names no one knows
    # here (fsspec plugins, the app's own) are taken as they are.
    for name in ("obs", "s3n", "ftps", "myproto", "r2"):
        config = parse_config({"deployments": [dep()], "storage": {name: {"key": "k"}}})
        assert name in config.storage


def test_defaults() -> None:
    config = parse_config({"deployments": [dep()]})
    d = config.deployments[0]
    # unset: the class's @deployment options apply (the replica reports them)
    assert (d.route_prefix, d.max_ongoing_requests, d.max_queued_requests) == ("/", None, None)
    assert d.num_replicas is None and d.initial_replicas == 1 and d.min_replicas == 1
    assert config.http.port == 8000 and config.http.admin_token is None
    assert config.tracing.exporter is None  # OTEL_TRACES_EXPORTER decides


def test_app_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("app_dir: src\ndeployments: [{name: M, import_path: 'a:B'}]\n")
    assert load_config(path).app_dir == str(tmp_path / "src")


@pytest.mark.parametrize(
    ("data", "where", "why"),
    [
        (
            {"deployments": [dep(max_ongoing_requests=0)]},
            "$.deployments[0].max_ongoing_requests",
            ">= 1",
        ),
        ({"deployments": [dep(import_path="no_colon")]}, "$.deployments[0].import_path", ""),
        ({"deployments": [dep(name="")]}, "$.deployments[0].name", ""),
        (
            {"deployments": [dep(num_replicas=1, autoscaling={})]},
            "$.deployments[0]",
            "mutually exclusive",
        ),
        ({"deployments": [dep(route_prefix="api")]}, "$.deployments[0]", "start with '/'"),
        ({"deployments": [dep(route_prefix="/api/")]}, "$.deployments[0]", "end with"),
        ({"deployments": [dep(route_prefix="/-/x")]}, "$.deployments[0]", "reserved"),
        (
            {"deployments": [dep(routing={"balance_factor": 1.0})]},
            "$.deployments[0].routing.balance_factor",
            "> 1.0",
        ),
        ({"deployments": [dep(), dep(route_prefix="/b")]}, "$.deployments[1].name", "twice"),
        ({"deployments": [dep(), dep(name="N")]}, "$.deployments[1].route_prefix", "twice"),
        ({"deployments": [dep(bogus=1)]}, "$.deployments[0]", "unknown field `bogus`"),
        ({"deployments": [dep()], "http": {"port": 70000}}, "$.http.port", "<= 65535"),
        (
            # a body must fit one message to a replica (1 GiB less 1 MiB)
            {"deployments": [dep()], "http": {"max_body_bytes": 1 << 30}},
            "$.http.max_body_bytes",
            "<= 1072693248",
        ),
        ({"deployments": [dep()], "tracing": {"exporter": "jaeger"}}, "$.tracing.exporter", ""),
        ({"deployments": []}, "$.deployments", "length >= 1"),
        ({}, "deployments", "missing"),
        (
            {"deployments": [dep(autoscaling={"min_replicas": 3, "max_replicas": 2})]},
            "$.deployments[0].autoscaling",
            "min_replicas",
        ),
        (
            {"deployments": [dep()], "storage": {"cache": {"max_bytes": "lots"}}},
            "storage.cache.max_bytes",
            "Expected `int`",
        ),
        (
            {"deployments": [dep()], "storage": {"retry": {"max_attempts": 0}}},
            "storage",
            "max_attempts must be >= 1",
        ),
        (
            {"deployments": [dep()], "storage": {"transfer": {"parts": 3}}},
            "storage.transfer",
            "unknown field `parts`",
        ),
        (
            {"deployments": [dep()], "storage": {"cache": {"max_byte": 3}}},
            "storage.cache",
            "unknown field `max_byte`: did you mean `max_bytes`?",
        ),
        (
            {"deployments": [dep()], "storage": {"cach": {"max_bytes": 3}}},
            "storage.cach",
            "neither a storage setting nor a known protocol: did you mean `cache`?",
        ),
        (
            {"deployments": [dep()], "storage": {"s4": {"endpoint_url": "http://x"}}},
            "storage.s4",
            "neither a storage setting nor a known protocol: did you mean `s3`?",
        ),
        (
            {"deployments": [dep()], "storage": {"gcz": {"token": "anon"}}},
            "storage.gcz",
            "neither a storage setting nor a known protocol: did you mean `gcs`?",
        ),
        (
            {"deployments": [dep()], "storage": {"retries": {"max_attempts": 3}}},
            "storage.retries",
            "did you mean `retry`?",
        ),
    ],
)
def test_invalid_configs_name_the_field(data: Any, where: str, why: str) -> None:
    message = error_of(data)
    assert message.startswith("app.yaml: ")
    assert where in message
    assert why in message


def test_unreadable_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments: [\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert info.value.path == str(bad)
    assert f'in "{bad}", line 2' in info.value.reason  # not "<byte string>"
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_cache_settings_per_deployment_reach_the_replica_spec() -> None:
    from muxgate.gateway._serve import make_spec

    config = parse_config(
        {"deployments": [dep(load_order="evict_first"), dep(name="N", route_prefix="/n")]}
    )
    first, second = config.deployments
    assert (first.load_order, first.eviction_policy) == ("evict_first", None)
    assert (second.load_order, second.eviction_policy) == (None, None)  # the loader's own
    spec = make_spec(config, first, "M#1")
    assert (spec.load_order, spec.eviction_policy) == ("evict_first", None)
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.load_order"):
        parse_config({"deployments": [dep(load_order="evict_later")]})
    tinylfu = parse_config({"deployments": [dep(eviction_policy="tinylfu")]}).deployments[0]
    assert make_spec(config, tinylfu, "M#2").eviction_policy == "tinylfu"
    assert (first.load_on_loop, spec.load_on_loop) == (None, None)  # the loader's own
    on_loop = parse_config({"deployments": [dep(load_on_loop=True)]}).deployments[0]
    assert make_spec(config, on_loop, "M#3").load_on_loop is True
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.load_on_loop"):
        parse_config({"deployments": [dep(load_on_loop="sometimes")]})
    assert (first.hits_wait_for_loads, spec.hits_wait_for_loads) == (True, True)
    beside = parse_config({"deployments": [dep(hits_wait_for_loads=False)]}).deployments[0]
    assert make_spec(config, beside, "M#4").hits_wait_for_loads is False
    assert (first.pin_cpus, spec.pin_cpus) == (False, False)
    pinning = parse_config({"deployments": [dep(pin_cpus=True)]}).deployments[0]
    assert make_spec(config, pinning, "M#5").pin_cpus is True
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.hits_wait_for_loads"):
        parse_config({"deployments": [dep(hits_wait_for_loads="sometimes")]})
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.eviction_policy"):
        parse_config({"deployments": [dep(eviction_policy="lfu")]})
