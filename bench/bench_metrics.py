"""Per-request cost of the gateway's metrics (GatewayMetrics.observe_request).

Run: .venv/bin/python bench/bench_metrics.py [--calls N] [--repeats R]

Every request the gateway answers calls ``observe_request`` once (a counter
increment by status and a histogram observation), so its cost is paid on the
hot path. Rows:

* ``observe_request``: the real method, 10 deployments' worth of statuses
  (9 in 10 answered 200, 1 in 10 a 500), with and without per-model labels
  (8 model ids);
* ``uncached labels() (wave 1)``: the same two series updated the way the
  wave-1 code did, ``labels()`` on both metrics per call plus a lock for a
  request count, reproduced here with the public prometheus_client API so
  before and after are measured in one run on one machine;
* ``children only``: ``inc()`` + ``observe()`` on pre-resolved children, the
  floor any caching of labelled children can reach;
* ``set_queue_length`` and ``count_spillover``, also cached now.

Each number is the best of R rounds of N calls (ns per call; best-of because
this machine is shared and noise only adds). Bounded: about 10 s by default.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

from _common import print_machine
from prometheus_client import CollectorRegistry, Counter, Histogram

from muxgate.gateway._metrics import REQUEST_DURATION_BUCKETS, GatewayMetrics

STATUSES = [200] * 9 + [500]
MODELS = [f"m{i}" for i in range(8)]


def best_ns(body: Callable[[int], None], calls: int, repeats: int) -> float:
    """Best-of-``repeats`` ns per call of ``body(i)`` over ``calls`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for i in range(calls):
            body(i)
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


class UncachedReference:
    """What wave 1's observe_request did per call: labels() twice, and a lock."""

    def __init__(self, per_model_labels: bool) -> None:
        registry = CollectorRegistry()
        model = ["model"] if per_model_labels else []
        self.per_model_labels = per_model_labels
        self.requests = Counter(
            "ref_requests_total", "", ["deployment", "status", *model], registry=registry
        )
        self.duration = Histogram(
            "ref_request_duration_seconds",
            "",
            ["deployment", *model],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self.lock = threading.Lock()
        self.seen = 0

    def observe_request(
        self, deployment: str, status: int, seconds: float, model_id: str = ""
    ) -> None:
        if self.per_model_labels:
            self.requests.labels(deployment, str(status), model_id).inc()
            self.duration.labels(deployment, model_id).observe(seconds)
        else:
            self.requests.labels(deployment, str(status)).inc()
            self.duration.labels(deployment).observe(seconds)
        with self.lock:
            self.seen += 1

    def children(self, status: int, model_id: str) -> tuple[Counter, Histogram]:
        """The two labelled children one request updates, resolved once."""
        if self.per_model_labels:
            return (
                self.requests.labels("Model", str(status), model_id),
                self.duration.labels("Model", model_id),
            )
        return self.requests.labels("Model", str(status)), self.duration.labels("Model")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    calls, repeats = args.calls, args.repeats

    rows: list[tuple[str, str, float]] = []
    for per_model in (False, True):
        labels = "per-model labels" if per_model else "default labels"
        metrics = GatewayMetrics(per_model_labels=per_model)
        reference = UncachedReference(per_model)

        def real(i: int, m: GatewayMetrics = metrics) -> None:
            m.observe_request("Model", STATUSES[i % 10], 0.003, MODELS[i % 8])

        def old(i: int, r: UncachedReference = reference) -> None:
            r.observe_request("Model", STATUSES[i % 10], 0.003, MODELS[i % 8])

        resolved = {(s, mid): reference.children(s, mid) for s in set(STATUSES) for mid in MODELS}

        def floor(
            i: int, table: dict[tuple[int, str], tuple[Counter, Histogram]] = resolved
        ) -> None:
            c, h = table[(STATUSES[i % 10], MODELS[i % 8])]
            c.inc()
            h.observe(0.003)

        # Interleaved, so a noisy neighbour hurts every row alike.
        for _ in range(2):
            old_ns = best_ns(old, calls, repeats)
            new_ns = best_ns(real, calls, repeats)
            floor_ns = best_ns(floor, calls, repeats)
        rows.append((f"uncached labels() (wave 1), {labels}", "observe_request", old_ns))
        rows.append((f"cached children (now), {labels}", "observe_request", new_ns))
        rows.append((f"children only (floor), {labels}", "inc+observe", floor_ns))

    metrics = GatewayMetrics()
    rows.append(
        (
            "cached child",
            "set_queue_length",
            best_ns(lambda i: metrics.set_queue_length("Model", i & 7), calls, repeats),
        )
    )
    rows.append(
        (
            "cached child",
            "count_spillover",
            best_ns(lambda i: metrics.count_spillover("Model", "m1"), calls, repeats),
        )
    )

    print_machine()
    print(f"calls per round: {calls}, best of {repeats} rounds (after one warm-up pass)")
    print()
    print(f"{'variant':<48} {'call':<18} {'ns/call':>9}")
    for variant, call, ns in rows:
        print(f"{variant:<48} {call:<18} {ns:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
