"""``PoolWarming``: what a pool's warming moments ask a replica to load, with a
fake connection at the seam (no processes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from muxgate.gateway._config import parse_config
from muxgate.gateway._pool_reports import ReplicaReports
from muxgate.gateway._pool_warming import PoolWarming
from muxgate.gateway._replica_set import RUNNING, Replica
from muxgate.gateway._router import Router
from muxgate.replicas._protocol import ReplicaState, Reply

pytestmark = pytest.mark.anyio


class FakeConnection:
    """Answers every warm as loaded; records what it was asked to warm."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.state = ReplicaState()
        self.warmed: list[str] = []

    async def control(self, action: str, model_id: str, **options: Any) -> Reply:
        self.warmed.append(model_id)
        return Reply(id=1, state=self.state, body=b'{"loaded": true}')


async def test_a_joining_replica_never_warms_a_model_suspected_of_killing_replicas() -> None:
    # "new" replaces a replica a model killed: of the models whose home it
    # became, it warms all but that one (else it would die the same way).
    router = Router(max_ongoing_requests=4)
    router.add_replica("old")
    models = [f"m{i}" for i in range(30)]
    for model_id in models:
        router.popularity.record(model_id)
    router.add_replica("new")
    moved = [m for m in models if router.preference_list(m)[0] == "new"]
    assert len(moved) >= 2
    poison = moved[0]
    conn = FakeConnection("new")
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Any, what: str) -> asyncio.Task[Any]:
        tasks.append(asyncio.ensure_future(coro))
        return tasks[-1]

    config = parse_config({"deployments": [{"name": "D", "import_path": "m:D"}]})
    warming = PoolWarming(
        config.deployments[0],
        router,
        {"old": FakeConnection("old"), "new": conn},  # type: ignore[dict-item]
        ReplicaReports("D"),
        refused=lambda model_id: model_id == poison,
        spawn=spawn,
        timeout_s=5.0,
    )
    warming.joined(Replica("new", state=RUNNING), conn)  # type: ignore[arg-type]
    await asyncio.gather(*tasks)
    assert sorted(conn.warmed) == sorted(moved[1:])
