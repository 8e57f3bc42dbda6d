"""Prometheus metrics of one gateway.

Every ``GatewayMetrics`` owns its own ``CollectorRegistry`` (never the
process-global one), so several gateways in one process (tests, embedding)
do not share or clash over series. Names follow the Prometheus conventions:
prefix ``muxgate_``, base units (seconds), ``_total`` on counters.

Two kinds of series:

* **Gateway-side** (requests, request duration, queue length, replicas by
  state, spillovers) are observed by the gateway itself and kept in ordinary
  ``prometheus_client`` metrics.
* **Replica-side** (model loads, load failures, unloads by reason, cache hits
  and misses, load duration buckets, models loaded) are cumulative counters each
  replica process reports in its ``Pong``. The gateway stores the latest
  snapshot per replica and a custom collector sums them per deployment at
  scrape time. A replica that goes away (drained, died, replaced) is folded
  into a retained per-deployment base by ``forget_replica``, and a replica
  whose counters go backwards (a restarted process reusing an id) has its
  previous values folded in the same way, so every ``_total`` the gateway
  exposes is monotonic: ``rate()`` and ``increase()`` never see a false reset.
  A replica's last counters after it stopped polling (a drain unloads its
  models after it left routing) go in with ``final_replica_counters``, which
  adds only what was not counted yet.

Per-model labels (``model``) on requests, request duration and spillovers are
opt-in through ``per_model_labels=True``: with thousands of models each label
value is a new series in Prometheus.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from muxgate.replicas.contract import (
    MODEL_LOAD_BUCKETS,
    MODELS_LOADED_KEY,
    REPLICA_COUNTER_KEYS,
    UNLOAD_REASONS,
    load_bucket_key,
)

__all__ = ["OTHER_MODELS", "REQUEST_DURATION_BUCKETS", "GatewayMetrics"]

#: the ``model`` label of the ids past ``metrics.max_model_labels``
OTHER_MODELS: Final = "(other)"

#: Request latency spans a cache hit (about a millisecond) to a cold model
#: load behind a queue (tens of seconds); roughly 2.5x steps over that range.
REQUEST_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: forgotten replicas remembered for late final reports (ids are never reused)
_FORGOTTEN_MAX: Final = 1024


class _ReplicaCounters(Collector):
    """Sums the cumulative counters replicas report, per deployment.

    State: ``_live[(deployment, replica_id)]`` is the latest snapshot of each
    known replica; ``_base[deployment]`` holds what replicas that are gone (or
    that reset) had counted. Exposed total = base + sum of live snapshots,
    which can only grow because a snapshot leaves ``_live`` only by being
    added to ``_base``.

    Load duration: the gateway never sees individual loads, so each replica
    keeps its own histogram as cumulative per-bucket counters (keys such as
    ``model_load_seconds_le_0.5``, bounds ``MODEL_LOAD_BUCKETS``). Bucket
    counts merge by the same base + live sum as every other key, and
    ``collect`` emits them as ``muxgate_model_load_duration_seconds``, whose
    ``+Inf`` bucket is ``model_loads`` and whose sum is ``model_load_seconds_sum``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[tuple[str, str], dict[str, float]] = {}
        self._base: dict[str, dict[str, float]] = {}
        # What was folded into _base for recently forgotten replicas, so that
        # a final report arriving after ``forget`` adds only what is new.
        self._forgotten: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()

    @staticmethod
    def _snapshot(counters: Mapping[str, float]) -> dict[str, float]:
        snapshot = {key: float(counters.get(key, 0.0)) for key in REPLICA_COUNTER_KEYS}
        snapshot[MODELS_LOADED_KEY] = float(counters.get(MODELS_LOADED_KEY, 0.0))
        return snapshot

    def update(self, deployment: str, replica_id: str, counters: Mapping[str, float]) -> None:
        snapshot = self._snapshot(counters)
        with self._lock:
            previous = self._live.get((deployment, replica_id))
            if previous is not None and any(
                snapshot[key] < previous[key] for key in REPLICA_COUNTER_KEYS
            ):
                # The process behind this id started counting again: keep
                # what it had counted before, like Prometheus's reset handling.
                self._fold(deployment, previous)
            self._live[(deployment, replica_id)] = snapshot
            self._base.setdefault(deployment, dict.fromkeys(REPLICA_COUNTER_KEYS, 0.0))

    def forget(self, deployment: str, replica_id: str) -> None:
        key = (deployment, replica_id)
        with self._lock:
            last = self._live.pop(key, None)
            if last is not None:
                self._fold(deployment, last)
                self._remember(key, last)

    def final(self, deployment: str, replica_id: str, counters: Mapping[str, float]) -> None:
        """A gone replica's last counters: fold in what was not counted yet.

        Whether the replica is still live, was forgotten (its last polled
        snapshot already folded) or was never seen, each count ends up in
        the totals exactly once; a repeated final report adds nothing.
        """
        key = (deployment, replica_id)
        snapshot = self._snapshot(counters)
        with self._lock:
            live = self._live.pop(key, None)
            folded = self._forgotten.pop(key, None)
            reset = False
            if live is not None:
                reset = any(snapshot[k] < live[k] for k in REPLICA_COUNTER_KEYS)
                if reset:
                    self._fold(deployment, live)  # as update() does on a reset
                self._fold(deployment, snapshot)
            elif folded is not None:
                reset = any(snapshot[k] < folded[k] for k in REPLICA_COUNTER_KEYS)
                new = (
                    snapshot
                    if reset
                    else {k: snapshot[k] - folded[k] for k in REPLICA_COUNTER_KEYS}
                )
                self._fold(deployment, new)
            else:
                self._fold(deployment, snapshot)
            self._remember(key, snapshot)

    def _remember(self, key: tuple[str, str], folded: dict[str, float]) -> None:
        self._forgotten[key] = folded
        self._forgotten.move_to_end(key)
        while len(self._forgotten) > _FORGOTTEN_MAX:
            self._forgotten.popitem(last=False)

    def _fold(self, deployment: str, snapshot: Mapping[str, float]) -> None:
        base = self._base.setdefault(deployment, dict.fromkeys(REPLICA_COUNTER_KEYS, 0.0))
        for key in REPLICA_COUNTER_KEYS:
            base[key] += snapshot[key]

    def totals(self) -> dict[str, dict[str, float]]:
        """Per deployment, base plus every live replica's snapshot."""
        with self._lock:
            out = {deployment: dict(base) for deployment, base in self._base.items()}
            for (deployment, _), snapshot in self._live.items():
                total = out[deployment]
                for key in REPLICA_COUNTER_KEYS:
                    total[key] += snapshot[key]
            return out

    def models_loaded(self) -> list[tuple[str, str, float]]:
        with self._lock:
            return [
                (deployment, replica_id, snapshot[MODELS_LOADED_KEY])
                for (deployment, replica_id), snapshot in sorted(self._live.items())
            ]

    def live_count(self) -> int:
        with self._lock:
            return len(self._live)

    def collect(self) -> Iterable[Metric]:
        totals = self.totals()
        deployments = sorted(totals)

        def per_deployment(name: str, doc: str, key: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["deployment"])
            for deployment in deployments:
                family.add_metric([deployment], totals[deployment][key])
            return family

        yield per_deployment(
            "muxgate_model_loads_total", "Models loaded successfully by replicas.", "model_loads"
        )
        yield per_deployment(
            "muxgate_model_load_failures_total",
            "Model loads that raised.",
            "model_load_failures",
        )
        yield per_deployment(
            "muxgate_model_load_refused_ids_total",
            "Of those, loads of an id the storage refused (bad_model_id: the client's"
            " mistake, not the storage's).",
            "model_load_refused_ids",
        )
        yield per_deployment(
            "muxgate_model_load_not_found_total",
            "Of those, loads of an id the storage does not have (model_not_found: usually the"
            " client's mistake; every load of a deployment failing so points at its model root).",
            "model_load_not_found",
        )
        unloads = CounterMetricFamily(
            "muxgate_model_unloads_total",
            "Models unloaded by replicas, by reason (lru, shutdown, drain, admin).",
            labels=["deployment", "reason"],
        )
        for deployment in deployments:
            for reason in UNLOAD_REASONS:
                unloads.add_metric(
                    [deployment, reason], totals[deployment][f"model_unloads_{reason}"]
                )
        yield unloads
        durations = HistogramMetricFamily(
            "muxgate_model_load_duration_seconds",
            "Time replicas took to load a model (successful loads).",
            labels=["deployment"],
        )
        for deployment in deployments:
            total = totals[deployment]
            durations.add_metric(
                [deployment],
                buckets=[
                    *((str(bound), total[load_bucket_key(bound)]) for bound in MODEL_LOAD_BUCKETS),
                    ("+Inf", total["model_loads"]),
                ],
                sum_value=total["model_load_seconds_sum"],
            )
        yield durations
        yield per_deployment(
            "muxgate_model_load_cpu_seconds_total",
            "CPU time of the loaders' own code in successful model loads, on whichever"
            " thread ran it (not the time a load waited).",
            "model_load_cpu_seconds_sum",
        )
        yield per_deployment(
            "muxgate_load_step_waits_total",
            "Calls whose model was loaded that first waited out a load step under way"
            " (hits_wait_for_loads).",
            "load_step_waits",
        )
        yield per_deployment(
            "muxgate_load_step_wait_seconds_total",
            "Time those calls waited.",
            "load_step_wait_seconds_sum",
        )
        yield per_deployment(
            "muxgate_cache_hits_total",
            "Model lookups answered from a replica's cache.",
            "cache_hits",
        )
        yield per_deployment(
            "muxgate_cache_misses_total",
            "Model lookups that needed a load.",
            "cache_misses",
        )
        yield per_deployment(
            "muxgate_storage_stale_serves_total",
            "Model files served from a host's disk cache because storage could not be reached.",
            "storage_stale_serves",
        )
        loaded = GaugeMetricFamily(
            "muxgate_models_loaded",
            "Models currently loaded, per replica.",
            labels=["deployment", "replica"],
        )
        for deployment, replica_id, value in self.models_loaded():
            loaded.add_metric([deployment, replica_id], value)
        yield loaded


class GatewayMetrics:
    """The Prometheus metrics of one gateway, in a registry of its own.

    Series (all prefixed ``muxgate_``):

    * ``requests_total{deployment,status}``: finished requests by HTTP status.
    * ``request_duration_seconds{deployment}``: histogram, gateway-observed.
    * ``queue_length{deployment}``: requests waiting for a replica.
    * ``replicas{deployment,state}``: replicas by state (e.g. starting,
      running, draining).
    * ``spillovers_total{deployment}``: requests routed past the model's home
      replica by the bounded-load rule.
    * ``model_loads_total``, ``model_load_failures_total`` (of which
      ``model_load_refused_ids_total``: ids the storage refused, the
      client's mistake; and ``model_load_not_found_total``: ids the storage
      does not have), ``model_unloads_total{reason}``, ``cache_hits_total``,
      ``cache_misses_total``, ``storage_stale_serves_total`` (all
      ``{deployment}``): replica counters summed over replicas, monotonic
      across replica churn.
    * ``model_load_duration_seconds{deployment}``: histogram of load times,
      merged from the replicas' own histograms the same way.
    * ``model_load_cpu_seconds_total{deployment}``: CPU time the loaders' own
      code took in those loads (over ``model_loads_total``: a load's CPU cost).
    * ``load_step_waits_total{deployment}``, ``load_step_wait_seconds_total``:
      calls with a loaded model that waited out a load step (``hits_wait_for_loads``),
      and how long.
    * ``models_loaded{deployment,replica}``: per live replica.
    * ``replica_rss_bytes{deployment,replica}``: resident memory of each live
      replica process, as it last reported.
    * ``replica_model_bytes{deployment,replica}``: bytes of the models each
      live replica holds, as measured when each was loaded (the byte budget
      ``max_bytes_per_replica`` counts the same bytes).
    * ``replica_memory_replacements_total{deployment}``: replicas drained and
      replaced for passing ``max_replica_rss_bytes``.
    * ``quarantined_models{deployment}``: model ids refused now because they
      kept killing replicas; ``quarantine_refusals_total{deployment}``: the
      requests refused for it.
    * ``leader{deployment}``: 1 while this gateway holds the deployment's
      leader lease (it sizes the shared pool), 0 while it follows; only for
      deployments whose launcher has a lease (``ray``).

    With ``per_model_labels=True`` requests, request duration and spillovers
    also carry ``model`` (the multiplexed model id, ``""`` for none). The
    ids come from clients, any number of them: the first
    ``max_model_labels`` per deployment get a label of their own, the rest
    share :data:`OTHER_MODELS`, so a client sending random ids cannot grow
    the series without bound.

    Thread-safe; every method is cheap and non-blocking, so it can be called
    from the event loop.
    """

    def __init__(self, *, per_model_labels: bool = False, max_model_labels: int = 1000) -> None:
        self.per_model_labels = per_model_labels
        self.max_model_labels = max_model_labels
        #: the model ids labelled so far, per deployment (at most max_model_labels)
        self._model_labels: dict[str, set[str]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        model = ["model"] if per_model_labels else []
        self._requests = Counter(
            "muxgate_requests_total",
            "Requests answered by the gateway, by HTTP status.",
            ["deployment", "status", *model],
            registry=self.registry,
        )
        self._duration = Histogram(
            "muxgate_request_duration_seconds",
            "Time from request received to response started, as seen by the gateway.",
            ["deployment", *model],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._queue = Gauge(
            "muxgate_queue_length",
            "Requests waiting in the gateway for a replica.",
            ["deployment"],
            registry=self.registry,
        )
        self._replicas = Gauge(
            "muxgate_replicas",
            "Replicas by state.",
            ["deployment", "state"],
            registry=self.registry,
        )
        self._spillovers = Counter(
            "muxgate_spillovers_total",
            "Requests routed past the model's home replica because it was at capacity.",
            ["deployment", *model],
            registry=self.registry,
        )
        self._rss = Gauge(
            "muxgate_replica_rss_bytes",
            "Resident memory of each replica process, as it last reported.",
            ["deployment", "replica"],
            registry=self.registry,
        )
        self._model_bytes = Gauge(
            "muxgate_replica_model_bytes",
            "Bytes of the models each replica holds, as measured when each was loaded.",
            ["deployment", "replica"],
            registry=self.registry,
        )
        self._memory_replacements = Counter(
            "muxgate_replica_memory_replacements_total",
            "Replicas drained and replaced because they passed max_replica_rss_bytes.",
            ["deployment"],
            registry=self.registry,
        )
        self._quarantined = Gauge(
            "muxgate_quarantined_models",
            "Model ids refused now because they were loading or in flight in replica deaths.",
            ["deployment"],
            registry=self.registry,
        )
        self._quarantine_refusals = Counter(
            "muxgate_quarantine_refusals_total",
            "Requests refused with 503 quarantined.",
            ["deployment"],
            registry=self.registry,
        )
        self._leader = Gauge(
            "muxgate_leader",
            "1 while this gateway holds the deployment's leader lease (it sizes the pool), else 0.",
            ["deployment"],
            registry=self.registry,
        )
        self._replica_counters = _ReplicaCounters()
        self.registry.register(self._replica_counters)
        self._lock = threading.Lock()
        self._replica_states: dict[str, set[str]] = {}
        # Labelled children, cached: ``labels()`` costs about as much as the
        # increment and the observation together (a tuple build, a dict
        # lookup and a lock per call; see bench/bench_metrics.py). Key:
        # (deployment, status, model), model "" unless per-model labels are on.
        # Filled lazily without a lock of ours: two threads missing at once
        # both get the same child from ``labels()``, so either store is right.
        self._request_children: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}
        self._queue_children: dict[str, Gauge] = {}
        self._spillover_children: dict[tuple[str, str], Counter] = {}

    def observe_request(
        self, deployment: str, status: int, seconds: float, model_id: str = ""
    ) -> None:
        """Count one finished request and observe its duration."""
        key = (deployment, status, self._model_label(deployment, model_id))
        children = self._request_children.get(key)
        if children is None:
            children = self._new_request_children(key)
        children[0].inc()
        children[1].observe(seconds)

    def _model_label(self, deployment: str, model_id: str) -> str:
        """``model_id``'s label: ``""`` without per-model labels, else the id
        while the deployment has room for it, else :data:`OTHER_MODELS`."""
        if not self.per_model_labels or not model_id:
            return ""
        labelled = self._model_labels.get(deployment)
        if labelled is None:
            labelled = self._model_labels.setdefault(deployment, set())
        if model_id in labelled:
            return model_id
        if len(labelled) >= self.max_model_labels:
            return OTHER_MODELS
        labelled.add(model_id)
        return model_id

    def _new_request_children(self, key: tuple[str, int, str]) -> tuple[Counter, Histogram]:
        deployment, status, model_id = key
        if self.per_model_labels:
            children = (
                self._requests.labels(deployment, str(status), model_id),
                self._duration.labels(deployment, model_id),
            )
        else:
            children = (
                self._requests.labels(deployment, str(status)),
                self._duration.labels(deployment),
            )
        self._request_children[key] = children
        return children

    def set_queue_length(self, deployment: str, n: int) -> None:
        """Set how many requests of ``deployment`` wait for a replica."""
        child = self._queue_children.get(deployment)
        if child is None:
            child = self._queue_children[deployment] = self._queue.labels(deployment)
        child.set(n)

    def set_replicas(self, deployment: str, counts_by_state: Mapping[str, int]) -> None:
        """Set the replica count per state; states seen before but absent now go to 0.

        The first report of a deployment also creates its queue length and
        (without per-model labels) spillover series at 0, so dashboards and
        alerts see 0 rather than no data before the first queued or spilled
        request.
        """
        with self._lock:
            first = deployment not in self._replica_states
            states = self._replica_states.setdefault(deployment, set())
            states.update(counts_by_state)
            known = sorted(states)
        if first:
            self._queue.labels(deployment)
            self._memory_replacements.labels(deployment)
            if not self.per_model_labels:
                self._spillovers.labels(deployment)
        for state in known:
            self._replicas.labels(deployment, state).set(counts_by_state.get(state, 0))

    def set_leader(self, deployment: str, leading: bool) -> None:
        """Whether this gateway leads ``deployment`` now (``leader``)."""
        self._leader.labels(deployment).set(1 if leading else 0)

    def count_spillover(self, deployment: str, model_id: str = "") -> None:
        """Count one request routed away from its model's home replica."""
        key = (deployment, self._model_label(deployment, model_id))
        child = self._spillover_children.get(key)
        if child is None:
            if self.per_model_labels:
                child = self._spillovers.labels(deployment, model_id)
            else:
                child = self._spillovers.labels(deployment)
            self._spillover_children[key] = child
        child.inc()

    def set_replica_counters(
        self, deployment: str, replica_id: str, counters: Mapping[str, float]
    ) -> None:
        """Record a replica's latest cumulative counters (from its ``Pong``).

        Missing keys count as 0; unknown keys are ignored.
        """
        self._replica_counters.update(deployment, replica_id, counters)

    def forget_replica(self, deployment: str, replica_id: str) -> None:
        """Drop a replica that is gone; its counts stay in the deployment totals."""
        self._replica_counters.forget(deployment, replica_id)
        with contextlib.suppress(KeyError):
            self._rss.remove(deployment, replica_id)
        with contextlib.suppress(KeyError):
            self._model_bytes.remove(deployment, replica_id)

    def set_replica_rss(self, deployment: str, replica_id: str, rss_bytes: int) -> None:
        """Record a live replica's resident memory (from its ``Pong``)."""
        self._rss.labels(deployment, replica_id).set(rss_bytes)

    def set_replica_model_bytes(self, deployment: str, replica_id: str, nbytes: int) -> None:
        """Record the bytes of a live replica's loaded models (from its ``Pong``)."""
        self._model_bytes.labels(deployment, replica_id).set(nbytes)

    def count_memory_replacement(self, deployment: str) -> None:
        """Count one replica drained for passing its memory limit."""
        self._memory_replacements.labels(deployment).inc()

    def watch_quarantine(self, deployment: str, active: Callable[[], int]) -> None:
        """Report ``active()`` (ids quarantined now) at each scrape; also
        creates the refusal counter at 0."""
        self._quarantined.labels(deployment).set_function(active)
        self._quarantine_refusals.labels(deployment)

    def count_quarantine_refusal(self, deployment: str) -> None:
        """Count one request refused with 503 quarantined."""
        self._quarantine_refusals.labels(deployment).inc()

    def final_replica_counters(
        self, deployment: str, replica_id: str, counters: Mapping[str, float]
    ) -> None:
        """Record a departed replica's last cumulative counters (e.g. sent with
        ``Drained``, after it unloaded its models with reason ``drain``).

        Call it before or after ``forget_replica``: only what the replica
        counted since the snapshot already in the totals is added, so the
        unloads of a drain and the requests it finished are not lost and
        nothing is counted twice. The replica is no longer live afterwards.
        """
        self._replica_counters.final(deployment, replica_id, counters)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Render every series for a scrape.

        Args:
            accept: the scraper's ``Accept`` header; OpenMetrics is returned
                when it asks for it, the Prometheus text format otherwise.

        Returns:
            ``(body, content_type)``.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def requests_seen(self) -> int:
        """Requests counted so far, over every label set (a sum at call time)."""
        total = 0.0
        for family in self._requests.collect():
            for sample in family.samples:
                if sample.name == "muxgate_requests_total":
                    total += sample.value
        return int(total)

    def __repr__(self) -> str:
        return (
            f"GatewayMetrics(per_model_labels={self.per_model_labels}, "
            f"requests={self.requests_seen()}, "
            f"live_replicas={self._replica_counters.live_count()})"
        )
