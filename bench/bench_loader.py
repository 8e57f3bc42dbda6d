"""Model load recipes: random initialisation then copy, against meta-device
construction with ``load_state_dict(assign=True)``, with and without
``torch.load(mmap=True)``.

For each architecture (the examples' tiny MLP and the ~4 MB MLP of the
peer benchmark) it saves one state dict to a temporary folder (so the file
is in the page cache, as a replica's cached download is), then times, one
thread (a replica's default CPU budget), many times:

* ``random+copy``: ``make_net()`` then ``load_state_dict(torch.load(...))``,
  what the examples did;
* ``meta+assign``: build on ``torch.device("meta")``, then
  ``load_state_dict(torch.load(...), assign=True)`` (examples/torch_mlp.py);
* ``meta+assign+mmap``: the same with ``torch.load(..., mmap=True)``;

each followed by one forward pass on a fixed input (a mapped file's pages
are touched there, so the comparison is load plus first use). Also the
parts alone: ``torch.load`` and the random initialisation.

    .venv/bin/python bench/bench_loader.py [--reps 200]

Prints a table (median and p90, ms) and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: (name, layer sizes): the examples' MLP and the peer benchmark's ~4.1 MB one
ARCHES: dict[str, list[int]] = {
    "examples (4-16-2)": [4, 16, 2],
    "peer 4 MB (256-640x3-64)": [256, 640, 640, 640, 64],
}


def build(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def timed(recipes: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Round-robin over the recipes (so a noisy neighbour hits all alike);
    median and p90 of wall and of this thread's CPU time, in ms."""
    for fn in recipes.values():
        fn()  # warm-up: imports, allocator, page cache
    wall: dict[str, list[float]] = {name: [] for name in recipes}
    cpu: dict[str, list[float]] = {name: [] for name in recipes}
    for _ in range(reps):
        for name, fn in recipes.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append((time.thread_time() - c0) * 1000.0)
            wall[name].append((time.perf_counter() - w0) * 1000.0)
    return {
        name: {
            "wall_p50": round(statistics.median(wall[name]), 3),
            "wall_p90": round(sorted(wall[name])[int(0.9 * (reps - 1))], 3),
            "cpu_p50": round(statistics.median(cpu[name]), 3),
        }
        for name in recipes
    }


def measure(sizes: list[int], folder: str, reps: int) -> dict[str, dict[str, float]]:
    path = os.path.join(folder, f"{'-'.join(map(str, sizes))}.pt")
    torch.save(build(sizes).state_dict(), path)
    x = torch.linspace(-1, 1, sizes[0]).reshape(1, sizes[0])

    def use(net: nn.Module) -> None:
        with torch.inference_mode():
            net(x)

    def random_copy() -> None:
        net = build(sizes)
        net.load_state_dict(torch.load(path, weights_only=True))
        use(net.eval())

    def meta_assign(mmap: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.device("meta"):
                net = build(sizes)
            net.load_state_dict(torch.load(path, weights_only=True, mmap=mmap), assign=True)
            use(net.eval())

        return run

    return timed(
        {
            "random+copy": random_copy,
            "meta+assign": meta_assign(False),
            "meta+assign+mmap": meta_assign(True),
            "torch.load alone": lambda: torch.load(path, weights_only=True),
            "random init alone": lambda: build(sizes),
        },
        reps,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as folder:
        for name, sizes in ARCHES.items():
            results[name] = measure(sizes, folder, args.reps)
    rows = list(next(iter(results.values())))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} reps;"
        " ms: wall p50 / wall p90 / thread CPU p50"
    )
    print("| recipe | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for row in rows:
        cells = [
            "{wall_p50:.3f} / {wall_p90:.3f} / {cpu_p50:.3f}".format(**results[name][row])
            for name in results
        ]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print(json.dumps({"bench": "loader", "threads": args.threads, "reps": args.reps, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
