"""``muxgate serve`` in the foreground: starts, serves, stops cleanly on
SIGTERM/SIGINT with no replica left behind; ``serve()`` cleans up too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from muxgate.gateway._config import parse_config
from muxgate.gateway._serve import serve

APPS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "apps"))

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (from /proc): replicas are the
    gateway's children when spawned, its fork server's when forked."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent]
        found += children
        frontier += children
    return found


def _gone(pids: list[int], within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _wait_for_url(log: Path, proc: subprocess.Popen[bytes], within_s: float = 60.0) -> str:
    """The URL from the "serving on" line the command writes to stderr (a file:
    a pipe nobody drains could block the replicas, which log to it too)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "serving on" in line:
                return line.strip().rsplit(" ", 1)[-1]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"muxgate serve did not report its URL:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_runs_and_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(
        f"app_dir: {APPS}\n"
        "deployments:\n"
        "  - {name: Cli, import_path: 'gateway_apps:Echo1', num_replicas: 2}\n"
    )
    log = tmp_path / "stderr.log"
    stderr = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "muxgate.gateway._cli",
            "serve",
            str(config),
            "--port",
            "0",
            "--log-level",
            "WARNING",
        ],
        stderr=stderr,
    )
    try:
        url = _wait_for_url(log, proc)
        assert url.startswith("http://127.0.0.1:")
        r = httpx.get(f"{url}/x", headers={"serve_multiplexed_model_id": "7"}, timeout=30)
        assert r.status_code == 200
        assert r.json()["model"] == "7"
        assert httpx.get(f"{url}/-/healthz", timeout=10).status_code == 200
        processes = _descendants(proc.pid)  # 2 replicas, and the fork server if any
        assert len(processes) in (2, 3)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert _gone(processes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


@pytest.mark.anyio
@pytest.mark.parametrize("given", ["AppConfig", "path", "mapping"])
async def test_serve_context_manager_leaves_no_process(tmp_path: Path, given: str) -> None:
    data = {
        "app_dir": APPS,
        "http": {"port": 0},
        "deployments": [{"name": "Ctx", "import_path": "gateway_apps:Echo1"}],
    }
    config: Any = data
    if given == "AppConfig":
        config = parse_config(data)
    elif given == "path":
        config = tmp_path / "app.yaml"
        config.write_text(yaml.safe_dump(data))
    async with serve(config) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/")
        assert r.status_code == 200
        pid = r.json()["pid"]
    assert _gone([pid])


def test_serve_reports_replicas_that_cannot_start(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("deployments:\n  - {name: Broken, import_path: 'no_such_module:Thing'}\n")
    env = {**os.environ}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, asyncio\n"
            "from muxgate.gateway._config import load_config\n"
            "from muxgate.gateway._serve import serve, GatewayStartError\n"
            "async def main():\n"
            "    try:\n"
            "        async with serve(load_config(sys.argv[1]), port=0, ready_timeout_s=3):\n"
            "            pass\n"
            "    except GatewayStartError as exc:\n"
            "        print('ERROR', exc)\n"
            "asyncio.run(main())\n",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert "ERROR replicas not running" in proc.stdout, proc.stdout + proc.stderr
    assert "no_such_module" in proc.stdout
