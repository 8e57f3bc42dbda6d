"""Run the gateway: in-process (``serve``) or in the foreground (``run``).

``async with serve(config) as base_url:`` starts one ``ReplicaPool`` per
deployment, the ASGI server on the configured host and port (port 0 picks a
free one; the URL has the real port), waits until every deployment has its
minimum replicas running, and yields. On exit it stops the server, then every
replica (connection closed, SIGKILL after a grace period), so nothing
outlives the block.

The ASGI server is uvicorn (httptools parser) driven on the caller's event
loop through its public ``startup``/``main_loop``/``shutdown`` steps, so it
installs no signal handlers and shares the loop with the pools. Chosen by
measurement (bench/bench_gateway.py, 2 cores, wrk): uvicorn 10.8k req/s at
concurrency 32 and 0.29 ms p50 at concurrency 1, against 9.4k req/s and
0.65 ms for granian's embedded server (``server="granian"``, also in-process
on the same loop, but marked experimental upstream and unable to report the
port it bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, TypeAlias

from muxgate.gateway._app import GatewayASGI, create_app
from muxgate.gateway._config import (
    AppConfig,
    DeploymentConfig,
    HttpConfig,
    load_config,
    parse_config,
)
from muxgate.gateway._edge import Edge, uvicorn_server
from muxgate.gateway._frontend import Shutdown
from muxgate.gateway._history import History, read_totals
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._pool import ReplicaPool
from muxgate.gateway._remote import RemoteLaunchers
from muxgate.gateway.launchers import LauncherNotFoundError, ReplicaReporter, get_launcher_class
from muxgate.gateway.launchers.local import LocalLauncher
from muxgate.replicas import configure_tracing, shutdown_tracing
from muxgate.replicas.contract import ChannelError, ReplicaSpec, TracingSettings, exports_spans

__all__ = ["Gateway", "GatewayStartError", "run", "serve"]

_log = logging.getLogger("muxgate.gateway")


class GatewayStartError(Exception):
    """The gateway could not start (port taken, replicas failing to start)."""


class Gateway:
    """A running gateway's parts, for embedding code and tests that need
    more than the URL (``serve(...)`` yields the URL; ``start_gateway``
    yields this).

    ``shutdown.cut_off()`` answers every request in flight 503
    ``shutting_down`` at once (what a second SIGTERM does); ``edge`` holds
    the HTTP server's connection accounting (None under granian).
    """

    def __init__(
        self,
        config: AppConfig,
        pools: dict[str, ReplicaPool],
        metrics: GatewayMetrics,
        url: str,
        *,
        shutdown: Shutdown | None = None,
        edge: Edge | None = None,
    ) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.url = url
        self.shutdown = shutdown if shutdown is not None else Shutdown()
        self.edge = edge

    def __repr__(self) -> str:
        return f"<Gateway {self.url} pools={list(self.pools.values())}>"


def make_spec(
    config: AppConfig,
    deployment: DeploymentConfig,
    replica_id: str,
    gateway_url: str | None = None,
    log_level: str = "INFO",
) -> ReplicaSpec:
    """The launcher's spec for one replica of ``deployment``.

    ``gateway_url`` (with the admin token) lets code in the replica call
    other deployments through handles. A drain or SIGTERM waits for
    in-flight calls as long as a request may last (``request_timeout_s``):
    the pool waits that long plus a margin before it kills a draining replica.
    """
    tracing = TracingSettings(exporter=config.tracing.exporter, endpoint=config.tracing.endpoint)
    return ReplicaSpec(
        deployment=deployment.name,
        import_path=deployment.import_path,
        replica_id=replica_id,
        init_kwargs=deployment.init_kwargs,
        app_dir=config.app_dir or None,
        listen="",  # the launcher's choice (LocalLauncher: a Unix socket)
        max_ongoing_requests=deployment.max_ongoing_requests,
        num_cpus=deployment.num_cpus,
        tracing=tracing,
        storage=config.storage,
        graceful_shutdown_timeout_s=config.http.request_timeout_s,
        gateway_url=gateway_url,
        admin_token=config.http.admin_token,
        log_level=log_level,
        eviction_policy=deployment.eviction_policy,
        load_order=deployment.load_order,
        load_on_loop=deployment.load_on_loop,
        loads_first=deployment.loads_first,
        hits_wait_for_loads=deployment.hits_wait_for_loads,
        pin_cpus=deployment.pin_cpus,
        preload=list(deployment.preload),
        pinned=list(deployment.pinned),
        multiplexed_loader=deployment.multiplexed_loader,
        max_bytes_per_replica=deployment.max_bytes_per_replica,
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose
    # proto says TCP, and accepted sockets inherit it. With proto 0, a response
    # written as head + body waits for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (
                " (another server listens there: stop it, or choose another port"
                " with --port or http.port; 0 picks a free one)"
            )
        raise GatewayStartError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from exc
    return sock


#: What ``serve`` and ``start_gateway`` accept: a validated config, the path
#: of a YAML or TOML file, or the same structure as a mapping.
ConfigSource: TypeAlias = "AppConfig | str | os.PathLike[str] | Mapping[str, Any]"


def as_config(config: ConfigSource) -> AppConfig:
    """An ``AppConfig`` from any ``ConfigSource`` (``ConfigError`` names the field)."""
    if isinstance(config, AppConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), source="<mapping>")
    return load_config(config)


@contextlib.asynccontextmanager
async def start_gateway(
    config: ConfigSource,
    *,
    host: str | None = None,
    port: int | None = None,
    launcher: ReplicaReporter | None = None,
    ready_timeout_s: float = 120.0,
    litestar_ingress: bool = False,
    server: Literal["uvicorn", "granian"] = "uvicorn",
    replica_log_level: str = "INFO",
    fail_fast: bool = False,
) -> AsyncIterator[Gateway]:
    """Like ``serve`` but yields the ``Gateway`` (pools, metrics, url).

    ``fail_fast=True``: the first start failure of a deployment's replicas
    before it is healthy ends the start (``GatewayStartError`` naming the
    deployment and the exception) instead of being retried with back-off.

    ``replica_log_level`` is the root log level inside the replicas
    (``muxgate demo`` quiets them to ``WARNING``).

    ``litestar_ingress=True`` serves ``create_app()`` (ingress mounted in
    Litestar) instead of ``GatewayASGI`` (ingress beside it); the benchmark
    compares the two. ``server="granian"`` runs granian's embedded server
    instead of uvicorn (measured in bench/bench_gateway.py).
    """
    config = as_config(config)
    host = host if host is not None else config.http.host
    port = port if port is not None else config.http.port
    metrics = GatewayMetrics(
        per_model_labels=config.metrics.per_model_labels,
        max_model_labels=config.metrics.max_model_labels,
    )
    try:
        remote = RemoteLaunchers(config)  # deployments whose replicas run elsewhere
    except ChannelError as exc:
        raise GatewayStartError(f"cluster settings: {exc}") from exc
    except (LauncherNotFoundError, ConnectionError) as exc:
        raise GatewayStartError(str(exc)) from exc
    own_launcher: LocalLauncher | None = None
    warm_up: asyncio.Task[bool] | None = None
    if launcher is None and len(remote.launchers) < len(config.deployments):
        launcher = own_launcher = get_launcher_class("local")()
        # Import torch once, in the fork server, while the gateway starts: a
        # replica start is then a fork (~30 ms), also the first one from zero.
        warm_up = asyncio.create_task(own_launcher.warm_up())
    use_launcher = launcher
    # Known once the server has bound its port; replicas start after that.
    gateway_url: list[str] = []
    pools = {
        d.name: ReplicaPool(
            d,
            make_spec=lambda dep, rid: make_spec(
                config, dep, rid, gateway_url[0] if gateway_url else None, replica_log_level
            ),
            metrics=metrics,
            per_model_labels=config.metrics.per_model_labels,
            drain_timeout_s=config.http.request_timeout_s + 5.0,
            **({"launcher": use_launcher} | remote.pool_options(d.name)),
        )
        for d in config.deployments
    }
    shutdown = Shutdown()
    # The status page's charts: counters sampled every 2 s into bounded rings.
    history = History()
    sampler: asyncio.Task[None] | None = None
    app: Any = (
        create_app(config, pools, metrics, shutdown=shutdown, history=history)
        if litestar_ingress
        else GatewayASGI(config, pools, metrics, shutdown=shutdown, history=history)
    )
    # Tracing is process-wide: touch it only when this gateway exports spans,
    # so an embedding application's own set-up is left alone otherwise.
    # An exporter of None (no choice in the config) defers to the standard
    # OTEL_* variables, and means otlp once an endpoint is named, as in the replicas.
    exporter, endpoint = config.tracing.exporter, config.tracing.endpoint
    traced = exports_spans(exporter, endpoint)
    try:
        if traced:
            # service name None: OTEL_SERVICE_NAME, else "muxgate-gateway".
            configure_tracing(exporter, endpoint, None)
        async with _http_server(server, app, host, port, config.http, shutdown) as (
            real_port,
            edge,
        ):
            url_host = f"[{host}]" if ":" in host else host
            connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host)
            if connect_host is not None:  # replicas cannot connect to a wildcard
                connect_host = f"[{connect_host}]" if ":" in connect_host else connect_host
            gateway_url.append(f"http://{connect_host or url_host}:{real_port}")
            for pool in pools.values():
                pool.start()
            sampler = asyncio.create_task(history.run(lambda: read_totals(metrics.registry)))
            try:
                async with asyncio.timeout(ready_timeout_s):
                    if fail_fast:
                        for pool in pools.values():
                            pool.start_failure_is_final = True
                        try:
                            await _healthy_or_failed(pools)
                        finally:
                            for pool in pools.values():
                                pool.start_failure_is_final = False
                    await asyncio.gather(*(p.wait_healthy() for p in pools.values()))
            except TimeoutError:
                lines = "; ".join(p.status_line() for p in pools.values() if not p.healthy)
                raise GatewayStartError(
                    f"replicas not running after {ready_timeout_s:g} s: {lines}"
                ) from None
            yield Gateway(
                config,
                pools,
                metrics,
                f"http://{url_host}:{real_port}",
                shutdown=shutdown,
                edge=edge,
            )
    finally:
        if sampler is not None:
            sampler.cancel()
        await asyncio.gather(*(p.aclose() for p in pools.values()), return_exceptions=True)
        if warm_up is not None:
            warm_up.cancel()
            with contextlib.suppress(BaseException):
                await warm_up
        if own_launcher is not None:
            await own_launcher.aclose()
        await remote.aclose()
        if traced:
            shutdown_tracing()


async def _healthy_or_failed(pools: Mapping[str, ReplicaPool]) -> None:
    """Wait until each pool is healthy or has failed a start; raise for the failed."""

    async def settled(pool: ReplicaPool) -> None:
        await pool.wait_for(lambda: pool.healthy or pool.last_failure is not None)

    await asyncio.gather(*(settled(p) for p in pools.values()))
    failed = [p for p in pools.values() if not p.healthy]
    if failed:
        raise GatewayStartError(
            "; ".join(
                f"deployment {p.name!r} ({p.config.import_path}) failed to start: {p.last_failure}"
                for p in failed
            )
        )


@contextlib.asynccontextmanager
async def _http_server(
    server: Literal["uvicorn", "granian"],
    app: Any,
    host: str,
    port: int,
    http: HttpConfig,
    shutdown: Shutdown,
) -> AsyncIterator[tuple[int, Edge | None]]:
    """The HTTP server on the running loop; yields the bound port and, under
    uvicorn, the connection accounting of ``http.limits``."""
    if server == "granian":
        async with _granian_server(app, host, port) as real_port:
            yield real_port, None
        return
    sock = _bind(host, port)
    async with uvicorn_server(app, sock, http, shutdown) as edge:
        yield int(sock.getsockname()[1]), edge


@contextlib.asynccontextmanager
async def _granian_server(app: Any, host: str, port: int) -> AsyncIterator[int]:
    """granian's embedded server (experimental upstream) on the running loop.

    A benchmark option: ``http.limits`` and the graceful shutdown's grace
    apply to uvicorn only (the body timeout and the 503 for requests after
    a shutdown began are the front end's, so they hold here too).

    Granian binds the socket itself, so port 0 is resolved here by binding
    and releasing a free port first (a small race, acceptable for a
    benchmark option).
    """
    from granian.constants import Interfaces
    from granian.server.embed import Server

    if port == 0:
        probe = _bind(host, 0)
        port = int(probe.getsockname()[1])
        probe.close()
    server = Server(
        app,
        address=host,
        port=port,
        interface=Interfaces.ASGINL,
        websockets=False,
        log_enabled=False,
    )
    task = asyncio.create_task(server.serve(), name="muxgate-http")
    try:
        # Ready when it accepts a connection (granian reports no readiness).
        async with asyncio.timeout(10):
            while True:
                if task.done():
                    await task
                    raise GatewayStartError(f"granian stopped at start on {host}:{port}")
                try:
                    _, writer = await asyncio.open_connection(host, port)
                except OSError:
                    await asyncio.sleep(0.01)
                    continue
                writer.close()
                break
        yield port
    finally:
        server.stop()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await task


@contextlib.asynccontextmanager
async def serve(
    config: ConfigSource,
    *,
    host: str | None = None,
    port: int | None = None,
    ready_timeout_s: float = 120.0,
    fail_fast: bool = True,
) -> AsyncIterator[str]:
    """Run the gateway and its replicas in this process; yield the base URL.

    Example::

        async with serve("app.yaml", port=0) as url:
            httpx.get(f"{url}/", headers={"serve_multiplexed_model_id": "1"})

    Args:
        config: an ``AppConfig``, the path of a YAML or TOML config file, or
            the same structure as a dict (validated like a file; relative
            ``import_path`` folders resolve from the current directory).
        host, port: override ``config.http``; port 0 picks a free port.
        ready_timeout_s: how long to wait for every deployment's minimum
            replicas before giving up.
        fail_fast: a replica that fails to start (its class does not
            import, its ``__init__`` raises) before its deployment is
            healthy stops the start at once; ``False``: retry with back-off
            until ``ready_timeout_s``.

    Raises:
        ConfigError: the config is invalid (the message names the field).
        GatewayStartError: the port is taken, a replica failed to start
            (``fail_fast``), or replicas did not start in time (the message
            has each deployment's last start failure).
    """
    async with start_gateway(
        config, host=host, port=port, ready_timeout_s=ready_timeout_s, fail_fast=fail_fast
    ) as gateway:
        yield gateway.url


def run(
    config: AppConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    replica_log_level: str = "INFO",
) -> int:
    """Serve in the foreground until SIGINT or SIGTERM; return the exit code.

    ``replica_log_level``: the root log level inside the replicas (``muxgate
    serve --log-level`` sets the gateway's and this)."""
    loop_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_run(config, host=host, port=port, replica_log_level=replica_log_level))


async def _run(
    config: AppConfig, *, host: str | None, port: int | None, replica_log_level: str
) -> int:
    # A signal while replicas start cancels the start; once serving, it
    # starts the graceful shutdown (stop accepting, let requests in flight
    # finish within http.shutdown_grace_s, then stop the replicas). A second
    # signal answers the requests still running 503 at once.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signalled: list[int] = []
    stop = asyncio.Event()
    serving: list[Gateway] = []

    def on_signal(sig: int) -> None:
        if signalled and serving:
            print("muxgate: stopping now", file=sys.stderr, flush=True)
            serving[0].shutdown.cut_off()
            return
        if signalled:
            return
        signalled.append(sig)
        if serving:
            grace = serving[0].config.http.grace_s
            print(
                f"muxgate: shutting down (requests in flight get up to {grace:g} s; "
                "signal again to stop now)",
                file=sys.stderr,
                flush=True,
            )
            stop.set()
        else:
            print("muxgate: shutting down", file=sys.stderr, flush=True)
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with start_gateway(
            config, host=host, port=port, fail_fast=True, replica_log_level=replica_log_level
        ) as gateway:
            serving.append(gateway)
            print(f"muxgate: serving on {gateway.url}", file=sys.stderr, flush=True)
            await stop.wait()
    except asyncio.CancelledError:
        if not signalled:
            raise
        main.uncancel()
    except GatewayStartError as exc:
        print(f"muxgate: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
