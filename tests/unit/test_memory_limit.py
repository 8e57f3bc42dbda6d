"""Which replicas the memory limit replaces (pure, from their reports)."""

from __future__ import annotations

import logging

import pytest

from muxgate.gateway._memory_limit import MemoryLimit
from muxgate.replicas._protocol import ReplicaState

HOLDS_A = ReplicaState(models=["a"])
LOADING_B = ReplicaState(loading=["b"])
EMPTY = ReplicaState()


def test_no_limit_or_no_report_never_replaces() -> None:
    assert not MemoryLimit(None).should_replace("r", 10**12, HOLDS_A)
    assert not MemoryLimit(100).should_replace("r", None, HOLDS_A)


def test_over_the_limit_with_a_model_is_replaced() -> None:
    limit = MemoryLimit(100)
    assert not limit.should_replace("r", 100, HOLDS_A)  # at the limit: kept
    assert limit.should_replace("r", 101, HOLDS_A)
    assert limit.should_replace("r", 101, LOADING_B)


def test_over_the_limit_without_a_model_is_kept_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = MemoryLimit(100)
    with caplog.at_level(logging.ERROR, logger="muxgate.gateway.pool"):
        for _ in range(3):
            assert not limit.should_replace("r", 500, EMPTY)
    assert [r.getMessage() for r in caplog.records] == [
        "replica r uses 500 bytes with no model loaded, over max_replica_rss_bytes=100:"
        " not replaced; raise the limit"
    ]
    assert repr(limit) == "<MemoryLimit 100 over_without_models=['r']>"
    limit.forget("r")
    assert repr(limit) == "<MemoryLimit 100 over_without_models=[]>"
