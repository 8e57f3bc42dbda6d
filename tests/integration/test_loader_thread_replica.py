"""Async loaders run off the replica's event loop, end to end: one replica of
``loader_thread_apps:SlowLoads`` behind a gateway.

With the default, a hit is answered while a slow load of another model
blocks its loader's thread (on the replica's loop, the hit's call would not
even be read until the load ended); the loader sees the request's model id
and the context variables ``__call__`` set; a loader that awaits an object
of the replica's loop fails with a message naming the opt-out. With
``load_on_loop: true`` in the app config, the loader runs on the replica's
loop and that loader works. Once the loader thread runs, the thread serving
calls runs at a lower priority than it (``loads_first``, the default), and
at the same one with ``loads_first: false`` or without a loader thread.
With ``hits_wait_for_loads`` (the default) the hit first waits out the
blocked load's step, up to its cap, and the gateway's metrics count the
wait; with ``hits_wait_for_loads: false`` it runs beside the load.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from prometheus_text import only, parse_samples
from waiting import wait_until

from muxgate.replicas._load_steps import MAX_WAIT_S
from muxgate.replicas._loader_thread import CALLS_NICE

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: per-thread priorities are Linux's (elsewhere the replica leaves them alone)
LINUX = sys.platform.startswith("linux")


def config(marker_dir: Path, **deployment: Any) -> dict[str, Any]:
    return {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "SlowLoads",
                "import_path": "loader_thread_apps:SlowLoads",
                "init_kwargs": {"marker_dir": str(marker_dir)},
                "num_replicas": 1,
                **deployment,
            }
        ],
    }


DEP = (("deployment", "SlowLoads"),)


@contextlib.asynccontextmanager
async def client_of(marker_dir: Path, **deployment: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway serving ``SlowLoads`` with ``deployment``'s fields."""
    async with (
        running_gateway(config(marker_dir, **deployment)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        yield client


async def hit_during_a_slow_load(client: httpx.AsyncClient, marker_dir: Path, n: int) -> None:
    """A hit on ``a`` answered while ``slow-N`` blocks the loader's thread."""
    slow: list[httpx.Response] = []

    async def load_slow() -> None:
        slow.append(await client.post("/", headers={MODEL: f"slow-{n}"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load_slow)
        await wait_until((marker_dir / f"started-slow-{n}").exists, what="the slow load")
        with anyio.fail_after(10):
            r = await client.post("/", headers={MODEL: "a"})
        assert r.status_code == 200, r.text
        assert r.json()["loaded"] is False  # a hit
        # answered while the slow load still blocks its thread (with
        # hits_wait_for_loads, after waiting out MAX_WAIT_S of its step)
        assert not slow
        (marker_dir / f"release-slow-{n}").touch()
    assert slow[0].status_code == 200, slow[0].text
    assert slow[0].json()["seen_model_id"] == f"slow-{n}"


async def step_waits(client: httpx.AsyncClient) -> tuple[float, float]:
    """The gateway's count of calls that waited out a load step, and their seconds."""
    samples = parse_samples((await client.get("/-/metrics")).text)
    return (
        only(samples, "muxgate_load_step_waits_total")[DEP],
        only(samples, "muxgate_load_step_wait_seconds_total")[DEP],
    )


async def test_a_hit_is_served_while_another_model_loads(tmp_path: Path) -> None:
    async with client_of(tmp_path) as client:
        r = await client.post("/", headers={MODEL: "a"})
        assert r.status_code == 200, r.text
        first = r.json()
        # in the loader: the request's model id, and the variable __call__ set
        assert first["seen_model_id"] == "a" and first["loaded"] is True
        assert first["loader_thread"].startswith("muxgate-loader-")
        assert first["call_thread"] == "MainThread"
        # loads_first (the default): the thread serving calls yields to the loader's
        if LINUX:  # 19 is the lowest priority: a test run already niced may hit it
            lowered = min(CALLS_NICE, 19 - first["loader_nice"])
            assert first["call_nice"] - first["loader_nice"] == lowered
        await hit_during_a_slow_load(client, tmp_path, 1)
        waits, seconds = await step_waits(client)  # by default the hit waited out the step
        assert waits == 1.0
        assert MAX_WAIT_S * 0.9 <= seconds < 10  # the whole cap: the step never ended

        r = await client.post("/", headers={MODEL: "bound-1"})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == "user_error"
        assert error["message"].startswith("LoaderLoopError: ")
        assert "@multiplexed(load_on_loop=True)" in error["message"]
        assert "load_on_loop: true" in error["message"]


async def test_load_on_loop_in_the_config_keeps_loads_on_the_replicas_loop(
    tmp_path: Path,
) -> None:
    async with client_of(tmp_path, load_on_loop=True) as client:
        r = await client.post("/", headers={MODEL: "bound-1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["loader_thread"] == body["call_thread"] == "MainThread"
        assert body["seen_model_id"] == "bound-1" and body["loaded"] is True
        assert body["call_nice"] == body["loader_nice"]  # no loader thread: nothing lowered


async def test_loads_first_false_keeps_one_priority(tmp_path: Path) -> None:
    async with client_of(tmp_path, loads_first=False) as client:
        r = await client.post("/", headers={MODEL: "a"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["loader_thread"].startswith("muxgate-loader-")
        assert body["call_nice"] == body["loader_nice"]


async def test_hits_wait_for_loads_false_runs_hits_beside_the_load(tmp_path: Path) -> None:
    async with client_of(tmp_path, hits_wait_for_loads=False) as client:
        r = await client.post("/", headers={MODEL: "a"})
        assert r.status_code == 200, r.text
        await hit_during_a_slow_load(client, tmp_path, 2)
        assert await step_waits(client) == (0.0, 0.0)  # the hit did not wait
