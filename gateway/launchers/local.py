"""The ``local`` launcher: replicas as processes on this host.

It implements ``muxgate.gateway.launchers.Launcher``: the pool talks to a
replica only through the address reported here (see
``ReplicaConnection.connect``), so another launcher (pods, actors) can take
its place without the pool changing.

``LocalLauncher`` runs each replica as a local process, in one of two ways:

* spawned: a child process ``python -m muxgate.replicas._server`` gets the
  spec on a stdin pipe that the launcher keeps open: when the gateway
  process dies the pipe closes and the replica exits, so no orphans survive
  the gateway. The replica prints exactly one line on stdout,
  ``READY <address>`` or ``FAILED <reason>``.
* forked (``fork_server=True``): a fork server (``muxgate.replicas._forkserver``)
  that has imported torch and muxgate once forks each replica, which then
  starts exactly like a spawned one; the same lines come back on a socket
  made for that start, which also plays the stdin pipe's part. A start
  costs a fork and ``__init__`` instead of a fresh interpreter importing
  torch (about a second). When the fork server cannot start or fork, the
  launcher spawns (and logs why).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from muxgate.gateway.launchers._interface import LaunchedReplica, ReplicaStartError
from muxgate.gateway.launchers._processes import (
    CpuBudgets,
    CpuPins,
    ForkedProcess,
    ForkServer,
    NoForkError,
    ReplicaProcess,
    SpawnedProcess,
    pin_process,
    usable_cores,
)
from muxgate.replicas.contract import (
    DEFAULT_NUM_CPUS,
    ReplicaSpec,
    cpu_budget_env,
    thread_count_for,
)

__all__ = ["FORK_SERVER_DEFAULT", "LocalLauncher", "ReplicaProcess"]

_log = logging.getLogger("muxgate.gateway.launcher")

#: Longest path a Unix socket address may have on Linux (sun_path is 108 bytes).
_MAX_UNIX_PATH = 107
#: Fork servers that may die before the launcher spawns replicas for good.
_FORK_SERVER_RESTARTS = 3
#: Whether ``LocalLauncher()`` forks replicas. Off for now only because
#: tests/integration/test_gateway_cli.py counts the gateway's *children* as
#: its replicas (forked replicas are the fork server's children); the whole
#: replica, gateway, autoscale, handles and e2e suites pass with it on.
FORK_SERVER_DEFAULT = sys.platform == "linux"


class LocalLauncher:
    """Starts replicas as local processes: forked by a fork server, or spawned.

    Args:
        socket_dir: folder for the replicas' Unix sockets; default a fresh
            temporary folder, removed by ``aclose()``. Used when a spec's
            ``listen`` is ``""`` or ``"unix:"``.
        start_timeout: seconds a replica may take to print ``READY``
            (importing torch alone takes a second or two).
        python: interpreter to run replicas with.
        env: extra environment variables for the replicas.
        fork_server: fork replicas from a fork server (a process that has
            imported torch, msgspec, anyio, opentelemetry and
            ``muxgate.replicas`` once) instead of spawning a fresh
            interpreter each: a start then costs a fork plus ``__init__``
            instead of about a second. It starts with the first replica
            (or ``warm_up()``); when it cannot start or cannot fork, replicas
            are spawned (logged). Needs ``os.pidfd_open`` (Linux >= 5.3).
            Default: ``FORK_SERVER_DEFAULT``.
        fork_server_preload: more modules for the fork server to import
            (e.g. the deployment's own module, found through ``env``'s
            ``PYTHONPATH``); one that fails to import disables forking.

    Each replica's CPU budget (``spec.num_cpus``, 1 when unset) sizes its
    thread pools (``muxgate.replicas._cpu``); a spawned replica also gets
    ``OMP_NUM_THREADS`` and friends in its environment from here. The
    budgets of running replicas are counted against the cores the host
    gives this process (``cpu_budgets``), with one warning when they exceed
    them.

    ``start`` may be called concurrently to start several replicas at once.
    The fork server and its children see the environment of the moment it
    started. It exits, stopping its children, when the launcher is closed or
    the gateway process dies (its control socket closes); a forked replica
    also exits at once when the gateway dies (its start socket closes) and
    gets SIGTERM if the fork server dies.
    """

    def __init__(
        self,
        *,
        socket_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        fork_server: bool | None = None,
        fork_server_preload: Sequence[str] = (),
    ) -> None:
        self._own_dir = socket_dir is None
        self.socket_dir = Path(
            tempfile.mkdtemp(prefix="muxgate-") if socket_dir is None else socket_dir
        )
        self.start_timeout = start_timeout
        self.python = python
        self.env = dict(env or {})
        wanted = FORK_SERVER_DEFAULT if fork_server is None else fork_server
        self.fork_server = wanted and hasattr(os, "pidfd_open")
        self.fork_server_preload = tuple(fork_server_preload)
        self._started = 0
        self._forked = 0
        self._server: ForkServer | None = None
        self._server_failures = 0
        self._server_lock = anyio.Lock()
        self._closed = False
        #: why forking is off for good (a broken fork server), else None
        self.fork_disabled_reason: str | None = None
        #: CPU budgets of the replicas started here against the host's cores
        self.cpu_budgets = CpuBudgets(usable_cores())
        #: cores of their own for the replicas whose spec says ``pin_cpus``
        self.cpu_pins = CpuPins()
        self._running: dict[str, ReplicaProcess] = {}

    def __repr__(self) -> str:
        mode = (
            f"fork_server={self._server!r}"
            if self.fork_server and self.fork_disabled_reason is None
            else f"spawn ({self.fork_disabled_reason or 'fork_server=False'})"
        )
        return (
            f"<LocalLauncher socket_dir={str(self.socket_dir)!r} started={self._started}"
            f" forked={self._forked} {mode}>"
        )

    def socket_address(self, replica_id: str) -> str:
        """The ``unix:`` address a replica with this id gets by default."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica_id)
        path = str(self.socket_dir / f"{safe}.sock")
        if len(path.encode()) > _MAX_UNIX_PATH:
            raise ReplicaStartError(
                f"Unix socket path too long ({len(path)} bytes): {path}; use a shorter socket_dir"
            )
        return f"unix:{path}"

    async def warm_up(self) -> bool:
        """Start the fork server now rather than with the first replica, so
        that a first start from zero costs a fork; True if replicas will be
        forked. Cheap once done; a gateway can run it in the background."""
        return await self._fork_server() is not None

    async def start(self, spec: ReplicaSpec) -> ReplicaProcess:
        """Start a replica and wait until it is ready to accept connections.

        Raises:
            ReplicaStartError: it printed ``FAILED``, exited, or did not get
                ready within ``start_timeout``; the process is gone by then.
        """
        if spec.listen in ("", "unix:"):
            spec = msgspec.structs.replace(spec, listen=self.socket_address(spec.replica_id))
        server = await self._fork_server()
        if server is not None:
            try:
                process = await self._start_forked(server, spec)
            except NoForkError as exc:
                self._disable_forking(str(exc))
            else:
                self._started += 1
                self._forked += 1
                self._count_budget(process)
                return process
        process = await self._spawn(spec)
        self._started += 1
        self._count_budget(process)
        return process

    def _count_budget(self, process: ReplicaProcess) -> None:
        for replica_id, running in list(self._running.items()):
            if running.returncode is not None:
                del self._running[replica_id]
                self.cpu_budgets.remove(replica_id)
                self.cpu_pins.release(replica_id)
        self._running[process.replica_id] = process
        num_cpus = process.spec.num_cpus
        budget = num_cpus if num_cpus is not None else DEFAULT_NUM_CPUS
        self.cpu_budgets.add(process.replica_id, budget)
        if process.spec.pin_cpus:
            self._pin(process, budget)

    def _pin(self, process: ReplicaProcess, budget: float) -> None:
        cores = self.cpu_pins.take(process.replica_id, thread_count_for(budget))
        if cores is None:
            _log.info(
                "replica %s is not pinned: the other pinned replicas hold the cores",
                process.replica_id,
            )
        elif pin_process(process.pid, cores):
            process.cores = cores
            _log.info("replica %s pinned to cores %s", process.replica_id, cores)
        else:
            self.cpu_pins.release(process.replica_id)

    async def ready_replicas(self, deployment: str) -> list[ReplicaProcess]:
        """The replicas of ``deployment`` started here that still run. A
        local replica never outlives the gateway that started it, so there
        is nothing older to adopt."""
        return [
            process
            for process in self._running.values()
            if process.returncode is None and process.spec.deployment == deployment
        ]

    async def stop(self, replica: LaunchedReplica, grace_s: float) -> int | None:
        """SIGTERM (it finishes its calls and unloads), SIGKILL after ``grace_s``."""
        return await _local(replica).stop(grace_s)

    def kill(self, replica: LaunchedReplica) -> None:
        """SIGKILL, now."""
        _local(replica).kill()

    async def wait_exit(self, replica: LaunchedReplica) -> int | None:
        """Its exit code once it exited (``-N``: killed by signal N; None:
        unknown, its fork server died first)."""
        return await _local(replica).wait()

    def _disable_forking(self, reason: str) -> None:
        _log.warning("fork server: %s; spawning replicas instead", reason)
        self.fork_disabled_reason = reason

    async def _fork_server(self) -> ForkServer | None:
        """The running fork server, started if need be; None: spawn."""
        if not self.fork_server or self.fork_disabled_reason is not None or self._closed:
            return None
        if self._server is not None and self._server.alive:
            return self._server
        async with self._server_lock:
            if self._server is not None and not self._server.alive:
                _log.warning("fork server %s exited; starting another", self._server.process.pid)
                await self._server.aclose()
                self._server = None
                self._server_failures += 1
            if self._server is None and self._server_failures < _FORK_SERVER_RESTARTS:
                try:
                    self._server = await ForkServer.start(
                        self.python,
                        {**os.environ, **self.env},
                        self.fork_server_preload,
                        self.start_timeout,
                    )
                except (NoForkError, OSError) as exc:
                    self._disable_forking(f"cannot start: {exc}")
            elif self._server is None:
                self._disable_forking(f"exited {self._server_failures} times")
            return self._server if self.fork_disabled_reason is None else None

    async def _start_forked(self, server: ForkServer, spec: ReplicaSpec) -> ReplicaProcess:
        lines = await server.fork(spec)
        pid: int | None = None
        pidfd: int | None = None
        address: str | None = None
        said = ""
        try:
            with anyio.move_on_after(self.start_timeout) as timer:
                # PID (from the fork server) and READY (from the child) come
                # in either order.
                while address is None or pid is None:
                    line = await lines.readline()
                    if line is None:
                        break
                    said = line
                    if line.startswith("PID "):
                        pid = int(line[len("PID ") :])
                        with contextlib.suppress(ProcessLookupError):
                            pidfd = os.pidfd_open(pid)
                    elif line.startswith("READY "):
                        address = line[len("READY ") :]
                    elif line.startswith("FAILED"):
                        raise ReplicaStartError(line[len("FAILED") :].strip() or "failed to start")
                    elif line.startswith("NOFORK"):
                        raise NoForkError(line[len("NOFORK") :].strip())
                    elif line.startswith("EXIT "):
                        raise ReplicaStartError(
                            f"replica {spec.replica_id} exited with code "
                            f"{line[len('EXIT ') :]} before it was ready"
                        )
            if timer.cancelled_caught:
                raise ReplicaStartError(
                    f"replica {spec.replica_id} not ready within {self.start_timeout:g}s"
                )
            if pid is None:
                raise NoForkError(f"fork server went away (said {said!r})")
            if address is None:
                raise ReplicaStartError(
                    f"replica {spec.replica_id} exited before it was ready"
                    + (f" (said {said!r})" if said else "")
                )
            return ForkedProcess(spec, address, pid, pidfd, lines)
        except BaseException:
            if pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
            lines.sock.close()
            raise

    async def _spawn(self, spec: ReplicaSpec) -> ReplicaProcess:
        num_cpus = spec.num_cpus if spec.num_cpus is not None else DEFAULT_NUM_CPUS
        env = {**os.environ, **self.env, **cpu_budget_env(num_cpus)}
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
                # Nothing more comes on stdout (the replica redirects it).
                await process.stdout.aclose()
                return SpawnedProcess(spec, process, text[len("READY ") :])
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
        """Stop the fork server (and replicas it forked that still run) and
        remove the socket folder if this launcher created it."""
        self._closed = True
        if self._server is not None:
            await self._server.aclose()
            self._server = None
        if self._own_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _local(replica: LaunchedReplica) -> ReplicaProcess:
    if not isinstance(replica, ReplicaProcess):
        raise TypeError(f"{replica!r} was not started by a LocalLauncher")
    return replica


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
