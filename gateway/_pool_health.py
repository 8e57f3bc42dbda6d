"""The pool's health poller: pings each running replica about once a second
for liveness, counters and model events, and on demand for a metrics scrape.

A replica that answers goes to ``on_pong``; one that has not answered for
``PING_TIMEOUT_S`` (``ReplicaSet.silent``) goes to ``on_silent``, which
kills it. A scrape's missed answer says nothing about liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._replica_set import PING_TIMEOUT_S, RUNNING, Replica, ReplicaSet
from muxgate.replicas.contract import Pong

__all__ = ["PING_INTERVAL_S", "HealthPoller"]

PING_INTERVAL_S = 1.0


class HealthPoller:
    """Pings the RUNNING replicas of ``replicas``."""

    def __init__(
        self,
        replicas: ReplicaSet,
        on_pong: Callable[[Replica, Pong], None],
        on_silent: Callable[[Replica, ReplicaConnection], Awaitable[None]],
    ) -> None:
        self._replicas = replicas
        self._on_pong = on_pong
        self._on_silent = on_silent

    def _running(self) -> list[tuple[Replica, ReplicaConnection]]:
        return [(r, r.conn) for r in self._replicas if r.state == RUNNING and r.conn is not None]

    async def run(self) -> None:
        """Ping every running replica each ``PING_INTERVAL_S``, forever."""
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            pings = (self._ping(rep, conn) for rep, conn in self._running())
            await asyncio.gather(*pings, return_exceptions=True)

    async def _ping(self, rep: Replica, conn: ReplicaConnection) -> None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                pong = await conn.ping(events_after=rep.events_seq)
        except Exception:
            if self._replicas.silent(rep):
                await self._on_silent(rep, conn)
            return
        self._on_pong(rep, pong)

    async def refresh(self, timeout_s: float) -> None:
        """Ping every running replica now, all at once, bounded by
        ``timeout_s`` overall; one that does not answer in time keeps its last
        counters. Never raises for a replica."""

        async def refresh(rep: Replica, conn: ReplicaConnection) -> None:
            try:
                pong = await conn.ping(events_after=rep.events_seq)
            except Exception:
                return  # closed or closing: the pool and the poller handle it
            self._on_pong(rep, pong)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(refresh(rep, conn) for rep, conn in self._running()))
