"""``muxgate demo``: a self-contained tour of model multiplexing.

It writes ``--models`` small torch models to a temporary folder, starts a
gateway with ``--replicas`` local replica processes in this process, sends
``--requests`` requests whose model ids follow a Zipf distribution (a few hot
models, a long cold tail) from ``--concurrency`` concurrent clients, and
prints what happened: latency, errors, the cache hit rate, model loads and
unloads per replica and spillovers (requests the router sent past a model's
home replica because it was busy). ``--keep-running`` then keeps serving so
the status page can be opened. Ctrl-C stops everything at any point; no
replica outlives the command and the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import math
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

__all__ = ["DemoResult", "main", "zipf_weights"]

DEPLOYMENT = "Demo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxgate demo",
        description="Make demo models, serve them, drive Zipf traffic, print a summary.",
    )
    parser.add_argument("--models", type=int, default=24, help="number of models (default 24)")
    parser.add_argument("--replicas", type=int, default=3, help="replica processes (default 3)")
    parser.add_argument(
        "--max-models-per-replica",
        type=int,
        default=6,
        help="max_num_models_per_replica of the cache (default 6)",
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests (default 3000)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument(
        "--zipf", type=float, default=1.1, help="Zipf exponent of model popularity (default 1.1)"
    )
    parser.add_argument(
        "--load-delay-ms",
        type=float,
        default=50.0,
        help="extra milliseconds per model load, standing in for big weights (default 50)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: any free)")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="keep serving after the summary until Ctrl-C (to look at the status page)",
    )
    return parser


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks 1..n with P(rank k) proportional to 1/k**exponent."""
    return list(itertools.accumulate(1.0 / (k**exponent) for k in range(1, n + 1)))


@dataclass
class DemoResult:
    """What the traffic phase observed (client side)."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Progress:
    """A one-line progress bar on stderr (a line per 10 % when not a terminal)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, done: int, errors: int) -> None:
        now = time.perf_counter()
        if self.tty:
            if done < self.total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 30
            filled = int(width * done / max(1, self.total))
            rate = done / max(1e-9, now - self.started)
            self.stream.write(
                f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
                f"  {rate:,.0f} req/s  errors {errors} "
            )
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
            return
        decile = done * 10 // max(1, self.total)
        if decile != self._last_decile:
            self._last_decile = decile
            print(f"  {done}/{self.total} requests, errors {errors}", file=self.stream, flush=True)


async def drive(
    url: str,
    model_ids: Sequence[str],
    *,
    requests: int,
    concurrency: int,
    exponent: float,
    seed: int,
    progress: _Progress | None = None,
) -> DemoResult:
    """Send ``requests`` POSTs with Zipf-distributed model ids; bounded in count."""
    rng = random.Random(seed)
    cumulative = zipf_weights(len(model_ids), exponent)
    total = cumulative[-1]
    # Popularity order is shuffled so the hot models are not simply "1", "2", ...
    ranked = list(model_ids)
    rng.shuffle(ranked)
    plan = [ranked[bisect.bisect(cumulative, rng.random() * total)] for _ in range(requests)]
    result = DemoResult()
    next_index = iter(range(requests))
    body = b'{"x": [0.5, -1.0, 2.0, 0.25]}'

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in next_index:
            start = time.perf_counter()
            try:
                response = await client.post(
                    f"{url}/",
                    content=body,
                    headers={
                        "serve_multiplexed_model_id": plan[i],
                        "content-type": "application/json",
                    },
                )
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            result.latencies.append(time.perf_counter() - start)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status != 200:
                result.errors += 1
            if progress is not None:
                progress.update(result.requests, result.errors)

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(limits=limits, timeout=60.0, trust_env=False) as client,
        asyncio.TaskGroup() as tg,
    ):
        for _ in range(concurrency):
            tg.create_task(client_loop(client))
    result.seconds = time.perf_counter() - started
    return result


_SPILLOVERS = re.compile(
    rb'^muxgate_spillovers_total\{[^}]*deployment="'
    + DEPLOYMENT.encode()
    + rb'"[^}]*\}\s+([0-9.eE+-]+)$',
    re.MULTILINE,
)


async def _replica_rows(gateway: Any) -> list[dict[str, Any]]:
    """Per replica: counters from a fresh ping, models now loaded."""
    pool = gateway.pools[DEPLOYMENT]
    rows = []
    for replica_id, conn in sorted(pool.targets.items()):
        counters: dict[str, float] = dict(conn.counters)
        models: list[str] = list(conn.state.models)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                pong = await conn.ping()
            counters, models = dict(pong.counters), list(pong.state.models)
        rows.append({"id": replica_id, "pid": conn.pid, "counters": counters, "models": models})
    return rows


def _spillovers(metrics_text: bytes) -> int:
    return int(sum(float(m) for m in _SPILLOVERS.findall(metrics_text)))


def format_summary(
    ns: argparse.Namespace, result: DemoResult, rows: list[dict[str, Any]], spillovers: int
) -> str:
    """The summary table (plain text)."""
    hits = sum(r["counters"].get("cache_hits", 0.0) for r in rows)
    misses = sum(r["counters"].get("cache_misses", 0.0) for r in rows)
    hit_rate = hits / (hits + misses) if hits + misses else 0.0
    rate = result.requests / result.seconds if result.seconds else 0.0
    lines = [
        "",
        f"muxgate demo: {ns.models} models, {ns.replicas} replicas, "
        f"max {ns.max_models_per_replica} models per replica, zipf {ns.zipf:g}, "
        f"concurrency {ns.concurrency}",
        "",
        f"  {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}"
        f" {'cache hit rate':>15} {'spillovers':>11}",
        f"  {result.requests:>9} {result.errors:>7} {result.percentile(0.5) * 1000:>8.1f}"
        f" {result.percentile(0.99) * 1000:>8.1f} {rate:>8.0f} {hit_rate:>15.1%} {spillovers:>11}",
        "",
        f"  {'replica':<14} {'pid':>7} {'calls':>6} {'hits':>6} {'loads':>6} {'joined':>7}"
        f" {'unloads':>8}  models now (least recently used first)",
    ]
    for r in rows:
        c = r["counters"]
        calls = int(c.get("cache_hits", 0) + c.get("cache_misses", 0))
        loads = int(c.get("model_loads", 0))
        # misses that neither loaded nor failed a load: they waited for a load
        # of the same model already under way
        failed = int(c.get("model_load_failures", 0))
        joined = max(0, int(c.get("cache_misses", 0)) - loads - failed)
        unloads = int(
            c.get("model_unloads_lru", 0)
            + c.get("model_unloads_drain", 0)
            + c.get("model_unloads_shutdown", 0)
            + c.get("model_unloads_admin", 0)
        )
        lines.append(
            f"  {r['id']:<14} {r['pid']:>7} {calls:>6} {int(c.get('cache_hits', 0)):>6}"
            f" {loads:>6} {joined:>7} {unloads:>8}  {' '.join(r['models'])}"
        )
    lines += _LEGEND
    if result.errors:
        detail = ", ".join(f"{s or 'no response'}: {n}" for s, n in sorted(result.statuses.items()))
        lines.append(f"\n  responses by status: {detail}")
    return "\n".join(lines)


_LEGEND = [
    "",
    "  calls    get_model() calls the replica served: hits + loads + joined",
    "  hits     the model was already in memory",
    "  loads    the model was read from storage (a cache miss)",
    "  joined   a miss that waited for a load of the same model already under way",
    "           (single flight: concurrent requests for a model share one load)",
    "  unloads  models evicted to make room (least recently used first)",
    "  spillovers  requests the router sent past a model's home replica because it was busy",
]

#: printed last: from the demo to serving your own models
NEXT_STEPS = """
Next: serve your own models
  . .venv/bin/activate                      # after `make demo`: muxgate and torch live in .venv
  python examples/make_models.py            # examples/models/{1..8}/model.pt
  muxgate serve examples/app.yaml           # the deployment in examples/torch_mlp.py
  curl -H 'serve_multiplexed_model_id: 2' -d '{"x": [1, 2, 3, 4]}' http://127.0.0.1:8000/
  status page: http://127.0.0.1:8000/-/    (or `muxgate status` in a terminal)
  examples/README.md: the deployment, its app config, HTTP and handle clients, S3 and GCS
"""


async def _amain(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # Imported here: `muxgate demo --help` stays fast, and torch loads once.
    from muxgate.gateway._config import parse_config
    from muxgate.gateway._demo_app import write_models
    from muxgate.gateway._serve import GatewayStartError, start_gateway
    from muxgate.gateway.launchers._processes import usable_cores

    with tempfile.TemporaryDirectory(prefix="muxgate-demo-") as root:
        print(f"muxgate demo: writing {ns.models} models to {root}", file=err, flush=True)
        model_ids = write_models(root, ns.models, seed=ns.seed)
        config = parse_config(
            {
                "http": {"host": "127.0.0.1", "port": ns.port},
                "deployments": [
                    {
                        "name": DEPLOYMENT,
                        "import_path": "muxgate.gateway._demo_app:DemoModel",
                        "init_kwargs": {
                            "model_root": root,
                            "max_models": ns.max_models_per_replica,
                            "load_delay_s": ns.load_delay_ms / 1000.0,
                        },
                        "num_replicas": ns.replicas,
                        "max_ongoing_requests": 8,
                        # The demo's models are tiny: a share of the host's
                        # cores each (one torch thread) rather than a warning
                        # that the replicas oversubscribe a small machine.
                        "num_cpus": max(
                            0.001,
                            math.floor(1000 * min(1.0, usable_cores() / ns.replicas)) / 1000,
                        ),
                    }
                ],
            }
        )
        print(f"muxgate demo: starting {ns.replicas} replicas", file=err, flush=True)
        try:
            async with start_gateway(config, replica_log_level="WARNING") as gateway:
                print(
                    f"muxgate demo: sending {ns.requests} requests to {gateway.url}",
                    file=err,
                    flush=True,
                )
                result = await drive(
                    gateway.url,
                    model_ids,
                    requests=ns.requests,
                    concurrency=ns.concurrency,
                    exponent=ns.zipf,
                    seed=ns.seed,
                    progress=_Progress(ns.requests, err),
                )
                rows = await _replica_rows(gateway)
                async with httpx.AsyncClient(trust_env=False) as client:
                    metrics = await client.get(f"{gateway.url}/-/metrics")
                print(format_summary(ns, result, rows, _spillovers(metrics.content)), file=out)
                if ns.keep_running:
                    print(f"\n  status page: {gateway.url}/-/", file=out, flush=True)
                    print("muxgate demo: serving until Ctrl-C", file=err, flush=True)
                    await asyncio.Event().wait()
                else:
                    print(
                        "\n  add --keep-running to keep the gateway up and browse its"
                        " live status page at /-/",
                        file=out,
                        flush=True,
                    )
                    print(NEXT_STEPS, file=out, flush=True)
        except GatewayStartError as exc:
            print(f"muxgate demo: {exc}", file=err)
            return 1
    return 0 if result.errors == 0 else 1


def _validate(ns: argparse.Namespace) -> str | None:
    checks = [
        (ns.models >= 1, "--models must be at least 1"),
        (ns.replicas >= 1, "--replicas must be at least 1"),
        (
            ns.max_models_per_replica >= 1 or ns.max_models_per_replica == -1,
            "--max-models-per-replica must be at least 1 (or -1: no limit)",
        ),
        (ns.requests >= 0, "--requests must not be negative"),
        (ns.concurrency >= 1, "--concurrency must be at least 1"),
        (ns.zipf >= 0, "--zipf must not be negative"),
        (ns.load_delay_ms >= 0, "--load-delay-ms must not be negative"),
        (0 <= ns.port <= 65535, "--port must be 0..65535"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    return None


def main(args: list[str]) -> int:
    """Entry point of ``muxgate demo``; returns the exit code (1 if any request failed)."""
    ns = _parser().parse_args(args)
    problem = _validate(ns)
    if problem is not None:
        print(f"muxgate demo: {problem}", file=sys.stderr)
        return 2
    loop_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_guarded(ns))


async def _guarded(ns: argparse.Namespace) -> int:
    # Ctrl-C (SIGINT) or SIGTERM cancels the main task wherever it is;
    # start_gateway's exit then stops the server and every replica.
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        if not signalled:
            signalled.append(sig)
            print("\nmuxgate demo: stopping", file=sys.stderr, flush=True)
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _amain(ns, sys.stdout, sys.stderr)
    except asyncio.CancelledError:
        if not signalled:
            raise
        main_task.uncancel()
        # 130 after Ctrl-C, as shells report it; 0 when --keep-running ended that way.
        return 0 if ns.keep_running else 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
