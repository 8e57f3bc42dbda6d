"""Local replica processes, spawned or forked, the launcher's side of the
fork server (``muxgate.replicas._forkserver`` describes its protocol), and
the host's CPU count against the replicas' budgets.

Used by ``muxgate.gateway.launchers.local.LocalLauncher``; nothing here decides
when to fork or spawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from muxgate.replicas.contract import ReplicaSpec

__all__ = [
    "CpuBudgets",
    "CpuPins",
    "ForkServer",
    "ForkedProcess",
    "NoForkError",
    "ReplicaProcess",
    "SpawnedProcess",
    "cgroup_cpu_limit",
    "parse_cpu_max",
    "pin_process",
    "usable_cores",
]

_log = logging.getLogger("muxgate.gateway.launcher")

#: Seconds the fork server gets to stop its children and exit (it gives
#: them 5 s after SIGTERM).
_FORK_SERVER_EXIT_S = 15.0


class ReplicaProcess:
    """A replica running as a local process (spawned, or forked by the fork server).

    Attributes:
        spec: what it was started with.
        address: where it listens (``unix:/path`` or ``tcp:host:port``).
        pid: its process id.
        forked: True if the fork server forked it.
        cores: the cores it is pinned to (``pin_cpus``), or None.
    """

    forked = False

    def __init__(self, spec: ReplicaSpec, address: str) -> None:
        self.spec = spec
        self.address = address
        self.cores: list[int] | None = None

    @property
    def replica_id(self) -> str:
        replica_id: str = self.spec.replica_id
        return replica_id

    @property
    def name(self) -> str:
        """Its stable identity: the spec's ``replica_id``."""
        return self.replica_id

    @property
    def deployment(self) -> str:
        deployment: str = self.spec.deployment
        return deployment

    @property
    def pid(self) -> int:
        raise NotImplementedError

    @property
    def returncode(self) -> int | None:
        """Exit code once it has exited and been waited for, else None."""
        raise NotImplementedError

    def terminate(self) -> None:
        """SIGTERM: the replica finishes in-flight calls, unloads, exits 0."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: immediate; connections to it drop."""
        self._signal(signal.SIGKILL)

    def _signal(self, signum: signal.Signals) -> None:
        raise NotImplementedError

    async def wait(self) -> int | None:
        """Wait for the process to exit; its exit code (``-N``: killed by
        signal N; None: unknown, its fork server died first)."""
        raise NotImplementedError

    async def stop(self, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109 - a grace period
        """Terminate, wait up to ``timeout`` seconds, then kill; the exit code."""
        self.terminate()
        with anyio.move_on_after(timeout):
            return await self.wait()
        self.kill()
        return await self.wait()

    def __repr__(self) -> str:
        code = self.returncode
        status = "running" if code is None else f"exited({code})"
        kind = " forked" if self.forked else ""
        return f"<ReplicaProcess {self.replica_id} pid={self.pid}{kind} {self.address} {status}>"


class SpawnedProcess(ReplicaProcess):
    """A replica spawned as ``python -m muxgate.replicas._server``, our child."""

    def __init__(self, spec: ReplicaSpec, process: anyio.abc.Process, address: str) -> None:
        super().__init__(spec, address)
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def _signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signum)

    async def wait(self) -> int:
        code = await self._process.wait()
        await self._close_pipes()
        return code

    async def _close_pipes(self) -> None:
        if self._process.stdin is not None:
            with contextlib.suppress(Exception):
                await self._process.stdin.aclose()
        if self._process.stdout is not None:
            with contextlib.suppress(Exception):
                await self._process.stdout.aclose()


class ForkedProcess(ReplicaProcess):
    """A replica forked by the fork server: not our child, so its exit is
    learnt from the fork server (``EXIT`` on the start socket) and signals
    go through a pidfd (never to a recycled pid)."""

    forked = True

    def __init__(
        self, spec: ReplicaSpec, address: str, pid: int, pidfd: int | None, lines: _SocketLines
    ) -> None:
        super().__init__(spec, address)
        self._pid = pid
        self._pidfd = pidfd
        self._lines = lines
        self._code: int | None = None
        self._exited = False
        self._wait_lock = anyio.Lock()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._code

    def _signal(self, signum: signal.Signals) -> None:
        if self._pidfd is not None and not self._exited:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    async def wait(self) -> int | None:
        async with self._wait_lock:
            if not self._exited:
                self._code = await _exit_code(self._lines)
                self._exited = True
                self._release()
        return self._code

    def _release(self) -> None:
        # Closing the start socket before the replica exits would tell it
        # that the gateway died; here it has exited.
        self._lines.sock.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)


async def _exit_code(lines: _SocketLines) -> int | None:
    while (line := await lines.readline()) is not None:
        if line.startswith("EXIT "):
            return int(line[len("EXIT ") :])
    return None  # the fork server died before it could tell


class _SocketLines:
    """Lines from a non-blocking stream socket, and sending on it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = b""

    async def readline(self, limit: int = 1 << 16) -> str | None:
        """The next line without its newline; None at end of stream."""
        while b"\n" not in self._buf:
            if len(self._buf) > limit:
                raise ValueError("line too long")
            # Cancellation lands in the wait, never after a recv: no data lost.
            await anyio.wait_readable(self.sock)
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(self.sock)


class NoForkError(Exception):
    """The fork server could not fork this replica (spawn it instead)."""


class ForkServer:
    """The launcher's side of one fork server process (see
    ``muxgate.replicas._forkserver`` for the protocol)."""

    def __init__(self, process: anyio.abc.Process, control: socket.socket) -> None:
        self.process = process
        self.control = control
        # One sender at a time: when a burst of starts fills the control
        # socket's send buffer, anyio lets only one task wait for it to drain
        # (a second gets BusyResourceError), so the others queue here.
        self._send_lock = anyio.Lock()

    @classmethod
    async def start(
        cls, python: str, env: Mapping[str, str], preload: Sequence[str], ready_timeout_s: float
    ) -> ForkServer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await anyio.open_process(
                [python, "-m", "muxgate.replicas._forkserver", *preload],
                stdin=theirs.fileno(),
                stdout=None,
                stderr=None,
                env=dict(env),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        server = cls(process, ours)
        try:
            ours.setblocking(False)
            reply = b""
            with anyio.move_on_after(ready_timeout_s):
                await anyio.wait_readable(ours)
                with contextlib.suppress(OSError):
                    reply = ours.recv(4096)
            if reply != b"ready":
                text = reply.decode(errors="replace")
                raise NoForkError(
                    text.removeprefix("failed ")
                    if text
                    else f"fork server not ready within {ready_timeout_s:g}s"
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await server.aclose()
            raise
        return server

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and self.control.fileno() != -1

    async def fork(self, spec: ReplicaSpec) -> _SocketLines:
        """Ask for a replica; the start socket to read its lines from."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lines = _SocketLines(ours)
        try:
            try:
                async with self._send_lock:
                    while True:
                        try:
                            socket.send_fds(self.control, [b"S"], [theirs.fileno()])
                            break
                        except BlockingIOError:
                            await anyio.wait_writable(self.control)
            except OSError as exc:
                raise NoForkError(f"fork server unreachable: {exc}") from exc
            finally:
                theirs.close()
            await lines.send_all(msgspec.json.encode(spec) + b"\n")
        except BaseException:
            ours.close()
            raise
        return lines

    async def aclose(self) -> None:
        """Close the control socket: the fork server stops its children
        (SIGTERM, SIGKILL after 5 s) and exits; wait for that."""
        self.control.close()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_FORK_SERVER_EXIT_S):
                await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            await self.process.aclose()

    def __repr__(self) -> str:
        return f"<fork server pid={self.process.pid} {'alive' if self.alive else 'gone'}>"


# -- the host's cores against the replicas' budgets ---------------------------


def parse_cpu_max(text: str) -> float | None:
    """Cores a cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"``) allows; None for
    ``max`` (no limit) or text that is not a quota."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> float | None:
    """The tightest cgroup v2 CPU quota on this process's cgroup and its
    ancestors, in cores; None without cgroup v2 or without a quota."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    limits: list[float] = []
    folder = Path(root, path.lstrip("/"))
    base = Path(root)
    while True:
        with contextlib.suppress(OSError):
            limit = parse_cpu_max((folder / "cpu.max").read_text())
            if limit is not None:
                limits.append(limit)
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None


def usable_cores() -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 quota."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    return min(cores, quota) if quota is not None else cores


class CpuBudgets:
    """The CPU budgets (``num_cpus``) of running local replicas against the
    cores the host gives the gateway; warns once when they oversubscribe
    them. Never refuses a start: a fractional or generous budget is the
    user's choice (as in Ray), but an unnoticed one costs throughput.

    Args:
        cores: cores the replicas may use (``usable_cores()``).
    """

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self._budgets: dict[str, float] = {}
        self.warned = False

    @property
    def total(self) -> float:
        return sum(self._budgets.values())

    def add(self, replica_id: str, num_cpus: float) -> bool:
        """Count a started replica; True if this start made the budgets
        oversubscribe the cores for the first time (logged)."""
        self._budgets[replica_id] = num_cpus
        total = self.total
        if self.warned or total <= self.cores + 1e-9:
            return False
        self.warned = True
        _log.warning(
            "local replicas' CPU budgets (num_cpus) add up to %g but this host gives the "
            "gateway %g cores: replicas will compete for them; lower num_cpus or "
            "num_replicas (logged once)",
            total,
            self.cores,
        )
        return True

    def remove(self, replica_id: str) -> None:
        self._budgets.pop(replica_id, None)

    def __repr__(self) -> str:
        return f"<CpuBudgets {self.total:g}/{self.cores:g} cores, {len(self._budgets)} replicas>"


class CpuPins:
    """Cores of their own for local replicas (``pin_cpus``): each pinned
    replica gets ``ceil(num_cpus)`` cores no other pinned replica has, from
    the cores this process may run on, while they last; a replica that
    finds too few left is not pinned and floats over every core.

    A replica that keeps to one core keeps its caches warm and is not
    moved between cores; on the peer benchmark (2 cores, 2 replicas) that
    gave 7 % more throughput and a tenth off the p99 (docs/benchmarks.md).
    The cores are this gateway's to hand out: two gateways on one host
    would pin their replicas to the same cores, so pin only where the
    gateway's replicas are the host's (or the cpuset's) main CPU users.

    Args:
        cores: the cores to hand out (default: this process's affinity).
    """

    def __init__(self, cores: Sequence[int] | None = None) -> None:
        if cores is None:
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cores = list(cores)
        self._owner: dict[int, str] = {}

    def take(self, replica_id: str, count: int) -> list[int] | None:
        """``count`` free cores for ``replica_id`` (now its own), or None."""
        free = [core for core in self.cores if core not in self._owner]
        if count < 1 or len(free) < count:
            return None
        chosen = free[:count]
        for core in chosen:
            self._owner[core] = replica_id
        return chosen

    def release(self, replica_id: str) -> None:
        """Give back the cores of ``replica_id`` (it exited)."""
        self._owner = {c: r for c, r in self._owner.items() if r != replica_id}


def pin_process(pid: int, cores: Sequence[int]) -> bool:
    """Set the CPU affinity of every thread of process ``pid`` (threads it
    starts later inherit it from theirs); whether it took (False: the
    process is gone, or this platform cannot)."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    pinned = False
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
            pinned = True
        except OSError:  # a thread that just exited
            continue
    return pinned
