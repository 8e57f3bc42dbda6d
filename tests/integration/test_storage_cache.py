"""Disk cache, concurrency and failure behaviour against a real moto S3 server.

A FaultProxy sits between the loader and moto: it counts requests (so a
test can prove how many downloads happened) and injects 503s.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from waiting import wait_until_sync

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; pytest turns warnings into errors.
    warnings.simplefilter("ignore", UserWarning)
    import torch

from muxgate.backends._cache import DiskCache
from muxgate.backends._config import (
    CacheConfig,
    RetryPolicy,
    StorageConfig,
    configure_storage,
    get_storage_config,
)
from muxgate.backends._errors import (
    MissingDependencyError,
    ModelFormatError,
    StorageUnavailableError,
    UnsupportedProtocolError,
)
from muxgate.backends._fetch import Strategy, fetch
from muxgate.backends._formats import load_state_dict
from muxgate.backends._registry import register_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage_servers import (
    FaultProxy,
    GcsServer,
    S3Server,
    fake_gcs,
    fault_proxy,
    free_port,
    moto_s3,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BUCKET = "muxgate-cache"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with fault_proxy(s3.endpoint) as p:
        yield p


@pytest.fixture
def prefix() -> str:
    return uuid.uuid4().hex


def _config(cache_dir: Path, **kwargs: object) -> StorageConfig:
    retry = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, deadline=10)
    return StorageConfig(
        cache=CacheConfig(directory=cache_dir, max_bytes=1 << 30),
        retry=retry,
        **kwargs,  # type: ignore[arg-type]
    )


def _model_bytes(n: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((n,), float(seed))}, buf)
    return buf.getvalue()


_CHILD = """
import json, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
import anyio
from muxgate.backends._config import CacheConfig, StorageConfig
from muxgate.backends._fetch import fetch
from muxgate.backends._formats import load_state_dict

args = json.loads(sys.argv[1])
config = StorageConfig(cache=CacheConfig(directory=Path(args["cache"])))

async def main():
    async with fetch(args["url"], storage_options=args["options"], config=config) as art:
        hit = art.cache_hit
    sd = await load_state_dict(args["root"], "m", storage_options=args["options"], config=config)
    print(json.dumps({"cache_hit": hit, "sum": float(sd["w"].sum())}))

anyio.run(main)
"""


def test_two_processes_download_once(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    s3.put(BUCKET, f"{prefix}/m/model.pt", _model_bytes(250_000, seed=3))
    key_path = f"/{BUCKET}/{prefix}/m/model.pt"
    # Hold the download until both processes have asked for the object, so
    # they really are loading it at the same time.
    release = proxy.hold("GET", key_path)
    args = {
        "cache": str(tmp_path / "shared-cache"),
        "url": f"s3://{BUCKET}/{prefix}/m/model.pt",
        "root": f"s3://{BUCKET}/{prefix}",
        "options": s3.options_via(proxy.endpoint),
    }
    env = {**os.environ, **s3.env}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        wait_until_sync(lambda: proxy.count("HEAD", key_path) >= 2, within_s=60, what="both HEADs")
        release.set()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        release.set()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    results = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert proxy.count("GET", key_path) == 1, proxy.counts()
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    assert all(r["sum"] == 750_000.0 for r in results)


async def test_parallel_ranged_download(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    data = _model_bytes(1_000_000)  # ~4 MB
    s3.put(BUCKET, f"{prefix}/m/model.pt", data)
    config = _config(tmp_path / "c", part_size=512 * 1024, concurrency=4)
    async with fetch(
        f"s3://{BUCKET}/{prefix}/m/model.pt",
        storage_options=s3.options_via(proxy.endpoint),
        config=config,
    ) as artifact:
        assert artifact.strategy is Strategy.CACHED
        assert artifact.path is not None
        assert await anyio.Path(artifact.path).read_bytes() == data
    parts = -(-len(data) // (512 * 1024))
    assert proxy.count("GET", f"/{BUCKET}/{prefix}/m/model.pt") == parts


@pytest.mark.parametrize(
    ("size", "threshold", "gets"),
    [
        (150_000, None, 1),  # ~600 KB < two 512 KiB parts: one GET
        (1_000_000, 8 << 20, 1),  # ~4 MB under an explicit 8 MiB threshold: one GET
        (1_000_000, 1, 8),  # everything parallel: 8 parts of 512 KiB
    ],
    ids=["default-below", "threshold-above-size", "always-parallel"],
)
async def test_single_get_below_parallel_threshold(
    s3: S3Server,
    proxy: FaultProxy,
    prefix: str,
    tmp_path: Path,
    size: int,
    threshold: int | None,
    gets: int,
) -> None:
    data = _model_bytes(size)
    s3.put(BUCKET, f"{prefix}/m/model.pt", data)
    config = _config(
        tmp_path / "c", part_size=512 * 1024, concurrency=4, parallel_threshold=threshold
    )
    async with fetch(
        f"s3://{BUCKET}/{prefix}/m/model.pt",
        storage_options=s3.options_via(proxy.endpoint),
        config=config,
    ) as artifact:
        assert artifact.path is not None
        assert await anyio.Path(artifact.path).read_bytes() == data
    assert proxy.count("GET", f"/{BUCKET}/{prefix}/m/model.pt") == gets


async def test_options_are_not_mutated_and_fsync_can_be_off(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    s3.put(BUCKET, f"{prefix}/m/model.pt", _model_bytes(1000, seed=4))
    options = {
        **s3.options_via(proxy.endpoint),
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}},
    }
    before = copy.deepcopy(options)
    config = StorageConfig(
        cache=CacheConfig(directory=tmp_path / "c", fsync=False),
        retry=RetryPolicy(base_delay=0.01),
    )
    for _ in range(2):  # a new filesystem instance, then the kept one
        loaded = await load_state_dict(
            f"s3://{BUCKET}/{prefix}", "m", storage_options=options, config=config
        )
        assert float(loaded["w"].sum()) == 4000.0
    # botocore's Config edits nested retry dicts in place: ours must not change.
    assert options == before
    assert proxy.count("GET", f"/{BUCKET}/{prefix}/m/model.pt") == 1


async def test_transient_failures_are_retried(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    s3.put(BUCKET, f"{prefix}/m/model.pt", _model_bytes(1000, seed=1))
    proxy.fail_next(2, status=503)
    loaded = await load_state_dict(
        f"s3://{BUCKET}/{prefix}",
        "m",
        storage_options=s3.options_via(proxy.endpoint),
        config=_config(tmp_path / "c"),
    )
    assert float(loaded["w"].sum()) == 1000.0
    # 2 x 503, HEAD, GET, HEAD (the version check after the download)
    assert proxy.count(path_contains=f"{prefix}/m/model.pt") == 5


async def test_persistent_503_gives_storage_unavailable(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    s3.put(BUCKET, f"{prefix}/m/model.pt", _model_bytes(1000))
    proxy.fail_next(100, status=503)
    with pytest.raises(StorageUnavailableError) as info:
        await load_state_dict(
            f"s3://{BUCKET}/{prefix}",
            "m",
            storage_options=s3.options_via(proxy.endpoint),
            config=_config(tmp_path / "c"),
        )
    assert info.value.attempts == 4
    assert info.value.url == f"s3://{BUCKET}/{prefix}/m/model.pt"
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(("scheme", "server_fixture"), [("s3", "s3"), ("gs", "gcs")])
async def test_server_down_fails_fast(
    request: pytest.FixtureRequest, scheme: str, server_fixture: str, tmp_path: Path
) -> None:
    """S3 and GCS alike: an unreachable endpoint fails after the retry budget, fast."""
    server: S3Server | GcsServer = request.getfixturevalue(server_fixture)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        await load_state_dict(
            f"{scheme}://{BUCKET}",
            "m",
            storage_options=server.options_via(dead),
            config=_config(tmp_path / "c"),
        )
    assert info.value.attempts == 4
    assert time.monotonic() - started < 5


def _cached_files(cache_dir: Path) -> list[Path]:
    return [f for f in (cache_dir / "objects").glob("*/*") if not f.name.startswith(".")]


async def test_a_damaged_cached_copy_is_fetched_again_a_bad_remote_copy_is_not(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    """A cached copy of the right size whose bytes were damaged (a disk
    error; a crash with fsync off) failed every load of its model, though
    the remote held it whole, for as long as requests kept it in the cache.
    It is removed and fetched again. A file that is bad at the remote is not
    downloaded again for each load."""
    config = _config(tmp_path / "cache")
    root = f"s3://{BUCKET}/{prefix}"
    options = s3.options_via(proxy.endpoint)
    s3.put(BUCKET, f"{prefix}/good/model.pt", _model_bytes(1000, seed=2))
    await load_state_dict(root, "good", storage_options=options, config=config)
    (copy_,) = _cached_files(tmp_path / "cache")
    damaged = bytearray(copy_.read_bytes())
    damaged[-512:] = bytes(512)  # same size: the size check cannot tell
    copy_.write_bytes(damaged)
    good = await load_state_dict(root, "good", storage_options=options, config=config)
    assert good["w"].tolist() == [2.0] * 1000
    assert proxy.count("GET", f"/{prefix}/good/") == 2
    # whole again in the cache: the next load downloads nothing
    await load_state_dict(root, "good", storage_options=options, config=config)
    assert proxy.count("GET", f"/{prefix}/good/") == 2

    s3.put(BUCKET, f"{prefix}/bad/model.pt", b"not a torch file " * 64)
    for _ in range(3):
        with pytest.raises(ModelFormatError):
            await load_state_dict(root, "bad", storage_options=options, config=config)
    assert proxy.count("GET", f"/{prefix}/bad/") == 1


async def test_lru_eviction_bounds_the_cache(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    blobs = {f"m{i}": _model_bytes(100_000, seed=i) for i in range(3)}  # ~400 KB each
    for name, data in blobs.items():
        s3.put(BUCKET, f"{prefix}/{name}/model.pt", data)
    size = len(blobs["m0"])
    config = StorageConfig(
        cache=CacheConfig(directory=tmp_path / "c", max_bytes=2 * size + size // 2),
        retry=RetryPolicy(base_delay=0.01),
    )
    opts = s3.options_via(proxy.endpoint)
    root = f"s3://{BUCKET}/{prefix}"
    for name in ("m0", "m1", "m0", "m2"):  # m1 is least recently used when m2 arrives
        await load_state_dict(root, name, storage_options=opts, config=config)
    cache = DiskCache(tmp_path / "c", config.cache.max_bytes)
    assert cache.total_bytes() <= config.cache.max_bytes
    assert len(cache.files()) == 2
    gets = {name: proxy.count("GET", f"{prefix}/{name}/") for name in blobs}
    assert gets == {"m0": 1, "m1": 1, "m2": 1}
    await load_state_dict(root, "m0", storage_options=opts, config=config)  # still cached
    await load_state_dict(root, "m1", storage_options=opts, config=config)  # evicted: again
    assert proxy.count("GET", f"{prefix}/m0/") == 1
    assert proxy.count("GET", f"{prefix}/m1/") == 2


async def test_cache_off_uses_private_temp_file(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    data = _model_bytes(600_000)
    s3.put(BUCKET, f"{prefix}/m/model.pt", data)
    config = StorageConfig(
        cache=CacheConfig(directory=tmp_path / "c", protocols={"s3": False}),
        part_size=1 << 20,
    )
    url = f"s3://{BUCKET}/{prefix}/m/model.pt"
    async with fetch(url, storage_options=s3.options_via(proxy.endpoint), config=config) as art:
        assert art.strategy is Strategy.TEMP_FILE
        assert art.path is not None
        temp = anyio.Path(art.path)
        assert await temp.read_bytes() == data
    assert not await temp.exists()
    assert not await anyio.Path(tmp_path / "c").exists()


def test_configure_storage_reads_env_when_called(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = get_storage_config()
    try:
        monkeypatch.setenv("MUXGATE_CACHE_DIR", str(tmp_path / "from-env"))
        config = configure_storage({"s3": {"endpoint_url": "http://127.0.0.1:9"}})
        assert config.cache_dir() == tmp_path / "from-env"
        assert get_storage_config() is config
        assert config.options_for("s3")["endpoint_url"] == "http://127.0.0.1:9"
        assert config.options_for("s3", {"endpoint_url": "x"})["endpoint_url"] == "x"
        assert config.cache.enabled_for("s3") and config.cache.enabled_for("gs")
        assert not config.cache.enabled_for("file") and not config.cache.enabled_for("memory")
    finally:
        configure_storage(
            before.options,
            cache=before.cache,
            retry=before.retry,
            part_size=before.part_size,
            concurrency=before.concurrency,
        )


async def test_unknown_protocol_and_missing_package(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedProtocolError, match="nosuch://"):
        await load_state_dict("nosuch://bucket", "m", config=_config(tmp_path))
    protocol = f"fake{uuid.uuid4().hex[:8]}"
    register_backend(protocol, "muxgate_not_installed.FileSystem", package="muxgate-fake")
    with pytest.raises(
        MissingDependencyError, match=f"Install muxgate-fake to access {protocol}://"
    ):
        await load_state_dict(f"{protocol}://bucket", "m", config=_config(tmp_path))


async def test_cancelled_download_leaves_no_partial_file_or_lock(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path
) -> None:
    s3.put(BUCKET, f"{prefix}/m/model.pt", _model_bytes(1000, seed=2))
    key_path = f"/{BUCKET}/{prefix}/m/model.pt"
    config = _config(tmp_path / "c")
    opts = s3.options_via(proxy.endpoint)
    root = f"s3://{BUCKET}/{prefix}"
    release = proxy.hold("GET", key_path)
    scope = anyio.CancelScope()

    async def load() -> None:
        with scope:
            await load_state_dict(root, "m", storage_options=opts, config=config)

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await anyio.to_thread.run_sync(
            partial(
                wait_until_sync, lambda: proxy.count("GET", key_path) >= 1, within_s=30, what="GET"
            )
        )
        scope.cancel()  # mid-download: the ranged read is in flight
        release.set()
    assert scope.cancelled_caught
    cache = DiskCache(tmp_path / "c", config.cache.max_bytes)
    assert cache.files() == []
    assert not list((tmp_path / "c" / "objects").rglob("*.part"))
    # The lock was released: the next load downloads and succeeds.
    loaded = await load_state_dict(root, "m", storage_options=opts, config=config)
    assert float(loaded["w"].sum()) == 2000.0
    assert proxy.count("GET", key_path) == 2


@pytest.fixture(scope="module")
def gcs() -> Iterator[GcsServer]:
    with fake_gcs() as server:
        server.create_bucket(BUCKET)
        yield server


async def test_gcs_transient_failures_are_retried(
    gcs: GcsServer, prefix: str, tmp_path: Path
) -> None:
    gcs.put(BUCKET, f"{prefix}/m/model.pt", _model_bytes(1000, seed=5))
    with fault_proxy(gcs.endpoint) as proxy:
        proxy.fail_next(2, status=503)
        started = time.monotonic()
        loaded = await load_state_dict(
            f"gs://{BUCKET}/{prefix}",
            "m",
            storage_options=gcs.options_via(proxy.endpoint),
            config=_config(tmp_path / "c"),
        )
        # Our policy's short back-off, not gcsfs's 1 s + 2 s sleeps.
        assert time.monotonic() - started < 3
        assert proxy.count() >= 4
    assert float(loaded["w"].sum()) == 5000.0


@pytest.mark.parametrize("new_size", [150_000, 50_000], ids=["grows", "shrinks"])
async def test_object_replaced_mid_download_is_fetched_again(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Path, new_size: int
) -> None:
    key = f"{prefix}/m/model.pt"
    s3.put(BUCKET, key, _model_bytes(100_000, seed=1))
    release = proxy.hold("GET", f"/{BUCKET}/{key}")
    config = _config(tmp_path / "c", part_size=128 * 1024)
    result: dict[str, torch.Tensor] = {}

    async def load() -> None:
        result.update(
            await load_state_dict(
                f"s3://{BUCKET}/{prefix}",
                "m",
                storage_options=s3.options_via(proxy.endpoint),
                config=config,
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await anyio.to_thread.run_sync(
            partial(wait_until_sync, lambda: proxy.count("GET", key) >= 1, within_s=30, what="GET")
        )
        # The first ranged GET is in flight; replace the object under it.
        await anyio.to_thread.run_sync(s3.put, BUCKET, key, _model_bytes(new_size, seed=2))
        release.set()
    assert result["w"].shape == (new_size,)
    assert float(result["w"].sum()) == 2.0 * new_size
