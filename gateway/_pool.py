"""The replica pool of one deployment: start, watch, replace, drain.

A ``ReplicaPool`` keeps ``target`` replica processes of one deployment
running. It owns the deployment's ``Router`` and ``Dispatcher`` and the map
``targets`` (replica id -> connection) the dispatcher sends over.

Its parts, each in a module of its own:

* ``ReplicaSet`` (``_replica_set``): the replicas' states (STARTING, RUNNING,
  DRAINING, STOPPING), the start backoff and liveness; synchronous, on the
  pool's clock.
* ``ReplicaProcesses`` (``_pool_processes``): specs, starts and stops through
  the launcher.
* ``HealthPoller`` (``_pool_health``): pings each running replica about once
  a second; ``ReplicaReports`` (``_pool_reports``) keeps what the pongs say
  (load time, model events, counters for the metrics).
* ``PoolWarming`` (``_pool_warming``): the warming when a replica joins or
  leaves (after zero, a moved home, a hand-over; carried out by ``_warmer``).
* ``ReplicaFeedback`` (``_pool_feedback``): what each reply and pong
  changes in the router and the dispatcher; the memory limit check.
* ``routing_side`` (``_pool_routing``): the router, quarantine and
  dispatcher, built from the config; the dispatcher records in
  ``FailedLoads`` (``_load_failures``) the model ids whose last load
  failed, which warming leaves out.
* ``Roles`` (``_pool_roles``): whether the pool follows the launcher, a
  leader, or reconciles on its own; adopts the replicas already running.

The pool does the rest: it starts replicas in parallel (one joins the router
once its process said READY and the handshake succeeded), replaces a dead one
(its connection closed or it stopped answering pings: it leaves the router at
once and the dispatcher fails its in-flight calls with 502), and drains on
scale-down (``set_target``) the replicas cheapest to lose
(``Router.removal_order``): a replica leaves the ring, gets ``Drain``,
finishes its calls, unloads its models through their hooks (reason
``drain``), answers ``Drained`` and exits. A replica over the deployment's
``max_replica_rss_bytes`` (``MemoryLimit``) is drained the same way and
replaced. Each death of a running replica is reported to the ``Quarantine``
with the model ids it was busy with; the dispatcher asks it before routing.
Where gateways share the replicas and the launcher has a leader lease
(``ray``), the pool acts (reconciles, autoscales, replaces, drains) only
while this gateway holds it; otherwise it serves the replicas the launcher
reports (its requests wait for those the leader starts) and starts, stops
and kills none.
An autoscaled deployment gets an ``Autoscaler`` loop, which moves ``target``;
at zero replicas the dispatcher calls ``activate()`` when a request finds no
replica, which raises the target to one (the request waits in the queue).
Every reply and pong refreshes the router's view of a replica through the
connection's ``on_state`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from muxgate.gateway._autoscaler import Autoscaler
from muxgate.gateway._config import DeploymentConfig
from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._load_failures import FailedLoads
from muxgate.gateway._memory_limit import MemoryLimit
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._pool_feedback import ReplicaFeedback
from muxgate.gateway._pool_health import HealthPoller
from muxgate.gateway._pool_processes import ReplicaProcesses, SpecFactory, how_it_ended
from muxgate.gateway._pool_reports import ReplicaReports
from muxgate.gateway._pool_roles import Roles
from muxgate.gateway._pool_routing import routing_side
from muxgate.gateway._pool_warming import PoolWarming
from muxgate.gateway._replica_set import (
    DRAINING,
    RUNNING,
    STARTING,
    STOPPING,
    Replica,
    ReplicaSet,
)
from muxgate.gateway.launchers import ReplicaReporter
from muxgate.replicas import DeploymentOptions
from muxgate.replicas.contract import ReplicaState

__all__ = [
    "DRAINING",
    "RUNNING",
    "STARTING",
    "STOPPING",
    "ReplicaPool",
]

_log = logging.getLogger("muxgate.gateway.pool")


Connector = Callable[[str, Callable[[ReplicaState], None]], Awaitable[ReplicaConnection]]


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
            liveness), dispatcher, autoscaler and quarantine (a test seam).
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
        #: the launcher side: specs, starts, stops
        self._procs = ReplicaProcesses(config, launcher, make_spec, drain_timeout_s=drain_timeout_s)
        self._metrics = metrics
        self._connect = connect
        self._drain_timeout = drain_timeout_s
        #: the replicas, their states, start backoff and liveness
        self.replicas = ReplicaSet(config.name, clock=clock)
        #: replica id -> connection, for RUNNING replicas only
        self.targets: dict[str, ReplicaConnection] = {}
        #: the model ids whose last load failed (warming leaves them out)
        self.failed_loads = FailedLoads()
        #: the ring, the model ids that keep killing replicas, the queue
        self.router, self.quarantine, self.dispatcher = routing_side(
            config,
            self.targets,
            starting=self.is_starting,
            activate=self.activate,
            unavailable_reason=self.replicas.unavailable_reason,
            metrics=metrics,
            per_model_labels=per_model_labels,
            clock=clock,
            failed_loads=self.failed_loads,
        )
        #: what the replicas report in their pongs (and metrics fed from it)
        self._reports = ReplicaReports(
            config.name, metrics, half_life=self.router.popularity.half_life
        )
        self._warming = PoolWarming(
            config,
            self.router,
            self.targets,
            self._reports,
            refused=lambda model_id: self.quarantine.suspected(model_id),
            failed_loads=self.failed_loads,
            spawn=self._spawn,
            timeout_s=drain_timeout_s,
            draining=lambda: {r.id for r in self.replicas.in_state(DRAINING)},
        )
        self.target = config.initial_replicas
        self.min_replicas: int = config.min_replicas
        self._memory = MemoryLimit(config.max_replica_rss_bytes)
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        #: set while ``serve`` gives up at a failed start of a pool not yet
        #: healthy (the log then promises no next try)
        self.start_failure_is_final = False
        self._feedback = ReplicaFeedback(
            config,
            self.router,
            self.dispatcher,
            self.targets,
            self.replicas,
            self._reports,
            self._memory,
            may_replace=lambda: not self._closing and self._procs.may_act,
            replace=self._replace_for_memory,
        )
        self._health = HealthPoller(self.replicas, self._feedback.on_pong, self._silent)
        self.autoscaler: Autoscaler | None = (
            Autoscaler(self, config.autoscaling, clock=clock)
            if config.autoscaling is not None
            else None
        )
        #: following the launcher or the leader lease, else reconciling
        self._roles = Roles(
            config.name,
            self._procs,
            self.replicas,
            spawn=self._spawn,
            serve=self._run_replica,
            reconcile=self._reconcile_loop,
            set_target=self._take_target,
            running=lambda: self.running,
            load=lambda: (self.dispatcher.in_flight, self.dispatcher.queued),
            autoscaling=config.autoscaling,
            autoscaler=self.autoscaler,
            kick=self._kick,
            report=self._report,
            metrics=metrics,
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
        self._spawn(self._roles.run(), "reconcile")
        self._spawn(self._health.run(), "poll")
        if self.autoscaler is not None and self._procs.leadership is None:
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
        """``(in_flight, queued)`` requests of this deployment right now; with a
        leader lease, the other gateways' as last reported too."""
        others = self._procs.leadership.others_load if self._procs.leadership else (0, 0)
        return self.dispatcher.in_flight + others[0], self.dispatcher.queued + others[1]

    def counts(self) -> dict[str, int]:
        """Replicas by state."""
        return self.replicas.counts()

    @property
    def load_time_s(self) -> float:
        """Moving estimate of one model load (s), from the replicas' counters."""
        return self._reports.load_time.value

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
        out: dict[str, Any] = {
            "target_replicas": self.target,
            "queued": self.dispatcher.queued,
            "in_flight": self.dispatcher.in_flight,
            "replicas": self._reports.rows(self.replicas),
            "last_failure": self.last_failure,
            "load_time_s": round(self.load_time_s, 4),
            # the spill price's interval between slots freeing (docs/routing.md)
            "service_time_s": round(self.dispatcher.service_time.value, 6),
            "events": self._reports.events.snapshot(),
            "quarantined": self.quarantine.snapshot(),
        }
        if self._procs.leadership is not None:
            out["lease"] = self._procs.leadership.snapshot()
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
        await self._health.refresh(timeout_s)

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
        if self._procs.outlive_gateway:
            # Left running for the next gateway to adopt (Ray's detached actors).
            await asyncio.gather(
                *(self._procs.release(rep) for rep in reps), return_exceptions=True
            )
        else:
            await asyncio.gather(*(self._procs.stop(rep) for rep in reps), return_exceptions=True)
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

    def _take_target(self, n: int) -> None:
        self.target = n

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
        on_state = self._feedback.on_state
        try:
            if rep.process is None:
                rep.wakes = not self.targets and self.dispatcher.queued > 0
                rep.process = await self._procs.start(rep.id, defer=rep.wakes)
            rep.conn = await self._connect(
                rep.process.address, lambda state: on_state(rep.id, state)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._start_failed(rep, exc)
            return
        if rep.state != STARTING:  # scaled down while starting: the drain task owns it
            return
        if rep.conn.options is not None and self._procs.learn_class_options(rep.conn.options):
            self._adopt_class_options(rep.conn.options)
        self.replicas.running(rep)
        self.targets[rep.id] = rep.conn
        self.router.add_replica(rep.id)
        on_state(rep.id, rep.conn.state)
        _log.info("replica %s running (pid %s, %s)", rep.id, rep.process.pid, rep.process.address)
        self._report()
        self.dispatcher.wake()  # the waking requests are sent before any warming
        self._warming.joined(rep, rep.conn)
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
            code = await self._procs.stop(rep)
            if code is not None:  # how it died: the connection's close does not say
                _log.warning("replica %s %s", rep.id, how_it_ended(code))

    def _adopt_class_options(self, options: DeploymentOptions) -> None:
        """Take the class's ``@deployment`` options for what the config leaves unset.

        The gateway never imports user code, so it learns them from the first
        replica's handshake; until then the defaults apply (a queue of 1000,
        8 requests per replica, one replica).
        """
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

    async def _hand_over_then_drain(self, rep: Replica) -> None:
        """Scale-down of a running replica: its recently requested models are
        warmed on their next homes while it keeps serving (``hand_over``),
        then it leaves the ring and drains."""
        try:
            await self._warming.hand_over(rep)
        finally:
            self._leave(rep)
        await self._drain(rep)

    def _start_failed(self, rep: Replica, exc: Exception) -> None:
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        delay = self.replicas.start_failed(rep, str(reason))
        if self.start_failure_is_final and not self.healthy:
            _log.error("replica %s of %s failed to start (%s)", rep.id, self.name, reason)
        else:
            _log.error(
                "replica %s of %s failed to start (%s); next try in %.1f s",
                rep.id,
                self.name,
                reason,
                delay,
            )
        if rep.process is not None:
            # Killed here, not in a task that shutdown could cancel: no orphans.
            self._procs.kill(rep.process)
            self._spawn(self._procs.stop(rep), f"reap-{rep.id}")
        self._report()
        self._kick.set()
        self.dispatcher.wake()

    def _leave(self, rep: Replica) -> None:
        """Take a replica out of routing (first step of draining or removal)."""
        self.targets.pop(rep.id, None)
        self.router.remove_replica(rep.id)
        self._memory.forget(rep.id)
        self._reports.forget(rep.id)
        if not self._closing:
            # Requests waiting for it as their model's only holder (``spill:
            # never`` has no timer that looks again) may now go elsewhere.
            self.dispatcher.wake()

    async def _drain(self, rep: Replica) -> None:
        try:
            if rep.task is not None and rep.conn is None:
                rep.task.cancel()  # still starting: abandon the start
                with contextlib.suppress(BaseException):
                    await rep.task
            if rep.conn is not None and self._procs.may_act:
                # In-flight calls finish; the replica unloads its models and exits.
                # (Not if the lease moved on meanwhile: then it is only let go.)
                _log.info("draining replica %s", rep.id)
                try:
                    async with asyncio.timeout(self._drain_timeout):
                        may, token = await self._procs.admit_drain(rep)
                        if may:
                            drained = await rep.conn.drain(events_after=rep.events_seq, token=token)
                except Exception as exc:
                    _log.warning("replica %s did not drain cleanly: %r", rep.id, exc)
                else:
                    if may:
                        self._reports.drained(rep, drained, rep.conn.counters)
        finally:
            rep.state = STOPPING
            self._report()
            await self._procs.stop(rep)
            self.replicas.remove(rep)
            self._report()

    async def _silent(self, rep: Replica, conn: ReplicaConnection) -> None:
        _log.warning("replica %s stopped answering pings; killing it", rep.id)
        if rep.process is not None:
            self._procs.kill(rep.process)
        await conn.aclose()  # wakes _run_replica, which replaces it

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
