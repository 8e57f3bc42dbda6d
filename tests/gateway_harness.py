"""An in-process gateway for tests, started from a config dict.

    async with running_gateway({"http": {"port": 0}, "deployments": [...]}) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client: ...

Import paths in the config resolve against ``tests/apps`` (``APPS``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from muxgate.gateway._config import parse_config
from muxgate.gateway._serve import Gateway, start_gateway

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
#: the request header that carries the multiplexed model id
MODEL = "serve_multiplexed_model_id"


@contextlib.asynccontextmanager
async def running_gateway(config: Mapping[str, Any], **options: Any) -> AsyncIterator[Gateway]:
    """Parse ``config`` (app_dir ``APPS``) and run a gateway until the block ends.

    ``options`` go to ``start_gateway`` as they are.
    """
    async with start_gateway(parse_config(dict(config), base_dir=APPS), **options) as gw:
        yield gw


def observed_config(
    model_root: Path, *, deployment: Mapping[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """A config with one replica of ``observability_apps:Observed`` over ``model_root``.

    ``deployment`` overrides the deployment's fields (``num_replicas``, ...);
    ``top`` adds top-level sections (``tracing``, ``metrics``, ...).
    """
    observed = {
        "name": "Observed",
        "import_path": "observability_apps:Observed",
        "init_kwargs": {"model_root": model_root.as_uri()},
        "num_replicas": 1,
        **(deployment or {}),
    }
    return {"http": {"port": 0}, **top, "deployments": [observed]}


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float) -> None:
    """Poll ``check()`` until it holds; ``TimeoutError`` after ``within_s`` seconds.

    For state no event announces (a scrape, a pool snapshot).
    """
    with anyio.fail_after(within_s):
        while True:
            if await check():
                return
            await anyio.sleep(0.1)  # poll interval, not synchronisation
