"""Model load rates through muxgate.backends, in MB/s.

For state-dict files of 4, 64 and 256 MB (one float32 tensor each):

- local: the baselines are a plain ``torch.load(weights_only=True)`` on the
  calling thread and the same in a worker thread (what an async server must
  do so its event loop never blocks); against them ``load_state_dict`` on a
  file:// root (read, the default) and with ``mmap_local_files=True``. Every
  tensor is summed on the calling thread, so lazily mapped pages are really
  read; each time includes the load and the sum. Each variant runs
  in blocks (one discarded warm-up call, then timed calls), the order
  rotating every round: interleaving single calls would make each thread
  reload into caches the previous variant's thread had warmed, which costs
  a worker-thread variant ~0.2 ms per 4 MB call here and measures the
  benchmark, not the loader. Reported: median and best per call.
- S3 (moto_server on 127.0.0.1) and GCS (fake-gcs-server): a cold load
  (empty disk cache) with one GET, with parallel ranged GETs (8 MiB parts,
  8 in flight), and with the default rule (one GET below
  ``parallel_threshold``, two parts' worth; parallel above), with and
  without fsync; then a warm load from the disk cache. Best of N.
- moto probe: the duration of one 8 MiB ranged GET from objects of
  different sizes (why parallel parts lose on moto).
- fsync: writing a file of each size, with and without ``os.fsync``.

Bounded to a few minutes. Run:

    .venv/bin/python bench/bench_storage.py [--sizes 4,64,256] [--reps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import command_line, machine_line
from storage_servers import S3Server, fake_gcs, moto_s3

from muxgate.backends._config import CacheConfig, RetryPolicy, StorageConfig
from muxgate.backends._formats import load_state_dict

MB = 1_000_000
MiB = 1 << 20
BUCKET = "bench"
# Older muxgate.backends (for before/after runs) lack these settings.
HAS_THRESHOLD = "parallel_threshold" in {f.name for f in dataclasses.fields(StorageConfig)}
HAS_FSYNC = "fsync" in {f.name for f in dataclasses.fields(CacheConfig)}


def model_bytes(size_mb: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((size_mb * MB // 4,), 1.0)}, buf)
    return buf.getvalue()


def touch(state: dict[str, Any]) -> float:
    return float(sum(t.sum() for t in state.values()))


async def timed_load(
    root: str,
    model_id: str,
    config: StorageConfig,
    storage_options: dict[str, Any] | None = None,
) -> float:
    """Seconds to ``load_state_dict`` a model and read every tensor of it."""
    t = time.perf_counter()
    touch(await load_state_dict(root, model_id, storage_options=storage_options, config=config))
    return time.perf_counter() - t


async def cold_load(
    work: Path, label: str, root: str, model_id: str, storage_options: dict[str, Any]
) -> float:
    """``timed_load`` with the ``label`` config of ``remote_configs`` and an empty cache."""
    cache_dir = Path(tempfile.mkdtemp(dir=work))
    config = remote_configs(cache_dir)[label]
    elapsed = await timed_load(root, model_id, config, storage_options)
    shutil.rmtree(cache_dir)
    return elapsed


async def abest(reps: int, run: Callable[[], Awaitable[float]]) -> float:
    return min([await run() for _ in range(reps)])


def local_section(work: Path, size: int, rounds: int, block: int) -> dict[str, list[float]]:
    """Per-call seconds of each local variant (see the module docstring)."""
    model_dir = work / "models" / f"m{size}"
    model_dir.mkdir(parents=True)
    path = model_dir / "model.pt"
    path.write_bytes(model_bytes(size))
    root = (work / "models").as_uri()

    def plain() -> dict[str, Any]:
        return dict(torch.load(path, weights_only=True))

    async def thread() -> float:
        t = time.perf_counter()
        touch(await anyio.to_thread.run_sync(plain))
        return time.perf_counter() - t

    async def calling() -> float:
        t = time.perf_counter()
        touch(plain())
        return time.perf_counter() - t

    def ours(mmap: bool) -> Callable[[], Awaitable[float]]:
        config = StorageConfig(cache=CacheConfig(directory=work / "unused"), mmap_local_files=mmap)

        async def run() -> float:
            return await timed_load(root, f"m{size}", config)

        return run

    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "torch.load, calling thread": calling,
        "torch.load, worker thread": thread,
        "muxgate (read)": ours(False),
        "muxgate (mmap)": ours(True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}

    async def run_rounds() -> None:
        names = list(variants)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                await variants[name]()  # warm-up, discarded
                for _ in range(block):
                    times[name].append(await variants[name]())

    plain()  # page cache
    anyio.run(run_rounds)
    path.unlink()
    return times


def remote_configs(cache_dir: Path) -> dict[str, StorageConfig]:
    retry = RetryPolicy()
    configs = {
        "1 GET": StorageConfig(
            cache=CacheConfig(directory=cache_dir), retry=retry, part_size=1 << 40, concurrency=1
        ),
    }
    if HAS_THRESHOLD:
        configs["parallel 8x8MiB"] = StorageConfig(
            cache=CacheConfig(directory=cache_dir),
            retry=retry,
            part_size=8 * MiB,
            concurrency=8,
            parallel_threshold=1,
        )
        configs["default"] = StorageConfig(cache=CacheConfig(directory=cache_dir), retry=retry)
        configs["default, no fsync"] = StorageConfig(
            cache=CacheConfig(directory=cache_dir, fsync=False), retry=retry
        )
    else:
        # Before parallel_threshold existed the default was always parallel.
        configs["parallel 8x8MiB"] = StorageConfig(
            cache=CacheConfig(directory=cache_dir), retry=retry, part_size=8 * MiB, concurrency=8
        )
    return configs


def moto_probe(s3: S3Server, sizes_mb: list[int], reps: int) -> list[tuple[int, float]]:
    """Median seconds of one 8 MiB ranged GET from objects of each size."""
    client = s3.client()
    out = []
    for size in sizes_mb:
        key = f"probe/{size}"
        client.put_object(Bucket=BUCKET, Key=key, Body=b"\0" * (size * MB))
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes=0-{8 * MiB - 1}")["Body"].read()
            samples.append(time.perf_counter() - t)
        out.append((size, statistics.median(samples)))
        client.delete_object(Bucket=BUCKET, Key=key)
    return out


def fsync_probe(work: Path, size: int, reps: int) -> tuple[float, float]:
    """Best seconds to write ``size`` MB without and with fsync."""
    data = b"\1" * (size * MB)
    results = []
    for sync in (False, True):
        samples = []
        for i in range(reps):
            p = work / f"fsync-{size}-{sync}-{i}"
            t = time.perf_counter()
            with open(p, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            samples.append(time.perf_counter() - t)
            p.unlink()
        results.append(min(samples))
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,64,256", help="file sizes in MB")
    parser.add_argument("--reps", type=int, default=5, help="remote repetitions (best is kept)")
    parser.add_argument("--skip-remote", action="store_true", help="local loads only")
    parser.add_argument(
        "--rounds", type=int, default=None, help="local rounds per size (default: by size, 4-20)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=os.environ.get("BENCH_DIR")))
    local: dict[int, dict[str, list[float]]] = {}
    remote: list[tuple[str, int, float]] = []
    probe: list[tuple[int, float]] = []
    fsyncs: dict[int, tuple[float, float]] = {}
    started = time.monotonic()
    try:
        for size in sizes:
            # 200 timed calls per variant at 4 MB, 12 at 64 MB, 8 at 256 MB.
            block = max(2, min(10, 40 // size))
            rounds = args.rounds or max(4, min(20, 400 // size))
            local[size] = local_section(work, size, rounds, block)
            fsyncs[size] = fsync_probe(work, size, 3)
        if not args.skip_remote:
            with moto_s3() as s3, fake_gcs() as gcs:
                s3.create_bucket(BUCKET)
                gcs.create_bucket(BUCKET)
                probe = moto_probe(s3, [8, 64, 256], 3)
                for size in sizes:
                    reps = args.reps if size < 256 else max(1, args.reps - 2)
                    data = model_bytes(size)
                    s3.put(BUCKET, f"m{size}/model.pt", data)
                    gcs.put(BUCKET, f"m{size}/model.pt", data)
                    for name, root, options in (
                        ("s3", f"s3://{BUCKET}", s3.storage_options),
                        ("gcs", f"gs://{BUCKET}", gcs.storage_options),
                    ):
                        for label in remote_configs(work):
                            cold = functools.partial(
                                cold_load, work, label, root, f"m{size}", options
                            )
                            remote.append(
                                (f"{name} cold, {label}", size, anyio.run(abest, reps, cold))
                            )

                        warm_config = StorageConfig(cache=CacheConfig(directory=work / "warm"))
                        warm = functools.partial(timed_load, root, f"m{size}", warm_config, options)
                        anyio.run(warm)  # fills the cache
                        remote.append(
                            (f"{name} warm (disk cache)", size, anyio.run(abest, reps, warm))
                        )
                        shutil.rmtree(work / "warm")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(command_line())
    print(
        machine_line(
            f"torch={torch.__version__} host={platform.node()} loadavg={os.getloadavg()[0]:.2f}"
        )
    )
    print(f"elapsed: {time.monotonic() - started:.1f}s; MB = 10^6 bytes\n")
    head = "".join(f"{f'{s} MB':>18}" for s in sizes)
    print("local loads, MB/s: median (best) per call")
    print(f"{'case':<34}{head}")
    names = list(next(iter(local.values())))
    for name in names:
        cells = ""
        for s in sizes:
            median, best = statistics.median(local[s][name]), min(local[s][name])
            cells += f"{f'{s / median:.0f} ({s / best:.0f})':>18}"
        print(f"{name:<34}{cells}")

    def med(s: int, name: str) -> float:
        return statistics.median(local[s][name])

    calling, worker = "torch.load, calling thread", "torch.load, worker thread"
    for base, short in ((calling, "calling thread"), (worker, "worker thread")):
        for name in ("muxgate (read)", "muxgate (mmap)"):
            cells = "".join(f"{f'{med(s, base) / med(s, name):.2f}x':>18}" for s in sizes)
            print(f"{name + ' / ' + short:<34}{cells}")
    cells = "".join(f"{(med(s, 'muxgate (read)') - med(s, worker)) * 1e6:>15.0f} us" for s in sizes)
    print(f"{'read - worker thread, medians':<34}{cells}")
    n = {s: len(local[s]["muxgate (read)"]) for s in sizes}
    print(f"(timed calls per variant: {n})\n")

    print("fsync: best seconds to write the file, without -> with fsync")
    for s in sizes:
        plain, synced = fsyncs[s]
        print(f"  {s:>4} MB: {plain * 1000:7.1f} ms -> {synced * 1000:7.1f} ms")
    if probe:
        print("\nmoto: one 8 MiB ranged GET, median of 3, by object size")
        for s, secs in probe:
            print(f"  object {s:>4} MB: {secs * 1000:7.1f} ms")
    if remote:
        print("\nremote loads, MB/s, best of reps (256 MB: reps-2)")
        print(f"{'case':<34}" + "".join(f"{f'{s} MB':>12}" for s in sizes))
        for label in dict.fromkeys(r[0] for r in remote):
            rates = {s: s / secs for lab, s, secs in remote if lab == label}
            print(f"{label:<34}" + "".join(f"{rates.get(s, float('nan')):>12.0f}" for s in sizes))


if __name__ == "__main__":
    main()
