"""Small deployments for replica tests (loaded by import path ``echo:Class``
with ``tests/apps`` as the app dir, the way a user's app is loaded)."""

from __future__ import annotations

import os
from typing import Any

import anyio

from muxgate.replicas import deployment, get_multiplexed_model_id


class Echo:
    """Async ``__call__`` plus handle methods for protocol tests."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    async def __call__(self, request: Any) -> dict[str, Any]:
        body = await request.body()
        return {
            "greeting": self.greeting,
            "method": request.method,
            "path": request.path,
            "query": dict(request.query_params),
            "header": request.headers.get("X-Test", ""),
            "model_id": get_multiplexed_model_id(),
            "body": body.decode(),
        }

    async def echo(self, value: Any) -> Any:
        return value

    def sync_echo(self, value: Any) -> dict[str, Any]:
        # Runs in a worker thread: the request context must follow it.
        return {"value": value, "model_id": get_multiplexed_model_id()}

    async def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def sleep(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    def sync_sleep(self, seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    async def wait_fifo(self, path: str) -> str:
        """Block until someone writes to the FIFO at ``path`` and closes it:
        lets a test hold a call in flight and release it at a chosen moment."""

        def read() -> str:
            with open(path) as fifo:
                return fifo.read()

        return await anyio.to_thread.run_sync(read, abandon_on_cancel=True)

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    def sync_fail(self, message: str) -> None:
        raise KeyError(message)

    async def missing_model(self, model_id: str) -> None:
        raise ModelNotFoundError(f"no model {model_id!r} in storage")

    def pid(self) -> int:
        return os.getpid()

    def _private(self) -> str:
        return "never reachable"


class ModelNotFoundError(LookupError):
    """Stands in for muxgate.backends' error of the same name (matched by name)."""


class SyncEcho:
    """Sync ``__call__``: runs in a worker thread."""

    def __call__(self, request: Any) -> str:
        return f"sync {get_multiplexed_model_id()}"


class BadInit:
    """``__init__`` raises: the replica reports FAILED with the reason."""

    def __init__(self, why: str = "no weights here") -> None:
        raise RuntimeError(why)


class Noisy:
    """Prints to stdout in ``__init__``: must not confuse the READY line."""

    def __init__(self) -> None:
        print("READY not-an-address (printed by user code)")
        print("FAILED neither")

    async def __call__(self, request: Any) -> str:
        return "ok"


class SlowInit:
    """``__init__`` announces itself on a FIFO, then takes (practically) forever."""

    def __init__(self, fifo_path: str) -> None:
        import time

        with open(fifo_path, "w") as fifo:
            fifo.write("started\n")
        time.sleep(3600)


class StorageProbe:
    """Reports the storage options the replica configured from its spec."""

    def options(self, protocol: str) -> dict[str, Any]:
        from muxgate.backends._config import get_storage_config

        return dict(get_storage_config().options.get(protocol, {}))

    def settings(self) -> dict[str, Any]:
        from muxgate.backends._config import get_storage_config

        config = get_storage_config()
        return {
            "cache_max_bytes": config.cache.max_bytes,
            "retry_max_attempts": config.retry.max_attempts,
            "part_size": config.part_size,
            "protocols": sorted(config.options),
        }


@deployment(graceful_shutdown_timeout_s=0.2)
class ShortGrace(Echo):
    """Echo whose calls get 0.2 s to finish when the replica stops."""
