"""The gateway end to end: routing, model caches, errors (real replica processes).

One gateway with four deployments is shared by the whole module (replica
processes take a second or two to start).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
async def gateway(anyio_backend: str) -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0},
        "deployments": [
            # 2 replicas, one model per replica.
            {
                "name": "Sticky",
                "import_path": "gateway_apps:Echo1",
                "route_prefix": "/sticky",
                "num_replicas": 2,
            },
            {
                "name": "Lru",
                "import_path": "gateway_apps:Echo2",
                "route_prefix": "/lru",
                "num_replicas": 1,
            },
            {
                "name": "Spread",
                "import_path": "gateway_apps:Echo3",
                "route_prefix": "/spread",
                "num_replicas": 2,
                "max_ongoing_requests": 1,
            },
            {
                "name": "Decorated",
                "import_path": "gateway_apps:Decorated",
                "route_prefix": "/decorated",
            },
            {
                "name": "Nested",
                "import_path": "gateway_apps:Echo3",
                "route_prefix": "/sticky/deeper",
                "num_replicas": 1,
                "init_kwargs": {"greeting": "nested"},
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def replicas(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await client.get("/-/replicas")
    assert r.status_code == 200
    out: dict[str, Any] = r.json()["deployments"][name]
    return out


async def test_one_model_stays_on_one_replica(client: httpx.AsyncClient) -> None:
    served = set()
    for _ in range(20):
        r = await client.post("/sticky/predict", headers={MODEL: "m1"}, content=b"{}")
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "m1"
        served.add(r.headers["x-muxgate-replica"])
    assert len(served) == 1
    (replica_id,) = served
    assert replica_id.startswith("Sticky#")
    view = await replicas(client, "Sticky")
    holders = [rep["id"] for rep in view["replicas"] if "m1" in rep["models"]]
    assert holders == [replica_id]


async def test_lru_eviction_visible_in_admin(client: httpx.AsyncClient) -> None:
    for model in ("1", "2", "1", "3"):
        r = await client.get("/lru/", headers={MODEL: model})
        assert r.status_code == 200, r.text
    view = await replicas(client, "Lru")
    assert view["target_replicas"] == 1
    assert view["queued"] == 0
    (rep,) = view["replicas"]
    assert rep["models"] == ["1", "3"]  # least recently used first
    assert rep["loading"] == []
    assert rep["state"] == "running"
    assert rep["in_flight"] == rep["in_flight_total"] == 0
    assert isinstance(rep["pid"], int)
    assert rep["address"].startswith(("unix:", "tcp:"))
    assert set(rep) == {
        "id",
        "state",
        "pid",
        "address",
        "in_flight",
        "in_flight_total",
        "models",
        "loading",
        "rss_bytes",
        "model_bytes",
        "pinned",
    }
    assert rep["pinned"] == []


async def test_concurrent_requests_spill_to_second_replica(client: httpx.AsyncClient) -> None:
    async def slow() -> httpx.Response:
        return await client.get("/spread/slow", params={"s": "1"}, headers={MODEL: "hot"})

    first, second = await asyncio.gather(slow(), slow())
    assert first.status_code == second.status_code == 200
    assert first.headers["x-muxgate-replica"] != second.headers["x-muxgate-replica"]


async def test_deployment_decorator_options_apply_when_the_config_is_silent(
    client: httpx.AsyncClient,
) -> None:
    # @deployment(max_ongoing_requests=1, num_replicas=2); the config sets neither.
    async def two_running() -> bool:
        view = await replicas(client, "Decorated")
        # learnt from the first replica's handshake, before it took traffic
        assert view["target_replicas"] == 2
        return sum(rep["state"] == "running" for rep in view["replicas"]) == 2

    await wait_until(two_running, within_s=30)

    async def slow() -> httpx.Response:
        return await client.get("/decorated/slow", params={"s": "1"}, headers={MODEL: "hot"})

    first, second = await asyncio.gather(slow(), slow())
    assert first.status_code == second.status_code == 200
    assert first.headers["x-muxgate-replica"] != second.headers["x-muxgate-replica"]


async def test_request_without_model_id_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/sticky/anything", params={"q": "1"})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == ""
    assert body["path"] == "/anything"
    assert r.headers["x-muxgate-replica"].startswith("Sticky#")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"])
async def test_any_method_reaches_the_deployment(client: httpx.AsyncClient, method: str) -> None:
    r = await client.request(method, "/sticky/any", headers={MODEL: "m1"}, content=b"abc")
    assert r.status_code == 200, r.text
    assert (r.json()["method"], r.json()["path"], r.json()["body_len"]) == (method, "/any", 3)
    assert r.headers["x-muxgate-replica"].startswith("Sticky#")
    # HEAD too: the deployment sees it, the client gets the headers only.
    r = await client.head("/sticky/any", headers={MODEL: "m1"})
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["x-muxgate-replica"].startswith("Sticky#")


async def test_hyphenated_header_and_longest_prefix(client: httpx.AsyncClient) -> None:
    r = await client.get("/sticky/deeper/x", headers={"serve-multiplexed-model-id": "h1"})
    assert r.status_code == 200
    assert r.json()["model"] == "h1"
    assert r.json()["greeting"] == "nested"
    assert r.json()["path"] == "/x"
    assert r.headers["x-muxgate-replica"].startswith("Nested#")
    # A prefix matches whole path segments only.
    r = await client.get("/stickyx")
    assert r.status_code == 404


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope", headers={"x-request-id": "req-42"})
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "code": "not_found",
            "message": "no deployment serves '/nope'",
            "request_id": "req-42",
        }
    }
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["x-muxgate-replica"] == ""


@pytest.mark.parametrize("bad", ["a b", "x" * 257, "tab\tid", "caf\u00e9", ""])
async def test_bad_model_id_is_400_before_any_replica(client: httpx.AsyncClient, bad: str) -> None:
    r = await client.get("/sticky/", headers=[(MODEL.encode(), bad.encode("utf-8"))])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_model_id"
    assert r.headers["x-muxgate-replica"] == ""
    # The router never saw it: no replica holds or loads it.
    view = await replicas(client, "Sticky")
    for rep in view["replicas"]:
        assert bad not in rep["models"] + rep["loading"]


async def test_model_id_of_256_printable_chars_is_fine(client: httpx.AsyncClient) -> None:
    model = "a~!" * 85 + "z"
    assert len(model) == 256
    r = await client.get("/lru/", headers={MODEL: model})
    assert r.status_code == 200
    assert r.json()["model"] == model


async def test_deployment_error_is_500_and_replica_keeps_serving(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/lru/raise", headers={MODEL: "1"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "user_error"
    assert err["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in err["message"]
    failed_on = r.headers["x-muxgate-replica"]
    r = await client.get("/lru/ok", headers={MODEL: "1"})
    assert r.status_code == 200
    assert r.headers["x-muxgate-replica"] == failed_on


@pytest.mark.parametrize("status", [204, 304])
async def test_a_bodiless_status_has_no_content_length(
    client: httpx.AsyncClient, status: int
) -> None:
    r = await client.get("/sticky/status", params={"s": status})
    assert r.status_code == status
    assert "content-length" not in r.headers  # RFC 9110 for a 204
    assert r.headers["x-request-id"] and r.headers["x-muxgate-replica"].startswith("Sticky#")
    assert (await client.get("/sticky/status")).status_code == 200  # the connection goes on


async def test_a_deployment_cannot_set_the_gateways_own_headers(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/sticky/own-ids", headers={"x-request-id": "req-7"})
    assert r.status_code == 200
    assert r.headers.get_list("x-request-id") == ["req-7"]
    assert r.headers["x-muxgate-replica"].startswith("Sticky#")


async def test_request_id_is_honoured_or_generated(client: httpx.AsyncClient) -> None:
    r = await client.get("/sticky/", headers={"x-request-id": "abc.DEF-123"})
    assert r.headers["x-request-id"] == "abc.DEF-123"
    r = await client.get("/sticky/", headers={"x-request-id": "not sane"})
    assert r.headers["x-request-id"] != "not sane"
    assert len(r.headers["x-request-id"]) >= 16


async def test_admin_errors_keep_only_a_sane_request_id(client: httpx.AsyncClient) -> None:
    for given in ("not sane", "x" * 129):
        r = await client.get("/-/nothing-here", headers={"x-request-id": given})
        assert r.status_code == 404
        assert r.headers["x-request-id"] != given
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = await client.get("/-/nothing-here", headers={"x-request-id": "admin-2"})
    assert r.headers["x-request-id"] == "admin-2"


async def test_admin_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    r = await client.post("/-/healthz")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, HEAD, OPTIONS"
    r = await client.get("/-/models/Sticky/1/load")
    assert r.status_code == 405
    assert "POST" in r.headers["allow"]
    assert "GET" not in r.headers["allow"]


async def test_admin_head_is_get_without_the_body(client: httpx.AsyncClient) -> None:
    r = await client.head("/-/healthz")
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]
    assert (await client.head("/-/replicas")).status_code == 200
    r = await client.head("/-/models/Sticky/1/load")  # a POST endpoint
    assert r.status_code == 405
    assert "POST" in r.headers["allow"]


async def test_admin_locality_is_the_peer_address_not_forwarded_headers(
    client: httpx.AsyncClient,
) -> None:
    # The server does not rewrite the client from X-Forwarded-For/Forwarded
    # (a remote client could claim 127.0.0.1 with them): this loopback peer
    # stays local whatever they say.
    forged = {"x-forwarded-for": "203.0.113.9", "forwarded": "for=203.0.113.9"}
    assert (await client.get("/-/replicas", headers=forged)).status_code == 200


async def test_admin_bad_query_is_400_bad_request(client: httpx.AsyncClient) -> None:
    r = await client.post("/-/models/Sticky/1/load", params={"pin": "maybe"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"


async def test_admin_endpoints(client: httpx.AsyncClient, gateway: Gateway) -> None:
    r = await client.get("/-/healthz", headers={"x-request-id": "admin-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "admin-1"
    assert r.headers["x-muxgate-replica"] == ""
    assert (await client.get("/sticky/")).status_code == 200  # counted below, run alone too
    r = await client.get("/-/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert r.headers["content-type"].count("charset") == 1
    assert 'muxgate_requests_total{deployment="Sticky",status="200"}' in r.text
    assert 'muxgate_replicas{deployment="Sticky",state="running"} 2.0' in r.text
    r = await client.get("/-/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    r = await client.get("/-/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]
    assert r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["message"] == "no admin endpoint '/-/nothing-here'"
    r = await client.get("/-/replica")  # a slip: the endpoint named closest
    assert r.status_code == 404
    assert r.json()["error"]["message"] == (
        "no admin endpoint '/-/replica'; did you mean '/-/replicas'?"
    )
    view = (await client.get("/-/replicas")).json()["deployments"]
    assert set(view) == {"Sticky", "Lru", "Spread", "Decorated", "Nested"}
    assert "Sticky" in repr(gateway)
