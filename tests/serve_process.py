"""``muxgate serve`` as a user runs it, for tests that need the real command:
a process of its own, its stderr (its log, the replicas' too) in a file.

    with serve_process(config, log) as url: ...

The URL comes from the ``serving on`` line; on exit the process gets
SIGTERM (SIGKILL if it has not stopped in 30 s).

:class:`ServedGateway` names such a process by address and log, and
:class:`RawClient` speaks HTTP/1.1 to it over one raw socket, for tests of
what an HTTP library would not send.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from waiting import wait_until_sync

__all__ = ["RawClient", "ServedGateway", "serve_process", "served_gateway"]


@contextlib.contextmanager
def serve_process(config: Path, log: Path, *args: str, prefix: Sequence[str] = ()) -> Iterator[str]:
    """Run ``muxgate serve CONFIG --port 0 ARGS...``; yield its URL.

    ``prefix``: a command that runs it (``setpriv ...``)."""
    with log.open("wb") as stderr:
        command = [*prefix, sys.executable, "-m", "muxgate.gateway._cli", "serve", str(config)]
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


@contextlib.contextmanager
def served_gateway(folder: Path, config_text: str) -> Iterator[ServedGateway]:
    """``muxgate serve`` on the app config ``config_text``, written into
    ``folder`` beside the process's log."""
    config = folder / "app.yaml"
    config.write_text(config_text)
    log = folder / "stderr.log"
    with serve_process(config, log) as url:
        yield ServedGateway(url, log)


class ServedGateway:
    """A ``muxgate serve`` process: its address and its log."""

    def __init__(self, url: str, log: Path) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.address = (parts.hostname, parts.port)
        self.log = log

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


class RawClient:
    """One raw connection: send bytes, read whole responses.

    ``send_buffer``: the socket's send buffer in bytes (the system's default
    when None), set before connecting.
    """

    def __init__(self, gw: ServedGateway, send_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if send_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock.settimeout(10)
        self.sock.connect(gw.address)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """Whether the gateway closed the connection (reads to its end)."""
        return self.file.read() == b""
