"""Replica log lines carry deployment, replica id and request id in the prefix."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import anyio
import pytest

from muxgate.replicas._context import current_replica, request_scope, set_replica_context
from muxgate.replicas._logging import install_replica_logging
from muxgate.replicas._multiplex import model_cache, multiplexed


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    previous = current_replica()
    set_replica_context("Model", "Model#ab12")
    stream = io.StringIO()
    handler = install_replica_logging("INFO", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        set_replica_context(previous.deployment, previous.replica_id)


PREFIX = r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} Model Model#ab12 "


def test_the_prefix_has_deployment_replica_and_request(log_stream: io.StringIO) -> None:
    log = logging.getLogger("user.code")
    with request_scope("req-1", "7"):
        log.info("inside")
    log.info("outside")
    first, second = log_stream.getvalue().splitlines()
    assert re.fullmatch(PREFIX + r"req-1 test_sdk_logging\.py:\d+ - inside", first)
    assert re.fullmatch(PREFIX + r"- test_sdk_logging\.py:\d+ - outside", second)


def test_installing_twice_keeps_one_handler(log_stream: io.StringIO) -> None:
    again = install_replica_logging("INFO", stream=log_stream)
    try:
        logging.getLogger("user.code").info("once")
        assert log_stream.getvalue().count("once") == 1
    finally:
        logging.getLogger().removeHandler(again)


def test_model_loads_are_logged_with_the_request_that_caused_them(
    log_stream: io.StringIO,
) -> None:
    @multiplexed
    async def get_model(model_id: str) -> str:
        return model_id

    async def main() -> None:
        with request_scope("req-9", "42"):
            await get_model("42")
        await model_cache(get_model).aclose()

    anyio.run(main)
    lines = log_stream.getvalue().splitlines()
    assert re.fullmatch(PREFIX + r"req-9 _cache\.py:\d+ - Loading model '42'\.", lines[0])
    assert re.fullmatch(PREFIX + r"req-9 _cache\.py:\d+ - Loaded model '42' in .*ms\.", lines[1])
    assert re.fullmatch(PREFIX + r"- _cache\.py:\d+ - Unloading model '42'\.", lines[2])
