"""The replica pool of one deployment: start, watch, replace, drain.

A ``ReplicaPool`` keeps ``target`` replica processes of one deployment
running. It owns the deployment's ``Router`` and ``Dispatcher`` and the map
``targets`` (replica id -> connection) the dispatcher sends over.

The replicas' states, the start backoff and liveness are decided by a
``ReplicaSet`` (``muxgate.gateway._replica_set``: synchronous, on the pool's
clock); the pool does the starting, connecting and polling. Life of a replica::

    STARTING --ready--> RUNNING --death--> (removed, replaced)
                           |
                           +--scale down--> DRAINING --Drained--> STOPPING --exit--> (removed)

* Starts run in parallel; a replica joins the router only when its process
  said READY and the handshake succeeded. Repeated start failures back off
  exponentially (0.5 s doubling, capped at 30 s); the last failure reason is
  kept for ``/-/replicas``.
* A replica is dead when its connection closes or it stops answering pings.
  It leaves the router at once (the dispatcher fails its in-flight calls with
  502 through the connection) and the reconciler starts a replacement.
* Scale-down (``set_target``) drains the replicas that are cheapest to lose
  (``Router.removal_order``: fewest models held nowhere else, then fewest in
  flight): a replica leaves the ring first, so no new request goes to it,
  then gets ``Drain``, finishes what it has in flight, unloads its models
  through their hooks (reason ``drain``), answers ``Drained`` and exits.
  The replica's ``graceful_shutdown_timeout_s`` is set to the request
  timeout (no request can need longer) and the pool waits that plus
  ``DRAIN_MARGIN_S`` before it closes the connection (then SIGKILL after
  ``EXIT_GRACE_S``).
* A replica that reports more resident memory than the deployment's
  ``max_replica_rss_bytes`` is drained the same way and replaced
  (``MemoryLimit`` decides). Each death of a running replica is reported to
  the ``Quarantine`` with the model ids it was busy with; the dispatcher
  asks it before routing a request.
* An autoscaled deployment gets an ``Autoscaler`` loop (started by
  ``start()``), which moves ``target`` with the policy. At zero replicas the
  pool is also the activator: the dispatcher calls ``activate()`` when a
  request finds no replica, which raises the target to one at once; the
  request waits in the dispatcher's queue.

Every reply and pong refreshes the router's view of the replica through the
connection's ``on_state`` callback; a poller pings each replica about once a
second for counters (metrics), liveness and the model load/unload events it
logged since the last ping (kept in a ``ModelEventLog``, shown by ``snapshot()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from muxgate.gateway._autoscaler import Autoscaler
from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._dispatch import Dispatcher
from muxgate.gateway._memory_limit import MemoryLimit
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._pool_reports import INITIAL_LOAD_TIME_S, LoadTimeEstimate, ModelEventLog
from muxgate.gateway._quarantine import Quarantine
from muxgate.gateway._replica_set import (
    DRAINING,
    PING_TIMEOUT_S,
    RUNNING,
    STARTING,
    STOPPING,
    Replica,
    ReplicaSet,
)
from muxgate.gateway._router import Router
from muxgate.gateway._warmer import warm_replica
from muxgate.gateway._warming import (
    DEFAULT_WARM_LIMIT,
    after_zero,
    handed_over,
    handover_bound_s,
    moved_home,
)
from muxgate.gateway.launchers import LaunchedReplica, Launcher, ReplicaReporter
from muxgate.replicas import DeploymentOptions
from muxgate.replicas.contract import (
    DEFAULT_MAX_ONGOING_REQUESTS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    Pong,
    ReplicaSpec,
    ReplicaState,
)

__all__ = [
    "DRAINING",
    "RUNNING",
    "STARTING",
    "STOPPING",
    "ReplicaPool",
]

_log = logging.getLogger("muxgate.gateway.pool")

PING_INTERVAL_S = 1.0
#: seconds a process gets to exit after its connection closed, before SIGKILL
EXIT_GRACE_S = 5.0
#: the pool waits for ``Drained`` this much longer than the replica's own
#: graceful timeout (models unload after the in-flight calls finish)
DRAIN_MARGIN_S = 5.0


Connector = Callable[[str, Callable[[ReplicaState], None]], Awaitable[ReplicaConnection]]
SpecFactory = Callable[[DeploymentConfig, str], ReplicaSpec]


async def _connect(address: str, on_state: Callable[[ReplicaState], None]) -> ReplicaConnection:
    return await ReplicaConnection.connect(address, on_state=on_state)


class ReplicaPool:
    """Keeps ``target`` replicas of one deployment running.

    Args:
        config: the deployment.
        launcher: where replicas run (``muxgate.gateway.launchers``): one
            that creates replicas is asked to start and stop them; one that
            only reports them (``ReplicaReporter``) is followed. Replicas it
            reports ready when the pool starts are adopted, not started.
        make_spec: ``(deployment config, replica id) -> spec`` for the launcher.
        metrics: optional ``GatewayMetrics`` to report replicas and counters to.
        connect: ``(address, on_state) -> ReplicaConnection`` (a seam for tests).
        per_model_labels: pass model ids to per-model metrics.
        drain_timeout_s: how long a scale-down waits for a replica's
            ``Drained``; the replica's graceful timeout is this minus
            ``DRAIN_MARGIN_S`` (the gateway passes request timeout + 5 s).
        clock: monotonic seconds for the replica set (start backoff,
            liveness), the autoscaler and the quarantine (a seam for tests).
    """

    def __init__(
        self,
        config: DeploymentConfig,
        *,
        launcher: ReplicaReporter,
        make_spec: SpecFactory,
        metrics: GatewayMetrics | None = None,
        connect: Connector = _connect,
        per_model_labels: bool = False,
        drain_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self._launcher = launcher
        #: the launcher, when it creates replicas (None: it only reports them)
        self._creator: Launcher | None = launcher if isinstance(launcher, Launcher) else None
        self._make_spec = make_spec
        self._metrics = metrics
        self._connect = connect
        self._drain_timeout = drain_timeout_s
        self.router = Router(
            balance_factor=config.routing.balance_factor,
            virtual_nodes=config.routing.virtual_nodes,
            max_ongoing_requests=(config.max_ongoing_requests or DEFAULT_MAX_ONGOING_REQUESTS),
            min_capacity=config.routing.min_capacity,
            spill_rule=config.routing.spill,
        )
        #: the replicas, their states, start backoff and liveness
        self.replicas = ReplicaSet(config.name, clock=clock)
        #: replica id -> connection, for RUNNING replicas only
        self.targets: dict[str, ReplicaConnection] = {}
        #: model ids that keep killing replicas (see ``muxgate.gateway._quarantine``)
        self.quarantine = Quarantine(
            config.quarantine,
            name=config.name,
            clock=clock,
            on_refusal=(
                functools.partial(metrics.count_quarantine_refusal, config.name)
                if metrics is not None
                else None
            ),
        )
        if metrics is not None:
            metrics.watch_quarantine(config.name, self.quarantine.active)
        self.dispatcher = Dispatcher(
            config.name,
            self.router,
            self.targets,
            max_queued_requests=(
                config.max_queued_requests
                if config.max_queued_requests is not None
                else DEFAULT_MAX_QUEUED_REQUESTS
            ),
            starting=self.is_starting,
            activate=self.activate,
            unavailable_reason=self.replicas.unavailable_reason,
            metrics=metrics,
            per_model_labels=per_model_labels,
            affinity_wait_s=(
                config.routing.queue_affinity_wait_s
                if config.routing.queue_affinity_wait_s is not None
                else INITIAL_LOAD_TIME_S
            ),
            admit=self.quarantine.check,
        )
        self._load_time = LoadTimeEstimate()
        self.target = config.initial_replicas
        self.min_replicas: int = config.min_replicas
        self._class_options_known = False
        #: the class's ``@deployment(num_cpus=...)``, once a replica told it
        self._class_num_cpus: float | None = None
        self._events = ModelEventLog()
        self._memory = MemoryLimit(config.max_replica_rss_bytes)
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.autoscaler: Autoscaler | None = (
            Autoscaler(self, config.autoscaling, clock=clock)
            if config.autoscaling is not None
            else None
        )

    def __repr__(self) -> str:
        return (
            f"<ReplicaPool {self.name} target={self.target} {self.replicas!r}"
            f" queued={self.dispatcher.queued}>"
        )

    # -- public API ---------------------------------------------------------

    def start(self) -> None:
        """Start the reconciler, the poller and, if autoscaled, the autoscaler
        (on the running loop)."""
        self._spawn(self._follow_then_reconcile(), "reconcile")
        self._spawn(self._poll_loop(), "poll")
        if self.autoscaler is not None:
            self._spawn(self.autoscaler.run(), "autoscaler")

    def set_target(self, n: int) -> None:
        """Change the desired number of replicas (used by the autoscaler).

        For an autoscaled deployment the target stays within
        ``[0, max_replicas]`` whoever sets it.
        """
        n = max(0, n)
        if self.config.autoscaling is not None:
            n = min(n, self.config.autoscaling.max_replicas)
        changed = n != self.target
        self.target = n
        self._kick.set()
        if changed:
            self._changed.set()

    def load(self) -> tuple[int, int]:
        """``(in_flight, queued)`` requests of this deployment right now."""
        return self.dispatcher.in_flight, self.dispatcher.queued

    def counts(self) -> dict[str, int]:
        """Replicas by state."""
        return self.replicas.counts()

    @property
    def load_time_s(self) -> float:
        """Moving estimate of one model load (s), from the replicas' counters."""
        return self._load_time.value

    @property
    def running(self) -> int:
        return len(self.targets)

    @property
    def last_failure(self) -> str | None:
        """Why the last replica start failed (None: none failed)."""
        return self.replicas.last_failure

    def activate(self) -> None:
        """Activation from zero: requests wait and no replica runs. An
        autoscaled deployment at zero replicas raises its target to one at
        once (the dispatcher calls this when a request finds no replica)."""
        scaling = self.config.autoscaling
        if self._closing or scaling is None or scaling.max_replicas == 0:
            return
        if self.target == 0:
            self.set_target(1)

    def is_starting(self) -> bool:
        """Whether a replica is starting or about to be (requests may wait);
        a query only (``activate`` raises a target of zero)."""
        return not self._closing and self.replicas.is_starting(self.target, self.running)

    @property
    def healthy(self) -> bool:
        """At least ``min_replicas`` running."""
        return self.running >= self.min_replicas

    async def wait_healthy(self) -> None:
        """Wait until ``healthy`` (bound it with ``asyncio.timeout``)."""
        await self.wait_for(lambda: self.healthy)

    async def wait_for(self, check: Callable[[], bool]) -> None:
        """Wait until ``check()`` holds; it is re-evaluated whenever a replica
        changes state or the target moves (bound it with ``asyncio.timeout``)."""
        while not check():
            self._changed.clear()
            await self._changed.wait()

    def status_line(self) -> str:
        """One line for start-up errors: running vs wanted, last start failure."""
        reason = f"; last start failure: {self.last_failure}" if self.last_failure else ""
        return f"{self.name}: {self.running} of {self.min_replicas} replicas running{reason}"

    def snapshot(self) -> dict[str, Any]:
        """The deployment's entry of ``GET /-/replicas``."""
        replicas = []
        for rep in sorted(self.replicas, key=lambda r: r.id):
            conn = rep.conn
            state = conn.state if conn is not None else ReplicaState()
            replicas.append(
                {
                    "id": rep.id,
                    "state": rep.state,
                    "pid": rep.process.pid if rep.process is not None else None,
                    "address": rep.process.address if rep.process is not None else None,
                    "in_flight": conn.in_flight if conn is not None else 0,
                    "models": list(state.models),
                    "loading": list(state.loading),
                    "rss_bytes": rep.rss_bytes,
                    "model_bytes": rep.model_bytes,
                    "pinned": list(rep.pinned),
                }
            )
        out: dict[str, Any] = {
            "target_replicas": self.target,
            "queued": self.dispatcher.queued,
            "in_flight": self.dispatcher.in_flight,
            "replicas": replicas,
            "last_failure": self.last_failure,
            "load_time_s": round(self.load_time_s, 4),
            "events": self._events.snapshot(),
            "quarantined": self.quarantine.snapshot(),
        }
        scaling = self.config.autoscaling
        if scaling is not None:
            out["autoscaling"] = {
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
            }
        return out

    async def refresh_counters(self, timeout_s: float) -> None:
        """Ask every running replica for its counters now (``GET /-/metrics``).

        The poller's Ping/Pong on each replica's connection, all replicas at
        once, bounded by ``timeout_s`` overall. A replica that does not answer
        in time keeps its last counters; unlike in the poller, a missed answer
        says nothing about its liveness. Never raises for a replica.
        """
        running = [
            (rep, rep.conn)
            for rep in self.replicas
            if rep.state == RUNNING and rep.conn is not None
        ]

        async def refresh(rep: Replica, conn: ReplicaConnection) -> None:
            try:
                pong = await conn.ping(events_after=rep.events_seq)
            except Exception:
                return  # closed or closing: _run_replica and the poller handle it
            self._on_pong(rep, pong)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(refresh(rep, conn) for rep, conn in running))

    async def aclose(self) -> None:
        """Stop every replica (connection closed, then SIGKILL after a grace);
        a launcher whose ``replicas_outlive_gateway`` is true keeps them
        running (their connections close)."""
        self._closing = True
        self.dispatcher.wake()  # fail waiters: nothing will start any more
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        reps = list(self.replicas)
        if getattr(self._creator, "replicas_outlive_gateway", False):
            # Left running for the next gateway to adopt (Ray's detached actors).
            await asyncio.gather(*(self._release(rep) for rep in reps), return_exceptions=True)
        else:
            await asyncio.gather(*(self._stop(rep) for rep in reps), return_exceptions=True)
        self.replicas.clear()
        self._report()

    # -- internals ----------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"muxgate-pool-{self.name}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("pool task %s failed", task.get_name(), exc_info=task.exception())

    def _report(self) -> None:
        self._changed.set()
        if self._metrics is not None:
            self._metrics.set_replicas(self.name, self.counts())

    async def _follow_then_reconcile(self) -> None:
        await self._adopt_reported()
        if self._creator is None:
            # The launcher decides which replicas exist: follow its reports.
            while True:
                await asyncio.sleep(PING_INTERVAL_S)
                await self._adopt_reported()
        await self._reconcile_loop()

    async def _adopt_reported(self) -> None:
        """Serve the replicas the launcher reports ready that the pool does
        not know yet (by name: one restarted under its name is the same
        replica to the ring)."""
        try:
            reported = await self._launcher.ready_replicas(self.name)
        except Exception:
            _log.exception("%s: the launcher could not report its replicas", self.name)
            return
        for replica in reported:
            if replica.name not in self.replicas:
                rep = self.replicas.add(replica.name, replica)
                rep.task = self._spawn(self._run_replica(rep), rep.id)
        if self._creator is None:
            self.target = len(self.replicas)
        self._report()

    async def _reconcile_loop(self) -> None:
        while True:
            self._reconcile()
            delay = self.replicas.backoff_left()
            self._kick.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._kick.wait()
            else:
                await self._kick.wait()

    def _reconcile(self) -> None:
        # Decide synchronously, then spawn the I/O.
        missing = self.replicas.missing(self.target)
        if missing > 0:
            for _ in range(missing):
                rep = self.replicas.add()
                rep.task = self._spawn(self._run_replica(rep), rep.id)
            self._report()
        elif missing < 0:
            # Prefer cancelling starts, then drain the cheapest running replicas.
            for rep, was_running in self.replicas.scale_down(-missing, self.router.removal_order()):
                handing_over = was_running and len(self.targets) > 1
                if handing_over:  # it serves on until its next homes hold its models
                    self._spawn(self._hand_over_then_drain(rep), f"drain-{rep.id}")
                    continue
                self._leave(rep)
                self._spawn(self._drain(rep), f"drain-{rep.id}")
            self._report()

    async def _run_replica(self, rep: Replica) -> None:
        """Start one replica (unless it was adopted), serve until it dies,
        then make room for a new one."""
        try:
            if rep.process is None:
                assert self._creator is not None  # only a creating launcher starts
                rep.wakes = not self.targets and self.dispatcher.queued > 0
                rep.process = await self._creator.start(self._spec(rep.id, defer=rep.wakes))
            rep.conn = await self._connect(
                rep.process.address, lambda state: self._on_state(rep.id, state)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._start_failed(rep, exc)
            return
        if rep.state != STARTING:  # scaled down while starting: the drain task owns it
            return
        if rep.conn.options is not None and not self._class_options_known:
            self._adopt_class_options(rep.conn.options)
        self.replicas.running(rep)
        self.targets[rep.id] = rep.conn
        self.router.add_replica(rep.id)
        self._on_state(rep.id, rep.conn.state)
        _log.info("replica %s running (pid %s, %s)", rep.id, rep.process.pid, rep.process.address)
        self._report()
        self.dispatcher.wake()  # the waking requests are sent before any warming
        if rep.wakes and len(self.targets) == 1:
            self._spawn(self._warm_after_zero(rep, rep.conn), f"warm-{rep.id}")
        elif len(self.targets) > 1:
            self._spawn(self._warm_moved(rep, rep.conn), f"warm-{rep.id}")
        await rep.conn.closed.wait()
        if rep.state == RUNNING and not self._closing:
            conn = rep.conn
            self.quarantine.replica_died(
                rep.id, conn.close_reason, conn.lost_models, conn.state.loading, conn.state.models
            )
            self._leave(rep)
            self.replicas.remove(rep)
            self._kick.set()  # replace it
            self._report()
            self.dispatcher.wake()
            await self._stop(rep)

    def _adopt_class_options(self, options: DeploymentOptions) -> None:
        """Take the class's ``@deployment`` options for what the config leaves unset.

        The gateway never imports user code, so it learns them from the first
        replica's handshake; until then the defaults apply (a queue of 1000,
        8 requests per replica, one replica).
        """
        self._class_options_known = True
        self._class_num_cpus = options.num_cpus
        config = self.config
        if config.max_ongoing_requests is None:
            self.router.set_max_ongoing_requests(options.max_ongoing_requests)
        if config.max_queued_requests is None:
            self.dispatcher.max_queued_requests = options.max_queued_requests
        wanted = options.num_replicas
        fixed_by_class = config.num_replicas is None and config.autoscaling is None
        if fixed_by_class and wanted is not None and wanted != self.target:
            self.target = self.min_replicas = wanted
            self._kick.set()
        _log.info(
            "%s: @deployment options %s (config overrides: %s)",
            self.name,
            msgspec.structs.asdict(options),
            {
                k: v
                for k in ("max_ongoing_requests", "max_queued_requests", "num_replicas", "num_cpus")
                if (v := getattr(config, k)) is not None
            },
        )

    def _spec(self, replica_id: str, *, defer: bool = False) -> ReplicaSpec:
        spec = self._make_spec(self.config, replica_id)
        if defer and (spec.preload or spec.pinned):
            # Loaded after the waking requests instead (_warm_after_zero).
            spec = msgspec.structs.replace(spec, preload=[], pinned=[])
        # A drain must be able to wait for the longest request (the
        # gateway's request timeout); the pool waits DRAIN_MARGIN_S more.
        graceful = max(1.0, self._drain_timeout - DRAIN_MARGIN_S)
        if spec.graceful_shutdown_timeout_s != graceful:
            spec = msgspec.structs.replace(spec, graceful_shutdown_timeout_s=graceful)
        if spec.num_cpus is None and self._class_num_cpus is not None:
            # The launcher counts budgets against the host's cores.
            spec = msgspec.structs.replace(spec, num_cpus=self._class_num_cpus)
        return spec

    async def _warm_after_zero(self, rep: Replica, conn: ReplicaConnection) -> None:
        """The first replica after zero: the config's deferred ``pinned`` and
        ``preload`` ids, then the hottest models of the deployment's warm set
        (docs/routing.md, "Warm models")."""
        config = self.config
        ranked = self.router.popularity.top(2 * DEFAULT_WARM_LIMIT)
        plan = after_zero(
            ranked,
            {*conn.state.models, *conn.state.loading},
            deferred=[*config.pinned, *config.preload],
            refused=[m for m, _ in ranked if self.quarantine.retry_after(m) is not None],
        )
        await warm_replica(
            conn,
            plan,
            pinned=config.pinned,
            loader=config.multiplexed_loader,
            timeout_s=self._drain_timeout,
            running=lambda: rep.state == RUNNING,
        )

    async def _warm_moved(self, rep: Replica, conn: ReplicaConnection) -> None:
        """A replica joined: it warms the recently requested models whose home it is now."""
        router = self.router
        plan = moved_home(
            router.popularity.top(4 * DEFAULT_WARM_LIMIT),
            rep.id,
            router.preference_list,
            lambda replica_id, model_id: replica_id in router.holders(model_id),
        )
        await warm_replica(
            conn,
            plan,
            loader=self.config.multiplexed_loader,
            timeout_s=self._drain_timeout,
            running=lambda: rep.state == RUNNING,
        )

    async def _hand_over_then_drain(self, rep: Replica) -> None:
        """Scale-down of a running replica: its recently requested models are
        warmed on their next homes while it keeps serving (bounded by
        ``handover_bound_s``), then it leaves the ring and drains."""
        router = self.router
        conn = rep.conn
        try:
            if conn is not None:
                plan = handed_over(
                    conn.state.models,
                    rep.id,
                    router.popularity.score,
                    router.preference_list,
                    lambda replica_id, model_id: replica_id in router.holders(model_id),
                )
                bound = handover_bound_s(self._load_time.value, plan)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(bound):
                        await asyncio.gather(
                            *(
                                warm_replica(
                                    self.targets[home],
                                    models,
                                    loader=self.config.multiplexed_loader,
                                    timeout_s=bound,
                                )
                                for home, models in plan.items()
                                if home in self.targets
                            )
                        )
        finally:
            self._leave(rep)
        await self._drain(rep)

    def _start_failed(self, rep: Replica, exc: Exception) -> None:
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        delay = self.replicas.start_failed(rep, str(reason))
        _log.error(
            "replica %s of %s failed to start (%s); next try in %.1f s",
            rep.id,
            self.name,
            reason,
            delay,
        )
        if rep.process is not None:
            # Killed here, not in a task that shutdown could cancel: no orphans.
            self._kill(rep.process)
            self._spawn(self._stop(rep), f"reap-{rep.id}")
        self._report()
        self._kick.set()
        self.dispatcher.wake()

    def _on_state(self, replica_id: str, state: ReplicaState) -> None:
        self.router.observe(replica_id, models=state.models, loading=state.loading)

    def _leave(self, rep: Replica) -> None:
        """Take a replica out of routing (first step of draining or removal)."""
        self.targets.pop(rep.id, None)
        self.router.remove_replica(rep.id)
        self._memory.forget(rep.id)
        if self._metrics is not None:
            self._metrics.forget_replica(self.name, rep.id)

    async def _drain(self, rep: Replica) -> None:
        try:
            if rep.task is not None and rep.conn is None:
                rep.task.cancel()  # still starting: abandon the start
                with contextlib.suppress(BaseException):
                    await rep.task
            if rep.conn is not None:
                # In-flight calls finish; the replica unloads its models and exits.
                _log.info("draining replica %s", rep.id)
                try:
                    async with asyncio.timeout(self._drain_timeout):
                        drained = await rep.conn.drain(events_after=rep.events_seq)
                except Exception as exc:
                    _log.warning("replica %s did not drain cleanly: %r", rep.id, exc)
                else:
                    rep.events_seq = self._events.add(rep.id, rep.events_seq, drained.events)
                    if self._metrics is not None:
                        # Drained carries the drain's unloads, counted after the last Pong.
                        self._metrics.final_replica_counters(self.name, rep.id, rep.conn.counters)
        finally:
            rep.state = STOPPING
            self._report()
            await self._stop(rep)
            self.replicas.remove(rep)
            self._report()

    async def _release(self, rep: Replica) -> None:
        """Close the connection and leave the replica running; one still
        starting is killed (no one would know of it)."""
        if rep.conn is not None:
            with contextlib.suppress(Exception):
                await rep.conn.aclose()
        elif rep.process is not None:
            self._kill(rep.process)

    async def _stop(self, rep: Replica) -> None:
        """Close the connection and make sure the process is gone."""
        if rep.conn is not None:
            with contextlib.suppress(Exception):
                await rep.conn.aclose()
        proc, creator = rep.process, self._creator
        if proc is None or creator is None:
            return  # a replica the pool did not start is not the pool's to stop
        if rep.conn is None:
            # Never connected (start abandoned): nothing to finish, no grace.
            self._kill(proc)
        try:
            async with asyncio.timeout(EXIT_GRACE_S):
                await creator.wait_exit(proc)
        except TimeoutError:
            self._kill(proc)
            with contextlib.suppress(Exception):
                await creator.wait_exit(proc)

    def _kill(self, replica: LaunchedReplica) -> None:
        """Forcibly, now (synchronous: a cancelled task still leaves no orphan)."""
        if self._creator is not None:
            with contextlib.suppress(ProcessLookupError):
                self._creator.kill(replica)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            running = [r for r in self.replicas if r.state == RUNNING and r.conn]
            await asyncio.gather(*(self._ping(rep) for rep in running), return_exceptions=True)

    async def _ping(self, rep: Replica) -> None:
        conn = rep.conn
        assert conn is not None
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                pong = await conn.ping(events_after=rep.events_seq)
        except Exception:
            if self.replicas.silent(rep):
                _log.warning("replica %s stopped answering pings; killing it", rep.id)
                if rep.process is not None:
                    self._kill(rep.process)
                await conn.aclose()  # wakes _run_replica, which replaces it
            return
        self._on_pong(rep, pong)

    def _on_pong(self, rep: Replica, pong: Pong) -> None:
        """A replica answered a ping (the poller's or a scrape's): liveness,
        load time estimate, model events, counters for the metrics."""
        self.replicas.answered(rep)
        rep.loads_seen = self._load_time.observe(rep.loads_seen, pong.counters)
        self.router.load_s = self._load_time.value  # the price of a spill
        if self.config.routing.queue_affinity_wait_s is None:
            # Cache hits overtake the queue head for about one load time.
            self.dispatcher.affinity_wait_s = self._load_time.affinity_wait_s()
        rep.events_seq = self._events.add(rep.id, rep.events_seq, pong.events)
        rep.rss_bytes = pong.rss_bytes
        rep.model_bytes, rep.pinned = pong.model_bytes, pong.pinned
        if self._metrics is not None and rep.state == RUNNING:
            self._metrics.set_replica_counters(self.name, rep.id, pong.counters)
            self._metrics.set_replica_model_bytes(self.name, rep.id, pong.model_bytes)
            if pong.rss_bytes is not None:
                self._metrics.set_replica_rss(self.name, rep.id, pong.rss_bytes)
        if (
            rep.state == RUNNING
            and rep.conn is not None
            and not self._closing
            and self._memory.should_replace(rep.id, pong.rss_bytes, rep.conn.state)
        ):
            self._replace_for_memory(rep)

    def _replace_for_memory(self, rep: Replica) -> None:
        """Drain a replica over its memory limit; the reconciler replaces it.

        Drained, not killed: its in-flight calls finish and its models unload
        through their hooks (reason ``drain``). Requests that arrive before
        the replacement runs go to the other replicas, or wait in the queue.
        """
        rep.state = DRAINING
        self._leave(rep)
        if self._metrics is not None:
            self._metrics.count_memory_replacement(self.name)
        self._spawn(self._drain(rep), f"drain-{rep.id}")
        self._kick.set()
        self._report()
