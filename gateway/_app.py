"""The gateway's HTTP surface: ingress (raw ASGI) and the admin API (Litestar).

Two ASGI entry points share one ``Ingress`` and one admin app:

* ``create_app(...) -> Litestar``: the admin endpoints under ``/-/`` plus
  the ingress mounted at ``/`` as a Litestar ``asgi`` handler. A complete,
  conventional Litestar application.
* ``GatewayASGI``: what the server runs. It sends ``/-/...`` to that Litestar
  app and everything else straight to ``Ingress``, skipping Litestar's
  routing and scope copying on the hot path (see bench/bench_gateway.py for
  the measured difference).

``Ingress`` is the ``FrontEnd`` (``_frontend``: header pass, body read under
the size limit, dispatch, JSON errors, span, metrics) for route prefixes: it
adds only a longest-prefix match over the route table built at start and the
``HttpRequest`` the replica gets.

``GET /-/healthz`` is public (probes and load balancers cannot send a token)
and says only ``{"status": "ok"}`` or 503 ``{"status": "starting"}``; a
caller the admin guard would let in also gets, per deployment below its
minimum, the replicas running and the last start failure. The detailed view
stays behind the admin guard at ``/-/replicas``.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Unpack, cast
from urllib.parse import unquote

import msgspec
from litestar import Litestar, Request, Response, delete, get
from litestar import types as lt
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.handlers import BaseRouteHandler, asgi
from litestar.params import FromPath, FromQuery

from muxgate.gateway._config import AppConfig
from muxgate.gateway._dispatch import Dispatcher
from muxgate.gateway._errors import (
    WWW_AUTHENTICATE,
    RouteNotFoundError,
    did_you_mean,
    error_body,
    no_deployment_named,
)
from muxgate.gateway._frontend import (
    REQUEST_ID,
    BodyBudget,
    FrontEnd,
    FrontEndOptions,
    Receive,
    RequestHead,
    Scope,
    Send,
    Shutdown,
    Target,
    bearer_matches,
    is_local_client,
    new_request_id,
)
from muxgate.gateway._handles import HANDLES_PREFIX, HandleIngress
from muxgate.gateway._history import History
from muxgate.gateway._history_api import history_handler
from muxgate.gateway._metrics import GatewayMetrics
from muxgate.gateway._models_api import model_handlers
from muxgate.gateway._pool import ReplicaPool
from muxgate.replicas.contract import ErrorCode, HttpRequest, Reply

__all__ = ["GatewayASGI", "Ingress", "build_handle_ingress", "build_ingress", "create_app"]

_log = logging.getLogger("muxgate.gateway.app")

#: how long ``GET /-/metrics`` waits for the replicas' fresh counters (s)
_METRICS_REFRESH_S = 0.5


class _Route:
    __slots__ = ("dispatcher", "name", "prefix", "strip")

    def __init__(self, prefix: str, name: str, dispatcher: Dispatcher) -> None:
        self.prefix = prefix
        self.name = name
        self.dispatcher = dispatcher
        # "/" strips nothing; "/api" strips "/api" from "/api/x".
        self.strip = 0 if prefix == "/" else len(prefix)


class Ingress(FrontEnd):
    """The raw ASGI handler for every deployment's route prefix.

    Args:
        routes: route prefix -> (deployment name, dispatcher).
        max_body_bytes: larger bodies get 413.
        request_timeout_s: per-request deadline, from arrival.
        use_raw_path: take the path from ``raw_path`` (when mounted under
            Litestar, which rewrites ``path`` for mounts).
        options: ``metrics``, ``body_timeout_s``, ``shutdown`` (see ``FrontEnd``).
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[str, Dispatcher]],
        *,
        max_body_bytes: int,
        request_timeout_s: float,
        use_raw_path: bool = False,
        **options: Unpack[FrontEndOptions],
    ) -> None:
        super().__init__(
            max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s, **options
        )
        # Longest prefix first, so the first match is the most specific.
        self._routes = [
            _Route(prefix, name, dispatcher)
            for prefix, (name, dispatcher) in sorted(
                routes.items(), key=lambda kv: len(kv[0]), reverse=True
            )
        ]
        self._use_raw_path = use_raw_path

    def _match(self, path: str) -> _Route | None:
        if path.startswith("/-/"):  # reserved for the admin API, even under "/"
            return None
        for route in self._routes:
            prefix = route.prefix
            if route.strip == 0 or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def _resolve(self, scope: Scope, head: RequestHead) -> Target:
        if self._use_raw_path:
            path: str = unquote(scope.get("raw_path", b"/").decode("latin-1"))
        else:
            path = scope["path"]
        route = self._match(path)
        if route is None:
            return Target(
                "", None, path=path, refusal=RouteNotFoundError(f"no deployment serves {path!r}")
            )
        return Target(
            route.name,
            route.dispatcher,
            path=path,
            span_name=f"{scope['method']} {route.prefix}",
            extra=path[route.strip :] or "/",
        )

    def _call_args(
        self, scope: Scope, target: Target, head: RequestHead, body: bytes
    ) -> dict[str, Any]:
        http = HttpRequest(
            method=scope["method"],
            path=target.extra,
            query=scope["query_string"].decode("latin-1"),
            headers=head.headers,
            body=body,
        )
        return {"http": http}

    def _reply(self, reply: Reply) -> tuple[int, list[tuple[bytes, bytes]]]:
        # The gateway sets the length and its own ids (a deployment's
        # x-request-id would make two).
        return reply.status, [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in reply.headers
            if k.lower() not in _GATEWAY_HEADERS
        ]


#: response headers the gateway writes itself, never a deployment's
_GATEWAY_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "x-request-id", "x-muxgate-replica")
)


# -- admin ------------------------------------------------------------------


def _admin_denial(
    connection: ASGIConnection[Any, Any, Any, Any], expected: bytes | None
) -> str | None:
    """Why ``connection`` may not use the admin endpoints, or None if it may."""
    if expected is not None:
        given = connection.headers.get("authorization", "").encode()
        if not bearer_matches(given, expected):
            return "admin endpoints need the bearer token"
        return None
    client = connection.client
    if client is None or not is_local_client(client.host):
        return "admin endpoints answer local clients only"
    return None


def _admin_guard(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        denial = _admin_denial(connection, expected)
        if denial is not None:
            raise NotAuthorizedException(denial)

    return guard


def _no_admin_endpoint(request: Request[Any, Any, Any]) -> str:
    """``no admin endpoint '/-/replica'; did you mean '/-/replicas'?`` (the
    endpoints are public knowledge: docs/http.md lists them)."""
    path = request.url.path
    paths = sorted({route.path for route in request.app.routes})
    return f"no admin endpoint {path!r}{did_you_mean(path, paths)}"


def _admin_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    status = getattr(exc, "status_code", 500)
    # The caller's id only when sane (as for the ingress), else one of ours.
    given = request.headers.get("x-request-id", "")
    request_id = given if REQUEST_ID.fullmatch(given.encode("latin-1")) else new_request_id()
    code = {
        401: ErrorCode.UNAUTHORIZED,
        404: ErrorCode.NOT_FOUND,
        405: ErrorCode.METHOD_NOT_ALLOWED,
        413: ErrorCode.PAYLOAD_TOO_LARGE,
    }.get(status, ErrorCode.BAD_REQUEST if 400 <= status < 500 else ErrorCode.INTERNAL)
    message = getattr(exc, "detail", "") or "internal error"
    if status == 404 and isinstance(exc, NotFoundException) and message == "Not Found":
        message = _no_admin_endpoint(request)  # no route: Litestar's bare message
    if status >= 500:
        _log.exception("admin endpoint failed", exc_info=exc)
        message = "internal error in the gateway"
    headers = {"x-request-id": request_id, "x-muxgate-replica": ""}
    if status == 401:
        name, value = WWW_AUTHENTICATE
        headers[name.decode()] = value.decode()
    if status == 405:
        # RFC 9110: a 405 lists the methods the resource takes.
        allow = (getattr(exc, "headers", None) or {}).get("allow")
        if allow:
            methods = [m.strip() for m in allow.split(",")]
            if "GET" in methods and "HEAD" not in methods:
                methods.insert(methods.index("GET") + 1, "HEAD")  # GatewayASGI's HEAD
            headers["allow"] = ", ".join(methods)
    return Response(
        content=error_body(code, message, request_id),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _admin_ids(message: lt.Message, scope: lt.Scope) -> None:
    """Give admin responses the ``x-request-id``/``x-muxgate-replica`` headers
    every gateway response carries (ingress responses set their own)."""
    if message["type"] != "http.response.start" or not scope["path"].startswith("/-"):
        return
    headers = cast(list[tuple[bytes, bytes]], message.setdefault("headers", []))
    if any(name == b"x-request-id" for name, _ in headers):
        return  # the error handler set them
    request_id = b""
    for name, value in scope["headers"]:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value) is not None:
            request_id = value
    headers.append((b"x-request-id", request_id or new_request_id().encode()))
    headers.append((b"x-muxgate-replica", b""))


def create_app(
    config: AppConfig,
    pools: Mapping[str, ReplicaPool],
    metrics: GatewayMetrics,
    *,
    mount_ingress: bool = True,
    shutdown: Shutdown | None = None,
    history: History | None = None,
) -> Litestar:
    """The gateway as a Litestar application.

    Args:
        config: the validated app config.
        pools: deployment name -> its running ``ReplicaPool``.
        metrics: the gateway's metrics (rendered at ``/-/metrics``).
        mount_ingress: mount the ingress at ``/`` (a complete app); ``False``
            when ``GatewayASGI`` sends ingress traffic around Litestar.
        shutdown: the server's shutdown state, shared by the ingress and
            the handle endpoint (see ``_frontend.Shutdown``).
        history: the sampled counters behind ``GET /-/history`` (the
            status page's charts); no such route without one.
    """
    handlers = _admin_handlers(config, pools, metrics)
    handlers.extend(model_handlers(pools, config.http.request_timeout_s))
    if history is not None:
        handlers.append(history_handler(history, pools))
    if mount_ingress:
        shutdown = shutdown if shutdown is not None else Shutdown()
        handlers.append(_ingress_mount(config, pools, metrics, shutdown))
    return Litestar(
        route_handlers=handlers,
        before_send=[_admin_ids],
        guards=[_admin_guard(config.http.admin_token)],
        exception_handlers={Exception: _admin_error_handler},
        openapi_config=None,
        debug=False,
        logging_config=None,
    )


def _admin_handlers(
    config: AppConfig, pools: Mapping[str, ReplicaPool], metrics: GatewayMetrics
) -> list[Any]:
    """The pools' endpoints under ``/-/``: health, replicas, quarantine,
    metrics and the status page."""

    @get("/-/replicas", sync_to_thread=False)
    def replicas() -> Response[bytes]:
        body = {"deployments": {name: pool.snapshot() for name, pool in pools.items()}}
        return Response(
            content=msgspec.json.encode(body), status_code=200, media_type="application/json"
        )

    @delete("/-/quarantine/{deployment:str}", status_code=200, sync_to_thread=False)
    def release_quarantine(
        deployment: FromPath[str], model_id: FromQuery[str | None] = None
    ) -> Response[bytes]:
        # ?model_id=X releases one id (ids may contain "/"), none: all.
        pool = pools.get(deployment)
        if pool is None:
            raise NotFoundException(no_deployment_named(deployment, pools))
        released = pool.quarantine.clear(model_id)
        return Response(
            content=msgspec.json.encode({"released": released}),
            status_code=200,
            media_type="application/json",
        )

    @get("/-/metrics")
    async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
        # The poller's counters can be a second old: ask every running replica
        # now. One that does not answer in time keeps its last counters.
        await asyncio.gather(*(p.refresh_counters(_METRICS_REFRESH_S) for p in pools.values()))
        body, content_type = metrics.render(request.headers.get("accept"))
        # As a header: Litestar would append a second charset to a text/ media_type.
        return Response(content=body, status_code=200, headers={"content-type": content_type})

    healthz = _healthz(pools, config.http.admin_token)
    return [healthz, replicas, release_quarantine, metrics_endpoint, _status_page()]


def _healthz(pools: Mapping[str, ReplicaPool], admin_token: str | None) -> Any:
    # Public: k8s httpGet probes and load balancers cannot send a token, so
    # it tells nothing beyond ok/starting (the details are at /-/replicas).
    expected = f"Bearer {admin_token}".encode() if admin_token else None

    @get("/-/healthz", sync_to_thread=False, opt={"public": True})
    def healthz(request: Request[Any, Any, Any]) -> Response[bytes]:
        if not all(p.healthy for p in pools.values()):
            body: dict[str, Any] = {"status": "starting"}
            if _admin_denial(request, expected) is None:
                # Admin callers (as /-/replicas would allow) also get why.
                body["deployments"] = {
                    name: {
                        "running": p.running,
                        "min_replicas": p.min_replicas,
                        "last_failure": p.last_failure,
                    }
                    for name, p in pools.items()
                    if not p.healthy
                }
            return Response(
                content=msgspec.json.encode(body),
                status_code=503,
                media_type="application/json",
            )
        return Response(content=b'{"status":"ok"}', status_code=200, media_type="application/json")

    return healthz


def _status_page() -> Any:
    # Read once: the page is static; it polls /-/replicas and /-/metrics,
    # sending ?token= as a bearer header, so the page itself needs no guard.
    page = importlib.resources.files("muxgate.gateway").joinpath("static/status.html")
    page_bytes = page.read_bytes() if page.is_file() else b"<p>status page not installed</p>"

    @get("/-/", sync_to_thread=False, opt={"public": True})
    def status_page() -> Response[bytes]:
        return Response(content=page_bytes, status_code=200, media_type="text/html")

    return status_page


def _ingress_mount(
    config: AppConfig,
    pools: Mapping[str, ReplicaPool],
    metrics: GatewayMetrics,
    shutdown: Shutdown,
) -> Any:
    """The ingress and the handle endpoint mounted at ``/`` (a complete
    Litestar app; the server itself runs ``GatewayASGI``)."""
    budget = body_budget(config)
    handles = build_handle_ingress(config, pools, metrics, shutdown=shutdown, body_budget=budget)
    ingress = build_ingress(
        config, pools, metrics, use_raw_path=True, shutdown=shutdown, body_budget=budget
    )
    handles_prefix = HANDLES_PREFIX.encode()

    async def ingress_handler(scope: lt.Scope, receive: lt.Receive, send: lt.Send) -> None:
        raw = cast(Scope, scope)
        raw_path: bytes = raw.get("raw_path", b"/")
        if raw_path.startswith(handles_prefix):
            # Litestar rewrites "path" for mounts; the handle ingress
            # wants the full path (a copy: the scope is not ours).
            raw = dict(raw, path=unquote(raw_path.decode("latin-1")))
            await handles(raw, cast(Receive, receive), cast(Send, send))
        else:
            await ingress(raw, cast(Receive, receive), cast(Send, send))

    # Public: ingress traffic needs no admin token, and the handle
    # ingress checks the token or the client address itself. Neither
    # changes the scope, so it is not copied.
    return asgi("/", is_mount=True, copy_scope=False, opt={"public": True})(ingress_handler)


def body_budget(config: AppConfig) -> BodyBudget:
    """The budget of request bodies held at once that one server's
    endpoints share: ``max_body_bytes_in_flight``, and at least one body of
    ``max_body_bytes``."""
    http = config.http
    return BodyBudget(max(http.limits.max_body_bytes_in_flight, http.max_body_bytes))


def build_ingress(
    config: AppConfig,
    pools: Mapping[str, ReplicaPool],
    metrics: GatewayMetrics | None,
    *,
    use_raw_path: bool = False,
    shutdown: Shutdown | None = None,
    body_budget: BodyBudget | None = None,
) -> Ingress:
    """The ingress for every deployment of ``config``."""
    routes = {d.route_prefix: (d.name, pools[d.name].dispatcher) for d in config.deployments}
    return Ingress(
        routes,
        max_body_bytes=config.http.max_body_bytes,
        request_timeout_s=config.http.request_timeout_s,
        metrics=metrics,
        use_raw_path=use_raw_path,
        body_timeout_s=config.http.limits.body_timeout_s,
        shutdown=shutdown,
        body_budget=body_budget,
    )


def build_handle_ingress(
    config: AppConfig,
    pools: Mapping[str, ReplicaPool],
    metrics: GatewayMetrics | None,
    *,
    shutdown: Shutdown | None = None,
    body_budget: BodyBudget | None = None,
) -> HandleIngress:
    """The ``/-/handles/`` endpoint for every deployment of ``config``."""
    return HandleIngress(
        {d.name: pools[d.name].dispatcher for d in config.deployments},
        max_body_bytes=config.http.max_body_bytes,
        request_timeout_s=config.http.request_timeout_s,
        admin_token=config.http.admin_token,
        metrics=metrics,
        body_timeout_s=config.http.limits.body_timeout_s,
        shutdown=shutdown,
        body_budget=body_budget,
    )


class GatewayASGI:
    """The ASGI app the server runs: ``/-/handles/`` to ``HandleIngress``,
    the rest of ``/-/`` to Litestar, everything else to ``Ingress``."""

    def __init__(
        self,
        config: AppConfig,
        pools: Mapping[str, ReplicaPool],
        metrics: GatewayMetrics,
        *,
        shutdown: Shutdown | None = None,
        history: History | None = None,
    ) -> None:
        self.litestar = create_app(config, pools, metrics, mount_ingress=False, history=history)
        # Litestar types its ASGI arguments with TypedDicts; ours are plain.
        self.admin = cast(Callable[[Scope, Receive, Send], Awaitable[None]], self.litestar)
        #: what a graceful shutdown tells the ingress and the handle endpoint
        self.shutdown = shutdown if shutdown is not None else Shutdown()
        budget = body_budget(config)
        self.ingress = build_ingress(
            config, pools, metrics, shutdown=self.shutdown, body_budget=budget
        )
        self.handles = build_handle_ingress(
            config, pools, metrics, shutdown=self.shutdown, body_budget=budget
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(HANDLES_PREFIX):
                await self.handles(scope, receive, send)
            elif path.startswith("/-/") or path == "/-":
                if scope["method"] == "HEAD":
                    # RFC 9110: HEAD is GET without the body (load balancers
                    # check health with it); the server sends no body to HEAD.
                    scope = dict(scope, method="GET")
                await self.admin(scope, receive, send)
            else:
                await self.ingress(scope, receive, send)
        else:
            # lifespan and websockets: Litestar answers them properly.
            await self.admin(scope, receive, send)
