"""The rate-limit contract: the same test bodies on memory, Redis and Redis Cluster.

Decides what `Store.rate_limit` answers on every backend: bursts of N + k concurrent requests
admit exactly N for each algorithm (also from two clients standing for two replicas); a
request rejected by one rule is charged to none; rules whose keys live in different Cluster
slots are refunded when another slot rejects, without CROSSSLOT errors; the sliding window
refuses the double burst a fixed window admits; monthly windows turn at the calendar month in
UTC; and every answer equals `extproc.core.ratelimit`, the reference the memory store runs and
the Lua script is held to. Redis unreachable or silent is a StoreError, transient, quickly.

Time: the bursts use the backend's own clock (Redis TIME) with day/month windows and slow
buckets, which nothing in a test run can cross or refill; boundary tests pass `now_ms`
explicitly. States written at an explicit time expire in real time, so those tests keep every
TTL at 10 s or more and nothing depends on a key outliving one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import socket
import time
from fractions import Fraction

import pytest
import redis
from redis.crc import key_slot

from extproc.core import ratelimit
from extproc.core.ratelimit import Algorithm, Limit, Outcome, Period
from extproc.store import MemoryStore, Store, StoreError
from extproc.store.base import RateCheck, RateResult
from extproc.store.keys import KeySpace
from extproc.store.redis import RedisStore
from tests.support.procs import free_port

DEADLINE_S = 3.0
MIN = 60_000


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) * 1000


def fixed(limit: int, period: str = "month", name: str = "fw") -> Limit:
    return Limit(name, Algorithm.FIXED_WINDOW, limit, Period.parse(period))


def sliding(limit: int, period: str = "day", name: str = "sw") -> Limit:
    return Limit(name, Algorithm.SLIDING_WINDOW, limit, Period.parse(period))


def bucket(capacity: int, refill_per_second: Fraction = Fraction(1, 3600), name: str = "tb") -> Limit:
    return Limit(name, Algorithm.TOKEN_BUCKET, capacity, Period(60), refill_per_second=refill_per_second)


# every algorithm with a clock-proof burst: no window boundary or refill within a test run
ALGORITHMS = {"fixed_window": fixed, "sliding_window": sliding, "token_bucket": bucket}


def other_slot_tag(tag: str, keys: KeySpace) -> str:
    """A tag whose keys hash to another Cluster slot than `tag`'s."""
    slot = key_slot(keys.key("rl", tag).encode())
    return next(t for t in (f"org-{i}" for i in range(100)) if key_slot(keys.key("rl", t).encode()) != slot)


def admitted(results: list[list[RateResult]]) -> int:
    return sum(all(r.outcome.allowed for r in rs) for rs in results)


# -- exactness under concurrency --------------------------------------------------------------

N, EXTRA = 10, 15


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_burst_admits_exactly_the_limit(algorithm: str, store: Store, keys: KeySpace, run) -> None:
    lim = ALGORITHMS[algorithm](N)
    check = RateCheck(keys.rate_limit("client", lim), lim)

    async def body() -> None:
        results = await asyncio.gather(*(store.rate_limit([check]) for _ in range(N + EXTRA)))
        allowed = [r for [r] in results if r.outcome.allowed]
        assert len(allowed) == N
        assert all(r.charged for r in allowed)
        assert sorted(r.outcome.remaining for r in allowed) == list(range(N))
        assert all(not r.charged and r.outcome.remaining == 0 and r.outcome.retry_after_ms > 0
                   for [r] in results if not r.outcome.allowed)
    run(body())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_burst_from_two_replicas_admits_exactly_the_limit(algorithm: str, store_pair, keys: KeySpace,
                                                             run) -> None:
    a, b = store_pair
    lim = ALGORITHMS[algorithm](N)
    check = RateCheck(keys.rate_limit("client", lim), lim)
    costly = RateCheck(keys.rate_limit("costly", lim), lim, cost=3)

    async def body() -> None:
        results = await asyncio.gather(*((a if i % 2 else b).rate_limit([check]) for i in range(N + EXTRA)))
        assert admitted(results) == N
        results = await asyncio.gather(*((a if i % 2 else b).rate_limit([costly]) for i in range(N + EXTRA)))
        assert admitted(results) == 3          # 9 of 10 units: the 4th would need 12
    run(body())


def test_a_burst_under_two_rules_admits_the_tighter_limit(store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair
    per_user, per_route = fixed(10, name="per-user"), bucket(7, name="per-route")
    checks = [RateCheck(keys.rate_limit("user-1", per_user), per_user),
              RateCheck(keys.rate_limit("user-1", per_route), per_route)]

    async def body() -> None:
        results = await asyncio.gather(*((a if i % 2 else b).rate_limit(checks) for i in range(25)))
        assert admitted(results) == 7
        # the wider rule counted only the 7 admitted requests: 10 - 7 - this one
        [alone] = await a.rate_limit(checks[:1])
        assert alone.outcome.remaining == 2
    run(body())


# -- several rules: all or nothing ------------------------------------------------------------

def test_a_rejected_request_is_charged_to_no_rule(store: Store, keys: KeySpace, run) -> None:
    wide, narrow = fixed(5, name="wide"), sliding(2, name="narrow")
    checks = [RateCheck(keys.rate_limit("user-1", wide), wide), RateCheck(keys.rate_limit("user-1", narrow), narrow)]

    async def body() -> None:
        answers = [await store.rate_limit(checks) for _ in range(5)]
        assert [[r.outcome.allowed for r in rs] for rs in answers] == [[True, True]] * 2 + [[True, False]] * 3
        assert [rs[0].charged for rs in answers] == [True, True, False, False, False]
        assert answers[-1][0].outcome.remaining == 3          # the wide rule, uncharged
        [alone] = await store.rate_limit(checks[:1])
        assert alone.outcome.remaining == 2                   # 5 - 2 admitted - this one
    run(body())


def test_rules_in_different_slots_are_refunded_when_one_rejects(store: Store, keys: KeySpace, run) -> None:
    user, org = "user-1", other_slot_tag("user-1", keys)
    per_user, per_org = fixed(10, name="per-user"), sliding(2, name="per-org")
    checks = [RateCheck(keys.rate_limit(user, per_user), per_user, cost=2),
              RateCheck(keys.rate_limit(org, per_org), per_org)]
    assert key_slot(checks[0].key.encode()) != key_slot(checks[1].key.encode())

    async def body() -> None:
        answers = [await store.rate_limit(checks) for _ in range(5)]     # no CROSSSLOT on Cluster
        assert [all(r.outcome.allowed for r in rs) for rs in answers] == [True, True, False, False, False]
        refused = answers[-1]
        assert refused[0].outcome.allowed and not refused[0].charged
        assert refused[0].outcome.remaining == 6                         # reported as refunded
        assert not refused[1].outcome.allowed and not refused[1].charged
        [alone] = await store.rate_limit(checks[:1])
        assert alone.outcome.remaining == 10 - 2 * 2 - 2                 # the refused ones were refunded
    run(body())


def test_bursts_across_slots_never_over_admit_and_refund_completely(store_pair, keys: KeySpace, run,
                                                                    backend) -> None:
    a, b = store_pair
    user, org = "user-1", other_slot_tag("user-1", keys)
    per_user, per_org = sliding(10, name="per-user"), bucket(5, name="per-org")
    checks = [RateCheck(keys.rate_limit(user, per_user), per_user), RateCheck(keys.rate_limit(org, per_org), per_org)]

    async def body() -> None:
        results = await asyncio.gather(*((a if i % 2 else b).rate_limit(checks) for i in range(20)))
        n = admitted(results)
        if backend.name == "redis-cluster":
            # a request may be refused by a charge that a concurrent request then refunds:
            # never more than the limit, possibly fewer
            assert 1 <= n <= 5
        else:
            assert n == 5                     # one script decides both rules
        assert all(r.charged == all(x.outcome.allowed for x in rs) for rs in results for r in rs)
        [user_alone] = await a.rate_limit(checks[:1])
        [org_alone] = await b.rate_limit(checks[1:])
        assert user_alone.outcome.remaining == 10 - n - 1             # refunds completed: counts = admitted
        assert org_alone.outcome.allowed == (n < 5)
        assert org_alone.outcome.remaining == max(0, 5 - n - 1)
    run(body())


def test_a_key_holding_another_type_is_a_permanent_error_and_charges_nothing(store: Store, keys: KeySpace,
                                                                             run) -> None:
    ok, broken = fixed(5, name="ok"), fixed(5, name="broken")
    checks = [RateCheck(keys.rate_limit("user-1", ok), ok), RateCheck(keys.rate_limit("user-1", broken), broken)]

    async def body() -> None:
        await store.set(checks[1].key, b"not a hash")
        with pytest.raises(StoreError) as info:
            await store.rate_limit(checks)
        assert info.value.transient is False and not isinstance(info.value, redis.RedisError)
        [alone] = await store.rate_limit(checks[:1])
        assert alone.outcome.remaining == 4
        with pytest.raises(StoreError):
            await store.get(checks[0].key)        # rate state is not bytes either
    run(body())


def test_rate_limit_arguments_are_checked_before_any_io(store: Store, keys: KeySpace, run) -> None:
    lim = fixed(5)
    check = RateCheck(keys.rate_limit("user-1", lim), lim)
    assert run(store.rate_limit([])) == []
    with pytest.raises(ValueError, match="twice"):
        run(store.rate_limit([check, check]))
    with pytest.raises(ValueError):
        run(store.rate_limit([check], now_ms=-1))
    with pytest.raises(ValueError):
        RateCheck(check.key, lim, cost=0)
    with pytest.raises(TypeError):
        run(store.rate_limit([(check.key, lim)]))  # type: ignore[list-item]


# -- windows at exact instants ----------------------------------------------------------------

def test_the_sliding_window_refuses_the_double_burst_a_fixed_window_admits(store: Store, keys: KeySpace,
                                                                           run) -> None:
    boundary = utc_ms(2026, 3, 1, 12, 1)
    fw, sw = Limit("fw", Algorithm.FIXED_WINDOW, 10, Period(60)), Limit("sw", Algorithm.SLIDING_WINDOW, 10, Period(60))

    async def burst(lim: Limit, now: int) -> int:
        check = RateCheck(keys.rate_limit("client", lim), lim)
        return admitted(await asyncio.gather(*(store.rate_limit([check], now_ms=now) for _ in range(10))))

    async def body() -> None:
        assert await burst(fw, boundary - 10_000) == 10
        assert await burst(fw, boundary + 1000) == 10           # 20 within 11 s: the fixed window's flaw
        assert await burst(sw, boundary - 10_000) == 10
        assert await burst(sw, boundary + 1000) == 0            # 10 * 59/60 still counted
        assert await burst(sw, boundary + 30_000) == 5          # half-way: 5 counted
    run(body())


def test_monthly_window_resets_at_the_calendar_month(store: Store, keys: KeySpace, run) -> None:
    lim = fixed(3, "month")
    check = RateCheck(keys.rate_limit("tier-free", lim), lim)
    late = utc_ms(2026, 1, 31, 23, 59, 50)
    february = utc_ms(2026, 2, 1)

    async def body() -> None:
        assert [(await store.rate_limit([check], now_ms=late))[0].outcome.allowed for _ in range(4)] == \
            [True, True, True, False]
        [full] = await store.rate_limit([check], now_ms=late)
        assert full.outcome == Outcome("fw", False, 3, 0, 10_000, 10_000, 31 * 86_400_000)
        [fresh] = await store.rate_limit([check], now_ms=february)
        assert fresh.outcome == Outcome("fw", True, 3, 2, 28 * 86_400_000, 0, 28 * 86_400_000)
    run(body())


def test_the_memory_store_follows_its_injected_wall_clock(keys: KeySpace, run) -> None:
    wall = [utc_ms(2025, 12, 31, 23, 59, 50) / 1000]
    store = MemoryStore(wall_clock=lambda: wall[0])
    lim = fixed(2, "month")
    check = RateCheck(keys.rate_limit("tier-free", lim), lim)

    async def body() -> None:
        assert [(await store.rate_limit([check]))[0].outcome.allowed for _ in range(3)] == [True, True, False]
        wall[0] = utc_ms(2026, 1, 1) / 1000
        [fresh] = await store.rate_limit([check])
        assert fresh.outcome.allowed and fresh.outcome.reset_after_ms == 31 * 86_400_000
    run(body())


MONTH_EDGES = [edge + delta
               for year, month in [(1970, 1), (1999, 12), (2000, 2), (2000, 3), (2023, 2), (2024, 2), (2024, 3),
                                   (2025, 12), (2026, 1), (2026, 7), (2099, 12), (2100, 2), (2100, 3), (2400, 2)]
               for edge in [utc_ms(year, month, 1)]
               for delta in (0, 1, 86_400_000 * 14 + 12_345)] + [utc_ms(2024, 3, 1) - 1, utc_ms(2100, 3, 1) - 1]


def test_the_script_computes_calendar_months_like_the_reference(store: Store, keys: KeySpace, run) -> None:
    # One call per instant on a fresh key: no state is involved, only the month arithmetic
    # (this month's bounds for `fixed`, next month's length for the sliding window's reset
    # and retry).
    fw, sw = fixed(5, "month"), sliding(5, "month")

    async def one(i: int, now: int, lim: Limit, cost: int) -> tuple[Outcome, Outcome]:
        check = RateCheck(keys.rate_limit(f"t{i}-{cost}", lim), lim, cost=cost)
        [result] = await store.rate_limit([check], now_ms=now)
        _, [expected] = ratelimit.check_and_charge([(lim, None, cost)], now)
        return result.outcome, expected.outcome

    async def body() -> None:
        pairs = await asyncio.gather(*(one(i, now, lim, cost) for i, now in enumerate(MONTH_EDGES)
                                       for lim, cost in ((fw, 1), (sw, 1), (sw, 6))))
        for got, expected in pairs:
            assert got == expected
    run(body())


# -- every answer is the reference's ----------------------------------------------------------

REFERENCE_LIMITS = [
    fixed(7, "hour", "fixed-hour"),
    fixed(9, "month", "fixed-month"),
    sliding(8, "minute", "sliding-minute"),
    sliding(6, "month", "sliding-month"),
    bucket(5, Fraction(1, 10), "bucket-slow"),
    bucket(4, Fraction(3, 70), "bucket-odd-rate"),
]


def _far_from_window_ends(now: int) -> bool:
    """States written at `now` live >= 10 s of real time (see the module docstring)."""
    return all(lim.period.window(now)[2] - now >= 10_000 for lim in REFERENCE_LIMITS
               if lim.algorithm is Algorithm.FIXED_WINDOW)


def test_every_answer_matches_the_reference_algorithms(store: Store, keys: KeySpace, run) -> None:
    rng = random.Random(11)
    states: dict[str, dict[str, int]] = {}

    async def body() -> None:
        now = utc_ms(2026, 1, 31, 23, 40)
        for step in range(300):
            now += rng.choice([0, 0, 1, 999, 7000, 45_000, 200_000])
            if not _far_from_window_ends(now):
                continue
            chosen = rng.sample(REFERENCE_LIMITS, rng.choice([1, 1, 2, 3]))
            tag = f"c{rng.randrange(2)}"
            checks = [RateCheck(keys.rate_limit(tag, lim), lim, cost=rng.choice([1, 1, 2])) for lim in chosen]
            results = await store.rate_limit(checks, now_ms=now)
            ok, charges = ratelimit.check_and_charge([(c.limit, states.get(c.key), c.units) for c in checks], now)
            assert [r.outcome for r in results] == [c.outcome for c in charges], f"step {step}"
            assert [r.charged for r in results] == [ok] * len(checks)
            if ok:
                for check, charge in zip(checks, charges, strict=True):
                    assert charge.state is not None
                    states[check.key] = charge.state
    run(body())


# -- lifecycle --------------------------------------------------------------------------------

def test_idle_rate_state_disappears(store: Store, keys: KeySpace, run) -> None:
    lim = Limit("short", Algorithm.FIXED_WINDOW, 5, Period(1))
    check = RateCheck(keys.rate_limit("client", lim), lim)

    async def gone() -> bool:
        try:
            return await store.get(check.key) is None
        except StoreError:          # WRONGTYPE: the rate state is still there
            return False

    async def body() -> None:
        await store.rate_limit([check])
        deadline = time.monotonic() + DEADLINE_S
        while not await gone():
            assert time.monotonic() < deadline, "a 1 s window's state outlived its window"
            await asyncio.sleep(0.02)
    run(body())


def test_rate_limit_survives_losing_the_script_cache(store: Store, keys: KeySpace, run, backend) -> None:
    lim = fixed(100)
    check = RateCheck(keys.rate_limit("client", lim), lim)

    async def body() -> None:
        assert (await store.rate_limit([check]))[0].outcome.remaining == 99
        backend.flush_scripts()                      # as after a Redis restart or failover
        assert (await store.rate_limit([check]))[0].outcome.remaining == 98
        backend.flush_scripts()                      # and on the pipelined path
        results = await asyncio.gather(*(store.rate_limit([check]) for _ in range(20)))
        assert sorted(r.outcome.remaining for [r] in results) == list(range(78, 98))
    run(body())


@pytest.mark.redis
@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_concurrent_calls_share_pipelines(cluster: bool, request: pytest.FixtureRequest, keys: KeySpace,
                                          run) -> None:
    url = (request.getfixturevalue("redis_cluster") if cluster else request.getfixturevalue("redis_server")).url
    lim = fixed(1000)

    async def body() -> None:
        store = RedisStore(url, cluster=cluster, timeout_ms=2000)
        try:
            checks = [RateCheck(keys.rate_limit(f"client-{i}", lim), lim) for i in range(50)]
            results = await asyncio.gather(*(store.rate_limit([c]) for c in checks))
            assert all(r.outcome.remaining == 999 for [r] in results)
            assert store.batched_calls >= 40 and store.pipelines < store.batched_calls
            [alone] = await store.rate_limit(checks[:1])         # idle: straight out, no pipeline
            assert alone.outcome.remaining == 998 and store.batched_calls < 51
        finally:
            await store.close()
    run(body())


# -- how Redis fails --------------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_unreachable_redis_rate_limit_is_a_quick_transient_error(cluster: bool, keys: KeySpace, run,
                                                                 caplog) -> None:
    caplog.set_level(logging.WARNING)
    lim = fixed(5)

    async def body() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}", cluster=cluster)
        try:
            checks = [RateCheck(keys.rate_limit(f"c{i}", lim), lim) for i in range(20)]
            started = time.monotonic()
            errors = await asyncio.gather(*(store.rate_limit([c]) for c in checks), return_exceptions=True)
            assert time.monotonic() - started < 1.0
            assert all(isinstance(e, StoreError) and e.transient and not e.timeout for e in errors)
        finally:
            await store.close()
    run(body())
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_silent_redis_rate_limit_times_out_within_the_store_timeout(cluster: bool, keys: KeySpace, run,
                                                                     caplog) -> None:
    caplog.set_level(logging.WARNING)
    lim = fixed(5)
    with socket.socket() as silent:               # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]

        async def body() -> None:
            store = RedisStore(f"redis://127.0.0.1:{port}", cluster=cluster, timeout_ms=50,
                               connect_timeout_ms=200)
            try:
                checks = [RateCheck(keys.rate_limit(f"c{i}", lim), lim) for i in range(20)]
                started = time.monotonic()
                errors = await asyncio.gather(*(store.rate_limit([c]) for c in checks), return_exceptions=True)
                # one timeout for the whole burst (direct call and pipeline wait together)
                assert time.monotonic() - started < 0.5
                assert all(isinstance(e, StoreError) and e.timeout and e.transient for e in errors)
            finally:
                await store.close()
        run(body())
    assert [r.getMessage() for r in caplog.records] == []
