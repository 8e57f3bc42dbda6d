"""Noticing that an HTTP client went away while its request is in flight.

Once the request body is read, the next ASGI ``receive()`` only returns
when the client disconnects (``http.disconnect``), or when the response is
complete. ``until_disconnect`` awaits the dispatch in the request's own task
while a small watcher task waits on ``receive()``; on a disconnect the
watcher cancels the request task, and the cancellation travels down to the
replica connection, which sends ``Cancel`` for the call (so the replica
stops it and frees its slot). The ingress then answers nothing (the client
is gone) and counts status 499, nginx's "client closed request".

The watcher cancels the request task only while it is still awaiting the
dispatch (``watching`` is cleared in the same step the dispatch returns), so
a disconnect that comes after the result never cancels sending the response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

__all__ = ["CLIENT_CLOSED_REQUEST", "ClientDisconnected", "until_disconnect"]

T = TypeVar("T")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

#: The status the metrics and spans record for a request whose client left
#: before the response (nginx's 499; never sent to anyone).
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client disconnected before its response; nothing is sent."""


class _Watch:
    __slots__ = ("gone", "task", "watching")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.watching = True
        self.gone = False

    async def run(self, receive: Receive) -> None:
        while True:
            try:
                message = await receive()
            except Exception:
                return  # the server's receive failed: nothing to watch
            if message["type"] == "http.disconnect":
                if self.watching:
                    self.gone = True
                    self.task.cancel()
                return


async def until_disconnect(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` (the dispatch) unless the client disconnects first.

    Call it only once the request body has been read completely.

    Raises:
        ClientDisconnected: the client went away; ``awaitable`` was cancelled.
    """
    task = asyncio.current_task()
    if task is None:  # not in an asyncio task: nothing to cancel
        return await awaitable
    watch = _Watch(task)
    watcher = asyncio.get_running_loop().create_task(watch.run(receive))
    try:
        result = await awaitable
        watch.watching = False
        return result
    except asyncio.CancelledError:
        watch.watching = False
        # Our own cancel only: a server shutting down cancels us as well.
        if watch.gone and task.uncancel() == 0:
            raise ClientDisconnected("the client disconnected") from None
        raise
    finally:
        watch.watching = False
        watcher.cancel()
