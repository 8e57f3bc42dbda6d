"""Storage conformance suite: one set of tests, run against every backend.

``store`` is parametrized over file://, memory://, a real moto S3 server, a
real fake-gcs-server and a static HTTP file server (each server started once
per session on a free 127.0.0.1 port, see tests/storage_stores.py).
"""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import os
import pathlib
import re
import shlex
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; pytest turns warnings into errors.
    warnings.simplefilter("ignore", UserWarning)
    import torch


from otlp_receiver import OtlpReceiver, ReceivedSpan
from span_export import exporting_spans
from storage_stores import STORES, Store, open_store, store_config

from muxgate.backends._errors import (
    InvalidModelIdError,
    ModelFormatError,
    ModelNotFoundError,
    UnsafePickleError,
)
from muxgate.backends._formats import (
    UntrustedPickleWarning,
    load_exported_program,
    load_pickled_module,
    load_safetensors,
    load_state_dict,
    load_torchscript,
)
from muxgate.replicas._multiplex import model_cache, multiplexed
from muxgate.replicas._tracing import flush_tracing

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(request.param, request, tmp_path) as opened:
        yield opened


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise per the safetensors spec (safetensors.torch.save needs numpy)."""
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        t = tensor.contiguous()
        blob = ctypes.string_at(t.data_ptr(), t.nbytes)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs)


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    # ~3.2 MB: four 1 MiB parts, the last one short.
    return {"weight": torch.randn(800, 1000, generator=gen), "bias": torch.arange(10.0)}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


class Call:
    """Unpickling this calls ``func(*args)``, as a hostile checkpoint would."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _system_touch(marker: Path) -> Call:
    """An ``os.system`` payload that creates ``marker`` if it ever runs."""
    return Call(os.system, f"touch {shlex.quote(str(marker))}")


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """Export this process's spans to a real OTLP/HTTP receiver, through
    muxgate's own tracing set-up (a global SDK provider set here would
    shadow it for every later test in the session)."""
    with exporting_spans(monkeypatch, "muxgate-storage-tests") as receiver:
        yield receiver


def _fetch_spans(receiver: OtlpReceiver, count: int) -> list[ReceivedSpan]:
    assert flush_tracing()
    spans = receiver.wait_for(
        lambda spans: sum(s.name == "muxgate.storage.fetch" for s in spans) >= count
    )
    return [s for s in spans if s.name == "muxgate.storage.fetch"]


async def test_state_dict_round_trip(store: Store) -> None:
    state = _state()
    store.put("m1/model.pt", _torch_bytes(state))
    loaded = await load_state_dict(store.root, "m1", "model.pt", **store.kwargs())
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)


async def test_state_dict_under_nested_model_id(store: Store) -> None:
    store.put("org/m1/model.pt", _torch_bytes({"x": torch.ones(2)}))
    loaded = await load_state_dict(store.root, "org/m1", **store.kwargs())
    assert torch.equal(loaded["x"], torch.ones(2))


# torch 2.13 deprecates TorchScript (torch.jit.*) in favour of torch.export.
JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@JIT_DEPRECATED
async def test_torchscript_round_trip(store: Store) -> None:
    scripted = torch.jit.script(Net())
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    store.put("ts/model.ts", buf.getvalue())
    loaded = await load_torchscript(store.root, "ts", "model.ts", **store.kwargs())
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), scripted(x))


@pytest.fixture(scope="session")
def exported() -> tuple[bytes, torch.export.ExportedProgram]:
    """One torch.export program for every backend (exporting takes ~1.5 s)."""
    program = torch.export.export(Net(), (torch.randn(3, 4),))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue(), program


async def test_exported_program_round_trip(
    store: Store, exported: tuple[bytes, torch.export.ExportedProgram]
) -> None:
    data, program = exported
    store.put("ep/model.pt2", data)
    # torch.export.load may unpickle with weights_only=False: trust is explicit.
    with pytest.raises(UnsafePickleError, match=r"ep/model\.pt2") as info:
        await load_exported_program(store.root, "ep", **store.kwargs())
    assert info.value.format == "exported_program"
    with pytest.warns(UntrustedPickleWarning):
        loaded = await load_exported_program(store.root, "ep", trusted=True, **store.kwargs())
    x = torch.randn(3, 4)
    assert torch.equal(loaded.module()(x), program.module()(x))
    store.put("ep/bad.pt2", _torch_bytes({"x": torch.ones(2)}))
    with pytest.warns(UntrustedPickleWarning), pytest.raises(ModelFormatError):
        await load_exported_program(store.root, "ep", "bad.pt2", trusted=True, **store.kwargs())


async def test_safetensors_round_trip(store: Store) -> None:
    state = _state()
    store.put("st/model.safetensors", _safetensors_bytes(state))
    loaded = await load_safetensors(store.root, "st", **store.kwargs())
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


async def test_pickled_module_needs_trust(store: Store) -> None:
    net = Net()
    store.put("pm/model.pt", _torch_bytes(net))
    with pytest.raises(UnsafePickleError) as info:
        await load_pickled_module(store.root, "pm", **store.kwargs())
    assert info.value.url.endswith("/pm/model.pt")
    with pytest.warns(UntrustedPickleWarning):
        loaded = await load_pickled_module(store.root, "pm", trusted=True, **store.kwargs())
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), net(x))


async def test_malicious_pickle_never_runs(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    store.put("evil/model.pt", _torch_bytes({"weight": Payload(marker)}))
    with pytest.raises(UnsafePickleError, match=r"evil/model\.pt"):
        await load_state_dict(store.root, "evil", **store.kwargs())
    with pytest.raises(UnsafePickleError):
        await load_pickled_module(store.root, "evil", **store.kwargs())
    assert not marker.exists()


async def test_os_system_payload_is_refused_as_unsafe(store: Store, tmp_path: Path) -> None:
    # torch blocks the os/posix modules outright, with its own message.
    marker = tmp_path / "system-ran"
    store.put("sys/model.pt", _torch_bytes({"weight": _system_touch(marker)}))
    refused = re.escape(f"{os.system.__module__}.system")
    with pytest.raises(UnsafePickleError, match=rf"sys/model\.pt.*calls {refused}\b") as info:
        await load_state_dict(store.root, "sys", **store.kwargs())
    assert info.value.format == "state_dict"
    with pytest.raises(UnsafePickleError, match=rf"calls {refused}\b"):
        await load_pickled_module(store.root, "sys", **store.kwargs())
    assert not marker.exists()


async def test_os_system_payload_is_live(store: Store, tmp_path: Path) -> None:
    # Control for the test above: the same payload does run once trusted.
    marker = tmp_path / "system-ran"
    store.put("live/model.pt", _torch_bytes({"weight": _system_touch(marker)}))
    with pytest.warns(UntrustedPickleWarning):
        loaded = await load_state_dict(store.root, "live", trusted=True, **store.kwargs())
    assert loaded == {"weight": 0}
    assert marker.exists()


@pytest.mark.parametrize("func", [builtins.eval, builtins.exec])
async def test_eval_and_exec_payloads_are_refused_as_unsafe(
    store: Store, tmp_path: Path, func: Callable[..., object]
) -> None:
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').close()"
    store.put("code/model.pt", _torch_bytes({"weight": Call(func, code)}))
    with pytest.raises(UnsafePickleError, match=rf"calls {func.__name__}\b"):
        await load_state_dict(store.root, "code", **store.kwargs())
    with pytest.raises(UnsafePickleError, match=rf"calls {func.__name__}\b"):
        await load_pickled_module(store.root, "code", **store.kwargs())
    assert not marker.exists()


async def test_state_dict_of_a_pickled_module_needs_trust(store: Store) -> None:
    net = Net()
    store.put("whole/model.pt", _torch_bytes(net))
    with pytest.raises(UnsafePickleError, match=r"trusted=True.*load_pickled_module"):
        await load_state_dict(store.root, "whole", **store.kwargs())
    with pytest.warns(UntrustedPickleWarning, match=r"whole/model\.pt"):
        loaded = await load_state_dict(store.root, "whole", trusted=True, **store.kwargs())
    expected = net.state_dict()
    assert type(loaded) is dict and loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


async def test_trusted_state_dict_of_a_plain_state_dict(store: Store) -> None:
    state = {"weight": torch.randn(3, 2), "bias": torch.arange(2.0)}
    store.put("plain/model.pt", _torch_bytes(state))
    with pytest.warns(UntrustedPickleWarning):
        loaded = await load_state_dict(store.root, "plain", trusted=True, **store.kwargs())
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    store.put("list/model.pt", _torch_bytes([torch.zeros(1)]))
    with pytest.warns(UntrustedPickleWarning), pytest.raises(ModelFormatError, match="list"):
        await load_state_dict(store.root, "list", trusted=True, **store.kwargs())


async def test_not_found(store: Store) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await load_state_dict(store.root, "missing", **store.kwargs())
    assert info.value.url == f"{store.root}/missing/model.pt"


async def test_not_found_under_a_relative_root_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``model_root`` is read from the working directory, which the
    log says: a config next to its models does not make them found."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        await load_state_dict("models", "7")
    assert str(info.value) == (
        "model file not found: models/7/model.pt"
        f" (a relative path: from the working directory {tmp_path})"
    )
    assert info.value.client_message == "model '7' not found in storage"  # no path
    with pytest.raises(ModelNotFoundError) as info:
        await load_state_dict(str(tmp_path / "models"), "7")
    assert str(info.value) == f"model file not found: {tmp_path}/models/7/model.pt"


async def test_longest_model_id_is_not_found(store: Store) -> None:
    # 256 characters is a valid id, longer than a local file name may be:
    # not found, not a storage failure (500). The root exists (a local file
    # system reports a missing folder before a name too long).
    store.put("1/model.pt", _torch_bytes(_state()))
    with pytest.raises(ModelNotFoundError):
        await load_state_dict(store.root, "a" * 256, **store.kwargs())


async def test_truncated_file(store: Store) -> None:
    data = _torch_bytes(_state())
    store.put("cut/model.pt", data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"cut/model\.pt") as info:
        await load_state_dict(store.root, "cut", **store.kwargs())
    assert info.value.format == "state_dict"


@JIT_DEPRECATED
async def test_wrong_format(store: Store) -> None:
    store.put("wrong/model.pt", _safetensors_bytes({"x": torch.ones(3)}))
    store.put("wrong/model.safetensors", _torch_bytes({"x": torch.ones(3)}))
    with pytest.raises(ModelFormatError):
        await load_state_dict(store.root, "wrong", **store.kwargs())
    with pytest.raises(ModelFormatError):
        await load_safetensors(store.root, "wrong", **store.kwargs())
    with pytest.raises(ModelFormatError):
        await load_torchscript(store.root, "wrong", "model.pt", **store.kwargs())


async def test_not_a_state_dict(store: Store) -> None:
    store.put("list/model.pt", _torch_bytes([torch.ones(1)]))
    with pytest.raises(ModelFormatError, match="holds a list"):
        await load_state_dict(store.root, "list", **store.kwargs())


async def test_changed_object_is_fetched_again(store: Store, spans: OtlpReceiver) -> None:
    store.put("v/model.pt", _torch_bytes({"v": torch.tensor([1.0])}))
    first = await load_state_dict(store.root, "v", **store.kwargs())
    again = await load_state_dict(store.root, "v", **store.kwargs())
    store.put("v/model.pt", _torch_bytes({"v": torch.tensor([2.0, 2.0])}))
    assert flush_tracing()  # earlier fetches' spans must not arrive after the clear
    spans.clear()
    second = await load_state_dict(store.root, "v", **store.kwargs())
    assert first["v"].tolist() == again["v"].tolist() == [1.0]
    assert second["v"].tolist() == [2.0, 2.0]
    (span,) = _fetch_spans(spans, 1)
    assert span.attributes["muxgate.cache_hit"] is False


async def test_fetch_span(store: Store, spans: OtlpReceiver) -> None:
    data = _torch_bytes(_state())
    store.put("span/model.pt", data)
    assert flush_tracing()  # earlier fetches' spans must not arrive after the clear
    spans.clear()
    await load_state_dict(store.root, "span", **store.kwargs())
    await load_state_dict(store.root, "span", **store.kwargs())
    fetches = _fetch_spans(spans, 2)
    assert len(fetches) == 2
    for span in fetches:
        assert span.attributes["url.full"] == f"{store.root}/span/model.pt"
        assert span.attributes["muxgate.bytes"] == len(data)
        assert float(span.attributes["muxgate.duration_ms"]) >= 0
    hits = [s.attributes["muxgate.cache_hit"] for s in fetches]
    assert hits == ([False, True] if store.cached else [False, False])
    sources = [s.attributes["muxgate.source"] for s in fetches]
    assert sources == (["remote", "cache"] if store.cached else ["local", "local"])


async def test_fetch_span_is_a_child_of_the_load_span(store: Store, spans: OtlpReceiver) -> None:
    store.put("child/model.pt", _torch_bytes({"x": torch.ones(2)}))
    assert flush_tracing()
    spans.clear()
    with trace.get_tracer("test").start_as_current_span("muxgate.model.load") as parent:
        await load_state_dict(store.root, "child", **store.kwargs())
    (span,) = _fetch_spans(spans, 1)
    assert span.parent_span_id == format(parent.get_span_context().span_id, "016x")


async def test_load_and_unload_spans_carry_bytes_and_source(
    store: Store, spans: OtlpReceiver
) -> None:
    data = _torch_bytes({"w": torch.ones(3)})
    store.put("read/model.pt", data)
    store.put("next/model.pt", _torch_bytes({"w": torch.ones(5)}))

    @multiplexed(max_num_models_per_replica=1)
    async def get_model(model_id: str) -> dict[str, Any]:
        return await load_state_dict(store.root, model_id, **store.kwargs())

    assert flush_tracing()
    spans.clear()
    await get_model("read")
    await get_model("next")  # evicts "read"
    assert flush_tracing()
    load = spans.wait_for_span("muxgate.model.load", **{"muxgate.model_id": "read"})
    unload = spans.wait_for_span("muxgate.model.unload", **{"muxgate.model_id": "read"})
    for span in (load, unload):
        assert span.attributes["muxgate.bytes"] == len(data)
        assert span.attributes["muxgate.source_url"] == f"{store.root}/read/model.pt"
    assert unload.attributes["muxgate.unload_reason"] == "lru"
    await model_cache(get_model).aclose()


@pytest.mark.parametrize(
    "model_id",
    [
        "..",
        "../other",
        "a/../../etc",
        "/etc/passwd",
        "s3://other/x",
        "file:///etc",
        "a//b",
        "a\\..\\b",
        "a\x00b",
        "%2e%2e",
        "a/%2E%2E/..",
        "",
        "C:evil",
        "~root",
    ],
)
async def test_path_escape_refused(store: Store, model_id: str) -> None:
    with pytest.raises(InvalidModelIdError) as info:
        await load_state_dict(store.root, model_id, **store.kwargs())
    assert isinstance(info.value, ValueError)


async def test_plain_path_root(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    torch.save({"a": torch.zeros(2)}, tmp_path / "m" / "model.pt")
    loaded = await load_state_dict(str(tmp_path), "m", config=store_config(tmp_path))
    assert torch.equal(loaded["a"], torch.zeros(2))
