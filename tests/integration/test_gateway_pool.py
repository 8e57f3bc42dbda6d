"""ReplicaPool with fakes at its ``launcher`` and ``connect`` seams (no
processes): start failures (backoff, last failure reason, 503 while nothing
starts), parallel starts, ring membership only when ready, scale-down order
and replica states, the drain timeout, the load-time estimate, activation
from zero."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import pytest
from fake_clock import FakeClock
from waiting import wait_until

from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._errors import NoReplicaError
from muxgate.gateway._policy import AutoscalingConfig
from muxgate.gateway._pool import ReplicaPool
from muxgate.gateway.launchers.local import ReplicaStartError
from muxgate.replicas._deployment import DeploymentOptions
from muxgate.replicas._protocol import Drained, HttpRequest, Pong, ReplicaState, Reply
from muxgate.replicas.contract import ReplicaSpec

pytestmark = pytest.mark.anyio


def spec_of(deployment: DeploymentConfig, replica_id: str) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=deployment.name, import_path=deployment.import_path, replica_id=replica_id
    )


class FakeLauncherBase:
    """The ``Launcher`` interface around a fake ``start``: nothing runs
    before the pool starts; its replicas are ``FakeProcess``es."""

    async def ready_replicas(self, deployment: str) -> list[Any]:
        return []

    async def aclose(self) -> None:
        pass

    async def stop(self, replica: Any, grace_s: float) -> int | None:
        replica.kill()
        return await self.wait_exit(replica)

    def kill(self, replica: Any) -> None:
        replica.kill()

    async def wait_exit(self, replica: Any) -> int | None:
        return await replica.wait()  # type: ignore[no-any-return]


class FailingLauncher(FakeLauncherBase):
    """Every start fails; ``attempts`` holds the clock's time of each."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.attempts: list[float] = []

    async def start(self, spec: Any) -> Any:
        self.attempts.append(self.clock())
        raise ReplicaStartError(f"import failed (attempt {len(self.attempts)})")


async def test_start_failures_back_off_and_are_reported() -> None:
    clock = FakeClock()
    launcher = FailingLauncher(clock)
    config = DeploymentConfig(name="Bad", import_path="nope:Nope", num_replicas=1)
    pool = ReplicaPool(config, launcher=launcher, make_spec=spec_of, clock=clock)

    def retried(tries: int) -> bool:  # one more attempt, failed, backing off
        return len(launcher.attempts) == tries + 1 and pool.replicas.backoff_left() > 0

    pool.start()
    try:
        await wait_until(lambda: retried(0))
        # Backoff starts at 0.5 s on the pool's clock and doubles; until the
        # clock gets there no start is due, and once it is the pool starts one
        # (the real timer of its loop is for the real clock: woken here).
        for expected in (0.5, 1.0):
            tries = len(launcher.attempts)
            assert pool.replicas.backoff_left() == pytest.approx(expected)
            clock.now += expected - 0.01
            assert pool.replicas.missing(1) == 0
            clock.now += 0.01
            pool.set_target(1)  # same target: only wakes the pool
            await wait_until(functools.partial(retried, tries))
        first, second = (
            launcher.attempts[1] - launcher.attempts[0],
            launcher.attempts[2] - launcher.attempts[1],
        )
        assert first == pytest.approx(0.5) and second == pytest.approx(1.0)
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
                deadline=pool.dispatcher.clock() + 5,
            )
    finally:
        await pool.aclose()
    assert "Bad" in repr(pool)


async def test_start_backoff_runs_on_the_pools_clock() -> None:
    launcher = FailingLauncher()
    clock = FakeClock()
    config = DeploymentConfig(name="Bad", import_path="nope:Nope", num_replicas=1)
    pool = ReplicaPool(config, launcher=launcher, make_spec=spec_of, clock=clock)
    pool.start()
    try:
        await wait_until(lambda: pool.last_failure is not None)
        # The clock stands still: the backoff never ends, nothing is starting.
        assert "failures=1 backoff=0.5s" in repr(pool)
        assert pool.dispatcher.clock is clock  # queue waits and deadlines too
        assert not pool.is_starting() and len(launcher.attempts) == 1
        clock.now += 0.5
        assert pool.is_starting()  # the next start may be tried now
        assert "backoff" not in repr(pool)
    finally:
        await pool.aclose()


# -- scaling with fakes at the launcher and connect seams ----------------------


class FakeProcess:
    def __init__(self, replica_id: str, deployment: str = "P") -> None:
        self.name = replica_id
        self.deployment = deployment
        self.pid: int | None = abs(hash(replica_id)) % 100_000
        self.address = f"fake:{replica_id}"
        self.exited = asyncio.Event()
        self.killed = False
        #: exit when the gateway closes the connection (False: stay until told)
        self.exit_on_close = True

    def kill(self) -> None:
        self.killed = True
        self.exited.set()

    async def wait(self) -> int | None:
        await self.exited.wait()
        return 0


class GatedLauncher(FakeLauncherBase):
    """Starts fake processes; every start waits for ``ready`` to be set."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.specs: list[Any] = []
        self.in_progress = 0
        self.most_in_progress = 0
        self.processes: dict[str, FakeProcess] = {}

    async def start(self, spec: Any) -> FakeProcess:
        self.specs.append(spec)
        self.in_progress += 1
        self.most_in_progress = max(self.most_in_progress, self.in_progress)
        try:
            await self.ready.wait()
        finally:
            self.in_progress -= 1
        rid = spec.replica_id
        proc = self.processes[rid] = FakeProcess(rid)
        return proc


class FakeConnection:
    """What the pool uses of a ``ReplicaConnection``."""

    def __init__(
        self,
        address: str,
        on_state: Callable[[ReplicaState], None],
        process: FakeProcess,
    ) -> None:
        self.replica_id = address.removeprefix("fake:")
        self.process = process
        self.state = ReplicaState()
        self.in_flight = 0
        self.unanswered_calls = 0  # as the replica's reports count them
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.drain_gate = asyncio.Event()
        self.drain_gate.set()
        self.drained = False
        self.lost_models: list[str] = []  # in flight when it closed
        self.counters: dict[str, float] = {}
        self.options: DeploymentOptions | None = None  # from Welcome
        self.on_state = on_state

    async def ping(self, *, events_after: int | None = None) -> Pong:
        return Pong(state=self.state, counters=dict(self.counters))

    async def drain(self, *, events_after: int | None = None, token: str | None = None) -> Drained:
        await self.drain_gate.wait()
        self.drained = True
        return Drained(counters=dict(self.counters))

    async def aclose(self) -> None:
        self.close_reason = self.close_reason or "closed by gateway"
        self.closed.set()
        if self.process.exit_on_close:
            self.process.exited.set()

    async def call(self, **kwargs: Any) -> Reply:
        return Reply(id=1, state=self.state, body=b"ok")


class Fakes:
    def __init__(self) -> None:
        self.launcher = GatedLauncher()
        self.conns: dict[str, FakeConnection] = {}

    async def connect(
        self, address: str, on_state: Callable[[ReplicaState], None]
    ) -> FakeConnection:
        conn = FakeConnection(
            address, on_state, self.launcher.processes[address.removeprefix("fake:")]
        )
        self.conns[conn.replica_id] = conn
        return conn

    def pool(self, config: DeploymentConfig, **kw: Any) -> ReplicaPool:
        return ReplicaPool(
            config,
            launcher=self.launcher,
            make_spec=spec_of,
            connect=self.connect,  # type: ignore[arg-type]
            **kw,
        )


async def until(pool: ReplicaPool, check: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait for a pool condition (re-checked on every pool change)."""
    async with asyncio.timeout(within_s):
        await pool.wait_for(check)


async def test_starts_run_in_parallel_and_join_the_ring_only_when_ready() -> None:
    fakes = Fakes()
    pool = fakes.pool(
        DeploymentConfig(name="P", import_path="m:P", num_replicas=3), drain_timeout_s=25.0
    )
    pool.start()
    try:
        await until(pool, lambda: pool.counts()["starting"] == 3)
        await wait_until(lambda: fakes.launcher.in_progress == 3)
        assert len(pool.router) == 0 and not pool.targets  # not ready: not routable
        assert [s["state"] for s in pool.snapshot()["replicas"]] == ["starting"] * 3
        fakes.launcher.ready.set()
        await until(pool, lambda: pool.running == 3)
        assert fakes.launcher.most_in_progress == 3
        assert len(pool.router) == 3
        # A drain waits for the longest request: request timeout (25 - 5) s.
        assert {s.graceful_shutdown_timeout_s for s in fakes.launcher.specs} == {20.0}
    finally:
        await pool.aclose()


async def test_scale_down_drains_the_replicas_that_lose_the_fewest_models() -> None:
    fakes = Fakes()
    fakes.launcher.ready.set()
    pool = fakes.pool(DeploymentConfig(name="P", import_path="m:P", num_replicas=3))
    pool.start()
    try:
        await until(pool, lambda: pool.running == 3)
        r1, r2, r3 = sorted(pool.targets)
        pool.router.observe(r1, models=["a", "b"], loading=[])
        pool.router.observe(r2, models=["a"], loading=[])  # only a copy of "a"
        pool.router.observe(r3, models=["c"], loading=[])
        assert pool.router.removal_order()[0] == r2
        conn = fakes.conns[r2]
        conn.drain_gate.clear()
        conn.process.exit_on_close = False
        pool.set_target(2)
        await until(pool, lambda: pool.counts()["draining"] == 1)
        states = {s["id"]: s["state"] for s in pool.snapshot()["replicas"]}
        assert states == {r1: "running", r2: "draining", r3: "running"}
        assert r2 not in pool.router and r2 not in pool.targets  # out of the ring first
        conn.drain_gate.set()
        await until(pool, lambda: pool.counts()["stopping"] == 1)
        assert conn.drained and conn.closed.is_set()
        fakes.launcher.processes[r2].exited.set()  # the process exits
        await until(pool, lambda: len(pool.snapshot()["replicas"]) == 2)
        assert sorted(pool.targets) == [r1, r3]
        assert pool.snapshot()["target_replicas"] == 2
        assert "target=2" in repr(pool)
    finally:
        await pool.aclose()


async def test_model_load_time_estimate_feeds_the_queue_affinity_wait() -> None:
    fakes = Fakes()
    fakes.launcher.ready.set()
    pool = fakes.pool(DeploymentConfig(name="P", import_path="m:P", num_replicas=1))
    pool.start()
    try:
        await until(pool, lambda: pool.running == 1)
        (conn,) = fakes.conns.values()
        conn.counters = {"model_loads": 2.0, "model_load_seconds_sum": 3.0}  # 1.5 s each
        await wait_until(lambda: pool.load_time_s != 0.5)  # the poller pings about once a second
        assert pool.load_time_s == pytest.approx(0.5 + 0.3 * (1.5 - 0.5))
        assert pool.dispatcher.affinity_wait_s == pool.load_time_s
        assert pool.snapshot()["load_time_s"] == pytest.approx(0.8)
    finally:
        await pool.aclose()


async def test_autoscaled_pool_at_zero_activates_on_a_request() -> None:
    fakes = Fakes()
    fakes.launcher.ready.set()
    config = DeploymentConfig(
        name="P",
        import_path="m:P",
        autoscaling=AutoscalingConfig(
            min_replicas=0, max_replicas=2, metrics_interval_s=0.05, downscale_delay_s=60
        ),
    )
    pool = fakes.pool(config)
    pool.start()
    try:
        assert pool.target == 0 and pool.autoscaler is not None
        # Asking is not activating: only activate() (the dispatcher's call
        # when a request finds no replica) raises the target.
        assert not pool.is_starting() and pool.target == 0
        reply, rid = await pool.dispatcher.dispatch(
            request_id="r",
            model_id="m",
            http=HttpRequest(method="GET", path="/", query="", headers=[], body=b""),
            deadline=pool.dispatcher.clock() + 5,
        )
        assert reply.body == b"ok" and rid in pool.targets
        assert pool.snapshot()["target_replicas"] == 1
        # The autoscaler adopts the activator's target instead of undoing it.
        decisions = pool.autoscaler.decisions
        await wait_until(
            lambda: pool.autoscaler is not None and pool.autoscaler.decisions > decisions + 2
        )
        assert pool.target == 1 and pool.autoscaler.state.target == 1
        pool.set_target(5)
        assert pool.target == 2  # clamped to max_replicas
    finally:
        await pool.aclose()


# -- launchers that report replicas ---------------------------------------------


class Reporter:
    """A launcher that cannot create replicas: it reports a fixed set."""

    def __init__(self, names: list[str]) -> None:
        self.processes = {name: FakeProcess(name) for name in names}
        for process in self.processes.values():
            process.pid = None  # not a local process
        self.asked = 0

    async def ready_replicas(self, deployment: str) -> list[FakeProcess]:
        self.asked += 1
        return [p for p in self.processes.values() if p.deployment == deployment]

    async def aclose(self) -> None:
        pass


async def test_a_reporting_launcher_is_followed_and_its_replicas_are_not_stopped() -> None:
    fakes = Fakes()
    reporter = Reporter(["P@a", "P@b"])
    fakes.launcher.processes = reporter.processes  # the fake connect finds them
    pool = ReplicaPool(
        DeploymentConfig(name="P", import_path="m:P", num_replicas=3),
        launcher=reporter,  # type: ignore[arg-type]
        make_spec=spec_of,
        connect=fakes.connect,  # type: ignore[arg-type]
    )
    pool.start()
    try:
        await until(pool, lambda: pool.running == 2)
        # the reported names are the replica ids the ring hashes
        assert sorted(pool.targets) == ["P@a", "P@b"] and len(pool.router) == 2
        assert pool.target == 2  # the launcher's set, not num_replicas
        assert [r["pid"] for r in pool.snapshot()["replicas"]] == [None, None]
        # one goes away: it leaves the ring; the pool cannot start another
        fakes.conns["P@a"].close_reason = "replica closed the connection"
        fakes.conns["P@a"].closed.set()
        await until(pool, lambda: pool.running == 1)
        assert "P@a" not in pool.targets
        # reported again (restarted under its name): followed back in
        await wait_until(lambda: reporter.asked >= 2, within_s=5.0)
        await until(pool, lambda: pool.running == 2)
        assert sorted(pool.targets) == ["P@a", "P@b"]
    finally:
        await pool.aclose()
    assert not any(p.killed for p in reporter.processes.values())


async def test_replicas_running_when_the_pool_starts_are_adopted() -> None:
    fakes = Fakes()
    fakes.launcher.ready.set()
    adopted = FakeProcess("P#old")
    fakes.launcher.processes["P#old"] = adopted

    async def already_running(deployment: str) -> list[FakeProcess]:
        return [adopted] if deployment == "P" else []

    fakes.launcher.ready_replicas = already_running  # type: ignore[method-assign]
    pool = fakes.pool(DeploymentConfig(name="P", import_path="m:P", num_replicas=2))
    pool.start()
    try:
        await until(pool, lambda: pool.running == 2)
        assert "P#old" in pool.targets
        assert len(fakes.launcher.specs) == 1  # one adopted, one started
    finally:
        await pool.aclose()
    assert adopted.killed or adopted.exited.is_set()  # the pool stops what it runs


async def test_replica_call_counters_set_the_spill_price_service_time() -> None:
    fakes = Fakes()
    fakes.launcher.ready.set()
    pool = fakes.pool(DeploymentConfig(name="P", import_path="m:P", num_replicas=1))
    pool.start()
    try:
        await until(pool, lambda: pool.running == 1)
        (conn,) = fakes.conns.values()
        # 0.9 s busy over 100 calls, 10 of them loads of 0.09 s in all: 9 ms a hit.
        conn.counters = {
            "calls_finished": 100.0,
            "busy_seconds": 0.9,
            "model_loads": 10.0,
            "model_load_seconds_sum": 0.09,
        }
        await wait_until(lambda: pool.dispatcher.service_time.reported is not None)
        assert pool.router.service_s == pytest.approx(0.009)
        assert pool.dispatcher.service_time.value == pytest.approx(0.009)
        assert pool.snapshot()["service_time_s"] == pytest.approx(0.009)
    finally:
        await pool.aclose()
