"""``POST /-/models/{deployment}/{model_id}/load`` and ``.../unload``: an
operator loads a model before traffic arrives, keeps one resident, or drops
one (explicit model control).

Behind the admin guard like every ``/-/`` endpoint (the bearer token, or
loopback clients only). ``load`` goes to the model's home replica (the first
running replica of its preference list on the ring, where its requests go),
``?pin=true`` keeps it there for good; ``unload`` goes to every running
replica (spills may have left copies) and drops the pin too. Neither wakes a
deployment scaled to zero: with no replica running the answer is 503
``no_replica``.

Model ids may contain ``/``, so the route takes the rest of the path and
splits the action off its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery

from muxgate.gateway._connection import ReplicaConnection, ReplicaConnectionError
from muxgate.gateway._dispatch import validate_model_id
from muxgate.gateway._errors import (
    GatewayError,
    NoReplicaError,
    ReplicaFailedError,
    error_from_info,
    error_response,
    no_deployment_named,
)
from muxgate.gateway._frontend import new_request_id
from muxgate.gateway._pool import ReplicaPool

__all__ = ["home_replica", "model_handlers"]


def home_replica(preference: list[str], running: Mapping[str, Any]) -> str | None:
    """The first replica of a model's preference list that is running, if any."""
    for replica_id in preference:
        if replica_id in running:
            return replica_id
    return None


async def _load(pool: ReplicaPool, model_id: str, pin: bool, timeout_s: float) -> dict[str, Any]:
    replica_id = home_replica(pool.router.preference_list(model_id), pool.targets)
    if replica_id is None:
        raise NoReplicaError(f"deployment {pool.name} has no replica running")
    reply = await _control(pool.targets[replica_id], "load", model_id, pin, pool, timeout_s)
    body: dict[str, Any] = msgspec.json.decode(reply.body) if reply.body else {}
    return {"deployment": pool.name, "replica": replica_id, **body}


async def _unload(pool: ReplicaPool, model_id: str, timeout_s: float) -> dict[str, Any]:
    targets = dict(pool.targets)
    if not targets:
        raise NoReplicaError(f"deployment {pool.name} has no replica running")
    replies = await asyncio.gather(
        *(_control(conn, "unload", model_id, False, pool, timeout_s) for conn in targets.values())
    )
    unloaded = {
        replica_id: bool(msgspec.json.decode(reply.body).get("unloaded"))
        for replica_id, reply in zip(targets, replies, strict=True)
    }
    return {
        "deployment": pool.name,
        "model_id": model_id,
        "action": "unload",
        "unloaded": unloaded,
    }


async def _control(
    conn: ReplicaConnection,
    action: Any,
    model_id: str,
    pin: bool,
    pool: ReplicaPool,
    timeout_s: float,
) -> Any:
    try:
        reply = await conn.control(
            action,
            model_id,
            pin=pin,
            loader=pool.config.multiplexed_loader,
            timeout_s=timeout_s,
        )
    except ReplicaConnectionError as exc:
        raise ReplicaFailedError(f"replica {conn.replica_id} went away: {exc}") from exc
    if reply.error is not None:
        err = error_from_info(reply.error)
        err.replica_id = conn.replica_id
        raise err
    return reply


def model_handlers(pools: Mapping[str, ReplicaPool], timeout_s: float) -> list[Any]:
    """The Litestar route handler of the two endpoints (``timeout_s``: the
    longest a load may take before the answer is 504; it goes on regardless)."""

    @post("/-/models/{deployment:str}/{rest:path}", status_code=200)
    async def model_control(
        request: Request[Any, Any, Any],
        deployment: FromPath[str],
        rest: FromPath[str],
        pin: FromQuery[bool] = False,
    ) -> Response[bytes]:
        pool = pools.get(deployment)
        if pool is None:
            raise NotFoundException(no_deployment_named(deployment, pools))
        model_id, _, action = rest.lstrip("/").rpartition("/")
        if action not in ("load", "unload"):
            raise NotFoundException("expected .../{model_id}/load or .../{model_id}/unload")
        request_id = request.headers.get("x-request-id") or new_request_id()
        try:
            # the ingress's check: any character outside printable ASCII fails it
            validate_model_id(model_id.encode("utf-8", "surrogatepass"))
            if action == "load":
                body = await _load(pool, model_id, pin, timeout_s)
            else:
                body = await _unload(pool, model_id, timeout_s)
        except GatewayError as exc:
            status, headers, content = error_response(exc, request_id)
            return Response(
                content=content,
                status_code=status,
                headers={
                    **{k.decode(): v.decode() for k, v in headers},
                    "x-request-id": request_id,
                    "x-muxgate-replica": exc.replica_id,
                },
            )
        return Response(
            content=msgspec.json.encode(body),
            status_code=200,
            media_type="application/json",
            headers={"x-request-id": request_id, "x-muxgate-replica": body.get("replica", "")},
        )

    return [model_control]
