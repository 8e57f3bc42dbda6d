"""The ``launcher`` sections: app-level default, per-deployment override,
and what a static launcher must be given."""

from __future__ import annotations

from typing import Any

import pytest

from muxgate.gateway._config import load_config, parse_config
from muxgate.gateway._errors import ConfigError


def config(own: dict[str, Any] | None = None, **top: Any) -> Any:
    """A one-deployment config; ``own``: the deployment's launcher section."""
    deployment: dict[str, Any] = {"name": "A", "import_path": "m:A"}
    if own is not None:
        deployment["launcher"] = own
    return parse_config({"deployments": [deployment], **top})


def test_local_is_the_default_and_a_deployment_overrides_the_app() -> None:
    plain = config()
    assert plain.launcher_for(plain.deployments[0]).kind == "local"
    static = {"kind": "static", "addresses": ["tcp:10.0.0.1:7100", "tcp:[::1]:7100"]}
    app_level = config(None, launcher=static)
    assert app_level.launcher_for(app_level.deployments[0]).addresses[0] == "tcp:10.0.0.1:7100"
    own = config({"kind": "local"}, launcher=static)
    assert own.launcher_for(own.deployments[0]).kind == "local"
    dns = config({"kind": "static", "dns": "replicas.muxgate.svc:7100", "resolve_interval_s": 5})
    assert dns.launcher_for(dns.deployments[0]).resolve_interval_s == 5


@pytest.mark.parametrize(
    ("launcher", "message"),
    [
        ({"kind": "static"}, "needs addresses or dns"),
        ({"kind": "static", "addresses": ["tcp:a:1"], "dns": "b:2"}, "needs addresses or dns"),
        ({"kind": "static", "addresses": ["unix:/x"]}, "is not tcp:HOST:PORT"),
        ({"kind": "static", "addresses": ["tcp:host"]}, "is not tcp:HOST:PORT"),
        ({"kind": "static", "dns": "no-port"}, "is not HOST:PORT"),
        ({"kind": "local", "addresses": ["tcp:a:1"]}, "takes no addresses"),
        ({"kind": "pods"}, "launcher.kind"),
        ({"kind": "static", "dns": "a:1", "resolve_interval_s": 0}, "resolve_interval_s"),
    ],
)
def test_bad_launcher_sections_are_config_errors(launcher: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(launcher)


def test_check_reports_an_unusable_cluster_secret(tmp_path: Any) -> None:
    from muxgate.gateway._check import check_config_file

    path = tmp_path / "app.yaml"
    path.write_text(
        "cluster: {secret_file: missing-secret}\n"
        "deployments:\n"
        "  - {name: A, import_path: 'm:A', launcher: {kind: static, addresses: ['tcp:h:1']}}\n"
    )
    report = check_config_file(path)
    assert (
        f"cluster: cannot read the cluster secret file {tmp_path}/missing-secret"
        in (report.problems[0])
    )


@pytest.mark.parametrize(
    "where",
    [
        "addresses: ['tcp:127.0.0.1:7100', 'tcp:10.0.0.7:7100']",
        "addresses: ['tcp:[::1]:7100', 'tcp:replica-host:7100']",
        "dns: 'replicas.muxgate.svc:7100'",
    ],
)
def test_replicas_on_other_hosts_need_the_secret_or_tls(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Before, the gateway took whatever answered there for a replica, and
    # sent it the clients' requests (a replica itself refuses to listen so).
    from muxgate.gateway._check import check_config_file
    from muxgate.gateway._remote import RemoteLaunchers
    from muxgate.replicas.contract import SECRET_ENV, ChannelError

    monkeypatch.delenv(SECRET_ENV, raising=False)
    path = tmp_path / "app.yaml"
    path.write_text(
        f"deployments:\n  - {{name: A, import_path: 'm:A', launcher: {{kind: static, {where}}}}}\n"
    )
    report = check_config_file(path)
    assert any("without the cluster secret or TLS" in p for p in report.problems), report
    with pytest.raises(ChannelError, match="refusing to connect to replicas at"):
        RemoteLaunchers(load_config(path))
    # with the secret, or only on this host, it is fine
    monkeypatch.setenv(SECRET_ENV, "0123456789abcdef0123")
    assert RemoteLaunchers(load_config(path)).launchers
    monkeypatch.delenv(SECRET_ENV)
    local = "addresses: ['tcp:127.0.0.1:7100', 'tcp:localhost:7101', 'tcp:[::1]:7102']"
    path.write_text(
        f"deployments:\n  - {{name: A, import_path: 'm:A', launcher: {{kind: static, {local}}}}}\n"
    )
    assert RemoteLaunchers(load_config(path)).launchers


def test_a_ray_launcher_takes_an_address_a_namespace_and_a_lease_period_only() -> None:
    ray = config({"kind": "ray", "address": "10.0.0.5:6379", "namespace": "shop", "lease_s": 4})
    settings = ray.launcher_for(ray.deployments[0])
    assert (settings.kind, settings.address, settings.namespace, settings.lease_s) == (
        "ray",
        "10.0.0.5:6379",
        "shop",
        4,
    )
    assert config({"kind": "ray"}).launcher.lease_s is None  # the launcher's default, 10 s
    with pytest.raises(ConfigError, match="takes no addresses"):
        config({"kind": "ray", "addresses": ["tcp:10.0.0.1:7100"]})
    with pytest.raises(ConfigError, match="takes no address, namespace or lease_s"):
        config({"kind": "local", "namespace": "shop"})
    with pytest.raises(ConfigError, match="takes no address, namespace or lease_s"):
        config({"kind": "static", "addresses": ["tcp:h:1"], "lease_s": 5})
    with pytest.raises(ConfigError, match="lease_s"):
        config({"kind": "ray", "lease_s": 0.1})
    with pytest.raises(ConfigError):
        config({"kind": "ray", "namespace": "no spaces"})


def test_check_connects_to_no_ray_cluster(tmp_path: Any) -> None:
    from muxgate.gateway._check import check_config_file

    path = tmp_path / "app.yaml"
    path.write_text(
        "deployments:\n"
        "  - name: A\n"
        "    import_path: 'm:A'\n"
        "    launcher: {kind: ray, address: '127.0.0.1:1', namespace: shop}\n"
    )
    # Nothing listens at that address: a check that connected would fail on it.
    report = check_config_file(path)
    assert not [p for p in report.problems if "Ray" in p or "cluster" in p], report.problems
