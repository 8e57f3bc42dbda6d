"""The replica process entry point: ``python -m muxgate.replicas._server``.

It takes a ``ReplicaSpec`` as JSON: ``--spec JSON``; ``--spec-fd N``, read
to its end (what ``muxgate replica`` does: the spec may hold the admin
token, which must not show in a process listing); or (what the launcher
does) one line on stdin. When the spec comes on stdin the pipe stays open:
end-of-file on it means the parent died, and the replica exits so no orphan
is left behind (``getppid`` is polled as a fallback, except in a standalone
replica, which has no parent gateway).

Start-up: set the replica context, install logging, tracing and storage
options, import the class (``app_dir`` first on ``sys.path``), instantiate
it in a worker thread (so a slow ``__init__`` does not block signal
handling), listen, then print exactly one line on the original stdout:
``READY <address>`` or ``FAILED <reason>`` (exit 1). Everything user code
prints goes to stderr, so the launcher never has to tell a readiness line
from noise.

Serving and stopping: see ``muxgate.replicas._replica``. The process exits 0
after a drain, a SIGTERM, or its gateway connection closing (not a
standalone replica's: it waits for the next gateway).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import msgspec

from muxgate.replicas._channel import (
    ChannelAuth,
    ChannelError,
    ChannelSettings,
    is_loopback_host,
    load_secret,
    server_ssl_context,
)
from muxgate.replicas._context import set_replica_context
from muxgate.replicas._cpu import apply_cpu_budget
from muxgate.replicas._deployment import DEFAULT_NUM_CPUS, get_deployment_options
from muxgate.replicas._drain_fence import DrainFence
from muxgate.replicas._handle import aclose_handle_clients, set_handle_defaults
from muxgate.replicas._handshake import HandshakeGate
from muxgate.replicas._loader_thread import loader_thread
from muxgate.replicas._logging import describe_exception, install_replica_logging
from muxgate.replicas._model_control import preload_models
from muxgate.replicas._multiplex import configure_model_caches
from muxgate.replicas._names import nearest
from muxgate.replicas._replica import Replica
from muxgate.replicas._spec import ReplicaSpec, TracingSettings
from muxgate.replicas._tracing import configure_tracing, shutdown_tracing
from muxgate.replicas._unix_streams import guard_unix_streams

__all__ = ["main", "run_replica"]

_log = logging.getLogger("muxgate.replica")

#: Seconds between checks that the parent process is still alive (fallback
#: for when the spec did not come on a stdin pipe).
_PARENT_POLL_S = 1.0


def _one_line(text: str, limit: int = 2000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- start-up ----------------------------------------------------------------


def failure_location(exc: BaseException) -> str | None:
    """Where in the user's code ``exc`` was raised: ``file:line in function``
    of the innermost frame below the last muxgate.replicas frame, importlib
    left out; None when there is none (e.g. a module that does not exist)."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep  # muxgate.replicas
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [i for i, f in enumerate(frames) if f.filename.startswith(here)]
    below = frames[ours[-1] + 1 :] if ours else frames
    user = [f for f in below if "importlib" not in f.filename]
    if not user:
        return None
    return f"{user[-1].filename}:{user[-1].lineno} in {user[-1].name}"


def _raised_resolving_the_import_path(exc: BaseException) -> bool:
    """Whether ``exc`` is :func:`_import_class`'s own (no such module,
    class or attribute): raised in this file, so its traceback shows no
    code but muxgate's."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename) == os.path.abspath(__file__)


def _modules_in(folder: str) -> list[str]:
    """The names of the modules and packages directly in ``folder``."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return [e.removesuffix(".py") for e in entries if e.endswith(".py") or "." not in e]


def _import_class(spec: ReplicaSpec) -> Any:
    if spec.app_dir and spec.app_dir not in sys.path:
        sys.path.insert(0, spec.app_dir)
    module_name, sep, attr = spec.import_path.partition(":")
    if not sep:
        module_name, _, attr = spec.import_path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"import_path {spec.import_path!r} is not 'module:Class'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.partition(".")[0] or not spec.app_dir:
            raise  # a module the deployment's own code imports
        if os.path.isdir(spec.app_dir):
            hint = nearest(exc.name, _modules_in(spec.app_dir)) or (
                f"; not in {spec.app_dir} (the app_dir: by default the config file's"
                " folder) nor an installed package"
            )
        else:
            hint = f" (app_dir {spec.app_dir} is not a folder)"
        raise ModuleNotFoundError(f"{exc}{hint}", name=exc.name) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            classes = [n for n, v in vars(obj).items() if isinstance(v, type)]
            kind = "module" if inspect.ismodule(obj) else "class"
            raise AttributeError(
                f"{kind} {getattr(obj, '__name__', '?')!r} has no attribute"
                f" {part!r}{nearest(part, classes)}"
            ) from None
    if not isinstance(obj, type):
        raise TypeError(f"{spec.import_path} is not a class")
    return obj


#: what user code may raise while it is imported and constructed: a start
#: failure to report (a module that runs argparse at import exits with
#: SystemExit), not a crash of the replica with no reason given
_START_FAILURES = (Exception, SystemExit, KeyboardInterrupt)


async def _race_stop(
    replica_stop: anyio.Event, fn: Callable[[], Awaitable[Any]]
) -> tuple[bool, Any]:
    """Run ``fn`` unless a stop is requested first; (finished, result).

    An exception of ``fn`` is re-raised as itself (not in a group)."""
    result: list[Any] = []
    failure: list[BaseException] = []

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                result.append(await fn())
            except _START_FAILURES as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()

        async def wait_stop() -> None:
            await replica_stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(wait_stop)
    if failure:
        raise failure[0]
    return (True, result[0]) if result else (False, None)


async def _listen(address: str) -> tuple[anyio.abc.Listener[anyio.abc.SocketStream], str]:
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rest)
        guard_unix_streams()  # see muxgate.replicas._unix_streams
        unix = await anyio.create_unix_listener(rest)
        return unix, f"unix:{rest}"
    if scheme == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        tcp = await anyio.create_tcp_listener(local_host=host or "127.0.0.1", local_port=int(port))
        sockname = tcp.extra(anyio.abc.SocketAttribute.local_address)
        return tcp, f"tcp:{sockname[0]}:{sockname[1]}"
    raise ValueError(f"listen address {address!r} is not 'unix:/path' or 'tcp:host:port'")


def make_gate(spec: ReplicaSpec) -> HandshakeGate:
    """The handshake gate of ``spec``'s listener: its secret and TLS context.

    Raises:
        ChannelError: the secret or a TLS file cannot be used, or the
            listener would be open to other machines without the secret or
            mutual TLS.
    """
    channel = spec.channel if spec.channel is not None else ChannelSettings()
    # No channel settings: a local replica, which never reads the environment's secret.
    secret = load_secret(channel.secret_file) if spec.channel is not None else None
    tls = channel.tls
    context = server_ssl_context(tls) if tls is not None else None
    mutual = tls is not None and tls.mutual
    scheme, _, rest = spec.listen.partition(":")
    host = rest.rpartition(":")[0] or "127.0.0.1"
    if scheme == "tcp" and not is_loopback_host(host) and secret is None and not mutual:
        raise ChannelError(
            f"refusing to listen on {spec.listen} without the cluster secret or mutual TLS: "
            "anyone who can reach it could run this deployment's code (set "
            "cluster.secret_file or MUXGATE_CLUSTER_SECRET, or cluster.tls with mutual: true)"
        )
    if spec.standalone and scheme == "tcp" and secret is None and not mutual:
        _log.warning(
            "Listening on %s without the cluster secret: any local user can connect.", spec.listen
        )
    return HandshakeGate(
        auth=ChannelAuth(secret) if secret is not None else None,
        ssl_context=context,
        timeout_s=channel.handshake_timeout_s,
    )


async def _watch_signals(replica_stop: Callable[[str, bool], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        count = 0
        async for signum in signals:
            count += 1
            _log.info("Received %s.", signal.Signals(signum).name)
            replica_stop("shutdown", count == 1)


async def _watch_parent_fd(
    fd: int, replica_stop: Callable[[str, bool], None], fence: DrainFence | None = None
) -> None:
    """End-of-file on ``fd`` means the gateway died: the spec's stdin pipe
    (spawned replicas) or the launcher's socket (forked replicas). What
    comes on it before then goes to the drain ``fence``, if any."""
    os.set_blocking(fd, False)
    while True:
        await anyio.wait_readable(fd)
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            continue
        except OSError:
            break
        if not data:
            break
        if fence is not None:
            fence.feed(data)
    _log.warning("Gateway went away (its pipe closed); shutting down.")
    replica_stop("parent died", False)


async def _watch_parent(replica_stop: Callable[[str, bool], None]) -> None:
    parent = os.getppid()
    # Polling is the fallback when there is no stdin pipe: the OS offers no
    # portable event for "my parent exited".
    while os.getppid() == parent:  # noqa: ASYNC110
        await anyio.sleep(_PARENT_POLL_S)
    _log.warning("Parent process %d went away; shutting down.", parent)
    replica_stop("parent died", False)


class _Starter:
    """Holds what ``_amain`` needs before a ``Replica`` exists."""

    def __init__(self) -> None:
        self.stop = anyio.Event()
        self.replica: Replica | None = None
        self.reason = "shutdown"
        self.graceful = True

    def request_stop(self, reason: str, graceful: bool) -> None:
        if self.replica is not None:
            self.replica.request_stop(reason, graceful=graceful)
        else:
            self.reason, self.graceful = reason, graceful
        self.stop.set()


async def _amain(spec: ReplicaSpec, ready_fd: int, parent_fd: int | None) -> int:
    starter = _Starter()

    def announce(line: str) -> None:
        os.write(ready_fd, (line + "\n").encode())
        os.close(ready_fd)

    # A fence with no pipe to read tokens from admits no drain (fail closed).
    fence = DrainFence(parent_fd) if spec.drain_fence else None
    async with anyio.create_task_group() as watchers:
        watchers.start_soon(_watch_signals, starter.request_stop)
        if not spec.standalone:
            watchers.start_soon(_watch_parent, starter.request_stop)
        if parent_fd is not None:
            watchers.start_soon(_watch_parent_fd, parent_fd, starter.request_stop, fence)

        def failed(reason: str) -> int:
            """Tell the launcher why the start failed; stop the watchers."""
            announce(f"FAILED {reason}")
            watchers.cancel_scope.cancel()
            return 1

        try:
            gate = make_gate(spec)
        except ChannelError as exc:
            return failed(_one_line(str(exc)))

        # What a failure with no frame in the user's code was doing.
        doing = f"importing {spec.import_path}"

        async def instantiate() -> Any:
            nonlocal doing
            # Import and __init__ run in a worker thread; the CPU budget is
            # applied between them in this thread (it runs the async code).
            cls = await anyio.to_thread.run_sync(_import_class, spec, abandon_on_cancel=True)
            doing = f"constructing {spec.import_path} with init_kwargs {sorted(spec.init_kwargs)}"
            num_cpus = spec.num_cpus
            if num_cpus is None:
                num_cpus = get_deployment_options(cls).num_cpus
            apply_cpu_budget(num_cpus, interop=True)
            return await anyio.to_thread.run_sync(
                lambda: cls(**spec.init_kwargs), abandon_on_cancel=True
            )

        try:
            done, instance = await _race_stop(starter.stop, instantiate)
        except _START_FAILURES as exc:
            where = failure_location(exc)
            at = f" (at {where})" if where else f" ({doing})"
            reason = f"{describe_exception(exc)}{at}"
            if _raised_resolving_the_import_path(exc):  # the one line says it all
                _log.error("Starting %s failed: %s", spec.import_path, reason)
            else:
                _log.exception("Starting %s failed.", spec.import_path)
            return failed(_one_line(reason))
        if not done:
            return failed(f"stopped during start-up ({starter.reason})")
        try:
            done, _ = await _race_stop(
                starter.stop,
                lambda: preload_models(
                    instance, spec.preload, spec.pinned, spec.multiplexed_loader
                ),
            )
        except ValueError as exc:
            return failed(_one_line(str(exc)))
        if not done:
            return failed(f"stopped while preloading models ({starter.reason})")
        try:
            listener, address = await _listen(spec.listen)
        except (OSError, ValueError) as exc:
            return failed(f"cannot listen on {spec.listen}: {_one_line(str(exc))}")
        replica = Replica(spec, instance, gate, fence.admits if fence is not None else None)
        starter.replica = replica
        announce(f"READY {address}")
        _log.info("Replica ready at %s.", address)
        try:
            await replica.serve(listener)
        finally:
            if address.startswith("unix:"):
                with contextlib.suppress(OSError):
                    os.unlink(address[len("unix:") :])
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await aclose_handle_clients()
        watchers.cancel_scope.cancel()
    _log.info("Replica stopped (%s).", replica.stop_reason)
    return 0


def _parse_args(argv: list[str] | None) -> tuple[bytes, bool]:
    parser = argparse.ArgumentParser(prog="python -m muxgate.replicas._server")
    parser.add_argument(
        "--spec", default="-", help="ReplicaSpec as JSON, or '-' to read one line from stdin"
    )
    parser.add_argument(
        "--spec-fd",
        type=int,
        default=None,
        help="read the ReplicaSpec (JSON) from this file descriptor to its end (muxgate replica)",
    )
    ns = parser.parse_args(argv)
    if ns.spec_fd is not None:
        with os.fdopen(ns.spec_fd, "rb") as f:
            return f.read(), False
    from_stdin = ns.spec == "-"
    raw = sys.stdin.buffer.readline() if from_stdin else ns.spec.encode()
    return raw, from_stdin


def _use_uvloop(choice: str) -> bool:
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m muxgate.replicas._server``."""
    # The readiness line goes to the original stdout; everything else that
    # writes to fd 1 (user prints, libraries) is sent to stderr instead.
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    raw, from_stdin = _parse_args(argv)
    return run_replica(raw, ready_fd, sys.stdin.fileno() if from_stdin else None)


def run_replica(raw_spec: bytes, ready_fd: int, parent_fd: int | None) -> int:
    """Start a replica from its JSON spec and serve until it stops; the exit code.

    Shared by ``main`` (a spawned replica) and the fork server's children.

    Args:
        raw_spec: the ``ReplicaSpec`` as JSON.
        ready_fd: where the one ``READY``/``FAILED`` line is written; closed
            after it.
        parent_fd: a pipe or socket whose end-of-file means the gateway died
            (None: only ``getppid`` is watched).
    """
    try:
        spec = msgspec.json.decode(raw_spec, type=ReplicaSpec)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        os.write(ready_fd, f"FAILED invalid spec: {_one_line(str(exc))}\n".encode())
        return 2
    # Before anything imports user code: the budget the spec names, else the
    # default until the class (and its @deployment option) is imported.
    apply_cpu_budget(
        spec.num_cpus if spec.num_cpus is not None else DEFAULT_NUM_CPUS, interop=False
    )
    set_replica_context(spec.deployment, spec.replica_id)
    set_handle_defaults(spec.gateway_url, spec.admin_token)
    install_replica_logging(spec.log_level)
    try:
        configure_model_caches(
            eviction_policy=spec.eviction_policy,
            load_order=spec.load_order,
            max_bytes_per_replica=spec.max_bytes_per_replica,
            load_on_loop=spec.load_on_loop,
        )
    except ValueError as exc:
        os.write(ready_fd, f"FAILED invalid spec: {_one_line(str(exc))}\n".encode())
        return 2
    loader_thread().calls_yield_to_loads(spec.loads_first)
    loader_thread().steps.enabled = spec.hits_wait_for_loads
    if spec.storage:
        # Imported only when used: a deployment need not touch storage.
        from muxgate.backends._config import configure_storage_section

        configure_storage_section(spec.storage)
    tracing = spec.tracing or TracingSettings()
    try:
        configure_tracing(
            tracing.exporter,
            tracing.endpoint,
            tracing.service_name or "muxgate-replica",
            resource_attributes={
                "muxgate.deployment": spec.deployment,
                "muxgate.replica_id": spec.replica_id,
            },
        )
    except ValueError as exc:
        os.write(ready_fd, f"FAILED invalid tracing settings: {_one_line(str(exc))}\n".encode())
        return 2
    try:
        code: int = anyio.run(
            _amain,
            spec,
            ready_fd,
            parent_fd,
            backend="asyncio",
            backend_options={"use_uvloop": _use_uvloop(spec.event_loop)},
        )
    finally:
        # Flush batched spans (model unloads happen last) before exiting.
        shutdown_tracing()
    return code


if __name__ == "__main__":
    exit_code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Hard exit: a user thread still running (an abandoned sync call) must
    # not keep the process alive after it has stopped serving.
    os._exit(exit_code)
