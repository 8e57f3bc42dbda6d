"""Storage that refuses the replica's credentials, or a replica without any:
``StorageAccessDeniedError``, never retried, and through the gateway 503
``storage_denied`` with a message that names no bucket, path or key and one
warning line in the replica's log, no traceback.

Against real servers on 127.0.0.1: moto checking credentials and IAM
policies as AWS does (``S3Server.enforce_auth``), botocore finding no
credentials at all, and an HTTP server answering 401/403 as GCS or a plain
HTTP root does (fake-gcs-server accepts everyone); and a local model file,
or its folder, that the replica's user may not read (as root: a replica
started without the capabilities that read any file).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; pytest turns warnings into errors.
    warnings.simplefilter("ignore", UserWarning)
    import torch

from gateway_harness import MODEL
from serve_process import serve_process
from storage_servers import S3Server, fault_proxy, moto_s3, refusing_server

from muxgate.backends._config import CacheConfig, RetryPolicy, StorageConfig
from muxgate.backends._errors import StorageAccessDeniedError
from muxgate.backends._formats import load_state_dict
from muxgate.backends._registry import filesystem_class

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BUCKET = "muxgate-denied"
APPS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "apps"))
#: botocore finds no credentials anywhere (and does not ask an EC2 metadata service)
NO_CREDENTIALS = {
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _config(cache_dir: Path) -> StorageConfig:
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, deadline=10)
    return StorageConfig(cache=CacheConfig(directory=cache_dir, max_bytes=1 << 30), retry=retry)


async def _denied_load(
    root: str, options: dict[str, Any], tmp_path: Path
) -> StorageAccessDeniedError:
    """Load model ``m`` under ``root``; the StorageAccessDeniedError it raises."""
    with pytest.raises(StorageAccessDeniedError) as info:
        await load_state_dict(
            root, "m", storage_options=options, config=_config(tmp_path / "cache")
        )
    return info.value


def _model_bytes() -> bytes:
    from apps.observability_apps import TinyNet

    buf = io.BytesIO()
    torch.save(TinyNet().state_dict(), buf)
    return buf.getvalue()


def _s3_options(endpoint: str, key: str | None, secret: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    if key is not None:
        options |= {"key": key, "secret": secret}
    return options


@pytest.fixture
def s3() -> Iterator[tuple[S3Server, tuple[str, str]]]:
    """A moto server of this test's own that checks credentials: a bucket
    with model ``m``; and the key id and secret of an IAM user without any
    policy."""
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        server.put(BUCKET, "models/m/model.pt", _model_bytes())
        reader = server.iam_user("reader")
        server.enforce_auth()
        yield server, reader


def _without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in NO_CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def _assert_denied(exc: StorageAccessDeniedError, *secrets: str) -> None:
    assert exc.client_message == (
        "model storage refused access (credentials missing or not allowed)"
    )
    for secret in (BUCKET, "s3://", "gs://", "models/m", *secrets):
        assert secret not in exc.client_message
    assert BUCKET in str(exc) or "127.0.0.1" in str(exc)  # the log gets the URL


# -- muxgate.backends on its own ---------------------------------------------------------------


@pytest.mark.parametrize("who", ["unknown key", "wrong secret", "no policy"])
async def test_s3_refusing_the_credentials_is_access_denied_once(
    s3: tuple[S3Server, tuple[str, str]], tmp_path: Path, who: str
) -> None:
    server, (key, secret) = s3
    key, secret = {
        "unknown key": ("AKIAUNKNOWNUNKNOWN12", "whatever"),
        "wrong secret": (key, "not-the-secret"),
        "no policy": (key, secret),
    }[who]
    with fault_proxy(server.endpoint) as proxy:
        options = _s3_options(proxy.endpoint, key, secret)
        denied = await _denied_load(f"s3://{BUCKET}/models", options, tmp_path)
        assert proxy.count() == 1  # not retried: the same credentials fail the same way
    _assert_denied(denied, key, secret)
    assert "PermissionError" in denied.reason


async def test_s3_without_any_credentials_is_access_denied(
    s3: tuple[S3Server, tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_credentials(monkeypatch)
    with fault_proxy(s3[0].endpoint) as proxy:
        options = _s3_options(proxy.endpoint, None, None)
        denied = await _denied_load(f"s3://{BUCKET}/models", options, tmp_path)
        assert proxy.count() == 0  # botocore could not sign: nothing was sent
    _assert_denied(denied)
    assert "NoCredentialsError" in denied.reason


async def test_gcs_without_credentials_is_access_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """google-auth finds no credentials (``DefaultCredentialsError``):
    nothing is asked of the server, which is a refusing one."""
    for name in list(os.environ):
        if name.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server to ask either
    with refusing_server(500) as server:
        options = {"token": "google_default", "endpoint_url": server.endpoint}
        denied = await _denied_load(f"gs://{BUCKET}/models", options, tmp_path)
        assert server.requests == []
    _assert_denied(denied)
    assert "DefaultCredentialsError" in denied.reason


@pytest.mark.parametrize(
    ("scheme", "status"), [("gs", 401), ("gs", 403), ("http", 401), ("http", 403)]
)
async def test_gcs_and_http_refusals_are_access_denied(
    tmp_path: Path, scheme: str, status: int
) -> None:
    filesystem_class(scheme)  # imported before the server counts anything
    body = json.dumps(
        {"error": {"code": status, "message": "Permission denied on the object", "errors": []}}
    ).encode()
    with refusing_server(status, body) as deny:
        if scheme == "gs":
            root = f"gs://{BUCKET}/models"
            options: dict[str, Any] = {
                "endpoint_url": deny.endpoint,
                "token": "anon",
                "project": "test",
            }
        else:
            root, options = f"{deny.endpoint}/models", {}
        denied = await _denied_load(root, options, tmp_path)
        assert len(deny.requests) >= 1
    _assert_denied(denied)
    assert str(status) in denied.reason or "Forbidden" in denied.reason


# -- through muxgate serve and a real replica --------------------------------------------------


def _serve_config(
    tmp_path: Path,
    s3_options: dict[str, Any] | None,
    *,
    model_root: str = f"s3://{BUCKET}/models",
    **deployment: Any,
) -> Path:
    app: dict[str, Any] = {
        "app_dir": APPS,
        "deployments": [
            {
                "name": "Observed",
                "import_path": "observability_apps:Observed",
                "init_kwargs": {"model_root": model_root},
                "num_replicas": 1,
                **deployment,
            }
        ],
    }
    if s3_options is not None:
        app["storage"] = {"s3": s3_options, "cache": {"directory": str(tmp_path / "cache")}}
    config = tmp_path / "app.yaml"
    config.write_text(json.dumps(app))
    return config


def _ask_for_m(
    config: Path, log: Path, prefix: list[str] | None = None
) -> tuple[httpx.Response, str]:
    """One request for model ``m`` through ``muxgate serve CONFIG``: the
    answer, checked to be 503 ``storage_denied``, and the one warning line
    it logged (with no traceback)."""
    with (
        serve_process(config, log, prefix=prefix or ()) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        r = client.post("/", headers={MODEL: "m"})
        lines = log.read_text(errors="replace").splitlines()
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "storage_denied"
    assert error["message"] == "model storage refused access (credentials missing or not allowed)"
    assert int(r.headers["retry-after"]) >= 1
    # one warning with the detail for the operator, no traceback
    warnings_ = [line for line in lines if line.startswith(("WARNING", "ERROR"))]
    assert len(warnings_) == 1, "\n".join(warnings_)
    assert not [line for line in lines if line.startswith("Traceback")]
    (line,) = warnings_
    assert r.headers["x-request-id"] in line and "StorageAccessDeniedError" in line
    return r, line


@pytest.mark.parametrize("credentials", ["refused", "missing"])
def test_gateway_answers_503_storage_denied_and_logs_one_line(
    s3: tuple[S3Server, tuple[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    credentials: str,
) -> None:
    server, (key, _) = s3
    if credentials == "missing":
        _without_credentials(monkeypatch)  # muxgate serve and its replicas inherit it
        options = _s3_options(server.endpoint, None, None)
        secrets: tuple[str, ...] = ()
    else:
        options = _s3_options(server.endpoint, key, "not-the-secret")
        secrets = (key, "not-the-secret")
    r, line = _ask_for_m(_serve_config(tmp_path, options), tmp_path / "stderr.log")
    for secret in (BUCKET, "s3://", "models/m", "127.0.0.1", *secrets):
        assert secret not in r.text
    assert f"s3://{BUCKET}/models/m/model.pt" in line
    assert ("NoCredentialsError" if credentials == "missing" else "PermissionError") in line


def test_a_refused_preload_and_admin_load_log_no_traceback(
    s3: tuple[S3Server, tuple[str, str]], tmp_path: Path
) -> None:
    """The replica starts without a preload id storage refuses (its load's
    line and one saying so, no traceback), and an operator's load of it
    answers as a request would, adding no line to the failed load's."""
    server, (key, _) = s3
    options = _s3_options(server.endpoint, key, "not-the-secret")
    log = tmp_path / "stderr.log"
    with (
        serve_process(_serve_config(tmp_path, options, preload=["m"]), log) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        r = client.post("/-/models/Observed/m/load")
        lines = log.read_text(errors="replace").splitlines()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "storage_denied"
    assert not [line for line in lines if line.startswith("Traceback")], "\n".join(lines)
    warnings_ = [line for line in lines if line.startswith(("WARNING", "ERROR"))]
    failed = [line for line in warnings_ if "Failed to load model 'm'" in line]
    assert len(failed) == 2, "\n".join(warnings_)  # the preload's load, the admin load
    assert all("StorageAccessDeniedError" in line for line in failed)
    assert sum("Preloading model 'm'" in line for line in warnings_) == 1
    assert len(warnings_) == 3, "\n".join(warnings_)


# -- a local file the replica may not read --------------------------------------------------


def _without_file_permissions() -> list[str]:
    """A command prefix under which a file of mode 000 is unreadable: none
    for a user other than root; as root, ``setpriv`` taking the capabilities
    that read any file (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``) out of
    the bounding set, so that the command and everything it starts run
    without them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("runs as root, and setpriv (util-linux) is not there to drop its file access")
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    tried = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if tried.returncode != 0:  # e.g. a container without CAP_SETPCAP
        pytest.skip(f"runs as root, and setpriv cannot drop its file access: {tried.stderr}")
    return prefix


def _unreadable_model(root: Path, what: str) -> Path:
    """``root/m/model.pt``, with the file or its folder made unreadable."""
    (root / "m").mkdir(parents=True)
    (root / "m" / "model.pt").write_bytes(_model_bytes())
    locked = root / "m" / "model.pt" if what == "file" else root / "m"
    locked.chmod(0)
    return locked


@pytest.fixture
def unlock() -> Iterator[list[Path]]:
    """Paths to give their permissions back at teardown (pytest removes tmp_path)."""
    locked: list[Path] = []
    yield locked
    for path in locked:
        path.chmod(0o755)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_local_file_the_replica_may_not_read_is_access_denied(
    tmp_path: Path, unlock: list[Path], what: str
) -> None:
    """Not ``ModelFormatError`` ("not a valid state_dict file"): the file
    may be fine, the process may not read it."""
    unlock.append(_unreadable_model(tmp_path / "models", what))
    probe = (
        "import asyncio, json\n"
        "from muxgate.backends import load_state_dict\n"
        "try:\n"
        f"    asyncio.run(load_state_dict({str(tmp_path / 'models')!r}, 'm'))\n"
        "    print(json.dumps({'error': None}))\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__,\n"
        "                      'client': getattr(exc, 'client_message', None),\n"
        "                      'log': str(exc)}))\n"
    )
    done = subprocess.run(
        [*_without_file_permissions(), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "StorageAccessDeniedError", outcome
    assert outcome["client"] == "model storage refused access (credentials missing or not allowed)"
    assert "PermissionError" in outcome["log"]
    assert str(tmp_path) in outcome["log"]  # the operator's line names the file


def test_gateway_answers_503_storage_denied_for_an_unreadable_local_file(
    tmp_path: Path, unlock: list[Path]
) -> None:
    root = tmp_path / "models"
    unlock.append(_unreadable_model(root, "file"))
    config = _serve_config(tmp_path, None, model_root=str(root))
    r, line = _ask_for_m(config, tmp_path / "stderr.log", prefix=_without_file_permissions())
    assert str(tmp_path) not in r.text and "model.pt" not in r.text
    assert f"{root}/m/model.pt" in line and "PermissionError" in line
