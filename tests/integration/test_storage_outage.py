"""Storage that is down or hangs: stale-if-error from the disk cache, and
storage calls that give up before the request's deadline.

Against real servers on 127.0.0.1: moto (stopped for an outage), a TCP
server that accepts and never answers, a FaultProxy holding requests or
cutting a transfer halfway, and fake-gcs-server. The gateway tests run
real replica processes; the last one checks that models in memory keep
serving through an S3 outage (a failed load of another model costs none of
them).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import context as otel_context

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; pytest turns warnings into errors.
    warnings.simplefilter("ignore", UserWarning)
    import torch

from muxgate.backends._config import CacheConfig, RetryPolicy, StorageConfig
from muxgate.backends._deadline import DEADLINE_KEY
from muxgate.backends._errors import ModelNotFoundError, StorageUnavailableError
from muxgate.backends._fetch import fetch, storage_counters
from muxgate.backends._formats import load_state_dict
from muxgate.backends._registry import filesystem_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway_harness import MODEL, running_gateway
from otlp_receiver import OtlpReceiver
from prometheus_text import only, parse_samples
from span_export import exporting_spans
from storage_servers import (
    S3Server,
    fake_gcs,
    fault_proxy,
    moto_s3,
    silent_server,
)

from muxgate.replicas._tracing import flush_tracing

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BUCKET = "muxgate-outage"


def _config(cache_dir: Path) -> StorageConfig:
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, deadline=10)
    return StorageConfig(cache=CacheConfig(directory=cache_dir, max_bytes=1 << 30), retry=retry)


def _weights(value: float) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((4,), value)}, buf)
    return buf.getvalue()


def _stale_serves() -> float:
    return storage_counters()["storage_stale_serves"]


def _s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "key": "k",
        "secret": "s",
        "client_kwargs": {"region_name": "us-east-1"},
    }


@contextlib.contextmanager
def _request_deadline(seconds: float) -> Iterator[float]:
    """What a replica does for each call: the request's deadline in the
    OpenTelemetry context (absolute ``time.monotonic()``)."""
    deadline = time.monotonic() + seconds
    token = otel_context.attach(otel_context.set_value(DEADLINE_KEY, deadline))
    try:
        yield deadline
    finally:
        otel_context.detach(token)


@pytest.fixture
def s3() -> Iterator[S3Server]:
    """A moto server of this test's own: outage tests stop it."""
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with exporting_spans(monkeypatch, "muxgate-outage-tests") as receiver:
        yield receiver


def _fetch_spans(receiver: OtlpReceiver, count: int) -> list[Any]:
    assert flush_tracing()
    spans = receiver.wait_for(
        lambda spans: sum(s.name == "muxgate.storage.fetch" for s in spans) >= count
    )
    return [s for s in spans if s.name == "muxgate.storage.fetch"]


# -- muxgate.backends on its own ---------------------------------------------------------------


async def test_s3_down_serves_the_cached_copy_and_only_that(
    s3: S3Server, tmp_path: Path, spans: OtlpReceiver
) -> None:
    config = _config(tmp_path / "cache")
    root = f"s3://{BUCKET}/models"
    s3.put(BUCKET, "models/cached/model.pt", _weights(1.0))
    s3.put(BUCKET, "models/never/model.pt", _weights(2.0))
    first = await load_state_dict(root, "cached", storage_options=s3.storage_options, config=config)
    before = _stale_serves()
    s3.stop()
    assert flush_tracing()
    spans.clear()

    stale = await load_state_dict(root, "cached", storage_options=s3.storage_options, config=config)
    assert stale["w"].tolist() == first["w"].tolist()
    assert _stale_serves() == before + 1
    (span,) = _fetch_spans(spans, 1)
    assert span.attributes["muxgate.stale"] is True
    assert span.attributes["muxgate.source"] == "cache"

    with pytest.raises(StorageUnavailableError) as info:
        await load_state_dict(root, "never", storage_options=s3.storage_options, config=config)
    assert _stale_serves() == before + 1
    # the log gets the URL; a client gets words without the bucket
    assert BUCKET in str(info.value)
    assert BUCKET not in info.value.client_message and "s3://" not in info.value.client_message


async def test_a_remote_that_answers_decides(s3: S3Server, tmp_path: Path) -> None:
    """Stale-if-error is for a remote that cannot be reached, never for one
    that says the object is gone or changed."""
    config = _config(tmp_path / "cache")
    root = f"s3://{BUCKET}/models"
    options = s3.storage_options
    s3.put(BUCKET, "models/gone/model.pt", _weights(1.0))
    s3.put(BUCKET, "models/changed/model.pt", _weights(1.0))
    await load_state_dict(root, "gone", storage_options=options, config=config)
    await load_state_dict(root, "changed", storage_options=options, config=config)
    before = _stale_serves()
    s3.delete(BUCKET, "models/gone/model.pt")
    s3.put(BUCKET, "models/changed/model.pt", _weights(5.0))
    with pytest.raises(ModelNotFoundError):
        await load_state_dict(root, "gone", storage_options=options, config=config)
    async with fetch(f"{root}/changed/model.pt", storage_options=options, config=config) as art:
        assert (art.cache_hit, art.stale) == (False, False)
    changed = await load_state_dict(root, "changed", storage_options=options, config=config)
    assert changed["w"].tolist() == [5.0] * 4
    # down now: the version served is the one the remote confirmed last
    s3.stop()
    stale = await load_state_dict(root, "changed", storage_options=options, config=config)
    assert stale["w"].tolist() == [5.0] * 4
    assert _stale_serves() == before + 1


@pytest.mark.parametrize("scheme", ["s3", "gs"])
async def test_silent_storage_gives_up_before_the_request_deadline(
    tmp_path: Path, scheme: str
) -> None:
    """A store that accepts connections and never answers: without a
    deadline each attempt would wait out botocore's 60 s read timeout (or
    gcsfs's own)."""
    # imported before the clock starts: importing gcsfs takes most of a second
    filesystem_class(scheme)
    with silent_server() as silent:
        options = (
            _s3_options(silent.endpoint)
            if scheme == "s3"
            else {"endpoint_url": silent.endpoint, "token": "anon", "project": "test"}
        )
        started = time.monotonic()
        with _request_deadline(3.0), pytest.raises(StorageUnavailableError) as info:
            await load_state_dict(
                f"{scheme}://{BUCKET}", "m", storage_options=options, config=_config(tmp_path / "c")
            )
        elapsed = time.monotonic() - started
    assert silent.accepted >= 1
    # 3 s left: storage keeps 0.75 s back to answer, and waited for the rest
    assert 1.5 < elapsed < 3.0, elapsed
    assert "deadline" in info.value.reason or "Timeout" in info.value.reason


async def test_hanging_storage_serves_the_cached_copy_within_the_deadline(
    s3: S3Server, tmp_path: Path
) -> None:
    config = _config(tmp_path / "cache")
    s3.put(BUCKET, "models/m/model.pt", _weights(3.0))
    with fault_proxy(s3.endpoint) as proxy:
        options = s3.options_via(proxy.endpoint)
        await load_state_dict(f"s3://{BUCKET}/models", "m", storage_options=options, config=config)
        proxy.hold("HEAD", "/models/m/model.pt")  # the version check never answers
        started = time.monotonic()
        with _request_deadline(3.0):
            stale = await load_state_dict(
                f"s3://{BUCKET}/models", "m", storage_options=options, config=config
            )
        elapsed = time.monotonic() - started
    assert stale["w"].tolist() == [3.0] * 4
    # half of the storage budget (2.25 s) for the check, the rest to load the copy
    assert elapsed < 2.0, elapsed


async def test_storage_that_stops_mid_transfer_is_retried_and_nothing_short_is_kept(
    s3: S3Server, tmp_path: Path
) -> None:
    """The store sends its headers and half of the object, then closes the
    connection: the read is retried; when every attempt is cut the load is
    ``storage_unavailable`` (not a model file that does not parse), and no
    short copy is left in the disk cache for a later load to serve."""
    config = _config(tmp_path / "cache")  # 3 attempts
    root = f"s3://{BUCKET}/models"
    s3.put(BUCKET, "models/once/model.pt", _weights(4.0))
    s3.put(BUCKET, "models/always/model.pt", _weights(5.0))
    with fault_proxy(s3.endpoint) as proxy:
        options = s3.options_via(proxy.endpoint)
        proxy.cut_next(1)
        once = await load_state_dict(root, "once", storage_options=options, config=config)
        assert once["w"].tolist() == [4.0] * 4
        assert proxy.count("GET", "/models/once/") == 2
        proxy.cut_next(3)
        with pytest.raises(StorageUnavailableError) as info:
            await load_state_dict(root, "always", storage_options=options, config=config)
        assert proxy.count("GET", "/models/always/") == 3
        assert "payload is not completed" in info.value.reason
        whole = await load_state_dict(root, "always", storage_options=options, config=config)
        assert whole["w"].tolist() == [5.0] * 4


async def test_gcs_down_serves_the_cached_copy(tmp_path: Path) -> None:
    config = _config(tmp_path / "cache")
    with fake_gcs() as gcs:
        gcs.create_bucket(BUCKET)
        gcs.put(BUCKET, "models/m/model.pt", _weights(7.0))
        options = gcs.storage_options
        root = f"gs://{BUCKET}/models"
        await load_state_dict(root, "m", storage_options=options, config=config)
    before = _stale_serves()
    stale = await load_state_dict(root, "m", storage_options=options, config=config)
    assert stale["w"].tolist() == [7.0] * 4
    assert _stale_serves() == before + 1
    with pytest.raises(StorageUnavailableError):
        await load_state_dict(root, "other", storage_options=options, config=config)


# -- through the gateway and a real replica ----------------------------------------------------


def _put_models(s3: S3Server, ids: list[str]) -> None:
    from apps.observability_apps import TinyNet

    for model_id in ids:
        buf = io.BytesIO()
        torch.manual_seed(sum(model_id.encode()))
        torch.save(TinyNet().state_dict(), buf)
        s3.put(BUCKET, f"models/{model_id}/model.pt", buf.getvalue())


def _gateway_config(
    options: dict[str, Any], cache_dir: Path, *, request_timeout_s: float
) -> dict[str, Any]:
    return {
        "http": {"port": 0, "request_timeout_s": request_timeout_s},
        "storage": {"s3": options, "cache": {"directory": str(cache_dir)}},
        "deployments": [
            {
                "name": "Observed",
                "import_path": "observability_apps:Observed",
                "init_kwargs": {"model_root": f"s3://{BUCKET}/models"},
                "num_replicas": 1,
            }
        ],
    }


def _assert_storage_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    # no bucket name, URL or path for the client
    assert BUCKET not in error["message"] and "s3://" not in error["message"]


async def test_gateway_during_an_s3_outage(s3: S3Server, tmp_path: Path) -> None:
    """S3 stopped: a model whose file is in the disk cache (no longer in
    memory) is served; one never fetched gets 503 with Retry-After; the
    stale serve shows in /-/metrics."""
    _put_models(s3, ["a", "b", "c"])
    config = _gateway_config(s3.storage_options, tmp_path / "cache", request_timeout_s=10)
    async with running_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for model_id in ("a", "b", "c"):  # two per replica: "a" leaves memory, stays on disk
            response = await c.post("/", headers={MODEL: model_id})
            assert response.status_code == 200, response.text
        s3.stop()
        cached = await c.post("/", headers={MODEL: "a"})
        assert cached.status_code == 200, cached.text
        assert cached.json()["model"] == "a"
        _assert_storage_unavailable(await c.post("/", headers={MODEL: "never-fetched"}))
        samples = parse_samples((await c.get("/-/metrics")).text)
        assert only(samples, "muxgate_storage_stale_serves_total") == {
            (("deployment", "Observed"),): 1.0
        }


async def test_gateway_with_storage_that_never_answers(tmp_path: Path) -> None:
    """Storage accepts connections and stays silent: 503 storage_unavailable
    with Retry-After before the request deadline, not 504 at it."""
    with silent_server() as silent:
        options = _s3_options(silent.endpoint)
        config = _gateway_config(options, tmp_path / "cache", request_timeout_s=3)
        async with (
            running_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
        ):
            started = time.monotonic()
            response = await client.post("/", headers={MODEL: "m"})
            elapsed = time.monotonic() - started
        assert silent.accepted >= 1
    _assert_storage_unavailable(response)
    assert elapsed < 3.0, elapsed


async def _outage_traffic(
    client: httpx.AsyncClient, in_memory: list[str], rounds: int
) -> tuple[int, int]:
    """Rounds of one request for an id never fetched beside one for each
    model in memory, all at once. Returns (in-memory requests, their failures)."""
    sent = failed = 0

    async def one(model_id: str, expect_ok: bool) -> None:
        nonlocal sent, failed
        response = await client.post("/", headers={MODEL: model_id})
        if expect_ok:
            sent += 1
            failed += response.status_code != 200
        else:
            _assert_storage_unavailable(response)

    for n in range(rounds):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, f"never-{n}", False)
            for model_id in in_memory:
                tg.start_soon(one, model_id, True)
    return sent, failed


@pytest.mark.parametrize(
    ("load_order", "disk_cache"),
    [
        ("evict_after", True),  # the default
        # The first version's behaviour: evict before the load, and no copy to
        # fall back on: loaded models are lost to failed loads of others.
        ("evict_first", False),
    ],
)
async def test_loaded_models_keep_serving_through_an_s3_outage(
    s3: S3Server, tmp_path: Path, load_order: str, disk_cache: bool
) -> None:
    in_memory = ["a", "b"]
    _put_models(s3, in_memory)
    config = _gateway_config(s3.storage_options, tmp_path / "cache", request_timeout_s=10)
    config["storage"]["cache"]["enabled"] = disk_cache
    config["storage"]["retry"] = {"max_attempts": 2, "base_delay": 0.01}
    config["deployments"][0]["load_order"] = load_order
    async with running_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for model_id in in_memory:  # fills the replica's two slots
            assert (await c.post("/", headers={MODEL: model_id})).status_code == 200
        s3.stop()
        sent, failed = await _outage_traffic(c, in_memory, rounds=10)
    assert sent == 20
    if load_order == "evict_after":
        assert failed == 0
    else:
        assert failed > 0  # the failure this order exists to avoid
