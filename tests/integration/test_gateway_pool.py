"""ReplicaPool start failures, with a fake launcher at its ``launcher`` seam
(no processes): backoff, last failure reason, 503 while nothing starts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._errors import NoReplicaError
from muxgate.gateway._launcher import ReplicaStartError
from muxgate.gateway._pool import ReplicaPool
from muxgate.replicas._protocol import HttpRequest

pytestmark = pytest.mark.anyio


class FailingLauncher:
    def __init__(self) -> None:
        self.attempts: list[float] = []

    async def start(self, spec: Any) -> Any:
        self.attempts.append(time.monotonic())
        raise ReplicaStartError(f"import failed (attempt {len(self.attempts)})")


async def test_start_failures_back_off_and_are_reported() -> None:
    launcher = FailingLauncher()
    config = DeploymentConfig(name="Bad", import_path="nope:Nope", num_replicas=1)
    pool = ReplicaPool(config, launcher=launcher, make_spec=lambda d, rid: rid)
    pool.start()
    try:
        deadline = time.monotonic() + 10
        while len(launcher.attempts) < 3:
            assert time.monotonic() < deadline, "pool stopped retrying"
            await asyncio.sleep(0.02)
        first, second = (
            launcher.attempts[1] - launcher.attempts[0],
            launcher.attempts[2] - launcher.attempts[1],
        )
        assert first >= 0.45  # backoff starts at 0.5 s
        assert second >= 0.95 and second > first  # and doubles
        snap = pool.snapshot()
        assert snap["last_failure"].startswith("import failed")
        assert snap["replicas"] == []
        assert not pool.healthy
        assert "last start failure: import failed" in pool.status_line()
        # Backing off: nothing is starting, so a request fails fast with 503.
        assert not pool.is_starting()
        with pytest.raises(NoReplicaError):
            await pool.dispatcher.dispatch(
                request_id="r",
                model_id="m",
                http=HttpRequest(method="GET", path="/", query="", headers=[], body=b""),
                deadline=asyncio.get_running_loop().time() + 5,
            )
    finally:
        await pool.aclose()
    assert "Bad" in repr(pool)
