"""The other gateways' share of a replica's calls, from its report (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from muxgate.gateway._shared_load import others_in_flight


def test_the_report_less_our_unanswered_calls() -> None:
    assert others_in_flight(7, 3) == 4
    assert others_in_flight(3, 3) == 0
    # Our calls still on their way are not in the report yet: never below 0.
    assert others_in_flight(1, 3) == 0


@given(st.integers(0, 100), st.integers(0, 100), st.integers(0, 100))
def test_never_more_than_the_calls_that_are_not_ours(
    ours: int, theirs: int, on_the_way: int
) -> None:
    # The replica counts what reached it: ours less those on their way, and theirs.
    reported = max(0, ours - on_the_way) + theirs
    assert others_in_flight(reported, ours) <= theirs
    if on_the_way == 0:
        assert others_in_flight(reported, ours) == theirs
