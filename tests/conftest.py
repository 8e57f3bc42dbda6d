from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest


# Session scope, so module- and session-scoped async fixtures can use it too.
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the requesting module's ``gateway`` fixture."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as c:
        yield c
