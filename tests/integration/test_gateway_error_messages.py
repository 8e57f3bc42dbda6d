"""What clients and logs get for errors (real gateway and replicas): client
messages carry a stable code and no server path, bucket name or credential;
an expected outcome (unknown model, unauthorized) is logged once, without a
traceback."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import pytest
from apps.leaky_apps import KEY_ID, PASSWORD, SECRET_DIR
from gateway_harness import MODEL, observed_gateway, running_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_client_messages_name_no_path_bucket_or_credential() -> None:
    config = {
        "http": {"port": 0},
        "deployments": [{"name": "Leaky", "import_path": "leaky_apps:Leaky"}],
    }
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        for path in ("/path", "/url"):
            r = await client.get(path)
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["code"] == "user_error"
            for secret in (SECRET_DIR, "secret-models", "secret-bucket", KEY_ID, PASSWORD):
                assert secret not in r.text
        assert err["message"].startswith("RuntimeError: cannot read <url> with key <redacted>")
        r = await client.get("/path")
        assert "No such file or directory: '<path>'" in r.json()["error"]["message"]


async def test_unknown_models_and_unauthorized_requests_log_no_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "models"
    async with (
        observed_gateway(root, ["1"], http={"port": 0, "admin_token": "t0ken"}) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        r = await client.get("/", headers={MODEL: "missing-7"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["message"] == "model 'missing-7' not found in storage"
        assert str(root) not in r.text
        for _ in range(20):
            assert (await client.get("/-/replicas")).status_code == 401
        # The replica logs the detail (with the path) once; wait for it.
        seen = ""
        with anyio.fail_after(10):
            while "ModelNotFoundError: model file not found" not in seen:
                seen += capfd.readouterr().err
                await anyio.sleep(0.05)  # polling a child's log: no event to wait on
    seen += capfd.readouterr().err
    lines = [line for line in seen.splitlines() if "missing-7" in line]
    assert "Traceback" not in seen
    assert sum(str(root / "missing-7") in line for line in lines) == 1, lines
    assert any("Failed to load model 'missing-7'" in line for line in lines)
    assert not [rec for rec in caplog.records if rec.levelname in ("WARNING", "ERROR")]
    assert not [rec for rec in caplog.records if rec.exc_info]


async def test_a_failed_load_logs_its_traceback_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Not an expected outcome (a corrupt file): the load logs the traceback,
    # the request that failed with it one line, not the traceback again.
    root = tmp_path / "models"
    (root / "corrupt").mkdir(parents=True)
    (root / "corrupt" / "model.pt").write_bytes(b"not a torch file" * 8)
    async with (
        observed_gateway(root, ["1"]) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        r = await client.get("/", headers={MODEL: "corrupt"})
        assert r.status_code == 500
        request_id = r.headers["x-request-id"]
        seen = ""
        with anyio.fail_after(10):
            while f"Request {request_id} failed" not in seen:
                seen += capfd.readouterr().err
                await anyio.sleep(0.05)  # polling a child's log: no event to wait on
    seen += capfd.readouterr().err
    assert seen.count("muxgate.backends._errors.ModelFormatError:") == 1, seen
    assert f"Request {request_id} failed: ModelFormatError of the model load logged above." in seen


async def test_an_admin_load_fails_as_a_request_for_the_model_would(tmp_path: Path) -> None:
    root = tmp_path / "models"
    async with (
        observed_gateway(root, ["1"]) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        for model_id in ("a/../../x", "missing"):
            request = await client.get("/", headers={MODEL: model_id})
            # quoted: httpx would resolve the ".." segments of the URL itself
            load = await client.post(f"/-/models/Observed/{quote(model_id, safe='')}/load")
            assert (load.status_code, load.json()["error"]["code"]) == (
                request.status_code,
                request.json()["error"]["code"],
            )
            expected = {"a/../../x": "bad_model_id", "missing": "model_not_found"}[model_id]
            assert load.json()["error"]["code"] == expected
