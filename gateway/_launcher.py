"""Where replicas run: launchers start replica processes and report addresses.

The pool talks to replicas only through the address a launcher returns (see
``ReplicaConnection.connect``), so a launcher for Kubernetes pods can replace
``LocalLauncher`` without the pool changing: it would create a pod from the
same ``ReplicaSpec``, wait for it to be ready and return its ``tcp:`` address.

``LocalLauncher`` runs each replica as a child process
(``python -m muxgate.replicas._server``) and hands it the spec on a stdin pipe
that it keeps open: when the gateway process dies the pipe closes and the
replica exits, so no orphans survive the gateway. The replica prints exactly
one line on stdout, ``READY <address>`` or ``FAILED <reason>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import msgspec

from muxgate.replicas._server import ReplicaSpec

__all__ = [
    "Launcher",
    "LocalLauncher",
    "ReplicaHandle",
    "ReplicaProcess",
    "ReplicaStartError",
]

#: Longest path a Unix socket address may have on Linux (sun_path is 108 bytes).
_MAX_UNIX_PATH = 107


class ReplicaStartError(Exception):
    """A replica did not become ready.

    Attributes:
        reason: one line saying why (the replica's ``FAILED`` line, its exit
            code, or a timeout).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplicaHandle(Protocol):
    """What the pool needs from a started replica, wherever it runs."""

    @property
    def replica_id(self) -> str: ...

    @property
    def address(self) -> str: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    async def wait(self) -> int | None: ...


class Launcher(Protocol):
    """Starts replicas; ``LocalLauncher`` now, a Kubernetes one later."""

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle: ...

    async def aclose(self) -> None: ...


class ReplicaProcess:
    """A replica running as a local child process.

    Attributes:
        spec: what it was started with.
        address: where it listens (``unix:/path`` or ``tcp:host:port``).
        pid: its process id.
    """

    def __init__(self, spec: ReplicaSpec, process: anyio.abc.Process, address: str) -> None:
        self.spec = spec
        self.address = address
        self._process = process

    @property
    def replica_id(self) -> str:
        replica_id: str = self.spec.replica_id
        return replica_id

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once it has exited and been waited for, else None."""
        return self._process.returncode

    def terminate(self) -> None:
        """SIGTERM: the replica finishes in-flight calls, unloads, exits 0."""
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: immediate; connections to it drop."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    async def wait(self) -> int:
        """Wait for the process to exit; its exit code."""
        code = await self._process.wait()
        await self._close_pipes()
        return code

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109 - a grace period
        """Terminate, wait up to ``timeout`` seconds, then kill; the exit code."""
        self.terminate()
        with anyio.move_on_after(timeout):
            return await self.wait()
        self.kill()
        return await self.wait()

    async def _close_pipes(self) -> None:
        if self._process.stdin is not None:
            with contextlib.suppress(Exception):
                await self._process.stdin.aclose()
        if self._process.stdout is not None:
            with contextlib.suppress(Exception):
                await self._process.stdout.aclose()

    def __repr__(self) -> str:
        code = self._process.returncode
        status = "running" if code is None else f"exited({code})"
        return f"<ReplicaProcess {self.replica_id} pid={self.pid} {self.address} {status}>"


class LocalLauncher:
    """Starts replicas as child processes of this (gateway) process.

    Args:
        socket_dir: folder for the replicas' Unix sockets; default a fresh
            temporary folder, removed by ``aclose()``. Used when a spec's
            ``listen`` is ``""`` or ``"unix:"``.
        start_timeout: seconds a replica may take to print ``READY``
            (importing torch alone takes a second or two).
        python: interpreter to run replicas with.
        env: extra environment variables for the replicas.

    ``start`` may be called concurrently to start several replicas at once.
    """

    def __init__(
        self,
        *,
        socket_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._own_dir = socket_dir is None
        self.socket_dir = Path(
            tempfile.mkdtemp(prefix="muxgate-") if socket_dir is None else socket_dir
        )
        self.start_timeout = start_timeout
        self.python = python
        self.env = dict(env or {})
        self._started = 0

    def __repr__(self) -> str:
        return f"<LocalLauncher socket_dir={str(self.socket_dir)!r} started={self._started}>"

    def socket_address(self, replica_id: str) -> str:
        """The ``unix:`` address a replica with this id gets by default."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica_id)
        path = str(self.socket_dir / f"{safe}.sock")
        if len(path.encode()) > _MAX_UNIX_PATH:
            raise ReplicaStartError(
                f"Unix socket path too long ({len(path)} bytes): {path}; use a shorter socket_dir"
            )
        return f"unix:{path}"

    async def start(self, spec: ReplicaSpec) -> ReplicaProcess:
        """Spawn a replica and wait until it is ready to accept connections.

        Raises:
            ReplicaStartError: it printed ``FAILED``, exited, or did not get
                ready within ``start_timeout``; the process is gone by then.
        """
        if spec.listen in ("", "unix:"):
            spec = msgspec.structs.replace(spec, listen=self.socket_address(spec.replica_id))
        env = {**os.environ, **self.env}
        process = await anyio.open_process(
            [self.python, "-m", "muxgate.replicas._server", "--spec", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the replica's logs go where the gateway's go
            env=env,
            # Own session: a Ctrl-C at the terminal reaches the gateway only,
            # which then drains its replicas in order.
            start_new_session=True,
        )
        try:
            assert process.stdin is not None and process.stdout is not None
            # The spec travels on stdin, not argv: it may hold storage
            # credentials, which argv would show to every user of the host.
            await process.stdin.send(msgspec.json.encode(spec) + b"\n")
            line = b""
            with anyio.move_on_after(self.start_timeout) as timer:
                line = await _read_line(process.stdout)
            if timer.cancelled_caught:
                raise ReplicaStartError(
                    f"replica {spec.replica_id} not ready within {self.start_timeout:g}s"
                )
            text = line.decode(errors="replace").strip()
            if text.startswith("READY "):
                self._started += 1
                # Nothing more comes on stdout (the replica redirects it).
                await process.stdout.aclose()
                return ReplicaProcess(spec, process, text[len("READY ") :])
            if text.startswith("FAILED"):
                raise ReplicaStartError(text[len("FAILED") :].strip() or "failed to start")
            with anyio.move_on_after(5):
                await process.wait()
            raise ReplicaStartError(
                f"replica {spec.replica_id} exited with code {process.returncode} before "
                f"it was ready" + (f" (said {text!r})" if text else "")
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.aclose()
            raise

    async def aclose(self) -> None:
        """Remove the socket folder if this launcher created it."""
        if self._own_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


async def _read_line(stream: anyio.abc.ByteReceiveStream, limit: int = 1 << 16) -> bytes:
    """Bytes up to the first newline (or end of stream); never more than one line is
    sent, so nothing read past the newline is lost."""
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        try:
            buf += await stream.receive()
        except anyio.EndOfStream:
            break
    return buf.split(b"\n", 1)[0]
