"""Poison-id quarantine rules on a fake clock (no processes, no sleeps)."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from muxgate.gateway._config import parse_config
from muxgate.gateway._errors import ConfigError, QuarantinedError, error_response
from muxgate.gateway._quarantine import Quarantine, QuarantineConfig, suspects


def make(**config: float) -> tuple[Quarantine, FakeClock]:
    clock = FakeClock()
    q = Quarantine(
        QuarantineConfig(**config),  # type: ignore[arg-type]
        clock=clock,
        wall_clock=lambda: clock.now + 1_700_000_000,
    )
    return q, clock


def test_suspects_are_the_ids_being_loaded_when_there_are_any() -> None:
    # "p" was in flight and not loaded: its load killed the replica; "a" and
    # "b" were served from memory beside it.
    assert suspects(["a", "p", "b", "a"], [], ["a", "b"]) == {"p"}
    assert suspects(["a"], ["p"], ["a", "p"]) == {"p"}
    # Nothing loading: every id in flight, never "" (calls without an id).
    assert suspects(["a", "b", ""], [], ["a", "b"]) == {"a", "b"}
    assert suspects([""], [], []) == set()


def test_two_deaths_within_the_window_quarantine_one_does_not() -> None:
    q, clock = make()
    assert q.record_death({"p", "bystander"}) == []
    assert q.retry_after("p") is None
    clock.now += 10
    assert q.record_death({"p"}) == ["p"]
    assert q.retry_after("p") == pytest.approx(30.0)
    assert q.retry_after("bystander") is None  # in flight beside the culprit once
    assert q.retry_after("other") is None
    assert q.active() == 1
    assert repr(q) == "<Quarantine quarantined=['p'] watched=2>"


def test_an_id_blamed_for_a_recent_death_is_suspected_until_the_window_ends() -> None:
    # What warming skips: one death refuses no request, but no replica
    # should load the id unasked.
    q, clock = make(window_s=300.0, backoff_s=30.0)
    assert not q.suspected("p")
    q.record_death({"p"})
    assert q.suspected("p") and q.retry_after("p") is None
    clock.now += 301
    assert not q.suspected("p")  # the death is out of the window
    q.record_death({"p"})
    clock.now += 1
    assert q.record_death({"p"}) == ["p"]
    assert q.suspected("p")  # quarantined
    clock.now += 31
    assert q.retry_after("p") is None and q.suspected("p")  # on probation
    clock.now += 300
    assert not q.suspected("p")


def test_check_refuses_with_503_and_retry_after_and_counts() -> None:
    refusals = []
    clock = FakeClock()
    q = Quarantine(clock=clock, on_refusal=lambda: refusals.append(1))
    q.record_death({"p"})
    q.record_death({"p"})
    q.check("other")
    clock.now += 0.5
    with pytest.raises(QuarantinedError) as caught:
        q.check("p")
    status, headers, body = error_response(caught.value, "rid")
    assert status == 503
    assert (b"retry-after", b"30") in headers  # 29.5 s left, rounded up
    assert b'"code":"quarantined"' in body
    assert len(refusals) == 1


def test_deaths_further_apart_than_the_window_do_not_add_up() -> None:
    q, clock = make(window_s=60)
    q.record_death({"p"})
    clock.now += 61
    assert q.record_death({"p"}) == []
    clock.now += 30
    assert q.record_death({"p"}) == ["p"]


def test_the_backoff_ends_and_doubles_with_each_repeat_up_to_the_cap() -> None:
    q, clock = make(backoff_s=30, max_backoff_s=100, window_s=300)
    q.record_death({"p"})
    q.record_death({"p"})
    clock.now += 29.5
    assert q.retry_after("p") == pytest.approx(0.5)
    clock.now += 0.5
    assert q.retry_after("p") is None  # released
    # On probation: the next death quarantines it again, for twice as long.
    clock.now += 100
    assert q.record_death({"p"}) == ["p"]
    assert q.retry_after("p") == pytest.approx(60.0)
    clock.now += 60
    assert q.record_death({"p"}) == ["p"]
    assert q.retry_after("p") == pytest.approx(100.0)  # 120 capped
    [entry] = q.snapshot()
    assert entry == {
        "model_id": "p",
        "until": pytest.approx(clock.now + 1_700_000_000 + 100),
        "retry_after_s": 100,
        "deaths": 4,
        "strikes": 3,
    }


def test_a_quiet_window_after_release_forgets_the_strikes() -> None:
    q, clock = make(backoff_s=30, window_s=300)
    q.record_death({"p"})
    q.record_death({"p"})
    clock.now += 30 + 301
    assert q.record_death({"p"}) == []  # one death is not enough any more
    assert q.record_death({"p"}) == ["p"]
    assert q.retry_after("p") == pytest.approx(30.0)  # the first back-off again
    assert q.snapshot()[0]["strikes"] == 1


def test_deaths_while_quarantined_do_not_extend_it() -> None:
    q, clock = make()
    q.record_death({"p"})
    q.record_death({"p"})
    clock.now += 10
    assert q.record_death({"p"}) == []  # a call sent before the quarantine
    assert q.retry_after("p") == pytest.approx(20.0)


def test_clear_releases_at_once_and_forgets() -> None:
    q, _ = make()
    for _ in range(2):
        q.record_death({"p", "q"})
    assert q.clear("p") == ["p"]
    assert q.retry_after("p") is None
    assert q.record_death({"p"}) == []  # starts afresh, not on probation
    assert q.clear() == ["q"]
    assert q.snapshot() == [] and q.active() == 0


def test_disabled_counts_but_never_refuses() -> None:
    q, _ = make()
    q.config = QuarantineConfig(enabled=False)
    for _ in range(5):
        assert q.record_death({"p"}) == []
    assert q.retry_after("p") is None


def test_old_records_are_dropped() -> None:
    q, clock = make(window_s=60)
    for i in range(100):
        q.record_death({f"m{i}"})
    clock.now += 61
    q.record_death({"x"})
    assert repr(q) == "<Quarantine quarantined=[] watched=1>"


def test_config_section_is_validated() -> None:
    config = parse_config(
        {
            "deployments": [
                {"name": "D", "import_path": "a:B", "quarantine": {"deaths": 3, "backoff_s": 5}}
            ]
        }
    )
    assert config.deployments[0].quarantine == QuarantineConfig(deaths=3, backoff_s=5)
    assert (
        parse_config({"deployments": [{"name": "D", "import_path": "a:B"}]})
        .deployments[0]
        .quarantine
        == QuarantineConfig()
    )
    with pytest.raises(ConfigError, match=r"quarantine.deaths"):
        parse_config(
            {"deployments": [{"name": "D", "import_path": "a:B", "quarantine": {"deaths": 0}}]}
        )
