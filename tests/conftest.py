from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from storage_servers import BUCKET, GcsServer, HttpFiles, S3Server, fake_gcs, http_files, moto_s3


# Session scope, so module- and session-scoped async fixtures can use it too.
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the requesting module's ``gateway`` fixture."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as c:
        yield c


# Storage servers, started once per session by the tests that ask for them
# (each test writes below a fresh prefix of its own).
@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server holding an empty bucket ``BUCKET``."""
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """A fake-gcs-server holding an empty bucket ``BUCKET``."""
    with fake_gcs() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def http_server() -> Iterator[HttpFiles]:
    """A static file server over an empty temp folder (an ``http://`` root)."""
    with http_files() as server:
        yield server
