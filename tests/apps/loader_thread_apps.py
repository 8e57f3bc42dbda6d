"""A deployment whose async loader blocks its thread, for the loader-thread tests
(tests/integration/test_loader_thread_replica.py).

``SlowLoads`` (four calls at once) answers what its loader saw. A model id
``slow-*`` blocks the loader's thread (a busy wait, as torch code would)
until the file ``release-<id>`` appears in ``marker_dir``, after writing
``started-<id>`` there; ``bound-*`` awaits a future of the event loop
that ``__call__`` runs on, resolved there half a second later (on that
loop the load then goes on; on a loader loop asyncio refuses the future at
once, as long as the load starts within that half second); any other id
loads at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from pathlib import Path
from typing import Any

from muxgate.replicas._context import get_multiplexed_model_id
from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request
from muxgate.replicas._multiplex import multiplexed

#: set by ``__call__`` around the loader call, read (and written) inside it
_note: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "loader_note", default=None
)
#: the longest a slow load blocks when the test never releases it
HOLD_S = 30.0


@deployment(max_ongoing_requests=4)
class SlowLoads:
    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = Path(marker_dir)

    @multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> dict[str, Any]:
        note = _note.get()
        if model_id.startswith("slow-"):
            (self.marker_dir / f"started-{model_id}").touch()
            release = self.marker_dir / f"release-{model_id}"
            deadline = time.monotonic() + HOLD_S
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.005)  # noqa: ASYNC251 (blocking on purpose, as torch code is)
        if model_id.startswith("bound-") and note is not None:
            await note["future"]
        if note is not None:
            note["loaded"] = True
        return {
            "model": model_id,
            "seen_model_id": get_multiplexed_model_id(),
            "loader_thread": threading.current_thread().name,
            "loader_nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
        }

    async def __call__(self, request: Request) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_later(0.5, future.set_result, None)
        note: dict[str, Any] = {"loaded": False, "future": future}
        token = _note.set(note)
        try:
            model = await self.get_model(get_multiplexed_model_id())
        finally:
            _note.reset(token)
        return {
            **model,
            "loaded": note["loaded"],
            "call_thread": threading.current_thread().name,
            "call_nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
        }
