"""Round trip of a handle call against an HTTP request to the same deployment.

The gateway (with one replica of ``tests/apps/handle_apps.py:Down``) runs in
this process; the client runs in a child process so it does not share the
gateway's event loop. Both paths run ``Down.__call__`` on the same replica
with model id "1" (loaded, so a cache hit) and return the same small dict:

* http:   ``httpx.AsyncClient.post(url/down, header)`` (JSON response)
* handle: ``await handle.options(multiplexed_model_id="1").remote()``
  (``POST /-/handles/Down/__call__``, MessagePack)

Sequential calls (concurrency 1) in interleaved rounds; median, p99 and mean
per call over all rounds.

    .venv/bin/python bench/bench_handles.py [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import msgspec
from _common import machine_line, percentile

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "apps")


async def client(url: str, calls: int, rounds: int) -> dict[str, list[float]]:
    import httpx

    from muxgate.replicas._handle import aclose_handle_clients, get_deployment_handle

    handle = get_deployment_handle("Down", url).options(multiplexed_model_id="1")
    samples: dict[str, list[float]] = {"http": [], "handle": []}
    async with httpx.AsyncClient(trust_env=False) as http:
        headers = {"serve_multiplexed_model_id": "1"}

        async def one_http() -> None:
            response = await http.post(f"{url}/down", headers=headers)
            assert response.status_code == 200

        async def one_handle() -> None:
            await handle.remote()

        for fn in (one_http, one_handle):  # warm up connections and the model
            for _ in range(200):
                await fn()
        for _ in range(rounds):
            for name, fn in (("http", one_http), ("handle", one_handle)):
                out = samples[name]
                for _ in range(calls):
                    start = time.perf_counter_ns()
                    await fn()
                    out.append((time.perf_counter_ns() - start) / 1000.0)
    await aclose_handle_clients()
    return samples


async def serve_and_measure(calls: int, rounds: int) -> dict[str, list[float]]:
    from muxgate.gateway._config import parse_config
    from muxgate.gateway._serve import start_gateway

    config = parse_config(
        {
            "app_dir": APPS,
            "http": {"port": 0},
            "deployments": [
                {"name": "Down", "import_path": "handle_apps:Down", "route_prefix": "/down"}
            ],
        }
    )
    async with start_gateway(config) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            gw.url,
            "--calls",
            str(calls),
            "--rounds",
            str(rounds),
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"client failed with {proc.returncode}")
    result: dict[str, list[float]] = msgspec.json.decode(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        samples = asyncio.run(client(args.client, args.calls, args.rounds))
        sys.stdout.buffer.write(msgspec.json.encode(samples))
        return
    samples = asyncio.run(serve_and_measure(args.calls, args.rounds))
    print(machine_line())
    print(
        f"command: .venv/bin/python bench/bench_handles.py --calls {args.calls}"
        f" --rounds {args.rounds}"
    )
    print(f"{'path':<8} {'calls':>7} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for name, values in samples.items():
        print(
            f"{name:<8} {len(values):>7} {statistics.median(values):>8.0f}"
            f" {percentile(values, 0.99):>8.0f}"
            f" {statistics.fmean(values):>8.0f}"
        )


if __name__ == "__main__":
    main()
