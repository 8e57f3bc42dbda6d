"""``muxgate demo`` as a user runs it: a subprocess that completes with a
clean summary, stops cleanly on Ctrl-C, and leaves no process behind.

Processes the demo starts are found by a marker in their environment (the
replicas inherit the demo's environment), so a replica that outlived the
demo would be found even after being re-parented.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from waiting import wait_until_sync

pytestmark = pytest.mark.slow


def _tagged(tag: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment carries ``tag``."""
    marker = f"MUXGATE_DEMO_TEST={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            pids.append(int(entry))
    return pids


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path, str]:
    tag = uuid.uuid4().hex
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # Files, not pipes: nobody drains a pipe while the test waits.
    with out.open("wb") as out_file, err.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "muxgate.gateway._cli", "demo", *args],
            stdout=out_file,
            stderr=err_file,
            env={**os.environ, "MUXGATE_DEMO_TEST": tag},
            start_new_session=True,  # its own process group, as at a terminal
        )
    return proc, out, err, tag


def _model_dir(err: Path) -> Path:
    match = re.search(r"writing \d+ models to (\S+)", err.read_text())
    assert match, err.read_text()
    return Path(match.group(1))


def test_demo_completes_with_zero_errors_and_cleans_up(tmp_path: Path) -> None:
    proc, out, err, tag = _start(tmp_path, "--requests", "200")
    try:
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = out.read_text()
    assert code == 0, f"{summary}\n{err.read_text()[-3000:]}"
    # The summary row: requests, errors, p50, p99, req/s, hit rate, spillovers.
    row = re.search(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+%\s+\d+$", summary, re.M)
    assert row, summary
    assert (int(row.group(1)), int(row.group(2))) == (200, 0)
    assert len(re.findall(r"^\s+Demo#\w+\s+\d+", summary, re.M)) == 3  # one row per replica
    assert "--keep-running" in summary  # the gateway stops with the demo
    # the demo fits the machine: no oversubscription warning on a small host
    assert "CPU budgets" not in err.read_text()
    # it ends with the way from the demo to one's own models
    next_steps = summary[summary.index("Next: serve your own models") :]
    assert "muxgate serve examples/app.yaml" in next_steps
    assert "http://127.0.0.1:8000/-/" in next_steps
    assert "examples/README.md" in next_steps
    assert not _model_dir(err).exists()
    wait_until_sync(lambda: not _tagged(tag), within_s=10, what="every demo process to exit")


def test_demo_ctrl_c_mid_run_stops_everything(tmp_path: Path) -> None:
    proc, _out, err, tag = _start(tmp_path, "--requests", "1000000", "--replicas", "2")
    try:
        wait_until_sync(
            lambda: "requests, errors" in err.read_text(), within_s=60, what="traffic to start"
        )
        running = _tagged(tag)
        assert len(running) >= 3  # the demo and its replicas
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130, err.read_text()[-3000:]
    assert "stopping" in err.read_text()
    # The demo itself ends without a traceback (replica logs may show calls
    # cut off by the shutdown; those are not the demo's).
    assert not err.read_text().rstrip().splitlines()[-1].startswith(("Traceback", "  File"))
    assert not _model_dir(err).exists()
    wait_until_sync(lambda: not _tagged(tag), within_s=10, what="every demo process to exit")


def test_demo_keep_running_serves_the_status_page_until_ctrl_c(tmp_path: Path) -> None:
    import httpx

    proc, out, err, tag = _start(
        tmp_path, "--requests", "20", "--replicas", "1", "--models", "3", "--keep-running"
    )
    try:
        wait_until_sync(
            lambda: "serving until Ctrl-C" in err.read_text(), within_s=60, what="the summary"
        )
        match = re.search(r"status page: (\S+)", out.read_text())
        assert match, out.read_text()
        page = httpx.get(match.group(1), timeout=10)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, err.read_text()[-3000:]
    wait_until_sync(lambda: not _tagged(tag), within_s=10, what="every demo process to exit")


def test_demo_pure_parts() -> None:
    """Zipf weights, percentiles and the summary table, without processes."""
    import argparse

    from muxgate.gateway._demo import DemoResult, format_summary, zipf_weights

    weights = zipf_weights(4, 1.0)
    assert weights == pytest.approx([1.0, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25])
    result = DemoResult(latencies=[0.001 * i for i in range(1, 101)], seconds=2.0)
    assert result.requests == 100
    assert result.percentile(0.5) == pytest.approx(0.051)
    assert result.percentile(0.99) == pytest.approx(0.1)
    ns = argparse.Namespace(models=4, replicas=1, max_models_per_replica=2, zipf=1.0, concurrency=2)
    rows = [
        {
            "id": "Demo#abc",
            "pid": 42,
            "counters": {
                "cache_hits": 90.0,
                "cache_misses": 10.0,
                "model_loads": 10.0,
                "model_unloads_lru": 8.0,
            },
            "models": ["3", "1"],
        }
    ]
    text = format_summary(ns, result, rows, spillovers=0)
    assert "90.0%" in text
    assert re.search(r"Demo#abc\s+42\s+100\s+90\s+10\s+0\s+8\s+3 1", text), text
    # calls = hits + loads + joined: a miss that waited for a load under way
    rows[0]["counters"]["cache_misses"] = 14.0
    text = format_summary(ns, result, rows, spillovers=0)
    assert re.search(r"Demo#abc\s+42\s+104\s+90\s+10\s+4\s+8\s+3 1", text), text
    assert "  calls    get_model() calls the replica served: hits + loads + joined" in text
    assert "single flight" in text
