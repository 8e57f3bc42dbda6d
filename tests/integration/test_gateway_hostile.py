"""Models that hurt their replica, end to end (real replica processes).

* A model id whose load kills the replica (``os._exit``) is quarantined
  after two deaths: 503 ``quarantined`` with ``Retry-After``, shown in
  ``/-/replicas`` and the metrics, while other ids keep being served and the
  pool recovers.
* A replica whose model leaks memory past ``max_replica_rss_bytes`` is
  drained (its models unload through their hooks, its in-flight calls
  finish) and replaced, and no request fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from apps.hostile_apps import POISON_EXIT
from gateway_harness import MODEL, running_gateway
from prometheus_text import parse_samples
from waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MIB = 1 << 20
#: replicas of this app start at about 165 MiB (the fork server imports torch)
LIMIT = 512 * MIB


def sample(scrape: str, name: str) -> float:
    return parse_samples(scrape)[(name, (("deployment", "H"),))]


def hostile(**fields: Any) -> dict[str, Any]:
    return {
        "http": {"port": 0},
        "deployments": [
            {"name": "H", "import_path": "hostile_apps:Hostile", "num_replicas": 1, **fields}
        ],
    }


async def deployment(client: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/-/replicas")).json()["deployments"]["H"]
    return body


async def test_an_id_that_kills_replicas_is_quarantined_and_the_rest_keep_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        running_gateway(hostile()) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        assert (await client.get("/", headers={MODEL: "a"})).status_code == 200
        # "a" is loaded and in flight when "poison" kills the replica: a bystander.
        bystander = asyncio.ensure_future(
            client.get("/slow", params={"s": "30"}, headers={MODEL: "a"})
        )

        async def a_in_flight() -> bool:
            return any(r["in_flight"] for r in (await deployment(client))["replicas"])

        await wait_until(a_in_flight, within_s=10)
        first = await client.get("/", headers={MODEL: "poison"})
        assert first.status_code == 502
        assert (await bystander).status_code == 502
        assert (await deployment(client))["quarantined"] == []  # one death is not enough
        # The log says how the replica ended: its exit code.
        await wait_until(
            lambda: any(
                r.getMessage().endswith(f"exited with code {POISON_EXIT}") for r in caplog.records
            ),
            what="the log line with the replica's exit code",
        )

        # The second request waits for the replacement and kills it too.
        second = await client.get("/", headers={MODEL: "poison"})
        assert second.status_code == 502
        refused = await client.get("/", headers={MODEL: "poison"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "quarantined"
        assert 25 <= int(refused.headers["retry-after"]) <= 30

        # Other ids are served (the pool replaced both replicas), "a" included.
        for model in ("a", "b"):
            ok = await client.get("/", headers={MODEL: model})
            assert ok.status_code == 200, ok.text
        state = await deployment(client)
        [entry] = state["quarantined"]
        assert entry["model_id"] == "poison"
        assert (entry["deaths"], entry["strikes"]) == (2, 1)
        assert 25 <= entry["retry_after_s"] <= 30
        assert [r["state"] for r in state["replicas"]] == ["running"]

        metrics = (await client.get("/-/metrics")).text
        assert sample(metrics, "muxgate_quarantined_models") == 1
        assert sample(metrics, "muxgate_quarantine_refusals_total") == 1

        # An operator who fixed the model releases it (admin endpoint).
        assert (await client.delete("/-/quarantine/Nope")).status_code == 404
        released = await client.delete("/-/quarantine/H", params={"model_id": "poison"})
        assert released.json() == {"released": ["poison"]}
        assert (await deployment(client))["quarantined"] == []
        assert (await client.delete("/-/quarantine/H")).json() == {"released": []}


async def test_a_replica_over_its_memory_limit_is_drained_and_replaced() -> None:
    async with (
        running_gateway(hostile(max_replica_rss_bytes=LIMIT)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        first = (await client.get("/leak", headers={MODEL: "leak"})).json()
        old = first["replica"]

        async def reported() -> bool:
            return (await deployment(client))["replicas"][0]["rss_bytes"] is not None

        await wait_until(reported, within_s=10)
        [rep] = (await deployment(client))["replicas"]
        assert rep["rss_bytes"] < LIMIT - 128 * MIB, "the app's replicas grew: raise LIMIT"

        # Leak 64 MiB a request, each time until the gateway saw it (about
        # one ping later), so the replica crosses the limit by one step.
        # A slow request of another model is in flight all along.
        slow = asyncio.ensure_future(client.get("/slow", params={"s": "3"}, headers={MODEL: "a"}))
        answers = []
        for _ in range(20):
            answer = await client.get("/leak", params={"mb": "64"}, headers={MODEL: "leak"})
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
            if answers[-1]["replica"] != old:
                break
            leaked = answers[-1]["leaked_mb"] * MIB

            async def seen(leaked: int = leaked) -> bool:
                reps = (await deployment(client))["replicas"]
                return any(
                    r["id"] != old or r["state"] != "running" or (r["rss_bytes"] or 0) >= leaked
                    for r in reps
                )

            await wait_until(seen, within_s=10)
        assert answers[-1]["replica"] != old, "never replaced"
        assert answers[-2]["leaked_mb"] * MIB >= LIMIT - 256 * MIB
        assert answers[-1]["leaked_mb"] == 64  # a fresh model on the new replica
        assert (await slow).status_code == 200

        async def old_gone() -> bool:
            state = await deployment(client)
            return [r["id"] for r in state["replicas"]] == [answers[-1]["replica"]]

        await wait_until(old_gone, within_s=30)
        events = (await deployment(client))["events"]
        assert any(
            (e["replica"], e["kind"], e["model"], e["reason"]) == (old, "unload", "leak", "drain")
            for e in events
        ), events
        metrics = (await client.get("/-/metrics")).text
        assert sample(metrics, "muxgate_replica_memory_replacements_total") == 1


async def test_queued_requests_for_an_id_quarantined_meanwhile_are_not_sent() -> None:
    # One replica taking one request at a time: the burst queues, and each
    # request sent kills the replica serving it. Only two may be sent.
    async with (
        running_gateway(hostile(max_ongoing_requests=1)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        burst = await asyncio.gather(
            *(client.get("/", headers={MODEL: "poison"}) for _ in range(6))
        )
        codes = sorted((r.status_code, r.json()["error"]["code"]) for r in burst)
        assert codes == [(502, "replica_died")] * 2 + [(503, "quarantined")] * 4
        assert (await client.get("/", headers={MODEL: "a"})).status_code == 200


async def test_a_replica_over_the_limit_with_no_model_is_not_replaced() -> None:
    # Replacing it would not help: a fresh replica starts as big.
    async with (
        running_gateway(hostile(max_replica_rss_bytes=MIB)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        before = [r["id"] for r in (await deployment(client))["replicas"]]
        for _ in range(2):  # each scrape asks the replica for a fresh report
            metrics = (await client.get("/-/metrics")).text
        [rep] = (await deployment(client))["replicas"]
        assert rep["rss_bytes"] > MIB
        assert [rep["id"]] == before and rep["state"] == "running"
        assert sample(metrics, "muxgate_replica_memory_replacements_total") == 0
