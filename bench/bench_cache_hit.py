"""Cost of a model cache hit: awaiting a @multiplexed loader whose model is loaded.

Compared with awaiting a trivial coroutine (the floor of any async call).
Each sample times a batch of BATCH calls with perf_counter_ns and divides, so
the timer's own cost is spread; median and p99 are over the samples.

    .venv/bin/python bench/bench_cache_hit.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from _common import print_machine

from muxgate.replicas._context import request_scope
from muxgate.replicas._multiplex import model_cache, multiplexed

BATCH = 10


async def trivial(model_id: str) -> str:
    return model_id


@multiplexed(max_num_models_per_replica=3)
async def get_model(model_id: str) -> str:
    return f"model-{model_id}"


class Deployment:
    @multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str) -> str:
        return f"model-{model_id}"


async def measure(call: Callable[[str], Awaitable[Any]], calls: int) -> list[float]:
    """Per-call microseconds, one value per batch."""
    samples: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(calls // BATCH):
        start = clock()
        for _ in range(BATCH):
            await call("1")
        samples.append((clock() - start) / BATCH / 1000)
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


async def main(calls: int) -> None:
    instance = Deployment()
    await get_model("1")
    await instance.get_model("1")
    for warm in (trivial, get_model, instance.get_model):
        await measure(warm, calls // 10)

    rows: list[tuple[str, list[float]]] = [
        ("await trivial coroutine", await measure(trivial, calls)),
        ("hit, plain function", await measure(get_model, calls)),
        ("hit, method (per-instance cache)", await measure(instance.get_model, calls)),
    ]
    # Inside a request each hit also pins the model and registers the unpin.
    samples: list[float] = []
    for _ in range(calls // BATCH):
        with request_scope("bench", "1"):
            start = time.perf_counter_ns()
            for _ in range(BATCH):
                await get_model("1")
            samples.append((time.perf_counter_ns() - start) / BATCH / 1000)
    rows.append(("hit inside a request (pins)", samples))
    assert model_cache(get_model).pins() == {}

    base = statistics.median(rows[0][1])
    print_machine()
    print(f"calls per row: {calls} (batches of {BATCH})")
    print(f"{'case':<36} {'median us':>10} {'p99 us':>9} {'x trivial':>10}")
    for name, values in rows:
        median = statistics.median(values)
        print(f"{name:<36} {median:>10.3f} {p99(values):>9.3f} {median / base:>10.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    anyio.run(main, max(args.calls, 10 * BATCH))
