"""A client cannot flood the log with requests that fail as they should:
``muxgate serve`` (a real process, its log and its replicas' in a file) gets
hundreds of requests for model ids storage does not have and of bodies that
are not JSON; each gets its 404 or 400, and the warnings they cause stay
bounded (``OutcomeThrottle``: 10 per outcome a minute), where they were one
or two per request.

The log is read once the answers are in: a replica writes a request's log
lines before it answers, so there is nothing to wait for.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from gateway_harness import MODEL
from serve_process import serve_process

APPS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "apps"))

pytestmark = pytest.mark.slow

FLOOD = 200
#: OutcomeThrottle's burst per outcome
BURST = 10


def test_requests_that_fail_as_they_should_leave_a_bounded_log(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    config = tmp_path / "app.yaml"
    config.write_text(
        f"app_dir: {APPS}\n"
        "deployments:\n"
        "  - name: Observed\n"
        "    import_path: observability_apps:Observed\n"
        f"    init_kwargs: {{model_root: '{empty.as_uri()}'}}\n"
        "    route_prefix: /obs\n"
        "    num_replicas: 1\n"
        "  - {name: Strict, import_path: 'bad_request_apps:Strict', route_prefix: /strict,"
        " num_replicas: 1}\n"
    )
    log = tmp_path / "stderr.log"
    with (
        serve_process(config, log, "--log-level", "WARNING") as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for i in range(FLOOD):
            missing = client.get("/obs/", headers={MODEL: f"missing-{i}"})
            assert (missing.status_code, missing.json()["error"]["code"]) == (
                404,
                "model_not_found",
            )
            bad = client.post("/strict/json", content=b"{not json")
            assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_request")
            no_id = client.get("/strict/model")
            assert (no_id.status_code, no_id.json()["error"]["code"]) == (400, "bad_request")
        lines = log.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if line.startswith("WARNING")]
    # model_not_found (one line a request: its failed load's, with the
    # detail) and bad_request (both kinds): BURST each, whatever FLOOD is.
    assert len(warnings) <= 2 * BURST, "\n".join(warnings)
    assert (
        sum(
            "Failed to load model 'missing-" in line
            and "ModelNotFoundError: model file not found" in line
            for line in warnings
        )
        == BURST
    )
    assert sum("not valid JSON" in line or "model ID" in line for line in warnings) == BURST
    # No tracebacks: these are outcomes, not bugs.
    assert not [line for line in lines if line.startswith("Traceback")]
