"""Malformed requests are the client's fault: 400 ``bad_request`` naming what is
wrong, while the same errors raised by the deployment's own code stay 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from gateway_harness import MODEL, running_gateway

from muxgate.gateway._serve import Gateway
from muxgate.replicas import HandleBadRequestError, get_deployment_handle

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
async def gateway(anyio_backend: str) -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0},
        "deployments": [
            {"name": "Strict", "import_path": "bad_request_apps:Strict", "num_replicas": 1}
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def test_a_loader_without_the_header_is_400_naming_the_header(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/model")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert f"no '{MODEL}' header" in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    # With the header the same path serves: the replica was not harmed.
    ok = await client.get("/model", headers={MODEL: "7"})
    assert ok.status_code == 200 and ok.text == "model 7"


async def test_a_request_without_an_id_to_code_that_needs_none_is_ordinary(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/plain")
    assert response.status_code == 200 and response.text == "plain"


async def test_a_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/json", content=b'{"x": [1, 2')
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert error["message"].startswith("The request body is not valid JSON: ")
    assert "truncated" in error["message"]
    assert (await client.post("/json", content=b'{"x": 1}')).json() == {"x": 1}


async def test_a_body_nested_too_deeply_is_400(client: httpx.AsyncClient) -> None:
    # msgspec gives up past the recursion limit with a RecursionError: the
    # client's input all the same (it was 500 user_error, a traceback each)
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await client.post("/json", content=b'{"x": ' + deep + b"}")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert error["message"] == "The request body is not valid JSON: it is nested too deeply"
    assert (await client.post("/json", content=b'{"x": [[1]]}')).json() == {"x": [[1]]}


async def test_the_deployments_own_decode_error_stays_a_user_error(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/own-decode", content=b'{"x": [1, 2')
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "user_error"
    assert error["message"].startswith("DecodeError: ")


async def test_a_handle_call_without_a_model_id_is_a_bad_request(gateway: Gateway) -> None:
    handle = get_deployment_handle("Strict", gateway_url=gateway.url)
    with pytest.raises(HandleBadRequestError, match=r"options\(multiplexed_model_id=\.\.\.\)"):
        await handle.predict.remote()
    assert await handle.options(multiplexed_model_id="3").predict.remote() == "model 3"
