"""Replica log lines carry deployment, replica id and request id in the prefix."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import anyio
import pytest
from fake_clock import FakeClock

from muxgate.replicas._context import current_replica, request_scope, set_replica_context
from muxgate.replicas._logging import (
    OUTCOME,
    OutcomeThrottle,
    install_replica_logging,
    logged,
    mark_outcome_logged,
    mark_traceback_logged,
    outcome_logged_for,
)
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


class StorageAccessDeniedError(Exception):
    """Named like muxgate.backends' (matched by name in a replica)."""


def test_a_failed_load_that_is_an_outcome_logs_its_detail_once_for_its_request(
    log_stream: io.StringIO,
) -> None:
    denied = StorageAccessDeniedError("storage refused access to s3://b/m/model.pt: Forbidden")

    @multiplexed
    async def get_model(model_id: str) -> str:
        raise denied

    async def main() -> None:
        with request_scope("req-3", "m"), pytest.raises(StorageAccessDeniedError):
            await get_model("m")
        await model_cache(get_model).aclose()

    anyio.run(main)
    (line,) = [x for x in log_stream.getvalue().splitlines() if x.startswith("WARNING")]
    assert re.fullmatch(
        r"WARNING .* req-3 _cache\.py:\d+ - Failed to load model 'm' after .*ms: "
        r"StorageAccessDeniedError: storage refused access to s3://b/m/model\.pt: Forbidden",
        line,
    )
    assert "Traceback" not in log_stream.getvalue()
    # the request that caused it logs nothing more; another that waited for it does
    assert outcome_logged_for(denied, "req-3")
    assert not outcome_logged_for(denied, "req-4")
    assert not outcome_logged_for(ValueError(), "req-3")


def test_an_outcome_logged_outside_a_request_is_no_requests() -> None:
    exc = ValueError("x")
    assert not logged(exc)
    mark_outcome_logged(exc)
    assert not outcome_logged_for(exc, "")
    assert logged(exc)  # a preload or a warm: in the log all the same
    other = ValueError("y")
    mark_traceback_logged(other)
    assert logged(other)


# -- lines clients cause are bounded -------------------------------------------------


def throttled(throttle: OutcomeThrottle) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(throttle)
    log = logging.Logger("throttled")  # not registered: no other handler sees it
    log.addHandler(handler)
    return log, stream


def take_lines(stream: io.StringIO) -> list[str]:
    """The lines written to ``stream`` since the last call, then empty it."""
    lines = stream.getvalue().splitlines()
    stream.truncate(0)
    stream.seek(0)
    return lines


def test_outcome_lines_are_bounded_per_outcome_and_the_rest_counted() -> None:
    clock = FakeClock()
    throttle = OutcomeThrottle(burst=3, interval_s=60, clock=clock)
    log, stream = throttled(throttle)
    for i in range(50):
        log.warning("unknown id %s", i, extra={OUTCOME: "model_not_found"})
        log.warning("bad body %s", i, extra={OUTCOME: "bad_request"})
        log.warning("not an outcome %s", i)
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if line.startswith("unknown id")] == [
        "unknown id 0",
        "unknown id 1",
        "unknown id 2",
    ]
    assert len([line for line in lines if line.startswith("bad body")]) == 3
    assert len([line for line in lines if line.startswith("not an outcome")]) == 50
    assert repr(throttle) == (
        "<OutcomeThrottle 3/60s left_out={'model_not_found': 47, 'bad_request': 47}>"
    )

    # Within the minute, still nothing; after it, the first line passes and
    # says how many were left out, and a new minute begins.
    clock.now += 59
    log.warning("unknown id late", extra={OUTCOME: "model_not_found"})
    clock.now += 1.5
    take_lines(stream)
    for i in range(5):
        log.warning("unknown id again %s", i, extra={OUTCOME: "model_not_found"})
    assert take_lines(stream) == [
        "unknown id again 0 [48 more model_not_found line(s) in the last 60 s not logged]",
        "unknown id again 1",
        "unknown id again 2",
    ]
    # bad_request: its first window (121.5 s ago) is the one that left lines out.
    clock.now += 61
    log.warning("bad body later", extra={OUTCOME: "bad_request"})
    log.warning("unknown id much later", extra={OUTCOME: "model_not_found"})
    assert take_lines(stream) == [
        "bad body later [47 more bad_request line(s) in the last 122 s not logged]",
        "unknown id much later [2 more model_not_found line(s) in the last 61 s not logged]",
    ]
    # After a minute that left nothing out, the next line is plain.
    clock.now += 60
    log.warning("unknown id plain", extra={OUTCOME: "model_not_found"})
    assert take_lines(stream) == ["unknown id plain"]


def test_the_replica_handler_bounds_outcome_lines(log_stream: io.StringIO) -> None:
    log = logging.getLogger("user.code")
    for _ in range(100):
        log.warning("no such model", extra={OUTCOME: "model_not_found"})
    assert log_stream.getvalue().count("no such model") == 10
