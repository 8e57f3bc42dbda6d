"""Preload, pinned models, the admin load/unload and the byte budget, with
real replica processes and real torch model files of different sizes
(``warm_apps:Sized``: a ``Linear(w, w)`` per model id).

One gateway, two deployments: ``Budget`` (one replica, a byte budget that
holds two mid-size models, the config's ``preload``) and ``Pinned`` (two
replicas, a pinned model, driven through ``/-/models``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apps.warm_apps import linear_bytes, write_sized
from gateway_harness import APPS, MODEL, running_gateway
from prometheus_text import only, parse_samples
from waiting import wait_until

from muxgate.gateway._app import GatewayASGI
from muxgate.gateway._config import parse_config
from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MID = 100  # 40,400 bytes
BUDGET = 2 * linear_bytes(MID) + linear_bytes(16)
WIDTHS = {
    "small": 16,
    "big": 400,  # 641,600 bytes: over the budget alone
    **{f"mid-{i}": MID for i in range(6)},
    **{f"p-{i}": 8 for i in range(8)},
}


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    root = tmp_path_factory.mktemp("sized")
    write_sized(root, WIDTHS)
    common = {"import_path": "warm_apps:Sized", "init_kwargs": {"model_root": str(root)}}
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                **common,
                "name": "Budget",
                "route_prefix": "/budget",
                "num_replicas": 1,
                "max_bytes_per_replica": BUDGET,
                "preload": ["small"],
            },
            {
                **common,
                "name": "Pinned",
                "route_prefix": "/pinned",
                "num_replicas": 2,
                "pinned": ["p-0"],
                "multiplexed_loader": "get_model",
                "max_bytes_per_replica": 3 * linear_bytes(8),
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def replicas_of(client: httpx.AsyncClient, deployment: str) -> list[dict[str, Any]]:
    r = await client.get("/-/replicas")
    assert r.status_code == 200
    replicas: list[dict[str, Any]] = r.json()["deployments"][deployment]["replicas"]
    return replicas


async def test_preload_then_the_byte_budget_bounds_resident_bytes(
    client: httpx.AsyncClient,
) -> None:
    (replica,) = await replicas_of(client, "Budget")
    assert replica["models"] == ["small"]  # loaded before the replica was ready
    for i in range(6):
        r = await client.post("/budget", headers={MODEL: f"mid-{i}"})
        assert r.status_code == 200, r.text
        assert r.json()["bytes"] == linear_bytes(MID)
        (replica,) = await replicas_of(client, "Budget")
        # two mid-size models and the small one fit; the next one evicts
        assert len(replica["models"]) <= 3

    async def bytes_reported() -> bool:
        (rep,) = await replicas_of(client, "Budget")
        return bool(rep["model_bytes"]) and rep["models"][-1] == "mid-5"

    await wait_until(bytes_reported, within_s=10)
    (replica,) = await replicas_of(client, "Budget")
    assert replica["models"] == ["small", "mid-4", "mid-5"] or replica["models"] == [
        "mid-4",
        "mid-5",
    ]
    assert replica["model_bytes"] <= BUDGET
    samples = parse_samples((await client.get("/-/metrics")).text)
    (value,) = [
        v
        for labels, v in only(samples, "muxgate_replica_model_bytes").items()
        if ("deployment", "Budget") in labels
    ]
    assert 0 < value <= BUDGET


async def test_a_model_over_the_budget_fails_and_the_replica_serves_on(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/budget", headers={MODEL: "mid-0"})
    r = await client.post("/budget", headers={MODEL: "big"})
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "model_too_large"
    assert f"{linear_bytes(400)} bytes" in error["message"]
    assert f"max_bytes_per_replica={BUDGET}" in error["message"]
    (replica,) = await replicas_of(client, "Budget")
    assert "big" not in replica["models"]
    assert "mid-0" in replica["models"]  # the failed model cost nothing
    r = await client.post("/budget", headers={MODEL: "mid-0"})
    assert r.status_code == 200
    r = await client.post("/budget", headers={MODEL: "small"})
    assert r.status_code == 200


async def test_pinned_models_stay_and_the_admin_api_loads_on_the_home_replica(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    async def pins_reported() -> bool:
        reps = await replicas_of(client, "Pinned")
        return len(reps) == 2 and all(rep["pinned"] == ["p-0"] for rep in reps)

    await wait_until(pins_reported, within_s=10)
    home = gateway.pools["Pinned"].router.preference_list("p-5")
    r = await client.post("/-/models/Pinned/p-5/load?pin=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["replica"], body["loaded"], body["pinned"]) == (home[0], True, True)
    assert r.headers["x-muxgate-replica"] == home[0]
    reps = {rep["id"]: rep for rep in await replicas_of(client, "Pinned")}
    assert "p-5" in reps[home[0]]["models"]
    # requests for it go to where it was loaded, and hit
    for _ in range(3):
        r = await client.post("/pinned", headers={MODEL: "p-5"})
        assert r.headers["x-muxgate-replica"] == home[0]
    # the budget holds three models: traffic never evicts the two pinned ones
    for i in range(1, 5):
        assert (await client.post("/pinned", headers={MODEL: f"p-{i}"})).status_code == 200

    async def both_pins_reported() -> bool:
        reps = {rep["id"]: rep for rep in await replicas_of(client, "Pinned")}
        return set(reps[home[0]]["pinned"]) == {"p-0", "p-5"}

    await wait_until(both_pins_reported, within_s=10)
    reps = {rep["id"]: rep for rep in await replicas_of(client, "Pinned")}
    assert {"p-0", "p-5"} <= set(reps[home[0]]["models"])
    assert all(len(rep["models"]) <= 3 for rep in reps.values())

    r = await client.post("/-/models/Pinned/p-5/unload")
    assert r.status_code == 200, r.text
    assert r.json()["unloaded"] == {home[0]: True, home[1]: False}
    reps = {rep["id"]: rep for rep in await replicas_of(client, "Pinned")}
    assert "p-5" not in reps[home[0]]["models"]

    # an operator's unload has its own reason, in the events and the metric
    async def unload_reported() -> list[dict[str, Any]]:
        body = (await client.get("/-/replicas")).json()["deployments"]["Pinned"]
        return [e for e in body["events"] if e["kind"] == "unload" and e["model"] == "p-5"]

    (event,) = await wait_until(unload_reported, within_s=10)
    assert (event["replica"], event["reason"]) == (home[0], "admin")
    samples = parse_samples((await client.get("/-/metrics")).text)
    unloads = only(samples, "muxgate_model_unloads_total")
    assert unloads[(("deployment", "Pinned"), ("reason", "admin"))] == 1


async def test_admin_model_control_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/-/models/Nope/x/load")
    assert r.status_code == 404
    r = await client.post("/-/models/Pined/x/load")  # a slip: the closest name
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "no deployment named 'Pined'; did you mean 'Pinned'?"
    r = await client.post("/-/models/Pinned/p-1/reload")
    assert r.status_code == 404
    r = await client.post("/-/models/Pinned/missing-model/load")
    assert r.status_code == 500, r.text  # the loader's own error, as for a request
    assert r.json()["error"]["code"] == "user_error"
    assert "/tmp" not in r.json()["error"]["message"]
    r = await client.post("/-/models/Budget/big/load")
    assert r.status_code == 507
    assert r.json()["error"]["code"] == "model_too_large"
    # the ingress's model id rule: printable ASCII, no whitespace, at most 256
    for bad in ("a%20b", "caf%C3%A9", "x" * 257):
        r = await client.post(f"/-/models/Pinned/{bad}/load")
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["code"] == "bad_model_id"


async def test_model_control_needs_the_token_or_a_local_client(gateway: Gateway) -> None:
    app = GatewayASGI(gateway.config, gateway.pools, gateway.metrics)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        for action in ("load", "unload"):
            r = await c.post(f"/-/models/Pinned/p-1/{action}")
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
    with_token = parse_config(
        {
            "deployments": [{"name": "Pinned", "import_path": "warm_apps:Sized"}],
            "http": {"admin_token": "s3cret"},
        },
        base_dir=APPS,
    )
    app = GatewayASGI(with_token, {"Pinned": gateway.pools["Pinned"]}, gateway.metrics)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as c:
        assert (await c.post("/-/models/Pinned/p-1/load")).status_code == 401
        r = await c.post("/-/models/Pinned/p-1/load", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200, r.text
        assert r.json()["pinned"] is False


def test_config_validates_the_new_fields(tmp_path: Path) -> None:
    from muxgate.gateway._errors import ConfigError

    base = {"name": "D", "import_path": "warm_apps:Sized"}
    for bad in (
        {"max_bytes_per_replica": 0},
        {"preload": ["has space"]},
        {"pinned": [""]},
        {"multiplexed_loader": "not-a-name"},
    ):
        with pytest.raises(ConfigError):
            parse_config({"deployments": [{**base, **bad}]}, base_dir=APPS)


async def test_an_unknown_multiplexed_loader_fails_the_start_with_its_name(
    tmp_path: Path,
) -> None:
    from muxgate.gateway._serve import GatewayStartError

    write_sized(tmp_path, {"x": 8})
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "Misnamed",
                "import_path": "warm_apps:Sized",
                "init_kwargs": {"model_root": str(tmp_path)},
                "preload": ["x"],
                "multiplexed_loader": "load_model",
            }
        ],
    }
    with pytest.raises(GatewayStartError, match=r"Sized\.load_model is not a @multiplexed loader"):
        async with running_gateway(config, fail_fast=True):
            pass
