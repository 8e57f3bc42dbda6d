"""Model load rates through muxgate.backends, in MB/s.

For state-dict files of 4, 64 and 256 MB (one float32 tensor each):

- local: plain ``torch.load(weights_only=True)`` (on the calling thread,
  and in a worker thread as an async server must run it) vs
  ``load_state_dict`` on a file:// root (read, the default) and with
  ``mmap_local_files=True``; every tensor is summed so lazily mapped pages
  are really read. Measurements are interleaved, best of N.
- S3 (moto_server on 127.0.0.1) and GCS (fake-gcs-server): a cold load
  (empty disk cache) fetched with one GET vs parallel ranged GETs
  (8 MiB parts, 8 in flight), and a warm load from the disk cache.

Best of N repetitions; bounded to about two minutes. Run:

    .venv/bin/python bench/bench_storage.py [--sizes 4,64,256] [--reps 3]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
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
from storage_servers import fake_gcs, moto_s3

from muxgate.backends._config import CacheConfig, RetryPolicy, StorageConfig
from muxgate.backends._formats import load_state_dict

MB = 1_000_000
BUCKET = "bench"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def model_bytes(size_mb: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((size_mb * MB // 4,), 1.0)}, buf)
    return buf.getvalue()


def touch(state: dict[str, Any]) -> float:
    return float(sum(t.sum() for t in state.values()))


def best(reps: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(reps))


async def abest(reps: int, run: Callable[[], Awaitable[float]]) -> float:
    return min([await run() for _ in range(reps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,64,256", help="file sizes in MB")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (best is kept)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    rows: list[tuple[str, int, float]] = []
    started = time.monotonic()

    def rate(size: int, seconds: float) -> float:
        return size / seconds

    try:
        with moto_s3() as s3, fake_gcs() as gcs:
            s3.create_bucket(BUCKET)
            gcs.create_bucket(BUCKET)
            for size in sizes:
                # More repetitions for small files: their times are short and noisy.
                reps = max(1, args.reps if size < 256 else args.reps - 1, 60 // size)
                data = model_bytes(size)
                model_dir = work / "models" / f"m{size}"
                model_dir.mkdir(parents=True)
                (model_dir / "model.pt").write_bytes(data)
                s3.put(BUCKET, f"m{size}/model.pt", data)
                gcs.put(BUCKET, f"m{size}/model.pt", data)
                path = model_dir / "model.pt"

                def plain(path: Path = path) -> float:
                    t = time.perf_counter()
                    touch(torch.load(path, weights_only=True))
                    return time.perf_counter() - t

                plain()  # warm the page cache

                async def ours(size: int = size, mmap: bool = False) -> float:
                    config = StorageConfig(
                        cache=CacheConfig(directory=work / "unused"), mmap_local_files=mmap
                    )
                    t = time.perf_counter()
                    touch(
                        await load_state_dict((work / "models").as_uri(), f"m{size}", config=config)
                    )
                    return time.perf_counter() - t

                async def local_rounds(
                    reps: int = reps, plain: Callable[[], float] = plain, size: int = size
                ) -> None:
                    # Interleaved so that background load hits all alike.
                    times: dict[str, list[float]] = {
                        "torch": [],
                        "thread": [],
                        "read": [],
                        "mmap": [],
                    }
                    for _ in range(reps):
                        times["torch"].append(plain())
                        times["thread"].append(await anyio.to_thread.run_sync(plain))
                        times["read"].append(await ours())
                        times["mmap"].append(await ours(mmap=True))
                    rows.append(("local torch.load", size, rate(size, min(times["torch"]))))
                    rows.append(
                        ("local torch.load in a thread", size, rate(size, min(times["thread"])))
                    )
                    rows.append(("local muxgate (read)", size, rate(size, min(times["read"]))))
                    rows.append(("local muxgate (mmap)", size, rate(size, min(times["mmap"]))))

                anyio.run(local_rounds)

                for name, root, options in (
                    ("s3", f"s3://{BUCKET}", s3.storage_options),
                    ("gcs", f"gs://{BUCKET}", gcs.storage_options),
                ):
                    for label, part, conc in (
                        ("1 GET", 1 << 40, 1),
                        ("parallel 8x8MiB", 8 << 20, 8),
                    ):

                        async def cold(
                            root: str = root,
                            options: dict[str, Any] = options,
                            part: int = part,
                            conc: int = conc,
                            size: int = size,
                        ) -> float:
                            cache_dir = Path(tempfile.mkdtemp(dir=work))
                            config = StorageConfig(
                                cache=CacheConfig(directory=cache_dir),
                                retry=RetryPolicy(),
                                part_size=part,
                                concurrency=conc,
                            )
                            t = time.perf_counter()
                            touch(
                                await load_state_dict(
                                    root, f"m{size}", storage_options=options, config=config
                                )
                            )
                            elapsed = time.perf_counter() - t
                            shutil.rmtree(cache_dir)
                            return elapsed

                        rows.append(
                            (
                                f"{name} cold, {label}",
                                size,
                                rate(size, anyio.run(abest, reps, cold)),
                            )
                        )

                    warm_dir = work / f"warm-{name}"
                    warm_config = StorageConfig(cache=CacheConfig(directory=warm_dir))

                    async def warm(
                        root: str = root,
                        options: dict[str, Any] = options,
                        size: int = size,
                        config: StorageConfig = warm_config,
                    ) -> float:
                        t = time.perf_counter()
                        touch(
                            await load_state_dict(
                                root, f"m{size}", storage_options=options, config=config
                            )
                        )
                        return time.perf_counter() - t

                    anyio.run(warm)  # fills the cache
                    rows.append(
                        (
                            f"{name} warm (disk cache)",
                            size,
                            rate(size, anyio.run(abest, reps, warm)),
                        )
                    )
                    shutil.rmtree(warm_dir)
                (model_dir / "model.pt").unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {platform.node()} nproc={os.cpu_count()} cpu={cpu_model()} "
        f"python={platform.python_version()} torch={torch.__version__}"
    )
    print(f"elapsed: {time.monotonic() - started:.1f}s; MB = 10^6 bytes; best of reps\n")
    labels = list(dict.fromkeys(r[0] for r in rows))
    print(f"{'case':<32}" + "".join(f"{s:>10} MB" for s in sizes))
    for label in labels:
        cells = {s: r for lab, s, r in rows if lab == label}
        print(f"{label:<32}" + "".join(f"{cells.get(s, float('nan')):>10.0f}/s" for s in sizes))


if __name__ == "__main__":
    main()
