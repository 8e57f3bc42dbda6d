"""Two pools (two gateways) on one shared set of replicas, with a leader
lease, at the ``launcher`` and ``connect`` seams (no processes, no Ray):
only the lease holder starts and stops replicas, the other adopts and
routes; a leader that cannot renew stops acting before the other takes
over, within two lease periods; a follower's waiting request makes the
leader start a replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from lease_clients import InMemoryLeaseClient
from test_gateway_pool import FakeConnection, FakeProcess, spec_of, until
from waiting import wait_until

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._leadership import Leadership
from muxgate.gateway._lease import Lease
from muxgate.gateway._policy import AutoscalingConfig
from muxgate.gateway._pool import ReplicaPool
from muxgate.gateway.launchers import ReplicaStartError
from muxgate.replicas._protocol import Drained, HttpRequest, ReplicaState

pytestmark = pytest.mark.anyio

#: short, so a handover takes well under a second of real time
PERIOD = 0.4


class Authority:
    """The lease's keeper in this process; a gateway's link to it can break."""

    def __init__(self) -> None:
        self.lease = Lease()

    def client(self) -> InMemoryLeaseClient:
        return InMemoryLeaseClient(self.lease)


class SharedLauncher:
    """One gateway's launcher over replicas every gateway sees (``cluster``),
    acting only while its gateway leads (as the ``ray`` launcher does); it
    records what it was asked to do."""

    replicas_outlive_gateway = True

    def __init__(
        self, cluster: dict[str, FakeProcess], client: InMemoryLeaseClient, holder: str
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.leadership = Leadership(client, period_s=PERIOD, holder=holder)
        self.started: list[str] = []
        self.stopped: list[str] = []

    async def ready_replicas(self, deployment: str) -> list[FakeProcess]:
        return [p for p in self.cluster.values() if not p.exited.is_set()]

    async def start(self, spec: Any) -> FakeProcess:
        if not self.leadership.is_leader():
            raise ReplicaStartError("not the leader")
        proc = FakeProcess(spec.replica_id)
        proc.exit_on_close = False  # a shared replica outlives one gateway's connection
        self.cluster[spec.replica_id] = proc
        self.started.append(spec.replica_id)
        return proc

    async def stop(self, replica: Any, grace_s: float) -> int | None:
        self.kill(replica)
        return 0

    def kill(self, replica: Any) -> None:
        self.stopped.append(replica.name)
        replica.kill()

    async def wait_exit(self, replica: Any) -> int | None:
        return await replica.wait()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.leadership.release()


class SharedConnection(FakeConnection):
    """A standalone replica exits once drained (whichever gateway drained
    it), closing every gateway's connection."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._watch = asyncio.ensure_future(self._close_on_exit())

    async def _close_on_exit(self) -> None:
        await self.process.exited.wait()
        self.close_reason = self.close_reason or "replica exited"
        self.closed.set()

    async def aclose(self) -> None:
        self._watch.cancel()
        await super().aclose()

    async def drain(self, *, events_after: int | None = None, token: str | None = None) -> Drained:
        drained = await super().drain(events_after=events_after)
        self.process.exited.set()
        return drained


def gateway(
    cluster: dict[str, FakeProcess], authority: Authority, holder: str, config: DeploymentConfig
) -> tuple[ReplicaPool, SharedLauncher]:
    launcher = SharedLauncher(cluster, authority.client(), holder)

    async def connect(address: str, on_state: Callable[[ReplicaState], None]) -> FakeConnection:
        return SharedConnection(address, on_state, cluster[address.removeprefix("fake:")])

    pool = ReplicaPool(
        config,
        launcher=launcher,  # type: ignore[arg-type]
        make_spec=spec_of,
        connect=connect,  # type: ignore[arg-type]
    )
    pool.start()
    return pool, launcher


def role(pool: ReplicaPool) -> str:
    return str(pool.snapshot()["lease"]["role"])


async def test_only_the_holder_acts_and_a_stalled_leader_hands_over_within_two_periods() -> None:
    cluster: dict[str, FakeProcess] = {}
    authority = Authority()
    config = DeploymentConfig(name="P", import_path="m:P", num_replicas=2)
    a, a_launcher = gateway(cluster, authority, "a", config)
    b = b_launcher = None
    try:
        await until(a, lambda: a.running == 2)
        assert role(a) == "leader" and set(a_launcher.started) == set(cluster)
        b, b_launcher = gateway(cluster, authority, "b", config)
        await until(b, lambda: b.running == 2)
        await wait_until(lambda: b_launcher.leadership.asks >= 2, what="b asked")
        assert role(b) == "follower" and b.snapshot()["lease"]["leader"] == "a"
        assert set(b.targets) == set(a.targets)  # the same replicas, routed by both

        # A follower asked to resize does nothing; the leader does.
        b.set_target(3)
        a.set_target(3)
        await until(a, lambda: a.running == 3)
        await until(b, lambda: b.running == 3)  # adopted, not started
        assert b_launcher.started == [] and b_launcher.stopped == []

        # a loses its way to the lease (its gateway stalls, or dies).
        a_launcher.client.reachable = False
        lost_at = time.monotonic()
        await wait_until(lambda: not a_launcher.leadership.is_leader(), within_s=2 * PERIOD)
        # a stopped leading before b could lead: never two leaders.
        assert not b_launcher.leadership.is_leader()
        await wait_until(b_launcher.leadership.is_leader, within_s=3 * PERIOD, what="takeover")
        assert time.monotonic() - lost_at <= 2 * PERIOD
        assert role(b) == "leader" and role(a) == "follower"

        # The new leader sizes the pool; the old one no longer acts.
        a.set_target(1)
        b.set_target(4)
        await until(b, lambda: b.running == 4)
        await until(a, lambda: a.running == 4)
        assert len(b_launcher.started) == 1 and a_launcher.stopped == []
        assert len(a_launcher.started) == 3
        b.set_target(2)
        await until(b, lambda: b.running == 2)
        await until(a, lambda: a.running == 2)  # drained by b: gone for a too
        assert sum(p.exited.is_set() for p in cluster.values()) == 2
        assert a_launcher.stopped == []
    finally:
        for pool, launcher in ((a, a_launcher), (b, b_launcher)):
            if pool is not None and launcher is not None:
                await pool.aclose()
                await launcher.aclose()


async def test_a_request_waiting_at_a_follower_makes_the_leader_start_a_replica() -> None:
    cluster: dict[str, FakeProcess] = {}
    authority = Authority()
    config = DeploymentConfig(
        name="P",
        import_path="m:P",
        autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=2, metrics_interval_s=0.05),
    )
    a, a_launcher = gateway(cluster, authority, "a", config)
    b, b_launcher = gateway(cluster, authority, "b", config)
    try:
        await wait_until(lambda: a_launcher.leadership.is_leader(), what="a leads")
        await wait_until(lambda: b_launcher.leadership.asks > 0, what="b asked")
        assert a.target == 0 and not cluster
        # Only b gets traffic: its waiting request reaches a's autoscaler
        # through the lease's load reports.
        reply, rid = await b.dispatcher.dispatch(
            request_id="r",
            model_id="m",
            http=HttpRequest(method="GET", path="/", query="", headers=[], body=b""),
            deadline=b.dispatcher.clock() + 10,
        )
        assert reply.body == b"ok" and rid in b.targets
        assert a_launcher.started == [rid] and b_launcher.started == []
    finally:
        for pool, launcher in ((a, a_launcher), (b, b_launcher)):
            await pool.aclose()
            await launcher.aclose()
    assert not any(p.killed for p in cluster.values())
