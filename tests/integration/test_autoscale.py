"""The serverless pool end to end (real gateway, real replica processes).

One gateway serves two autoscaled deployments for the whole module:

* ``Auto`` (``Hooked``): min 0, max 3, target 2 requests per replica,
  short delays, so a test sees cold start, scale-up, drain and scale to
  zero in seconds;
* ``Broken``: its ``__init__`` raises, so every start fails.

The tests run in file order and each first waits for the state it needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import MODEL, running_gateway

from muxgate.gateway._pool import ReplicaPool
from muxgate.gateway._serve import Gateway

REQUEST_TIMEOUT_S = 20.0
UPSCALE_DELAY_S = 0.25

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def hook_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("autoscale") / "unloads.log")


@pytest.fixture(scope="module")
async def gateway(anyio_backend: str, hook_log: str) -> AsyncIterator[Gateway]:
    fast = {
        "metrics_interval_s": 0.1,
        "look_back_period_s": 0.5,
        "upscale_delay_s": UPSCALE_DELAY_S,
    }
    config = {
        "http": {"port": 0, "request_timeout_s": REQUEST_TIMEOUT_S},
        "deployments": [
            {
                "name": "Auto",
                "import_path": "autoscale_apps:Hooked",
                "init_kwargs": {"hook_log": hook_log},
                "route_prefix": "/auto",
                "max_ongoing_requests": 4,
                "autoscaling": {
                    "min_replicas": 0,
                    "max_replicas": 3,
                    "target_ongoing_requests": 2,
                    "downscale_delay_s": 1.0,
                    "downscale_to_zero_delay_s": 1.5,
                    **fast,
                },
            },
            {
                "name": "Broken",
                "import_path": "autoscale_apps:Broken",
                "route_prefix": "/broken",
                "autoscaling": {"min_replicas": 0, "max_replicas": 1, **fast},
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def until(pool: ReplicaPool, check: Callable[[], bool], within_s: float, what: str) -> float:
    """Wait until ``check()`` holds (re-checked on every pool change); return the wait."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within_s):
            await pool.wait_for(check)
    except TimeoutError:
        raise AssertionError(f"timed out after {within_s} s waiting for {what}: {pool!r}") from None
    return time.monotonic() - started


def read_unloads(path: str) -> list[list[str]]:
    """``[model id, pid]`` per model a close() hook saw unloaded."""
    return [line.split() for line in Path(path).read_text().splitlines()]


async def snapshot(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/-/replicas")).json()
    return dict(body["deployments"][name])


async def test_cold_start_from_zero_serves_the_first_request(gateway: Gateway) -> None:
    pool = gateway.pools["Auto"]
    await until(pool, lambda: pool.target == 0 and not pool.counts()["running"], 10, "zero")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        snap = await snapshot(client, "Auto")
        assert snap["target_replicas"] == 0 and snap["replicas"] == []
        started = time.perf_counter()
        response = await client.get("/auto/", headers={MODEL: "cold"})
        latency = time.perf_counter() - started
        print(f"cold start: first response after {latency:.3f} s")
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "cold"
        snap = await snapshot(client, "Auto")
    assert snap["target_replicas"] >= 1
    assert [r["state"] for r in snap["replicas"]] == ["running"]
    assert snap["replicas"][0]["models"] == ["cold"]
    assert snap["queued"] == 0
    assert latency < 15


async def test_burst_scales_up_then_back_to_zero_with_drain(
    gateway: Gateway, hook_log: str
) -> None:
    pool = gateway.pools["Auto"]
    states_seen: set[str] = set()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        # Steady light traffic (2 clients, load ~2: one replica's worth) runs
        # through the whole burst, the scale-up and the scale-down: every
        # one of its requests must succeed.
        results: list[int] = []
        stop = asyncio.Event()
        at_first_drain: list[int] = []
        progress = asyncio.Event()

        async def steady(worker: int) -> None:
            i = 0
            while not stop.is_set() and len(results) < 5000:
                r = await client.get(
                    "/auto/slow", params={"s": "0.02"}, headers={MODEL: f"m{(worker + i) % 8}"}
                )
                results.append(r.status_code)
                progress.set()
                i += 1

        def record(check: Callable[[], bool]) -> Callable[[], bool]:
            def wrapped() -> bool:
                states = {r["state"] for r in pool.snapshot()["replicas"]}
                if "draining" in states and not at_first_drain:
                    at_first_drain.append(len(results))
                states_seen.update(states)
                return check()

            return wrapped

        clients = [asyncio.ensure_future(steady(w)) for w in range(2)]
        try:
            # 40 requests of 1 s, 8 models: load 40 wants 20 replicas, capped at 3.
            burst_started = time.monotonic()
            burst = [
                asyncio.ensure_future(
                    client.get("/auto/slow", params={"s": "1"}, headers={MODEL: f"m{i % 8}"})
                )
                for i in range(40)
            ]
            scaled = await until(pool, lambda: pool.running == 3, 20, "3 running replicas")
            print(f"scale-up reaction: 3 replicas running {scaled:.3f} s after the burst started")
            queued_seen = (await snapshot(client, "Auto"))["queued"]
            responses = await asyncio.gather(*burst)
            burst_s = time.monotonic() - burst_started
            print(
                f"burst of 40 x 1 s served in {burst_s:.2f} s ({queued_seen} queued at 3 replicas)"
            )
            assert [r.status_code for r in responses] == [200] * 40
            assert len({r.json()["replica"] for r in responses}) >= 2
            await until(
                pool,
                record(lambda: pool.target == 1 and len(pool.snapshot()["replicas"]) == 1),
                REQUEST_TIMEOUT_S + 10,
                "scale-down to 1 under steady traffic, drained replicas gone",
            )
            done_at_scale_down = len(results)
            async with asyncio.timeout(10):  # and traffic still flows after it
                while len(results) < done_at_scale_down + 10:
                    progress.clear()
                    await progress.wait()
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert results and set(results) == {200}, f"failures under scale-down: {results}"
        assert at_first_drain, "no replica was seen draining"
        print(
            f"steady traffic: {len(results)} requests, 0 failed"
            f" ({len(results) - at_first_drain[0]} after the first drain began)"
        )

        # Traffic stops: min_replicas is 0, so the pool goes to zero.
        await until(
            pool,
            record(lambda: pool.target == 0 and not pool.snapshot()["replicas"]),
            15,
            "scale to zero",
        )
        snap = await snapshot(client, "Auto")
    assert snap["target_replicas"] == 0 and snap["replicas"] == []
    assert "draining" in states_seen
    # Drained replicas unloaded their models through the close() hooks.
    unloaded = read_unloads(hook_log)
    assert {model for model, _ in unloaded} >= {f"m{i}" for i in range(8)}
    assert len({pid for _, pid in unloaded}) >= 3


async def test_init_failure_gives_prompt_clear_503s(gateway: Gateway) -> None:
    pool = gateway.pools["Broken"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for attempt in range(2):
            started = time.monotonic()
            response = await client.get("/broken/", headers={MODEL: "x"})
            took = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
            error = response.json()["error"]
            assert error["code"] == "no_replica"
            assert "model registry unreachable (raised on purpose)" in error["message"]
            assert took < REQUEST_TIMEOUT_S / 2, f"attempt {attempt} hung for {took:.1f} s"
            print(f"Broken: 503 after {took:.3f} s (attempt {attempt})")
        snap = await snapshot(client, "Broken")
    assert "model registry unreachable" in snap["last_failure"]
    assert snap["replicas"] == []
    assert "last start failure" in pool.status_line()
