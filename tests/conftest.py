import pytest


# Session scope, so module- and session-scoped async fixtures can use it too.
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
