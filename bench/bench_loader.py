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

``--beside`` measures instead what a replica's other thread does to a
load of the peer model (its loader thread shares one interpreter lock with
the thread serving calls): the two load recipes alone, then beside a
thread of the same process that runs Python in bursts (``--burst-ms`` of
every ``--period-ms``, as a serving thread between calls does) at the
serving thread's two priorities (``nice`` 0, and 10 as with
``loads_first``), beside a Python thread that never sleeps (a serving
thread that always has a call to run), and beside a thread that runs
torch operations (which release the lock). ``--switch-interval`` sets
:func:`sys.setswitchinterval` (CPython's default 0.005 s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
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


def _neighbour(kind: str, nice: int, burst_ms: float, period_ms: float) -> Callable[[], None]:
    """Start a thread of this process that runs ``kind`` of work until the
    returned function stops it."""
    stop = threading.Event()

    def python_bursts() -> None:
        while not stop.is_set():
            until = time.perf_counter() + burst_ms / 1000.0
            while time.perf_counter() < until:
                pass
            time.sleep(max(0.0, period_ms - burst_ms) / 1000.0)

    def python_spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    def torch_ops() -> None:
        a = torch.randn(256, 256)
        while not stop.is_set():
            a @ a

    body = {"python bursts": python_bursts, "python spin": python_spin, "torch ops": torch_ops}

    def run() -> None:
        if nice and sys.platform.startswith("linux"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        body[kind]()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join()

    return halt


def beside(folder: str, reps: int, burst_ms: float, period_ms: float) -> dict[str, Any]:
    """The peer model's two load recipes alone and beside each neighbour thread."""
    sizes = ARCHES["peer 4 MB (256-640x3-64)"]
    path = os.path.join(folder, "peer.pt")
    torch.save(build(sizes).state_dict(), path)

    def random_copy() -> None:
        build(sizes).load_state_dict(torch.load(path, weights_only=True))

    def recipe() -> None:
        with torch.device("meta"):
            net = build(sizes)
        net.load_state_dict(torch.load(path, weights_only=True, mmap=True), assign=True)

    neighbours: list[tuple[str, str, int]] = [
        ("alone", "", 0),
        (f"Python {burst_ms:g} ms of every {period_ms:g} ms, nice 0", "python bursts", 0),
        (f"Python {burst_ms:g} ms of every {period_ms:g} ms, nice 10", "python bursts", 10),
        ("Python without a pause, nice 10", "python spin", 10),
        ("torch operations, nice 10", "torch ops", 10),
    ]
    results: dict[str, Any] = {}
    for label, kind, nice in neighbours:
        halt = _neighbour(kind, nice, burst_ms, period_ms) if kind else None
        try:
            results[label] = timed({"random+copy": random_copy, "meta+assign+mmap": recipe}, reps)
        finally:
            if halt is not None:
                halt()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beside", action="store_true", help="a load beside another thread")
    parser.add_argument("--burst-ms", type=float, default=0.3)
    parser.add_argument("--period-ms", type=float, default=1.0)
    parser.add_argument("--switch-interval", type=float, default=None, help="seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.beside:
        return _print_beside(args)
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


def _print_beside(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as folder:
        results = beside(folder, args.reps, args.burst_ms, args.period_ms)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} reps, switch interval "
        f"{sys.getswitchinterval() * 1000:g} ms; the peer model's load, ms: "
        "wall p50 / wall p90 / thread CPU p50"
    )
    print("| the load's thread beside | random+copy | meta+assign+mmap |")
    print("|---|---|---|")
    for label, rows in results.items():
        cells = [
            "{wall_p50:.2f} / {wall_p90:.2f} / {cpu_p50:.2f}".format(**rows[recipe])
            for recipe in ("random+copy", "meta+assign+mmap")
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    record = {"bench": "loader_beside", "reps": args.reps, "burst_ms": args.burst_ms}
    print(json.dumps({**record, "switch_interval_s": sys.getswitchinterval(), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
