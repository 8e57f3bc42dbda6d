"""The leader lease's rules on a fake clock: acquire, renew, expire,
release, epochs (fencing), a restarted authority's block, and the holder's
margin that keeps two leaders from overlapping (no processes, no sleeps)."""

from __future__ import annotations

import asyncio

import pytest
from fake_clock import FakeClock
from lease_clients import InMemoryLeaseClient

from muxgate.gateway._leadership import Leadership
from muxgate.gateway._lease import MARGIN_FRACTION, Lease, LeaseGrant, Tenure

pytestmark = pytest.mark.anyio

PERIOD = 10.0


def test_a_vacant_lease_goes_to_the_first_asker_and_others_are_refused() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    a = lease.acquire("a", PERIOD)
    assert a == LeaseGrant(granted=True, holder="a", epoch=1, ttl_s=PERIOD)
    clock.now += 4
    b = lease.acquire("b", PERIOD)
    assert not b.granted and b.holder == "a" and b.epoch == 1 and b.ttl_s == pytest.approx(6)
    assert repr(lease) == "<Lease epoch=1 holder=a ttl=6.00s>"


def test_the_holder_renews_with_the_same_epoch_and_keeps_it_past_the_first_expiry() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    lease.acquire("a", PERIOD)
    for _ in range(5):
        clock.now += PERIOD * 0.9
        grant = lease.acquire("a", PERIOD)
        assert grant.granted and grant.epoch == 1 and grant.ttl_s == PERIOD
        assert not lease.acquire("b", PERIOD).granted


def test_an_expired_lease_goes_to_the_next_asker_with_the_next_epoch() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    lease.acquire("a", PERIOD)
    clock.now += PERIOD - 0.001
    assert not lease.acquire("b", PERIOD).granted
    assert lease.check(1)
    clock.now += 0.001  # expired exactly now
    assert not lease.check(1)
    b = lease.acquire("b", PERIOD)
    assert b.granted and b.holder == "b" and b.epoch == 2
    # The old holder's renewal is refused now, and its epoch fenced off.
    a = lease.acquire("a", PERIOD)
    assert not a.granted and a.holder == "b"
    assert not lease.check(1) and lease.check(2)


def test_a_holder_that_renews_too_late_gets_a_new_epoch() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    lease.acquire("a", PERIOD)
    clock.now += PERIOD + 1
    again = lease.acquire("a", PERIOD)
    assert again.granted and again.epoch == 2  # a new term: its old actions are fenced
    assert not lease.check(1)


def test_release_hands_the_lease_over_at_once() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    lease.acquire("a", PERIOD)
    assert not lease.release("b", 1)  # not the holder
    assert not lease.release("a", 7)  # not its epoch
    assert lease.release("a", 1)
    assert not lease.check(1)
    b = lease.acquire("b", PERIOD)
    assert b.granted and b.epoch == 2
    assert not lease.release("a", 1)


def test_a_restarted_authority_grants_nothing_for_one_period_then_the_next_epoch() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock, epoch=7, blocked_for_s=PERIOD)
    refused = lease.acquire("b", PERIOD)
    assert not refused.granted and refused.holder is None and refused.epoch == 7
    assert not lease.check(7)
    clock.now += PERIOD
    grant = lease.acquire("b", PERIOD)
    assert grant.granted and grant.epoch == 8


def test_a_restarted_authority_gives_its_last_holder_the_lease_back_at_once() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock, epoch=7, blocked_for_s=PERIOD, last_holder="a")
    # Anyone else waits out the block, and learns who may come back.
    refused = lease.acquire("b", PERIOD)
    assert not refused.granted and refused.holder == "a" and not lease.check(7)
    clock.now += 1
    back = lease.acquire("a", PERIOD)
    assert back == LeaseGrant(granted=True, holder="a", epoch=7, ttl_s=PERIOD)
    assert lease.check(7)
    clock.now += PERIOD - 0.5  # past the block: still a's, renewed
    assert not lease.acquire("b", PERIOD).granted
    assert lease.acquire("a", PERIOD).epoch == 7


def test_a_restarted_authoritys_last_holder_that_never_comes_back_costs_one_period() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock, epoch=7, blocked_for_s=PERIOD, last_holder="a")
    clock.now += PERIOD
    b = lease.acquire("b", PERIOD)
    assert b.granted and b.epoch == 8
    # a comes back too late: b holds the lease, a is refused and fenced off.
    a = lease.acquire("a", PERIOD)
    assert not a.granted and a.holder == "b" and not lease.check(7)


def test_a_restarted_authoritys_last_holder_may_release_it() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock, epoch=7, blocked_for_s=PERIOD, last_holder="a")
    assert not lease.release("a", 6) and not lease.release("b", 7)
    assert lease.release("a", 7)
    b = lease.acquire("b", PERIOD)
    assert b.granted and b.epoch == 8


def test_each_answer_carries_the_other_gateways_recent_load() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    lease.acquire("a", PERIOD, in_flight=1, queued=0)
    lease.acquire("b", PERIOD, in_flight=3, queued=2)
    lease.acquire("c", PERIOD, in_flight=4, queued=5)
    mine = lease.acquire("a", PERIOD, in_flight=1, queued=0)
    assert (mine.others_in_flight, mine.others_queued) == (7, 7)
    clock.now += 2 * PERIOD + 1  # b and c went quiet: their load is forgotten
    mine = lease.acquire("a", PERIOD)
    assert (mine.others_in_flight, mine.others_queued) == (0, 0)


def test_bad_period_is_refused() -> None:
    with pytest.raises(ValueError, match="period_s must be > 0"):
        Lease(clock=FakeClock()).acquire("a", 0)


@pytest.mark.parametrize("delay", [0.0, 1.0, 3.7])
def test_the_holder_stops_leading_a_margin_before_the_authority_expires(delay: float) -> None:
    """The holder counts from when it sent the ask: however long the answer
    took (``delay`` each way), it stops believing it leads at least a margin
    before anyone else can acquire."""
    clock = FakeClock()  # one clock: both sides' monotonic time
    lease = Lease(clock=clock)
    tenure = Tenure(clock=clock, margin_s=PERIOD * MARGIN_FRACTION)
    sent = clock.now
    clock.now += delay
    grant = lease.acquire("a", PERIOD)
    clock.now += delay
    tenure.answered(grant, sent)
    assert tenure.is_leader() and tenure.epoch == 1
    last = sent + PERIOD - tenure.margin_s  # the holder's end
    clock.now = last - 0.001
    assert tenure.is_leader()
    clock.now = last
    assert not tenure.is_leader() and tenure.epoch is None
    # The authority still refuses everyone else for at least the margin.
    clock.now = last + tenure.margin_s - 0.001
    assert not lease.acquire("b", PERIOD).granted and lease.check(1)


def test_an_answer_slower_than_the_lease_makes_no_leader() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    tenure = Tenure(clock=clock, margin_s=PERIOD * MARGIN_FRACTION)
    sent = clock.now
    clock.now += 4.0
    grant = lease.acquire("a", PERIOD)
    clock.now += 4.0  # 8 s round trip: past sent + period - margin
    tenure.answered(grant, sent)
    assert grant.granted and not tenure.is_leader() and tenure.epoch is None


def test_a_refused_answer_names_the_leader_and_ends_any_tenure() -> None:
    clock = FakeClock()
    tenure = Tenure(clock=clock, margin_s=1.0)
    tenure.answered(LeaseGrant(granted=True, holder="me", epoch=3, ttl_s=PERIOD), clock.now)
    assert tenure.is_leader() and repr(tenure) == "<Tenure leader epoch=3 for=9.00s>"
    tenure.answered(LeaseGrant(granted=False, holder="x", epoch=4, ttl_s=5), clock.now)
    assert not tenure.is_leader() and tenure.leader == "x"
    assert repr(tenure) == "<Tenure follower leader=x>"


async def test_leadership_hands_over_within_two_periods_when_the_leader_stops_renewing() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    a_client, b_client = InMemoryLeaseClient(lease), InMemoryLeaseClient(lease)
    a = Leadership(a_client, period_s=PERIOD, holder="a", clock=clock)
    b = Leadership(b_client, period_s=PERIOD, holder="b", clock=clock)
    b.load = lambda: (2, 3)
    await a.ask(timeout_s=1)
    await b.ask(timeout_s=1)
    assert a.is_leader() and not b.is_leader() and a.changed.is_set()
    assert a.snapshot() == {
        "role": "leader",
        "holder": "a",
        "leader": "a",
        "epoch": 1,
        "lease_s": PERIOD,
    }
    assert b.snapshot()["role"] == "follower" and b.snapshot()["leader"] == "a"
    assert repr(b) == "<Leadership b asks=1 <Tenure follower leader=a>>"
    await a.ask(timeout_s=1)
    assert a.others_load == (2, 3)

    # a can no longer reach the authority (its gateway stalled, or died).
    a_client.reachable = False
    lost_at = clock.now
    step = PERIOD / 4
    while not b.is_leader():
        clock.now += step
        await a.ask(timeout_s=1)
        await b.ask(timeout_s=1)
        assert not (a.is_leader() and b.is_leader()), "two leaders at once"
        assert clock.now - lost_at <= 2 * PERIOD
    assert not a.is_leader() and b.epoch == 2
    assert clock.now - lost_at <= PERIOD + step  # expiry plus one ask interval


async def test_a_leader_keeps_leading_across_a_restart_of_the_authority() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    a_client, b_client = InMemoryLeaseClient(lease), InMemoryLeaseClient(lease)
    a = Leadership(a_client, period_s=PERIOD, holder="a", clock=clock)
    b = Leadership(b_client, period_s=PERIOD, holder="b", clock=clock)
    await a.ask(timeout_s=1)
    await b.ask(timeout_s=1)
    assert a.is_leader() and a.epoch == 1
    a.changed.clear()
    # The authority dies and, a moment later, comes back restored from what
    # it kept (the last epoch and its holder), as the Ray lease actor does.
    a_client.reachable = b_client.reachable = False
    step = PERIOD / 4
    clock.now += step
    await a.ask(timeout_s=1)
    await b.ask(timeout_s=1)
    restarted = Lease(clock=clock, epoch=lease.epoch, blocked_for_s=PERIOD, last_holder="a")
    a_client.lease = b_client.lease = restarted
    a_client.reachable = b_client.reachable = True
    # b asks first, then a, then both for two periods: a never stops leading,
    # with its epoch, and b never leads.
    for _ in range(8):
        clock.now += step
        await b.ask(timeout_s=1)
        await a.ask(timeout_s=1)
        assert a.is_leader() and a.epoch == 1 and restarted.check(1)
        assert not b.is_leader() and b.tenure.leader == "a"
    assert not a.changed.is_set()  # no change of role on the way


async def test_leadership_released_on_stop_hands_over_at_the_next_ask() -> None:
    clock = FakeClock()
    lease = Lease(clock=clock)
    a = Leadership(InMemoryLeaseClient(lease), period_s=PERIOD, holder="a", clock=clock)
    b = Leadership(InMemoryLeaseClient(lease), period_s=PERIOD, holder="b", clock=clock)
    await a.ask(timeout_s=1)
    await a.release()
    assert not a.is_leader()
    await b.ask(timeout_s=1)
    assert b.is_leader() and b.epoch == 2


async def test_wait_role_wakes_when_the_tenure_lapses_without_any_answer() -> None:
    lease = Lease()
    client = InMemoryLeaseClient(lease)
    leadership = Leadership(client, period_s=0.4, holder="a")
    runner = asyncio.ensure_future(leadership.run())
    try:
        async with asyncio.timeout(5):
            await leadership.wait_role(True)
            client.reachable = False
            await leadership.wait_role(False)  # the loop woke at the lapse itself
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
