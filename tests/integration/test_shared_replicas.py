"""Several gateways over the same standalone replicas (``static`` launcher).

Real processes throughout: ``muxgate replica`` servers on loopback TCP with
the cluster secret, one gateway as a ``muxgate serve`` process (so it can be
killed) and one in this process.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from gateway_harness import MODEL, running_gateway
from standalone_replicas import two_replicas
from waiting import wait_until, wait_until_sync

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, config: dict[str, Any]
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``muxgate serve`` over ``config`` in a process of its own; (process, URL)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "muxgate.gateway._cli", "serve", str(path), "--port", "0"],
            stderr=stderr,
        )
    try:

        def url() -> str | None:
            for line in log.read_text(errors="replace").splitlines():
                if "serving on" in line:
                    return line.strip().rsplit(" ", 1)[-1]
            assert proc.poll() is None, log.read_text()[-3000:]
            return None

        yield proc, wait_until_sync(url, within_s=60, what="the gateway process to serve")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


async def test_killing_one_gateway_fails_only_its_own_requests(tmp_path: Path) -> None:
    async with two_replicas(tmp_path) as (r0, r1, config):
        replicas = [r0, r1]
        with gateway_process(tmp_path, config) as (doomed, doomed_url):
            async with (
                running_gateway(config) as survivor,
                httpx.AsyncClient(base_url=survivor.url, timeout=30) as via_survivor,
                httpx.AsyncClient(base_url=doomed_url, timeout=60) as via_doomed,
            ):
                conns = survivor.pools["Hooked"].targets
                await wait_until(lambda: len(conns) == 2, what="the survivor to see both replicas")
                doomed_outcomes: list[str] = []
                outcomes: list[int] = []

                async def stuck_on_doomed(model: str) -> None:
                    # In flight on a replica until the gateway dies under it.
                    try:
                        response = await via_doomed.get("/slow?s=60", headers={MODEL: model})
                        doomed_outcomes.append(str(response.status_code))
                    except httpx.TransportError as exc:
                        doomed_outcomes.append(type(exc).__name__)

                async def keep_asking_survivor() -> None:
                    for i in range(10_000):  # bounded; cancelled long before
                        response = await via_survivor.get("/", headers={MODEL: f"m{i % 6}"})
                        outcomes.append(response.status_code)

                def replicas_hold(n: int) -> bool:
                    return sum(c.state.in_flight for c in conns.values()) >= n

                async with anyio.create_task_group() as tg:
                    for i in range(4):
                        tg.start_soon(stuck_on_doomed, f"slow-{i}")
                    # The survivor learns of the doomed gateway's calls from
                    # the replicas' reports (pongs).
                    await wait_until(
                        lambda: replicas_hold(4), within_s=15, what="the doomed gateway's calls"
                    )
                    # ... and shows them apart from its own in /-/replicas.
                    view = (await via_survivor.get("/-/replicas")).json()
                    rows = view["deployments"]["Hooked"]["replicas"]
                    assert sum(r["in_flight_total"] for r in rows) >= 4, rows
                    assert sum(r["in_flight"] for r in rows) == 0, rows
                    tg.start_soon(keep_asking_survivor)
                    await wait_until(lambda: len(outcomes) > 20, what="the survivor serving")
                    doomed.send_signal(signal.SIGKILL)
                    doomed.wait(timeout=30)
                    served = len(outcomes)
                    # Its four calls end with it: the replicas cancel the calls
                    # of a connection that closed, and report none left.
                    await wait_until(
                        lambda: len(doomed_outcomes) == 4, what="the doomed gateway's clients"
                    )
                    await wait_until(
                        lambda: not replicas_hold(1) and len(outcomes) > served + 40,
                        within_s=15,
                        what="the replicas to drop the dead gateway's calls",
                    )
                    tg.cancel_scope.cancel()
                # Only the killed gateway's own requests failed, with their connections.
                assert all(not o.isdigit() for o in doomed_outcomes), doomed_outcomes
                assert set(outcomes) == {200}, outcomes
                assert all(r.process.returncode is None for r in replicas)
                response = await via_survivor.get("/slow?s=0", headers={MODEL: "after"})
                assert response.status_code == 200
