"""A replica whose spec asks for a drain fence (Ray's replica actors) obeys
only a ``Drain`` carrying a token its supervisor wrote on its stdin pipe:
a real replica process, its parent playing the supervisor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest
from standalone_replicas import _ready_line

from muxgate.gateway._connection import ReplicaConnection, ReplicaDiedError
from muxgate.replicas._protocol import HttpRequest
from muxgate.replicas.contract import ReplicaSpec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APPS = str(Path(__file__).resolve().parents[1] / "apps")
HTTP = HttpRequest(method="GET", path="/", query="", headers=[], body=b"")


async def test_a_fenced_replica_drains_only_with_its_supervisors_token() -> None:
    spec = ReplicaSpec(
        deployment="Echo2",
        import_path="gateway_apps:Echo2",
        replica_id="fenced#1",
        app_dir=APPS,
        listen="tcp:127.0.0.1:0",
        drain_fence=True,
    )
    process = await anyio.open_process(
        [sys.executable, "-m", "muxgate.replicas._server", "--spec", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    assert process.stdin is not None
    try:
        await process.stdin.send(msgspec.json.encode(spec) + b"\n")
        line = await _ready_line(process, within_s=60)
        assert line.startswith("READY "), line
        address = line.split(" ", 1)[1]
        first = await ReplicaConnection.connect(address)
        second = await ReplicaConnection.connect(address)

        async def refused() -> None:
            # Never Drained: it ends only when the replica exits (below).
            with pytest.raises(ReplicaDiedError):
                await first.drain(token="forged")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                # A gateway that was given no token (it does not lead): refused.
                tg.start_soon(refused)
                await first.ping()  # answered after the Drain was handled
                await process.stdin.send(b"DRAIN other-gateways-token\n")
                # The replica still serves, and takes new connections.
                reply = await second.call(request_id="r1", model_id="m", http=HTTP)
                assert reply.error is None
                third = await ReplicaConnection.connect(address)
                await third.aclose()
                assert process.returncode is None
                # The leader's drain, with the token its supervisor issued.
                await process.stdin.send(b"DRAIN leader-token\n")
                await second.drain(token="leader-token")
                assert await process.wait() == 0
        await first.aclose()
        await second.aclose()
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
