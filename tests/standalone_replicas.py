"""``muxgate replica`` processes for tests: start one, read its ``READY``
line, stop it (SIGTERM, then SIGKILL after a deadline)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import yaml

APPS = str(Path(__file__).resolve().parent / "apps")
MUXGATE = [sys.executable, "-m", "muxgate.gateway._cli"]
#: A secret for tests (never a real one).
SECRET = "test-cluster-secret-0123456789abcdef"
#: a deployment of tests/apps with max_ongoing_requests 4
HOOKED = {"name": "Hooked", "import_path": "autoscale_apps:Hooked"}


def write_config(folder: Path, deployments: list[dict[str, Any]], **top: Any) -> Path:
    """An app config (YAML) with ``tests/apps`` as the app dir."""
    path = folder / "app.yaml"
    path.write_text(yaml.safe_dump({"app_dir": APPS, "deployments": deployments, **top}))
    return path


def replica_command(config: Path, deployment: str, name: str, listen: str) -> list[str]:
    return [
        *MUXGATE,
        "replica",
        str(config),
        "--deployment",
        deployment,
        "--listen",
        listen,
        "--name",
        name,
    ]


def replica_env(secret: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MUXGATE_CLUSTER_SECRET"}
    if secret is not None:
        env["MUXGATE_CLUSTER_SECRET"] = secret
    return env


class Standalone:
    """A running ``muxgate replica``; ``address`` from its ``READY`` line."""

    def __init__(self, process: anyio.abc.Process, address: str) -> None:
        self.process = process
        self.address = address

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """Resident memory now (``VmRSS``) or at its peak (``VmHWM``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def reset_peak_rss(self) -> None:
        """Reset ``VmHWM`` to the current resident memory (Linux)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    async def stop(self, *, within_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (SIGKILL past ``within_s``)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(within_s):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        raise AssertionError(f"muxgate replica {self.pid} ignored SIGTERM for {within_s}s")


async def _ready_line(process: anyio.abc.Process, within_s: float) -> str:
    assert process.stdout is not None
    data = b""
    with anyio.fail_after(within_s):
        while b"\n" not in data:
            try:
                data += await process.stdout.receive()
            except anyio.EndOfStream:
                break
    return data.decode().split("\n", 1)[0]


@contextlib.asynccontextmanager
async def standalone_replica(
    config: Path,
    deployment: str,
    name: str,
    *,
    listen: str = "tcp:127.0.0.1:0",
    secret: str | None = SECRET,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Standalone]:
    """Run ``muxgate replica`` until the block ends (then SIGTERM)."""
    process = await anyio.open_process(
        replica_command(config, deployment, name, listen),
        env={**replica_env(secret), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=None,
    )
    try:
        line = await _ready_line(process, within_s=60)
        if not line.startswith("READY "):
            raise AssertionError(f"muxgate replica did not start: {line!r}")
        replica = Standalone(process, line.split(" ", 1)[1])
        yield replica
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()


@contextlib.asynccontextmanager
async def two_replicas(
    tmp_path: Path,
) -> AsyncIterator[tuple[Standalone, Standalone, dict[str, Any]]]:
    """Replicas hooked-0 and hooked-1 of ``HOOKED`` (secret required; their
    config is ``tmp_path/app.yaml``) and a gateway config watching both with
    a ``static`` launcher."""
    replica_config = write_config(tmp_path, [HOOKED])
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    async with (
        standalone_replica(replica_config, "Hooked", "hooked-0") as r0,
        standalone_replica(replica_config, "Hooked", "hooked-1") as r1,
    ):
        yield (
            r0,
            r1,
            {
                "app_dir": APPS,
                "http": {"port": 0},
                "cluster": {"secret_file": str(secret_file)},
                "deployments": [
                    {
                        **HOOKED,
                        "launcher": {"kind": "static", "addresses": [r0.address, r1.address]},
                    }
                ],
            },
        )
