"""/-/metrics of a real gateway after a known request sequence: exact values.

One replica of ``observability_apps:Observed`` (two models per replica, real
torch files loaded through muxgate.backends). The sequence and what each
request does to the replica's cache:

====  ==========================  ======  =====================================
#     request                     status  cache (LRU first) / counters
====  ==========================  ======  =====================================
1     model 1                     200     miss, load 1          -> [1]
2     model 2                     200     miss, load 2          -> [1, 2]
3     model 1                     200     hit                   -> [2, 1]
4     model 3                     200     miss, evict 2 (lru), load 3 -> [1, 3]
5     model id "bad id"           400     refused by the gateway, never sent
6     model 3, path /raise        500     hit, then the deployment raises
====  ==========================  ======  =====================================

Replica-side series arrive through the pool's ping (about once a second)
and, fresh, through the ping every scrape sends to each running replica
before it renders: the first test waits as a scraper that polls would, the
second scrapes once, right after the sequence.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from gateway_harness import MODEL, observed_gateway
from otlp_receiver import OtlpReceiver
from prometheus_text import Samples, only, parse_samples
from waiting import wait_until

from muxgate.gateway._serve import Gateway

DEP = (("deployment", "Observed"),)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with observed_gateway(tmp_path, ["1", "2", "3"]) as gw:
        yield gw


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/-/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse_samples(r.text)


async def send_the_sequence(client: httpx.AsyncClient) -> None:
    """Requests 1 to 6 of the table above, each answered before the next."""
    statuses = []
    for model_id, path in [("1", "/"), ("2", "/"), ("1", "/"), ("3", "/")]:
        r = await client.post(path, headers={MODEL: model_id})
        statuses.append(r.status_code)
        assert r.json()["model"] == model_id
    r = await client.post("/", headers={MODEL: "bad id"})
    statuses.append(r.status_code)
    assert r.json()["error"]["code"] == "bad_model_id"
    r = await client.post("/raise", headers={MODEL: "3"})
    statuses.append(r.status_code)
    assert statuses == [200, 200, 200, 200, 400, 500]


async def test_metrics_after_a_known_request_sequence(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        await send_the_sequence(client)

        # The replica's counters reach the gateway with its next Pong.
        with anyio.fail_after(10):
            while True:
                samples = await scrape(client)
                hits = only(samples, "muxgate_cache_hits_total").get(DEP)
                if hits == 2.0:
                    break
                await anyio.sleep(0.1)  # poll interval, not synchronisation

    replica_id = next(iter(gateway.pools["Observed"].snapshot()["replicas"]))["id"]
    assert only(samples, "muxgate_requests_total") == {
        (("deployment", "Observed"), ("status", "200")): 4.0,
        (("deployment", "Observed"), ("status", "400")): 1.0,
        (("deployment", "Observed"), ("status", "500")): 1.0,
    }
    assert only(samples, "muxgate_request_duration_seconds_count") == {DEP: 6.0}
    # Every request was answered; the +Inf bucket counts them all.
    buckets = only(samples, "muxgate_request_duration_seconds_bucket")
    assert buckets[(("deployment", "Observed"), ("le", "+Inf"))] == 6.0
    assert only(samples, "muxgate_request_duration_seconds_sum")[DEP] > 0.0
    assert only(samples, "muxgate_model_loads_total") == {DEP: 3.0}
    assert only(samples, "muxgate_model_load_failures_total") == {DEP: 0.0}
    assert only(samples, "muxgate_model_load_refused_ids_total") == {DEP: 0.0}
    assert only(samples, "muxgate_model_load_not_found_total") == {DEP: 0.0}
    # Three loads in the replica's histogram: all counted, every bucket cumulative.
    assert only(samples, "muxgate_model_load_duration_seconds_count") == {DEP: 3.0}
    assert only(samples, "muxgate_model_load_duration_seconds_sum")[DEP] > 0.0
    load_buckets = only(samples, "muxgate_model_load_duration_seconds_bucket")
    assert load_buckets[(("deployment", "Observed"), ("le", "+Inf"))] == 3.0
    # The loaders' own CPU: some, and no more than the loads' wall time.
    load_cpu = only(samples, "muxgate_model_load_cpu_seconds_total")[DEP]
    assert 0.0 < load_cpu <= only(samples, "muxgate_model_load_duration_seconds_sum")[DEP]
    by_bound = sorted((float(dict(k)["le"]), v) for k, v in load_buckets.items())
    assert [v for _, v in by_bound] == sorted(v for _, v in by_bound)
    assert only(samples, "muxgate_model_unloads_total") == {
        (("deployment", "Observed"), ("reason", "admin")): 0.0,
        (("deployment", "Observed"), ("reason", "drain")): 0.0,
        (("deployment", "Observed"), ("reason", "lru")): 1.0,
        (("deployment", "Observed"), ("reason", "shutdown")): 0.0,
    }
    assert only(samples, "muxgate_cache_hits_total") == {DEP: 2.0}
    assert only(samples, "muxgate_cache_misses_total") == {DEP: 3.0}
    # One request at a time: no hit came while a load ran.
    assert only(samples, "muxgate_load_step_waits_total") == {DEP: 0.0}
    assert only(samples, "muxgate_models_loaded") == {
        (("deployment", "Observed"), ("replica", replica_id)): 2.0
    }
    assert only(samples, "muxgate_spillovers_total") == {DEP: 0.0}
    assert only(samples, "muxgate_queue_length") == {DEP: 0.0}
    replicas = only(samples, "muxgate_replicas")
    assert replicas[(("deployment", "Observed"), ("state", "running"))] == 1.0
    assert sum(replicas.values()) == 1.0


async def test_one_scrape_right_after_the_sequence_is_exact(gateway: Gateway) -> None:
    """No waiting for the poller: the scrape asks the replica for its counters."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        await send_the_sequence(client)
        samples = await scrape(client)

    replica_id = next(iter(gateway.pools["Observed"].snapshot()["replicas"]))["id"]
    assert only(samples, "muxgate_model_loads_total") == {DEP: 3.0}
    assert only(samples, "muxgate_model_load_duration_seconds_count") == {DEP: 3.0}
    assert only(samples, "muxgate_cache_hits_total") == {DEP: 2.0}
    assert only(samples, "muxgate_cache_misses_total") == {DEP: 3.0}
    unloads = only(samples, "muxgate_model_unloads_total")
    assert unloads[(("deployment", "Observed"), ("reason", "lru"))] == 1.0
    assert only(samples, "muxgate_models_loaded") == {
        (("deployment", "Observed"), ("replica", replica_id)): 2.0
    }


async def test_a_scrape_before_any_request_shows_zeros(gateway: Gateway) -> None:
    """A running replica's series exist at 0 at once, not after its first poll."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        samples = await scrape(client)

    replica_id = next(iter(gateway.pools["Observed"].snapshot()["replicas"]))["id"]
    for name in (
        "muxgate_model_loads_total",
        "muxgate_model_load_duration_seconds_count",
        "muxgate_model_load_cpu_seconds_total",
        "muxgate_cache_hits_total",
        "muxgate_cache_misses_total",
        "muxgate_load_step_waits_total",
        "muxgate_load_step_wait_seconds_total",
    ):
        assert only(samples, name) == {DEP: 0.0}, name
    assert set(only(samples, "muxgate_model_unloads_total").values()) == {0.0}
    assert only(samples, "muxgate_models_loaded") == {
        (("deployment", "Observed"), ("replica", replica_id)): 0.0
    }


async def test_scale_down_counts_drain_unloads_and_keeps_totals(gateway: Gateway) -> None:
    pool = gateway.pools["Observed"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for model_id in ("1", "2"):
            r = await client.post("/", headers={MODEL: model_id})
            assert r.status_code == 200

        async def polled() -> bool:
            return only(await scrape(client), "muxgate_model_loads_total").get(DEP) == 2.0

        async def gone() -> bool:
            return not pool.snapshot()["replicas"]

        await wait_until(polled, within_s=10)
        pool.set_target(0)  # drain the only replica: it unloads both models
        await wait_until(gone, within_s=20)
        samples = await scrape(client)

    assert only(samples, "muxgate_model_loads_total") == {DEP: 2.0}
    assert only(samples, "muxgate_models_loaded") == {}
    assert sum(only(samples, "muxgate_replicas").values()) == 0.0
    assert only(samples, "muxgate_model_unloads_total") == {
        (("deployment", "Observed"), ("reason", "admin")): 0.0,
        (("deployment", "Observed"), ("reason", "drain")): 2.0,
        (("deployment", "Observed"), ("reason", "lru")): 0.0,
        (("deployment", "Observed"), ("reason", "shutdown")): 0.0,
    }


async def test_spillovers_per_model_match_the_route_spans(tmp_path: Path) -> None:
    """Two replicas, one request each at most, per-model labels, tracing on.

    While a request for model 1 is held in flight on one replica, a second
    request for model 1 must go to the other replica. Exactly one of the two
    replicas is the model's home, so exactly one of the two requests is a
    spillover, whatever the router's placement chose for the first; the
    metric and the ``muxgate.spillover`` attribute of the route spans must
    agree on which.
    """
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    with OtlpReceiver() as receiver:
        async with (
            observed_gateway(
                tmp_path,
                ["1"],
                deployment={"num_replicas": 2, "max_ongoing_requests": 1},
                metrics={"per_model_labels": True},
                tracing={"exporter": "otlp", "endpoint": receiver.endpoint},
            ) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as client,
        ):
            dispatcher = gateway.pools["Observed"].dispatcher
            served: dict[str, str] = {}

            async def held() -> None:
                r = await client.post("/hold", params={"fifo": str(fifo)}, headers={MODEL: "1"})
                assert r.status_code == 200
                served["held"] = r.headers["x-muxgate-replica"]

            async def in_flight() -> bool:
                return dispatcher.in_flight == 1

            def release() -> None:
                with open(fifo, "w") as f:
                    f.write("go")

            async with anyio.create_task_group() as tg:
                tg.start_soon(held)
                await wait_until(in_flight, within_s=10)
                r = await client.post("/", headers={MODEL: "1"})
                assert r.status_code == 200
                served["second"] = r.headers["x-muxgate-replica"]
                with anyio.fail_after(10):
                    await anyio.to_thread.run_sync(release)
            assert served["held"] != served["second"]

            async def polled() -> bool:
                return only(await scrape(client), "muxgate_model_loads_total").get(DEP) == 2.0

            await wait_until(polled, within_s=10)
            samples = await scrape(client)
        spans = receiver.wait_for(
            lambda spans: sum(s.name == "muxgate.route" for s in spans) == 2, timeout=10
        )

    model_1 = (("deployment", "Observed"), ("model", "1"))
    assert only(samples, "muxgate_spillovers_total") == {model_1: 1.0}
    assert only(samples, "muxgate_requests_total") == {
        (("deployment", "Observed"), ("model", "1"), ("status", "200")): 2.0
    }
    assert only(samples, "muxgate_request_duration_seconds_count") == {model_1: 2.0}
    # Model 1 now has a copy on each replica.
    assert sorted(only(samples, "muxgate_models_loaded").values()) == [1.0, 1.0]

    routes = [s for s in spans if s.name == "muxgate.route"]
    spilled = [
        s.attributes["muxgate.replica_id"] for s in routes if s.attributes["muxgate.spillover"]
    ]
    assert len(spilled) == 1
    assert spilled[0] in (served["held"], served["second"])
    assert {s.attributes["muxgate.replica_id"] for s in routes} == set(served.values())
