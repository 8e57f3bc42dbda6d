"""The last minutes of each deployment, for the status page's charts.

Every ``interval_s`` (2 s) the gateway reads the cumulative counters it
already keeps for ``/-/metrics`` (requests by status, the request duration
histogram, cache hits and misses and model loads the replicas report) and
stores, per deployment, one :class:`Sample` of what happened since the last
read: request and 5xx rates, p50 and p99 latency, cache hit ratio, loads per
second. Samples go into a bounded ring (``keep_s``, 10 minutes), so memory
stays flat and ``GET /-/history`` has the whole window the moment the status
page opens.

The arithmetic is pure (:func:`read_totals` turns a Prometheus registry into
:class:`Totals`; :func:`sample_between` turns two of them into a sample;
:func:`histogram_quantile` estimates a quantile from bucket counts the way
Prometheus does, linear inside a bucket), and :class:`History` takes the time
as an argument, so tests need neither a gateway nor sleeps. ``run`` is the
loop around them.

The per-model view (``models``) ranks the model ids the deployment's replicas
hold, load or loaded recently by the router's popularity sketch (decayed
request counts, so "share" is the model's share of the last few thousand
requests), with the replicas holding each and its loads in the window from
the pool's event log. Per-model request counts are not kept (that is the
opt-in ``metrics.per_model_labels``), so a model's hit ratio is estimated as
``1 - loads / (share * requests)`` over the window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "History",
    "Sample",
    "Totals",
    "histogram_quantile",
    "model_view",
    "read_totals",
    "sample_between",
]

_log = logging.getLogger("muxgate.gateway.history")

DEFAULT_INTERVAL_S = 2.0
DEFAULT_KEEP_S = 600.0
#: models listed per deployment in the per-model view
TOP_MODELS = 15


@dataclass
class Totals:
    """Cumulative counters of one deployment at one moment."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    hits: float = 0.0
    misses: float = 0.0
    loads: float = 0.0
    #: request duration histogram: upper bound (s) -> cumulative count
    buckets: dict[float, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sample:
    """What one deployment did during one interval (rates per second)."""

    time: float
    requests_per_s: float
    errors_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    hit_ratio: float | None
    loads_per_s: float


class _Sampled(Protocol):
    def collect(self) -> Iterable[Any]: ...


def read_totals(registry: _Sampled) -> dict[str, Totals]:
    """Per deployment, the counters of a Prometheus registry (``GatewayMetrics.registry``)."""
    out: dict[str, Totals] = {}
    for family in registry.collect():
        for s in family.samples:
            deployment = s.labels.get("deployment")
            if deployment is None:
                continue
            name = s.name
            if name == "muxgate_requests_total":
                t = out.setdefault(deployment, Totals())
                t.requests += s.value
                if str(s.labels.get("status", "")).startswith("5"):
                    t.errors += s.value
            elif name == "muxgate_request_duration_seconds_bucket":
                t = out.setdefault(deployment, Totals())
                bound = float(s.labels["le"])
                t.buckets[bound] = t.buckets.get(bound, 0.0) + s.value
            elif name == "muxgate_cache_hits_total":
                out.setdefault(deployment, Totals()).hits += s.value
            elif name == "muxgate_cache_misses_total":
                out.setdefault(deployment, Totals()).misses += s.value
            elif name == "muxgate_model_loads_total":
                out.setdefault(deployment, Totals()).loads += s.value
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative bucket counts (upper bound -> count),
    linear inside the bucket it falls in, as Prometheus' ``histogram_quantile``;
    None with no observations. A quantile in the ``+Inf`` bucket is the
    largest finite bound."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return lower


def _delta(now: float, before: float) -> float:
    # A counter that went down restarted (a replica's base was folded): no rate.
    return now - before if now >= before else 0.0


def sample_between(before: Totals, now: Totals, seconds: float, at: float) -> Sample:
    """The sample for the interval between two readings ``seconds`` apart."""
    dt = max(seconds, 1e-9)
    lookups = _delta(now.hits, before.hits) + _delta(now.misses, before.misses)
    window = {b: _delta(c, before.buckets.get(b, 0.0)) for b, c in now.buckets.items()}
    p50, p99 = histogram_quantile(0.5, window), histogram_quantile(0.99, window)
    return Sample(
        time=at,
        requests_per_s=_delta(now.requests, before.requests) / dt,
        errors_per_s=_delta(now.errors, before.errors) / dt,
        p50_ms=None if p50 is None else p50 * 1000.0,
        p99_ms=None if p99 is None else p99 * 1000.0,
        hit_ratio=_delta(now.hits, before.hits) / lookups if lookups > 0 else None,
        loads_per_s=_delta(now.loads, before.loads) / dt,
    )


class History:
    """Bounded rings of :class:`Sample`, one per deployment."""

    def __init__(
        self, *, interval_s: float = DEFAULT_INTERVAL_S, keep_s: float = DEFAULT_KEEP_S
    ) -> None:
        if not interval_s > 0 or not keep_s >= interval_s:
            raise ValueError("need interval_s > 0 and keep_s >= interval_s")
        self.interval_s = interval_s
        self.capacity = int(keep_s // interval_s)
        self._rings: dict[str, deque[Sample]] = {}
        self._last: dict[str, Totals] = {}
        self._last_time: float | None = None

    def __repr__(self) -> str:
        sizes = {name: len(ring) for name, ring in self._rings.items()}
        return f"<History every {self.interval_s:g}s, capacity {self.capacity}, samples {sizes}>"

    def record(self, totals: Mapping[str, Totals], now: float) -> None:
        """Take a reading of every deployment's counters at ``now`` (Unix s);
        from the second reading on, each adds a sample."""
        if self._last_time is not None and now > self._last_time:
            seconds = now - self._last_time
            for name, current in totals.items():
                before = self._last.get(name, Totals())
                ring = self._rings.setdefault(name, deque(maxlen=self.capacity))
                ring.append(sample_between(before, current, seconds, now))
        self._last = {name: _copy(t) for name, t in totals.items()}
        self._last_time = now

    def samples(self, deployment: str) -> list[Sample]:
        """The deployment's samples, oldest first."""
        return list(self._rings.get(deployment, ()))

    def snapshot(self, names: Iterable[str] = ()) -> dict[str, Any]:
        """``GET /-/history``'s charts: per deployment (those sampled, and
        ``names``), one array per series (columnar: 10 minutes are a few kB)."""
        deployments: dict[str, Any] = {}
        for name in [*self._rings, *(n for n in names if n not in self._rings)]:
            ring = self._rings.get(name, deque())
            deployments[name] = {
                "time": [round(s.time, 3) for s in ring],
                "requests_per_s": [_round(s.requests_per_s) for s in ring],
                "errors_per_s": [_round(s.errors_per_s) for s in ring],
                "p50_ms": [_round(s.p50_ms) for s in ring],
                "p99_ms": [_round(s.p99_ms) for s in ring],
                "hit_ratio": [_round(s.hit_ratio, 4) for s in ring],
                "loads_per_s": [_round(s.loads_per_s) for s in ring],
            }
        return {"interval_s": self.interval_s, "deployments": deployments}

    def requests_since(self, deployment: str, since: float) -> float:
        """Requests the samples after ``since`` account for."""
        ring = self._rings.get(deployment, ())
        return sum(s.requests_per_s * self.interval_s for s in ring if s.time > since)

    async def run(
        self, read: Callable[[], Mapping[str, Totals]], clock: Callable[[], float] = time.time
    ) -> None:
        """Read and record every ``interval_s`` until cancelled."""
        while True:
            try:
                self.record(read(), clock())
            except Exception:  # a bad reading must not stop the history
                _log.exception("could not sample the gateway's counters")
            await asyncio.sleep(self.interval_s)


def _copy(t: Totals) -> Totals:
    return Totals(t.requests, t.errors, t.hits, t.misses, t.loads, dict(t.buckets))


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def model_view(
    snapshot: Mapping[str, Any],
    score: Callable[[str], float],
    requests_in_window: Callable[[float], float],
    now: float,
    window_s: float,
    top: int = TOP_MODELS,
) -> list[dict[str, Any]]:
    """The hottest models of one deployment, hottest first.

    Args:
        snapshot: the deployment's ``/-/replicas`` entry (replicas, events).
        score: the router's decayed request count of a model id.
        requests_in_window: the deployment's requests after a time (Unix s).
        now, window_s: the window loads and requests are counted over.
    """
    holders: dict[str, list[str]] = {}
    loading: dict[str, list[str]] = {}
    for rep in snapshot.get("replicas", []):
        for m in rep.get("models", []):
            holders.setdefault(m, []).append(rep["id"])
        for m in rep.get("loading", []):
            loading.setdefault(m, []).append(rep["id"])
    since = now - window_s
    loads: dict[str, int] = {}
    for e in snapshot.get("events", []):
        if e.get("kind") == "load" and e.get("time", 0) > since:
            loads[e["model"]] = loads.get(e["model"], 0) + 1
    candidates = set(holders) | set(loading) | set(loads)
    scores = {m: score(m) for m in candidates}
    total = sum(scores.values())
    requests = requests_in_window(since)
    ranked = sorted(candidates, key=lambda m: (-scores[m], m))[:top]
    view = []
    for m in ranked:
        share = scores[m] / total if total > 0 else 0.0
        expected = share * requests
        hit = max(0.0, 1.0 - loads.get(m, 0) / expected) if expected >= 1 else None
        view.append(
            {
                "model_id": m,
                "share": round(share, 4),
                "requests": round(expected),
                "loads": loads.get(m, 0),
                "hit_ratio": None if hit is None else round(hit, 4),
                "replicas": sorted(holders.get(m, [])),
                "loading_on": sorted(loading.get(m, [])),
            }
        )
    return view
