"""The examples/ folder runs as its README says, at small sizes.

Models are made by examples/make_models.py in a temp folder (or a moto S3
bucket), the gateway serves examples/app.yaml or examples/composition.yaml
in-process (port 0, MODEL_ROOT pointing at the models), and the client
scripts run as subprocesses against it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from muxgate.gateway._config import AppConfig, load_config
from muxgate.gateway._serve import serve

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.anyio


def _small(config: AppConfig, **storage: dict[str, object]) -> AppConfig:
    """The example's config with one replica per deployment and a free port."""
    deployments = [msgspec.structs.replace(d, num_replicas=1) for d in config.deployments]
    return msgspec.structs.replace(
        config,
        deployments=deployments,
        http=msgspec.structs.replace(config.http, port=0),
        storage=dict(storage) or config.storage,
    )


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run an example script (blocking: only while no gateway runs on this loop)."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


async def _arun(script: str, *args: str) -> str:
    """Run an example script without blocking the loop the gateway serves on."""
    with anyio.fail_after(60):
        proc = await anyio.run_process([sys.executable, str(EXAMPLES / script), *args], check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, f"{script} failed:\n{out}\n{proc.stderr.decode()}"
    return out


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    out = _run("make_models.py", str(root), "--count", "3")
    assert "wrote 3 models" in out
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "3"]
    assert (root / "2" / "model.pt").is_file()
    return root


@pytest.fixture
def model_env(model_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Replicas inherit the gateway's environment: MODEL_ROOT is the one setting.
    monkeypatch.setenv("MODEL_ROOT", str(model_root))
    yield model_root


async def test_app_yaml_http_and_handle_clients(model_env: Path) -> None:
    config = _small(load_config(EXAMPLES / "app.yaml"))
    async with serve(config) as url:
        out = await _arun("client_http.py", "--url", url, "--model", "2")
        status_line, body = out.strip().splitlines()
        assert status_line.startswith("200 served by Model#")
        result = json.loads(body)
        assert result["model_id"] == "2"
        assert len(result["y"]) == 2

        out = await _arun("client_handle.py", "--url", url, "--model", "2")
        call_result, predict = (json.loads(line) for line in out.strip().splitlines())
        # Same model, same input: the handle and HTTP paths agree.
        assert call_result == result
        assert predict == {"model_id": "2", "predict": result["y"]}

        # A model id the gateway refuses: no replica served it, the client says so.
        with anyio.fail_after(60):
            refused = await anyio.run_process(
                [sys.executable, str(EXAMPLES / "client_http.py"), "--url", url, "--model", "a b"],
                check=False,
            )
        assert refused.returncode == 1
        assert refused.stdout.decode().splitlines()[0] == "400 served by the gateway"

        async with httpx.AsyncClient() as client:
            missing = await client.post(
                f"{url}/", json={"x": [0, 0, 0, 0]}, headers={"serve_multiplexed_model_id": "9"}
            )
            # passes the gateway's character check, refused by the storage join
            escape = await client.post(
                f"{url}/", json={"x": [0, 0, 0, 0]}, headers={"serve_multiplexed_model_id": "../1"}
            )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert escape.status_code == 400
        assert escape.json()["error"]["code"] == "bad_model_id"


async def test_composition_example(model_env: Path) -> None:
    config = _small(load_config(EXAMPLES / "composition.yaml"))
    async with serve(config) as url, httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/ensemble",
            json={"x": [1, 2, 3, 4], "models": ["1", "2", "3"]},
            headers={"serve_multiplexed_model_id": "upstream-id"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["own_model_id"] == "upstream-id"
        assert len(body["outputs"]) == 3
        assert body["outputs"][0] != body["outputs"][1]  # different weights
        direct = await client.post(
            f"{url}/model", json={"x": [1, 2, 3, 4]}, headers={"serve_multiplexed_model_id": "3"}
        )
        assert direct.json()["y"] == body["outputs"][2]


async def test_app_yaml_against_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same example against an S3 bucket: MODEL_ROOT plus the storage section."""
    from storage_servers import moto_s3

    with moto_s3() as s3:
        s3.create_bucket("bucket")
        _run("make_models.py", "s3://bucket/models", "--count", "2", env=s3.env)
        monkeypatch.setenv("MODEL_ROOT", "s3://bucket/models")
        config = _small(load_config(EXAMPLES / "app.yaml"), s3=s3.storage_options)
        async with serve(config) as url:
            out = await _arun("client_http.py", "--url", url, "--model", "2")
        assert json.loads(out.strip().splitlines()[1])["model_id"] == "2"


def test_make_models_without_s3_credentials_says_what_to_set() -> None:
    """No credentials (none in the environment, no files, no instance
    metadata): one line saying what to set, not botocore's traceback."""
    from storage_servers import moto_s3

    with moto_s3() as s3:
        s3.create_bucket("bucket")
        env = {k: v for k, v in {**os.environ, **s3.env}.items() if k not in _CREDENTIALS}
        env |= {
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "make_models.py"), "s3://bucket/models"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    assert proc.returncode == 1
    assert proc.stderr == (
        "make_models.py: cannot write under s3://bucket/models: NoCredentialsError:"
        " Unable to locate credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)\n"
    )


_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def test_a_model_root_that_does_not_exist_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Loaded apart (not in sys.modules): what a replica runs, in this process.
    spec = importlib.util.spec_from_file_location("example_torch_mlp", EXAMPLES / "torch_mlp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Model = module.Model

    missing = tmp_path / "no-models"
    Model(str(missing))
    Model(missing.as_uri())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    warning = (
        f"Model root {missing} does not exist: every model will be 404 model_not_found"
        f" (python examples/make_models.py {missing} writes models there)."
    )
    assert warnings == [warning, warning]
    caplog.clear()
    Model(str(tmp_path))
    Model("s3://bucket/models")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("script", ["client_http.py", "client_handle.py"])
def test_a_client_without_a_gateway_says_so_without_a_traceback(script: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / script), "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("is `muxgate serve examples/app.yaml` running?")
