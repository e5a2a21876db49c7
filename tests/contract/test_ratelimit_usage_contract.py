"""The rate-usage contract: `Store.rate_usage` on memory, Redis and Redis Cluster.

Decides what the read-only rate-limit operation answers on every backend: it charges nothing
(no state created, none changed, no TTL touched: peeking between charges changes no later
answer, and peeks racing a burst leave it exact); it answers what a charge at the same instant
would (a rejected charge answers the very same Outcome, an admitted one `remaining - cost`);
missing state is the full quota; windows turn (calendar months included) and buckets refill as
time passes; every answer equals `extproc.core.ratelimit.peek`, the reference the memory store
runs and the script's "peek" mode is held to; checks in several Cluster slots are read without
CROSSSLOT. Redis unreachable is a quick transient StoreError.

Time: explicit `now_ms` everywhere (states written at an explicit time still expire in real
time, so every state here lives 10 s or more; see test_ratelimit_contract.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from fractions import Fraction

import pytest
from redis.crc import key_slot

from extproc.core import ratelimit
from extproc.core.ratelimit import Algorithm, Limit, Outcome, Period
from extproc.store import MemoryStore, Store, StoreError
from extproc.store.base import RateCheck
from extproc.store.keys import KeySpace
from extproc.store.redis import RedisStore
from tests.contract.test_ratelimit_contract import (
    ALGORITHMS,
    EXTRA,
    REFERENCE_LIMITS,
    N,
    _far_from_window_ends,
    admitted,
    bucket,
    fixed,
    other_slot_tag,
    sliding,
    utc_ms,
)
from tests.support.procs import free_port

T0 = utc_ms(2026, 1, 20, 12)          # mid-month, mid-day: no window of these tests turns by accident
DAY = 86_400_000


async def expiry(store: Store, key: str) -> int | None:
    """When `key` expires (absolute; memory: monotonic us, Redis: Unix ms), None when absent."""
    if isinstance(store, MemoryStore):
        entry = store._data.get(key)
        return None if entry is None else entry.expires_us
    assert isinstance(store, RedisStore)
    at = await store._client.pexpiretime(key)
    return None if at == -2 else at


# -- it charges nothing -----------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_peeking_creates_no_state(algorithm: str, store: Store, keys: KeySpace, run) -> None:
    lim = ALGORITHMS[algorithm](5)
    check = RateCheck(keys.rate_limit("fresh", lim), lim)

    async def body() -> None:
        for _ in range(3):
            [outcome] = await store.rate_usage([check], now_ms=T0)
            assert outcome.allowed and outcome.remaining == 5
        assert await store.get(check.key) is None            # a rate state would be WRONGTYPE
        assert await expiry(store, check.key) is None
    run(body())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_peeks_between_charges_change_no_later_answer(algorithm: str, store: Store, keys: KeySpace, run) -> None:
    # two partitions get the same charges at the same instants; one is also peeked (twice) before
    # each charge and after the last: both must answer the same charges, and keep the same expiry
    lim = ALGORITHMS[algorithm](4)
    peeked = RateCheck(keys.rate_limit("peeked", lim), lim)
    plain = RateCheck(keys.rate_limit("plain", lim), lim)
    instants = [T0, T0 + 1, T0 + 2000, T0 + 2000, T0 + 3000, T0 + 3500, T0 + 60_000]

    async def body() -> None:
        for step, now in enumerate(instants):
            before = await expiry(store, peeked.key)
            first = await store.rate_usage([peeked], now_ms=now)
            assert await store.rate_usage([peeked], now_ms=now) == first
            assert await expiry(store, peeked.key) == before, f"step {step}: a peek moved the TTL"
            [a] = await store.rate_limit([peeked], now_ms=now)
            [b] = await store.rate_limit([plain], now_ms=now)
            assert a == b, f"step {step}"
        later = instants[-1] + 5000
        before = await expiry(store, peeked.key)
        assert before is not None
        await store.rate_usage([peeked], now_ms=later)
        assert await expiry(store, peeked.key) == before
        assert await store.rate_usage([peeked], now_ms=later) == await store.rate_usage([plain], now_ms=later)
    run(body())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_peeks_racing_a_burst_leave_it_exact(algorithm: str, store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair
    lim = ALGORITHMS[algorithm](N)
    check = RateCheck(keys.rate_limit("client", lim), lim)

    async def body() -> None:
        calls = [(a if i % 2 else b).rate_limit([check]) for i in range(N + EXTRA)]
        peeks = [(b if i % 2 else a).rate_usage([check]) for i in range(N + EXTRA)]
        mixed = [c for pair in zip(calls, peeks, strict=True) for c in pair]
        results = await asyncio.gather(*mixed)
        charged = results[0::2]
        assert admitted(charged) == N
        for [seen] in results[1::2]:        # a peek sees some prefix of the burst, never more
            assert 0 <= seen.remaining <= N
        [after] = await a.rate_usage([check])
        assert after.remaining == 0 and not after.allowed and after.retry_after_ms > 0
    run(body())


# -- it answers what a charge would -----------------------------------------------------------

def test_a_peek_answers_what_a_charge_at_that_instant_answers(store: Store, keys: KeySpace, run) -> None:
    rng = random.Random(23)
    states: dict[str, dict[str, int]] = {}

    async def body() -> None:
        now = utc_ms(2026, 1, 31, 23, 40)
        for step in range(250):
            now += rng.choice([0, 0, 1, 999, 7000, 45_000, 200_000])
            if not _far_from_window_ends(now):
                continue
            chosen = rng.sample(REFERENCE_LIMITS, rng.choice([1, 1, 2, 3]))
            tag = f"c{rng.randrange(2)}"            # one tag per request: one slot, one script
            checks = [RateCheck(keys.rate_limit(tag, lim), lim, cost=rng.choice([1, 1, 2])) for lim in chosen]
            peeked = await store.rate_usage(checks, now_ms=now)
            reference = ratelimit.peek([(c.limit, states.get(c.key), c.units) for c in checks], now)
            assert peeked == reference, f"step {step}"
            results = await store.rate_limit(checks, now_ms=now)
            ok = all(o.allowed for o in peeked)
            assert [r.charged for r in results] == [ok] * len(checks)
            for check, p, r in zip(checks, peeked, results, strict=True):
                if ok:      # charged: the same answer, less this request's cost
                    assert (r.outcome.allowed, r.outcome.remaining, r.outcome.retry_after_ms) == \
                        (True, p.remaining - check.units, 0), f"step {step}"
                else:       # nothing charged: the very same answer
                    assert r.outcome == p, f"step {step}"
            _, charges = ratelimit.check_and_charge([(c.limit, states.get(c.key), c.units) for c in checks], now)
            if ok:
                for check, charge in zip(checks, charges, strict=True):
                    assert charge.state is not None
                    states[check.key] = charge.state
    run(body())


def test_remaining_before_and_after_a_charge(store: Store, keys: KeySpace, run) -> None:
    lim = fixed(10, "month")
    check = RateCheck(keys.rate_limit("user-1", lim), lim, cost=3)

    async def body() -> None:
        for expected_before in (10, 7, 4, 1):
            [before] = await store.rate_usage([check], now_ms=T0)
            assert before.remaining == expected_before
            [charged] = await store.rate_limit([check], now_ms=T0)
            assert charged.outcome.allowed == (expected_before >= 3)
            assert charged.outcome.remaining == (expected_before - 3 if expected_before >= 3 else expected_before)
        [last] = await store.rate_usage([check], now_ms=T0)
        assert last == (await store.rate_limit([check], now_ms=T0))[0].outcome    # rejected: identical
        assert not last.allowed and last.remaining == 1
        [cheap] = await store.rate_usage([RateCheck(check.key, lim, cost=1)], now_ms=T0)
        assert cheap.allowed and cheap.remaining == 1                              # a cheaper request fits
    run(body())


# -- missing state is the full quota ----------------------------------------------------------

def test_unknown_state_reads_as_the_full_quota(store: Store, keys: KeySpace, run) -> None:
    month = utc_ms(2026, 2, 1) - T0
    cases = [
        (fixed(7, "month"), Outcome("fw", True, 7, 7, 0, 0, 31 * DAY)),
        (sliding(8, "day"), Outcome("sw", True, 8, 8, 0, 0, DAY)),
        (bucket(5, Fraction(1, 10)), Outcome("tb", True, 5, 5, 0, 0, 50_000)),
    ]

    async def body() -> None:
        for lim, expected in cases:
            check = RateCheck(keys.rate_limit("nobody", lim), lim)
            assert await store.rate_usage([check], now_ms=T0) == [expected]
            too_big = RateCheck(check.key, lim, cost=lim.limit + 1)
            [refused] = await store.rate_usage([too_big], now_ms=T0)
            assert not refused.allowed and refused.remaining == lim.limit and refused.retry_after_ms > 0
        # after a charge and a delete (what the admin reset does) it is full again
        lim = fixed(7, "month")
        check = RateCheck(keys.rate_limit("reset-me", lim), lim)
        await store.rate_limit([check], now_ms=T0)
        [used] = await store.rate_usage([check], now_ms=T0)
        assert (used.remaining, used.reset_after_ms) == (6, month)
        assert await store.delete(check.key) == 1
        assert await store.rate_usage([check], now_ms=T0) == [Outcome("fw", True, 7, 7, 0, 0, 31 * DAY)]
    run(body())


# -- time passes ------------------------------------------------------------------------------

def test_monthly_windows_turn_at_the_calendar_month(store: Store, keys: KeySpace, run) -> None:
    fw, sw = fixed(6, "month"), sliding(6, "month")
    checks = [RateCheck(keys.rate_limit("tier-free", fw), fw), RateCheck(keys.rate_limit("tier-free", sw), sw)]
    late_january = utc_ms(2026, 1, 31, 12)
    february = utc_ms(2026, 2, 1)
    mid_february = utc_ms(2026, 2, 15)

    async def body() -> None:
        for _ in range(4):
            await store.rate_limit(checks, now_ms=late_january)
        [f, s] = await store.rate_usage(checks, now_ms=late_january)
        assert (f.remaining, f.reset_after_ms) == (2, 12 * 3_600_000)
        assert (s.remaining, s.reset_after_ms) == (2, 12 * 3_600_000 + 28 * DAY)   # then February empties
        [f, s] = await store.rate_usage(checks, now_ms=february)
        assert f == Outcome("fw", True, 6, 6, 0, 0, 28 * DAY)                    # a new month: full
        assert (s.remaining, s.reset_after_ms) == (2, 28 * DAY)                 # January weighs ~100 %
        [f, s] = await store.rate_usage(checks, now_ms=mid_february)
        assert s.remaining == 4 and s.reset_after_ms == 14 * DAY                # half of 4 still counted
        assert [f, s] == ratelimit.peek([(fw, {"w": 2026 * 12, "c": 4}, 1),
                                         (sw, {"w": 2026 * 12, "c": 4, "p": 0}, 1)], mid_february)
    run(body())


def test_a_bucket_refills_as_time_passes(store: Store, keys: KeySpace, run) -> None:
    lim = bucket(5, Fraction(1, 10))                   # one token per 10 s
    check = RateCheck(keys.rate_limit("user-1", lim), lim)

    async def body() -> None:
        for _ in range(5):
            await store.rate_limit([check], now_ms=T0)
        seen = [(o.allowed, o.remaining, o.reset_after_ms, o.retry_after_ms)
                for t in (0, 9_999, 10_000, 25_000, 49_999, 50_000, 90_000)
                for [o] in [await store.rate_usage([check], now_ms=T0 + t)]]
        assert seen == [(False, 0, 50_000, 10_000), (False, 0, 40_001, 1), (True, 1, 40_000, 0),
                        (True, 2, 25_000, 0), (True, 4, 1, 0), (True, 5, 0, 0), (True, 5, 0, 0)]
        [o] = await store.rate_usage([check], now_ms=T0 + 25_000)           # the peeks refilled nothing
        assert o.remaining == 2
        [r] = await store.rate_limit([check], now_ms=T0 + 25_000)
        assert r.outcome.allowed and r.outcome.remaining == 1
    run(body())


def test_a_sliding_window_forgets_as_time_passes(store: Store, keys: KeySpace, run) -> None:
    lim = Limit("sw", Algorithm.SLIDING_WINDOW, 10, Period(3600))
    check = RateCheck(keys.rate_limit("user-1", lim), lim)
    hour = utc_ms(2026, 1, 20, 12)

    async def body() -> None:
        for _ in range(8):
            await store.rate_limit([check], now_ms=hour + 60_000)
        remaining = [(await store.rate_usage([check], now_ms=hour + t))[0].remaining
                     for t in (60_000, 3_600_000, 3_600_000 + 900_000, 3_600_000 + 1_800_000, 7_200_000)]
        assert remaining == [2, 2, 4, 6, 10]         # 8 units, then 8 weighted by 1, 3/4, 1/2, 0
    run(body())


# -- shape of the operation -------------------------------------------------------------------

def test_checks_in_several_slots_are_read_in_order(store: Store, keys: KeySpace, run) -> None:
    user, org = "user-1", other_slot_tag("user-1", keys)
    per_user, per_org, per_user_hour = fixed(10, name="per-user"), sliding(5, name="per-org"), fixed(9, "hour", "h")
    checks = [RateCheck(keys.rate_limit(user, per_user), per_user, cost=2),
              RateCheck(keys.rate_limit(org, per_org), per_org),
              RateCheck(keys.rate_limit(user, per_user_hour), per_user_hour)]
    assert key_slot(checks[0].key.encode()) != key_slot(checks[1].key.encode())

    async def body() -> None:
        await store.rate_limit(checks, now_ms=T0)               # every rule charged once
        [u, o, h] = await store.rate_usage(checks, now_ms=T0)   # no CROSSSLOT on Cluster
        assert (u.rule, u.remaining, o.rule, o.remaining, h.rule, h.remaining) == \
            ("per-user", 8, "per-org", 4, "h", 8)
        assert [u, o, h] == [(await store.rate_usage([c], now_ms=T0))[0] for c in checks]
    run(body())


def test_rate_usage_arguments_are_checked_before_any_io(store: Store, keys: KeySpace, run) -> None:
    lim = fixed(5)
    check = RateCheck(keys.rate_limit("user-1", lim), lim)
    assert run(store.rate_usage([])) == []
    with pytest.raises(ValueError, match="twice"):
        run(store.rate_usage([check, check]))
    with pytest.raises(ValueError):
        run(store.rate_usage([check], now_ms=-1))
    with pytest.raises(TypeError):
        run(store.rate_usage([(check.key, lim)]))  # type: ignore[list-item]


def test_a_key_holding_another_type_is_a_permanent_error(store: Store, keys: KeySpace, run) -> None:
    lim = fixed(5)
    check = RateCheck(keys.rate_limit("user-1", lim), lim)

    async def body() -> None:
        await store.set(check.key, b"not a hash")
        with pytest.raises(StoreError) as info:
            await store.rate_usage([check], now_ms=T0)
        assert info.value.transient is False
        assert await store.get(check.key) == b"not a hash"
    run(body())


def test_rate_usage_survives_losing_the_script_cache(store: Store, keys: KeySpace, run, backend) -> None:
    lim = fixed(100)
    check = RateCheck(keys.rate_limit("client", lim), lim)

    async def body() -> None:
        backend.flush_scripts()                      # as after a Redis restart or failover
        assert (await store.rate_usage([check]))[0].remaining == 100
        await store.rate_limit([check])
        backend.flush_scripts()                      # and on the pipelined path
        results = await asyncio.gather(*(store.rate_usage([check]) for _ in range(10)))
        assert all(o.remaining == 99 for [o] in results)
    run(body())


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_unreachable_redis_rate_usage_is_a_quick_transient_error(cluster: bool, keys: KeySpace, run) -> None:
    lim = fixed(5)

    async def body() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}", cluster=cluster)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await store.rate_usage([RateCheck(keys.rate_limit("c", lim), lim)])
            assert time.monotonic() - started < 1.0
            assert info.value.transient and not info.value.timeout
        finally:
            await store.close()
    run(body())
