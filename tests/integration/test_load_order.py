"""A failed load never costs a working model (the default load order), and the
app config's ``load_order`` reaches the replica.

One replica of ``observability_apps:Observed`` (two models per replica, real
torch files). Models 1 and 2 fill the cache; model ``broken`` is a corrupt
file, so its load fails. By default (``evict_after``) both cached models stay
and keep being served without a new load; with ``load_order: evict_first``
in the config, the least recently used one was evicted before the failed load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import MODEL, observed_gateway
from waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def replica_view(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/-/replicas")
    assert r.status_code == 200
    view: dict[str, Any] = r.json()["deployments"]["Observed"]
    return view


@pytest.mark.parametrize("load_order", [None, "evict_first"])
async def test_a_failing_load_into_a_full_cache(tmp_path: Path, load_order: str | None) -> None:
    deployment = {} if load_order is None else {"load_order": load_order}
    async with observed_gateway(tmp_path, ["1", "2"], deployment=deployment) as gw:
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "model.pt").write_bytes(b"not a torch file at all")
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            for model_id in ("1", "2"):
                assert (await client.post("/", headers={MODEL: model_id})).status_code == 200
            r = await client.post("/", headers={MODEL: "broken"})
            assert r.status_code >= 400, r.text
            view: dict[str, Any] = {}

            async def failure_reported() -> bool:
                nonlocal view
                view = await replica_view(client)
                return any(e["kind"] == "load_failed" for e in view["events"])

            await wait_until(failure_reported, within_s=10)
            (replica,) = view["replicas"]
            if load_order == "evict_first":
                assert replica["models"] == ["2"]
                return
            assert replica["models"] == ["1", "2"]
            for model_id in ("1", "2"):  # served from the cache: no load
                r = await client.post("/", headers={MODEL: model_id})
                assert r.status_code == 200
                assert r.json()["model"] == model_id
            view = await replica_view(client)
            kinds = [(e["kind"], e["model"]) for e in view["events"]]
            assert kinds == [("load", "1"), ("load", "2"), ("load_failed", "broken")]
            assert view["replicas"][0]["models"] == ["1", "2"]


async def test_the_config_eviction_policy_reaches_the_replicas(tmp_path: Path) -> None:
    deployment = {"eviction_policy": "tinylfu"}
    async with (
        observed_gateway(tmp_path, ["1", "2", "3"], deployment=deployment) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        for model_id in ("1", "2", "1", "2", "1", "2", "3"):
            r = await client.post("/", headers={MODEL: model_id})
            assert r.status_code == 200
            assert r.json()["model"] == model_id  # 3 is served even though it is not kept
        # "3", asked for once, did not take the place of "1" (asked for three times);
        # with LRU the cache would hold ["2", "3"].
        (replica,) = (await replica_view(client))["replicas"]
        assert replica["models"] == ["1", "2"]
