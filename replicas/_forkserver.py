"""The fork server (zygote): ``python -m muxgate.replicas._forkserver``.

Starting a replica with ``python -m muxgate.replicas._server`` costs about a
second, nearly all of it importing torch and friends. The fork server pays
that once: it imports what every replica needs, then forks a child per
replica start; the child applies the spec exactly like a spawned replica
(``muxgate.replicas._server.run_replica``), so starting one costs a fork
and the deployment's own ``__init__``.

Protocol (the launcher side is ``muxgate.gateway.launchers.local``):

* fd 0 is a ``SOCK_SEQPACKET`` control socket from the launcher. The fork
  server sends ``b"ready"`` on it once its imports are done (or
  ``b"failed <reason>"`` and exits). Each later message carries one file
  descriptor (``SCM_RIGHTS``): the fork server's end of a ``SOCK_STREAM``
  socket pair made for one start. End-of-file on the control socket means
  the launcher is gone: the children get SIGTERM, then SIGKILL after
  ``_CHILD_GRACE_S``, and the fork server exits.
* On a start socket the launcher writes the ``ReplicaSpec`` as one JSON line.
  The fork server forks and writes ``PID <pid>``; the child writes
  ``READY <address>`` or ``FAILED <reason>`` (like a spawned replica's
  stdout); when the child has exited the fork server writes
  ``EXIT <code>`` (``-N``: killed by signal N) and closes its end. If it
  cannot fork safely it writes ``NOFORK <reason>`` instead and the launcher
  spawns that replica. The child treats end-of-file on its start socket
  as its gateway dying, as a spawned replica treats its stdin pipe.

Fork safety: the fork server never runs an event loop or a torch op, and
forks only while it has one thread (``/proc/self/task``). ``import torch``
brings numpy's OpenBLAS, whose thread server starts at load and stops in
its own ``pthread_atfork`` handler; one throw-away fork after the imports
lets it stop, and the thread count is checked again before every fork.

Threads and the CPU budget: forking after OpenMP (or torch's inter-op pool)
has started threads leaves the child with a pool whose threads did not
survive the fork. So the fork server runs with one thread everywhere:
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` are 1
before anything loads, and torch's intra-op threads are set to 1 once torch
is imported, so even a preloaded deployment module that runs torch ops at
import starts no pool. Torch's inter-op threads are left unset: each child
sets both pools (and the variables) to its own ``num_cpus`` in
``run_replica`` (``muxgate.replicas._cpu``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from muxgate.replicas._cpu import apply_cpu_budget, cpu_budget_env

__all__ = ["main"]

#: Modules every replica imports; the point of the fork server.
PRELOAD = (
    "torch",
    "msgspec",
    "anyio",
    "anyio._backends._asyncio",
    "opentelemetry.trace",
    "opentelemetry.sdk.trace",
    "muxgate.replicas._server",
    "muxgate.backends",
    "muxgate.backends._config",
)
#: Optional accelerators: imported when installed.
_OPTIONAL = ("uvloop",)
#: Seconds the launcher has to write a spec after handing over its socket.
_SPEC_TIMEOUT_S = 10.0
#: Seconds children get to exit after SIGTERM when the launcher is gone.
_CHILD_GRACE_S = 5.0
_MAX_SPEC = 64 << 20
_PR_SET_PDEATHSIG = 1


def thread_count() -> int:
    """Threads of this process, native ones included (``threading`` sees
    only Python's)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1  # unknown: treated as unsafe


def _settle_threads() -> None:
    """One fork whose child exits at once: libraries that stop their thread
    pools in a ``pthread_atfork`` handler (OpenBLAS) leave them stopped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _set_parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


@dataclass(eq=False)
class _Child:
    pid: int
    pidfd: int
    conn: socket.socket


def _read_spec(conn: socket.socket) -> bytes | None:
    """The spec line from the launcher, or None if it did not come."""
    conn.settimeout(_SPEC_TIMEOUT_S)
    buf = b""
    try:
        while b"\n" not in buf and len(buf) < _MAX_SPEC:
            chunk = conn.recv(1 << 16)
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None
    finally:
        conn.setblocking(True)
    # The launcher sends nothing after the line (the child watches for
    # end-of-file on this socket), so nothing past the newline is lost.
    return buf.split(b"\n", 1)[0]


def _say(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):  # the launcher gave up on this start
        conn.sendall(line.encode() + b"\n")


def _child_main(conn: socket.socket, raw: bytes, zygote_pid: int, others: list[int]) -> NoReturn:
    """Runs in the forked child: become a replica, never return."""
    code = 70
    try:
        # Die with the fork server (it dies with the gateway). Checked after
        # prctl: the fork server may have died before the call.
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != zygote_pid:
            os._exit(1)
        # Nothing of the fork server's survives: its control socket (fd 0),
        # its selector, its other children's sockets and pidfds, its signal
        # set-up.
        for fd in others:
            with contextlib.suppress(OSError):
                os.close(fd)
        # dup2 replaces fd 0 (the control socket) in one step.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # random reseeds itself in an at-fork hook; done again explicitly so
        # replicas never share a sequence whatever that hook does.
        random.seed()
        gc.unfreeze()
        fd = conn.detach()
        from muxgate.replicas._server import run_replica

        code = run_replica(raw, os.dup(fd), fd)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        # Hard exit, like a spawned replica: no fork-server state to unwind.
        os._exit(code)


class _ForkServer:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: dict[int, _Child] = {}
        self.selector = selectors.DefaultSelector()
        self.pid = os.getpid()

    def serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    if not self._on_control():
                        self._shutdown()
                        return
                else:
                    self._reap(key.data)

    def _on_control(self) -> bool:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.control, 16, 4)
        except OSError:
            return False
        if not msg and not fds:
            return False  # the launcher is gone
        for fd in fds:
            self._start(socket.socket(fileno=fd))
        return True

    def _start(self, conn: socket.socket) -> None:
        raw = _read_spec(conn)
        if raw is None:
            conn.close()
            return
        threads = thread_count()
        if threads != 1:
            _say(conn, f"NOFORK fork server has {threads} threads; forking is unsafe")
            conn.close()
            return
        others = [self.selector.fileno()]
        for child in self.children.values():
            others += [child.pidfd, child.conn.fileno()]
        try:
            pid = os.fork()
        except OSError as exc:
            _say(conn, f"NOFORK fork failed: {exc}")
            conn.close()
            return
        if pid == 0:
            _child_main(conn, raw, self.pid, others)
        pidfd = os.pidfd_open(pid)
        child = _Child(pid, pidfd, conn)
        self.children[pid] = child
        self.selector.register(pidfd, selectors.EVENT_READ, child)
        _say(conn, f"PID {pid}")

    def _reap(self, child: _Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        del self.children[child.pid]
        _say(child.conn, f"EXIT {os.waitstatus_to_exitcode(status)}")
        child.conn.close()

    def _shutdown(self) -> None:
        """The launcher is gone: take the children along."""
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child.pidfd, signal.SIGTERM)
        deadline = time.monotonic() + _CHILD_GRACE_S
        while self.children and time.monotonic() < deadline:
            for key, _ in self.selector.select(max(0.0, deadline - time.monotonic())):
                if key.data is not None:
                    self._reap(key.data)
        for child in list(self.children.values()):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            self._reap(child)


def _preload(modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name)
    for name in _OPTIONAL:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m muxgate.replicas._forkserver [MODULE ...]``
    (extra modules to import before forking, e.g. the deployment's)."""
    extra = list(sys.argv[1:] if argv is None else argv)
    control = socket.socket(fileno=0)
    # fd 0 is the control socket; prints of preloaded modules (and of the
    # children, which inherit this) go to stderr like a replica's.
    os.dup2(2, 1)
    # One thread per pool in this process (read when the libraries load); the
    # children size their own.
    os.environ.update(cpu_budget_env(1))
    try:
        if not hasattr(os, "pidfd_open"):
            raise OSError("os.pidfd_open is unavailable (Linux >= 5.3 needed)")
        _preload(PRELOAD)
        apply_cpu_budget(1, interop=False)  # before a preloaded module can run torch ops
        _preload(extra)
        if thread_count() != 1:
            _settle_threads()
        threads = thread_count()
        if threads != 1:
            raise RuntimeError(f"{threads} threads after the imports; forking is unsafe")
    except BaseException as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
        with contextlib.suppress(OSError):
            control.send(f"failed {reason}".encode())
        return 1
    # Objects that exist now are never collected: the GC does not touch
    # (and so copy) the pages they live on in every child.
    gc.freeze()
    try:
        control.send(b"ready")
    except OSError:
        return 0  # the gateway is gone already (it stopped while we imported)
    _ForkServer(control).serve()
    return 0


if __name__ == "__main__":
    os._exit(main())
