"""Model ids with characters that mean something in URLs or to fsspec, on
real storage: each reads the object at exactly ``<root>/<id>/model.pt``, or
is refused as a bad model id, on every backend; never another model.

The decoys sit where a naive join would read: ``a?b`` or ``a#b`` put into an
``http://`` URL ask for the object ``a`` (the rest is a query string or a
fragment), ``a%3Fb`` for the model ``a?b``, ``a%41`` for ``aA``; s3fs ends a
key at ``?versionId=``.
"""

from __future__ import annotations

import io
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from prometheus_text import only, parse_samples
from storage_servers import BUCKET, HttpFiles, S3Server
from storage_stores import STORES, Store, open_store

from muxgate.backends import InvalidModelIdError, load_state_dict

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; pytest turns warnings into errors.
    warnings.simplefilter("ignore", UserWarning)
    import torch

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: Ids every backend reads literally (their own object, whatever a URL or a
#: glob would make of them).
LITERAL_IDS = [
    "a?b",
    "a#b",
    "?a",
    "a#",
    "x/a?b",
    "a%3Fb",
    "a%23b",
    "a%25b",
    "a%b",
    "a%41",
    "a#1",
    "a?generation=1",
    "a*",
    "a[b]",
    "a{b,c}",
    "ab",
    "aA",
    "ab:c",
    "a@b",
    "a!$&'()+,;=b",
    'a^b|c`d"e<f>',
    "a~",
]
#: Ids refused on one backend only (read literally by the others): s3fs
#: ends a key at "?versionId="; gcsfs with version_aware reads "?...&" as a
#: query string holding a generation.
REFUSED = {
    "s3": ["a?versionId=1", "x/a?versionId=null"],
    "gs": ["a?generation=1&x", "a?b/&generation=2&c"],
}


def _state(value: float) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.tensor([value])}, buf)
    return buf.getvalue()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(request.param, request, tmp_path) as opened:
        yield opened


async def test_each_id_reads_its_own_object(store: Store) -> None:
    ids = LITERAL_IDS + [
        i for name, refused in REFUSED.items() if name != store.name for i in refused
    ]
    # Decoys: a naive join reads the object "a" for "a?b" over HTTP; every
    # id's own object is another's decoy ("a%3Fb" would read "a?b").
    store.put("a", _state(-1.0))
    for index, model_id in enumerate(ids):
        store.put(f"{model_id}/model.pt", _state(float(index)))
    read = {}
    for model_id in ids:
        loaded = await load_state_dict(store.root, model_id, **store.kwargs())
        read[model_id] = ids[int(loaded["w"].item())] if loaded["w"].item() >= 0 else "<a>"
    assert read == {model_id: model_id for model_id in ids}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_what_a_backend_reads_as_no_key_is_refused(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with open_store(name, request, tmp_path) as store:
        # What the library would read for them: the object "a" (or "x/a").
        store.put("a", _state(-1.0))
        store.put("x/a", _state(-1.0))
        options = {**store.storage_options, "version_aware": True}
        for storage_options in (store.storage_options, options):
            for model_id in REFUSED[name]:
                with pytest.raises(InvalidModelIdError) as info:
                    await load_state_dict(
                        store.root, model_id, storage_options=storage_options, config=store.config
                    )
                assert info.value.model_id == model_id
                assert f"is not allowed on {name}:// storage" in info.value.client_message
                assert "object version" in info.value.reason


def _tiny_state(seed_of: str) -> bytes:
    from apps.observability_apps import TinyNet

    torch.manual_seed(sum(seed_of.encode()))
    buf = io.BytesIO()
    torch.save(TinyNet().state_dict(), buf)
    return buf.getvalue()


def _expected_y(seed_of: str) -> list[float]:
    from apps.observability_apps import TinyNet

    torch.manual_seed(sum(seed_of.encode()))
    with torch.no_grad():
        return TinyNet().eval()(torch.ones(4)).tolist()  # type: ignore[no-any-return]


async def test_through_the_gateway(
    http_server: HttpFiles, s3_server: S3Server, tmp_path: Path
) -> None:
    """A request gets its own model over http:// and s3://, or a 400 naming
    what is refused; the decoys a naive join reads are there to be served."""
    prefix = f"ids-{uuid.uuid4().hex}"
    ids = ["a?b", "a#b", "a%3Fb", "a%41"]
    for model_id in [*ids, "aA"]:
        http_server.put(f"{prefix}/{model_id}/model.pt", _tiny_state(model_id))
        s3_server.put(BUCKET, f"{prefix}/{model_id}/model.pt", _tiny_state(model_id))
    http_server.put(f"{prefix}/a", _tiny_state("decoy"))
    s3_server.put(BUCKET, f"{prefix}/a", _tiny_state("decoy"))
    deployments = [
        {
            "name": name,
            "import_path": "observability_apps:Observed",
            "route_prefix": f"/{name}",
            "init_kwargs": {"model_root": root},
            "num_replicas": 1,
        }
        for name, root in (
            ("http", f"{http_server.endpoint}/{prefix}"),
            ("s3", f"s3://{BUCKET}/{prefix}"),
        )
    ]
    config = {
        "http": {"port": 0},
        "storage": {
            "s3": s3_server.storage_options,
            "cache": {"directory": str(tmp_path / "cache")},
        },
        "deployments": deployments,
    }
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        for name in ("http", "s3"):
            for model_id in ids:
                r = await client.get(f"/{name}", headers={MODEL: model_id})
                assert r.status_code == 200, (name, model_id, r.text)
                assert r.json() == {"model": model_id, "y": _expected_y(model_id)}
        r = await client.get("/s3", headers={MODEL: "a?versionId=1"})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "bad_model_id"
        assert "'?versionId=' is not allowed on s3:// storage" in error["message"]
        r = await client.get("/s3", headers={MODEL: "nobody"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        # Failed loads, each counted apart as the client's mistake (the alert leaves them out).
        samples = parse_samples((await client.get("/-/metrics")).text)
        s3 = (("deployment", "s3"),)
        assert only(samples, "muxgate_model_load_failures_total")[s3] == 2.0
        assert only(samples, "muxgate_model_load_refused_ids_total")[s3] == 1.0
        assert only(samples, "muxgate_model_load_not_found_total")[s3] == 1.0
