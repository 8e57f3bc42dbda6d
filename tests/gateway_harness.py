"""An in-process gateway for tests, started from a config dict.

    async with running_gateway({"http": {"port": 0}, "deployments": [...]}) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client: ...

Import paths in the config resolve against ``tests/apps`` (``APPS``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

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


@contextlib.asynccontextmanager
async def observed_gateway(
    model_root: Path,
    model_ids: Iterable[str],
    *,
    deployment: Mapping[str, Any] | None = None,
    **top: Any,
) -> AsyncIterator[Gateway]:
    """A gateway serving ``observability_apps:Observed`` on ``/``, one replica.

    Writes a real torch model for each of ``model_ids`` under ``model_root``
    first. ``deployment`` overrides the deployment's fields
    (``num_replicas``, ...); ``top`` adds top-level config sections
    (``tracing``, ``metrics``, ...).
    """
    from apps.observability_apps import write_models

    write_models(model_root, model_ids)
    observed = {
        "name": "Observed",
        "import_path": "observability_apps:Observed",
        "init_kwargs": {"model_root": model_root.as_uri()},
        "num_replicas": 1,
        **(deployment or {}),
    }
    async with running_gateway({"http": {"port": 0}, **top, "deployments": [observed]}) as gw:
        yield gw
