"""Router decision time at 10, 100 and 1,000 replicas with 100,000 model ids.

Run: .venv/bin/python bench/bench_router.py [--decisions N] [--models N] [--replicas 10,100,1000]

Each decision is choose() + acquire(), with releases keeping the deployment at
about half of max_ongoing_requests per replica (so bounded-load spills happen),
and a replica report (observe, LRU order, 3 models per replica) every 50
decisions. Model ids are drawn from a Zipf(1.1) distribution over the id
space, so most decisions for the long tail are cold misses that take the
placement path (victim popularity on up to 4 replicas); "placed %" counts the
decisions it moved off the first candidate. "cold" is a first pass where every
model id is new to the preference cache, "warm" the steady state.
Bounded: at most ~60 s in total.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
import statistics
import time

from _common import print_machine

from muxgate.gateway._router import Router


def zipf_sampler(n: int, s: float, rng: random.Random) -> list[float]:
    weights = [1.0 / (k**s) for k in range(1, n + 1)]
    return list(itertools.accumulate(weights))


def run(n_replicas: int, n_models: int, decisions: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    max_ongoing = 8
    router = Router(max_ongoing_requests=max_ongoing, rng=random.Random(seed))
    t0 = time.perf_counter()
    for i in range(n_replicas):
        router.add_replica(f"replica-{i}")
    router.choose("warm-up")  # the ring is sorted lazily on first use
    build_ms = (time.perf_counter() - t0) * 1e3
    model_ids = [f"model-{i}" for i in range(n_models)]
    cum = zipf_sampler(n_models, 1.1, rng)
    total = cum[-1]
    target_in_flight = n_replicas * max_ongoing // 2
    in_flight: list[tuple[str, str]] = []
    # Replica-side LRU view (K=3) so observe() reports realistic sets.
    caches: dict[str, list[str]] = {r: [] for r in router.replica_ids}
    cold: list[float] = []
    for m in model_ids[: min(n_models, 20_000)]:  # first sight of each id
        t = time.perf_counter_ns()
        router.choose(m)
        cold.append(time.perf_counter_ns() - t)
    times: list[float] = []
    choose_only: list[float] = []
    picks = [model_ids[bisect.bisect_left(cum, rng.random() * total)] for _ in range(decisions)]
    perf = time.perf_counter_ns
    spills = placed = 0
    for i, m in enumerate(picks):
        t = perf()
        d = router.choose(m)
        t1 = perf()
        if d is not None:
            router.acquire(d.replica_id, m)
        t2 = perf()
        choose_only.append(t1 - t)
        times.append(t2 - t)
        if d is None:
            continue
        spills += d.spillover
        placed += d.reason == "placed"
        in_flight.append((d.replica_id, m))
        cache = caches[d.replica_id]
        if m in cache:
            cache.remove(m)
        cache.append(m)
        del cache[:-3]
        while len(in_flight) > target_in_flight:
            router.release(*in_flight.pop(rng.randrange(len(in_flight))))
        if i % 50 == 0:
            router.observe(d.replica_id, models=cache, loading=[])
    times.sort()
    choose_only.sort()
    return {
        "build_ms": build_ms,
        "cold_median_us": statistics.median(cold) / 1e3,
        "median_us": statistics.median(times) / 1e3,
        "p99_us": times[int(len(times) * 0.99)] / 1e3,
        "choose_median_us": statistics.median(choose_only) / 1e3,
        "choose_p99_us": choose_only[int(len(choose_only) * 0.99)] / 1e3,
        "spill_pct": 100.0 * spills / len(picks),
        "placed_pct": 100.0 * placed / len(picks),
        "p2c_us": p2c_time(router),
    }


def p2c_time(router: Router) -> float:
    times = []
    for _ in range(20_000):
        t = time.perf_counter_ns()
        router.choose("")
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--replicas", default="10,100,1000", help="comma-separated pool sizes")
    args = parser.parse_args()
    print_machine()
    print(f"model ids: {args.models:,} (Zipf 1.1), decisions per row: {args.decisions:,}")
    header = (
        f"{'replicas':>8} {'build ms':>9} {'cold µs':>8} {'choose p50':>11} "
        f"{'choose p99':>11} {'+acquire p50':>13} {'+acquire p99':>13} {'spill %':>8} "
        f"{'placed %':>9} {'p2c µs':>7}"
    )
    print(header)
    print("-" * len(header))
    for n in (int(r) for r in args.replicas.split(",")):
        r = run(n, args.models, args.decisions)
        print(
            f"{n:>8} {r['build_ms']:>9.1f} {r['cold_median_us']:>8.2f} "
            f"{r['choose_median_us']:>11.2f} {r['choose_p99_us']:>11.2f} "
            f"{r['median_us']:>13.2f} {r['p99_us']:>13.2f} {r['spill_pct']:>8.2f} "
            f"{r.get('placed_pct', 0.0):>9.2f} {r['p2c_us']:>7.2f}"
        )


if __name__ == "__main__":
    main()
