"""``muxgate serve`` as a user runs it, for tests that need the real command:
a process of its own, its stderr (its log, the replicas' too) in a file.

    with serve_process(config, log) as url: ...

The URL comes from the ``serving on`` line; on exit the process gets
SIGTERM (SIGKILL if it has not stopped in 30 s).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from waiting import wait_until_sync

__all__ = ["serve_process"]


@contextlib.contextmanager
def serve_process(config: Path, log: Path, *args: str) -> Iterator[str]:
    """Run ``muxgate serve CONFIG --port 0 ARGS...``; yield its URL."""
    with log.open("wb") as stderr:
        command = [sys.executable, "-m", "muxgate.gateway._cli", "serve", str(config)]
        proc = subprocess.Popen([*command, "--port", "0", *args], stderr=stderr)
        try:

            def url() -> str | None:
                for line in log.read_text(errors="replace").splitlines():
                    if "serving on" in line:
                        return line.strip().rsplit(" ", 1)[-1]
                assert proc.poll() is None, log.read_text()
                return None

            yield wait_until_sync(url, within_s=60, what="muxgate serve's URL")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
