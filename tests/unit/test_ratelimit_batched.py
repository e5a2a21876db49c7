"""Batched rate limits (`sync: {mode: batched}`): the pure table (`extproc.core.ratebatch`) at
each of its routes and edges, the over-admission bound checked against the reference algorithms
with several simulated replicas, and `RateLimiter` driving it over an in-memory store (mixed
rules, shadow, a failing store, close and reload).

Time is an argument in the core tests. The service tests run one event loop per test
(`asyncio.run`) and sync explicitly with `RateLimiter.flush()`; where the background flusher
is the subject, they poll its effect with a deadline. Nothing sleeps for synchronisation.
"""

from __future__ import annotations

import asyncio
import random
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from extproc import config as cfgmod
from extproc.core.authorize import Principal
from extproc.core.ratebatch import BatchTable, Route
from extproc.core.ratelimit import Algorithm, Limit, Outcome, Period, check_and_charge, peek
from extproc.core.request import Request
from extproc.services.ratelimit import RateLimiter
from extproc.store import StoreError
from extproc.store.memory import MemoryStore

T0 = 1_767_225_600_000          # 2026-01-01T00:00:00Z, a minute/hour/day/month boundary
HOUR = 3_600_000


def fixed(limit: int, period: str = "hour", name: str = "fw") -> Limit:
    return Limit(name, Algorithm.FIXED_WINDOW, limit, Period.parse(period))


def sliding(limit: int, period: str = "minute", name: str = "sw") -> Limit:
    return Limit(name, Algorithm.SLIDING_WINDOW, limit, Period.parse(period))


def bucket(limit: int, period: str = "second", name: str = "tb") -> Limit:
    return Limit.from_rule(name, "token_bucket", limit, period)


def answer(limit: Limit, remaining: int, *, allowed: bool = True, retry: int = 0, reset: int = HOUR) -> Outcome:
    return Outcome(limit.name, allowed, limit.limit, remaining, reset, retry, HOUR)


def told(table: BatchTable, key: str, limit: Limit, outcome: Outcome, cost: int, now: int, interval: int = 5) -> None:
    """One request's store call on `key`, alone in flight: sent, answered, learnt."""
    table.sending(key, limit, interval, now)
    table.learn(key, limit, interval, outcome, cost, now)
    table.finish(key)


def known(table: BatchTable, limit: Limit, remaining: int, now: int, key: str = "k", interval: int = 5) -> None:
    told(table, key, limit, answer(limit, remaining), 1, now, interval)


def admit(table: BatchTable, limit: Limit, now: int, cost: int = 1, key: str = "k"):
    d = table.decide(key, limit, cost, now)
    if d.route is Route.LOCAL:
        table.confirm(d, now)
    return d


# -- the table's routes -------------------------------------------------------------------------

def test_an_unknown_key_asks_the_store_then_decides_locally():
    t, lim = BatchTable(), fixed(10)
    assert t.decide("k", lim, 1, T0).route is Route.STORE
    known(t, lim, 9, T0)                       # the store admitted the first request: 9 left
    d = t.decide("k", lim, 2, T0 + 1)
    assert d.route is Route.LOCAL and d.outcome is not None
    assert (d.outcome.allowed, d.outcome.remaining, d.outcome.limit) == (True, 7, 10)
    assert t.get("k").reserved == 2 and t.get("k").pending == 0
    t.confirm(d, T0 + 1)
    assert t.get("k").reserved == 0 and t.get("k").pending == 2


def test_local_admissions_stop_at_the_remaining_last_seen_and_never_ask_the_store_twice():
    t, lim = BatchTable(), fixed(10)
    known(t, lim, 4, T0)
    routes = [admit(t, lim, T0 + i).route for i in range(7)]
    # 4 admitted here; then rejected here, not asked of the store (it has not seen those 4)
    assert routes == [Route.LOCAL] * 4 + [Route.OVER] * 3
    over = t.decide("k", lim, 1, T0 + 9)
    assert over.outcome is not None and not over.outcome.allowed and over.outcome.remaining == 0
    assert over.outcome.retry_after_ms == HOUR - 9          # a fixed window's: its end


def test_a_key_spent_while_the_store_is_down_goes_to_its_fail_open_answer():
    t, lim = BatchTable(), bucket(10)
    known(t, lim, 2, T0)
    admit(t, lim, T0)
    admit(t, lim, T0)
    assert t.decide("k", lim, 1, T0 + 1).route is Route.OVER
    # the store not answering: the last known state of a bucket would never refill, so the
    # request goes to the store, and the rule's fail-open answer (local limiter) applies
    assert t.decide("k", lim, 1, T0 + 1, store_ok=False).route is Route.STORE


def test_a_spent_key_with_nothing_unsynced_asks_the_store():
    t, lim = BatchTable(), fixed(10)
    known(t, lim, 1, T0)
    admit(t, lim, T0)
    [f], _ = t.take(T0 + 5)
    assert t.decide("k", lim, 1, T0 + 6).route is Route.OVER       # in flight: not synced yet
    assert t.settle(f, answer(lim, 0), 1, T0 + 7) == 0
    assert t.decide("k", lim, 1, T0 + 8).route is Route.STORE


def test_a_released_reservation_is_never_charged():
    t, lim = BatchTable(), fixed(10)
    known(t, lim, 3, T0)
    d = t.decide("k", lim, 3, T0)
    assert t.decide("k", lim, 1, T0).route is Route.OVER      # reserved units count
    t.release(d)
    assert t.get("k").reserved == 0
    assert [f.units for f in t.take(T0 + 10, force=True)[0]] == [0]     # only a refresh: nothing to charge
    assert t.decide("k", lim, 3, T0 + 1).route is Route.LOCAL


def test_a_store_rejection_is_remembered_until_its_retry_after_for_requests_as_costly():
    t, lim = BatchTable(), bucket(10)
    told(t, "k", lim, answer(lim, 0, allowed=False, retry=300), 2, T0)
    d = t.decide("k", lim, 2, T0 + 100)
    assert d.route is Route.CACHED and d.outcome is not None and d.outcome.retry_after_ms == 200
    assert t.decide("k", lim, 1, T0 + 100).route is Route.STORE    # cheaper: may fit
    assert t.decide("k", lim, 2, T0 + 300).route is Route.STORE    # retry time reached


def test_a_stale_state_asks_the_store_unless_the_store_is_down():
    t, lim = BatchTable(grace_ms=20), fixed(10)
    known(t, lim, 9, T0, interval=5)
    stale = T0 + 4 * 5 + 20 + 1
    d = t.decide("k", lim, 1, stale - 1)
    assert d.route is Route.LOCAL
    t.release(d)
    assert t.decide("k", lim, 1, stale).route is Route.STORE
    # the store not answering: the last known state goes on deciding (fail-open), however old
    assert t.decide("k", lim, 1, stale + HOUR // 2, store_ok=False).route is Route.LOCAL


def test_a_new_window_asks_the_store():
    t, lim = BatchTable(), fixed(10, "minute")
    known(t, lim, 0, T0 + 59_000)
    assert t.decide("k", lim, 1, T0 + 59_999).route is Route.STORE    # spent, nothing unsynced
    known(t, lim, 5, T0 + 59_999)
    assert t.decide("k", lim, 1, T0 + 60_000).route is Route.STORE    # the next minute


def test_a_different_limit_on_the_same_key_asks_the_store():
    t = BatchTable()
    gold, free = fixed(100, name="r"), fixed(10, name="r")
    known(t, gold, 99, T0)
    assert t.decide("k", free, 1, T0).route is Route.STORE
    assert t.decide("k", Limit("r", Algorithm.FIXED_WINDOW, 100, Period.parse("hour")), 1, T0).route is Route.LOCAL


def test_local_outcomes_carry_the_headers_numbers():
    t = BatchTable()
    tb = bucket(100)            # 100 tokens, refilled at 100/s
    known(t, tb, 100, T0)
    d = admit(t, tb, T0, cost=30)
    assert d.outcome == Outcome("tb", True, 100, 70, 300, 0, HOUR)   # 30 tokens: 300 ms to full again
    sw = sliding(60)
    told(t, "s", sw, Outcome("sw", True, 60, 60, 0, 0, 60_000), 1, T0 + 1_000)
    d = admit(t, sw, T0 + 1_000, key="s")
    assert d.outcome is not None and d.outcome.remaining == 59
    assert d.outcome.reset_after_ms == 59_000 + 60_000       # as the algorithm says: this window and the next
    fw = fixed(5, "minute")
    known(t, fw, 1, T0 + 10_000, key="f")
    admit(t, fw, T0 + 10_000, key="f")
    over = t.decide("f", fw, 1, T0 + 10_001)
    assert over.outcome is not None and over.outcome.reset_after_ms == 49_999
    tb_over = BatchTable()
    known(tb_over, tb, 1, T0)
    admit(tb_over, tb, T0)
    o = tb_over.decide("k", tb, 3, T0).outcome
    assert o is not None and not o.allowed and o.retry_after_ms == 30      # 3 tokens at 100/s


# -- the flushes ------------------------------------------------------------------------------

def test_take_moves_due_pending_units_in_flight_one_flush_per_key():
    t, lim = BatchTable(), fixed(100)
    for key in ("a", "b"):
        known(t, lim, 100, T0, key=key)
    for _ in range(3):
        admit(t, lim, T0, key="a")
    admit(t, lim, T0 + 3, key="b")
    assert t.pending_units == 4
    flushes, dropped = t.take(T0 + 3)
    assert sorted((f.entry.key, f.units) for f in flushes) == [("a", 3), ("b", 1)] and dropped == {}
    assert t.get("a").inflight == 3 and t.get("a").pending == 0
    admit(t, lim, T0 + 4, key="a")
    assert t.take(T0 + 5) == ([], {})                # due again one interval after its flush
    assert [f.units for f in t.take(T0 + 8)[0]] == [1]
    f = flushes[0]
    assert t.settle(f, answer(lim, 97), 3, T0 + 9) == 0
    e = t.get("a")
    assert (e.inflight, e.remaining, e.available) == (1, 97, 96)


def test_keys_used_lately_with_nothing_to_send_are_refreshed_once_per_interval():
    t, lim = BatchTable(grace_ms=20), fixed(100)
    known(t, lim, 100, T0)
    admit(t, lim, T0)
    [f], _ = t.take(T0 + 5)
    t.settle(f, answer(lim, 99), 1, T0 + 6)
    assert t.take(T0 + 8) == ([], {})            # synced 2 ms ago
    [r], _ = t.take(T0 + 11)
    assert r.units == 0 and t.get("k").inflight == 0
    t.settle(r, answer(lim, 60), 0, T0 + 12)     # the others charged 39 meanwhile
    assert t.get("k").remaining == 60 and t.take(T0 + 13) == ([], {})
    t.release(t.decide("k", lim, 1, T0 + 13))   # used again (a request another rule rejected)
    assert t.take(T0 + 16) == ([], {})            # synced at 12: the next refresh is due at 17
    [r], _ = t.take(T0 + 17)
    t.settle(r, answer(lim, 60), 0, T0 + 17)
    assert t.take(T0 + 13 + 3 * 5 + 1) == ([], {})      # unused for 3 intervals: left alone
    told(t, "k", lim, answer(lim, 0, allowed=False, retry=1_000), 1, T0 + 100)
    t.decide("k", lim, 1, T0 + 101)
    assert t.take(T0 + 110) == ([], {})          # a known rejection: nothing to learn before its retry


def test_a_refused_flush_reports_the_over_admission():
    t, lim = BatchTable(), fixed(10)
    known(t, lim, 10, T0)
    for _ in range(6):
        admit(t, lim, T0)
    [f], _ = t.take(T0 + 5)
    # another replica took 8 meanwhile: 2 remained, the service charged those 2
    refused = t.settle(f, answer(lim, 0), 2, T0 + 6)
    assert refused == 4 and t.get("k").remaining == 0
    assert t.decide("k", lim, 1, T0 + 7).route is Route.STORE


def test_a_failed_flush_keeps_its_units_capped_at_the_limit():
    t, lim = BatchTable(), fixed(5)
    known(t, lim, 5, T0)
    for _ in range(4):
        admit(t, lim, T0)
    [f], _ = t.take(T0 + 5)
    admit(t, lim, T0 + 6)
    assert t.failed(f, T0 + 7) == 0
    assert (t.get("k").pending, t.get("k").inflight) == (5, 0)
    [f2], _ = t.take(T0 + 12)
    assert f2.units == 5
    f3 = type(f2)(f2.entry, lim, 9, f2.wid)       # more than the limit can ever take
    assert t.failed(f3, T0 + 13) == 4 and t.get("k").pending == 5


def test_an_answer_that_ran_before_a_flush_never_hides_its_units():
    """Redis may run a request's call sent after a flush before it (another connection): its
    answer does not count the flush's units, and must not replace what the flush said."""
    t, lim = BatchTable(), fixed(100)
    known(t, lim, 100, T0)
    for _ in range(10):
        admit(t, lim, T0)
    [f], _ = t.take(T0 + 5)                      # 10 units in flight
    t.sending("k", lim, 5, T0 + 6)               # a request's call, sent after the flush...
    t.settle(f, answer(lim, 90), 10, T0 + 7)     # the flush answers first: 90 left
    t.learn("k", lim, 5, answer(lim, 99), 1, T0 + 8)   # ...but ran before it: 99 "left"
    t.finish("k")
    e = t.get("k")
    assert (e.remaining, e.inflight, e.available) == (90, 0, 90)
    # alone in flight again, an answer is the latest word (a bucket's refill comes back so)
    known(t, lim, 95, T0 + 9)
    assert t.get("k").remaining == 95


def test_concurrent_first_calls_keep_the_smallest_remaining():
    t, lim = BatchTable(), fixed(100)
    for _ in range(3):
        t.sending("k", lim, 5, T0)               # three requests ask the store at once
    assert t.decide("k", lim, 1, T0).route is Route.STORE       # nothing known yet
    for left in (97, 99, 98):                    # answered in another order than run
        t.learn("k", lim, 5, answer(lim, left), 1, T0 + 1)
        t.finish("k")
    e = t.get("k")
    assert (e.remaining, e.calls, e.overlapped) == (97, 0, False)
    known(t, lim, 96, T0 + 2)
    assert t.get("k").remaining == 96
    t.sending("k", lim, 5, T0 + 3)
    t.finish("k")                                # a failed call only counts back
    assert t.get("k").calls == 0


def test_a_new_window_answer_replaces_the_last_ones():
    t, lim = BatchTable(), fixed(100, "minute")
    known(t, lim, 3, T0 + 59_000)
    t.sending("k", lim, 5, T0 + 59_999)
    t.sending("k", lim, 5, T0 + 59_999)
    t.learn("k", lim, 5, answer(lim, 99), 1, T0 + 60_001)      # overlapped, but a new window
    assert t.get("k").remaining == 99


def test_pending_units_across_a_window_boundary():
    t = BatchTable()
    fw, sw, tb = fixed(100, "minute"), sliding(100, "minute"), bucket(100)
    for key, lim in (("f", fw), ("s", sw), ("b", tb)):
        known(t, lim, 100, T0 + 59_990, key=key)
        admit(t, lim, T0 + 59_990, key=key)
    flushes, dropped = t.take(T0 + 60_001)
    # a fixed window's units count in the window that is over: dropped; the others are charged
    assert dropped == {"fw": 1} and sorted(f.entry.key for f in flushes) == ["b", "s"]
    known(t, sw, 100, T0 + 60_001, key="s2")
    admit(t, sw, T0 + 60_001, key="s2")
    _, dropped = t.take(T0 + 120_000)
    assert dropped == {}                         # the next window: charged there
    admit(t, sw, T0 + 120_000, key="s")
    t2 = BatchTable()
    known(t2, sw, 100, T0, key="s")
    admit(t2, sw, T0, key="s")
    assert t2.take(T0 + 120_000)[1] == {"sw": 1}                # two windows later: dropped


# -- bounds and housekeeping ------------------------------------------------------------------

def test_the_table_is_bounded_and_idle_keys_go():
    t, lim = BatchTable(max_keys=3, idle_ms=1_000), fixed(100)
    for i, key in enumerate("abc"):
        known(t, lim, 100, T0 + i, key=key)
    admit(t, lim, T0 + 5, key="a")               # "a" has pending units: it stays
    known(t, lim, 100, T0 + 10, key="d")         # full: the least recently used idle key goes... none idle yet
    assert "d" in t and "b" not in t and len(t) == 3
    t2 = BatchTable(max_keys=2, idle_ms=1_000)
    for key in "ab":
        known(t2, lim, 100, T0, key=key)
        admit(t2, lim, T0, key=key)
    known(t2, lim, 100, T0 + 1, key="c")         # full of keys with pending units: "c" stays per-request
    assert "c" not in t2 and t2.decide("c", lim, 1, T0 + 1).route is Route.STORE
    assert t2.evict(T0 + 5_000) == 0            # pending units are never evicted
    for f in t2.take(T0 + 5_000)[0]:
        t2.settle(f, answer(lim, 99), 1, T0 + 5_001)
    assert t2.evict(T0 + 5_001) == 2 and len(t2) == 0          # synced, and unused for 5 s


def test_evict_keeps_remembered_rejections_and_recent_keys():
    t, lim = BatchTable(idle_ms=1_000), fixed(10)
    told(t, "over", lim, answer(lim, 0, allowed=False, retry=10_000), 1, T0)
    known(t, lim, 5, T0, key="idle")
    known(t, lim, 5, T0 + 900, key="recent")
    assert t.evict(T0 + 1_000) == 1 and "over" in t and "recent" in t and "idle" not in t


def test_forget_voids_a_key_and_its_pending_units():
    t, lim = BatchTable(), fixed(10)
    known(t, lim, 10, T0)
    admit(t, lim, T0)
    t.forget("k")
    assert "k" not in t and t.take(T0 + 100, force=True) == ([], {})


def test_adopt_moves_unchanged_rules_keys_with_their_units():
    old, new, lim = BatchTable(), BatchTable(), fixed(10)
    known(old, lim, 10, T0, key="keep")
    known(old, fixed(10, name="gone"), 10, T0, key="drop")
    admit(old, lim, T0, key="keep")
    moved = new.adopt(old, lambda e: 7 if e.limit.name == "fw" else None)
    assert moved == 1 and "keep" in new and "keep" not in old and "drop" in old
    assert new.get("keep").interval_ms == 7 and new.pending_units == 1


def test_table_arguments_are_checked():
    with pytest.raises(ValueError):
        BatchTable(max_keys=0)


# -- the bound, against the reference algorithms ----------------------------------------------

class Fleet:
    """R replicas, each with its own BatchTable, sharing one reference store (check_and_charge
    on explicit state, as the memory store and the Lua script run it)."""

    def __init__(self, limit: Limit, replicas: int, interval: int = 5):
        self.limit, self.interval = limit, interval
        self.tables = [BatchTable() for _ in range(replicas)]
        self.state: dict | None = None
        self.admitted = 0
        self.local_admits = [0] * replicas
        self.refused = 0

    def store(self, units: int, now: int) -> tuple[bool, Outcome]:
        ok, [charge] = check_and_charge([(self.limit, self.state, units)], now)
        if ok:
            self.state = charge.state
        return ok, charge.outcome

    def request(self, i: int, now: int) -> bool:
        t = self.tables[i]
        d = t.decide("k", self.limit, 1, now)
        if d.route is Route.LOCAL:
            t.confirm(d, now)
            self.admitted += 1
            self.local_admits[i] += 1
            return True
        if d.route is not Route.STORE:
            return False
        ok, o = self.store(1, now)
        told(t, "k", self.limit, o, 1, now, self.interval)
        self.admitted += ok
        return ok

    def sync(self, i: int, now: int) -> None:
        t = self.tables[i]
        for f in t.take(now, force=True)[0]:
            if not f.units:                      # a refresh: read, charge nothing
                [o] = peek([(self.limit, self.state, 1)], now)
                t.settle(f, o, 0, now)
                continue
            ok, o = self.store(f.units, now)
            charged = f.units if ok else 0
            if not ok and 0 < min(o.remaining, f.units - 1):
                left = min(o.remaining, f.units - 1)
                ok2, o = self.store(left, now)
                charged = left if ok2 else 0
            self.refused += t.settle(f, o, charged, now)


@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("seed", range(5))
def test_over_admission_stays_within_the_documented_bound(replicas, seed):
    rng = random.Random(seed)
    n = 50
    fleet = Fleet(fixed(n), replicas)
    now = T0
    for _ in range(4 * n):
        now += 1
        fleet.request(rng.randrange(replicas), now)
        if rng.random() < 0.1:
            fleet.sync(rng.randrange(replicas), now)
    for i in range(replicas):
        fleet.sync(i, now + 1)
    over = fleet.admitted - n
    assert over == fleet.refused                 # every unit past the limit is a refused one
    if replicas == 1:
        assert over == 0                         # alone, a replica subtracts its own units
    # each replica over-admits at most what it admitted locally and the remaining it saw
    assert over <= sum(min(a, n) for a in fleet.local_admits)
    assert over <= (replicas - 1) * n
    assert fleet.admitted >= n                   # never under-admits: 4n requests were offered
    # once synced, every replica sees the key spent: its requests go to the store, which says no
    for i in range(replicas):
        assert not fleet.request(i, now + 2)
        assert fleet.tables[i].decide("k", fleet.limit, 1, now + 3).route is Route.CACHED


def test_a_saturated_bucket_is_exact_once_synced():
    """At a bucket's refill rate, replicas that know the key spent ask the store per request:
    the fleet admits the refill, not R times it."""
    lim = Limit.from_rule("tb", "token_bucket", 1_000, "second")   # 1 token per ms, burst 1000
    fleet = Fleet(lim, 3)
    now = T0
    for i in range(3):                           # spend the burst first, all synced
        fleet.request(i, now)
    fleet.state = {"l": 0, "t": now, "s": lim.scale}
    for i in range(3):
        fleet.sync(i, now)
        told(fleet.tables[i], "k", lim, fleet.store(1, now)[1], 1, now)
    start = fleet.admitted
    for ms in range(1, 501):
        now = T0 + ms
        for i in range(3):
            for _ in range(5):                   # 15 requests offered per ms, 1 token refilled
                fleet.request(i, now)
        if ms % 5 == 0:
            for i in range(3):
                fleet.sync(i, now)
    for i in range(3):
        fleet.sync(i, now)
    assert fleet.admitted - start <= 500 + fleet.refused
    assert fleet.refused <= 3 * 5                # a few units per replica, not 2x the refill
    assert fleet.admitted - start >= 490


# -- RateLimiter over a store -----------------------------------------------------------------

POLICY = types.SimpleNamespace(name="api")


def rules_cfg(*rules: dict, **top: Any) -> cfgmod.RateLimits:
    return cfgmod.RateLimits.model_validate({"rules": list(rules), **top})


def hot(limit: int = 20, **extra: Any) -> dict:
    return {"name": "hot", "count_by": ["route"], "algorithm": "fixed_window", "limit": limit, "period": "hour",
            "sync": {"mode": "batched", "interval_ms": 5}, **extra}


def per_user(limit: int, **extra: Any) -> dict:
    return {"name": "per-user", "count_by": ["user"], "algorithm": "fixed_window", "limit": limit,
            "period": "hour", **extra}


class CountingStore(MemoryStore):
    """The memory store, counting rate-limit calls and failing them while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.down = False

    async def rate_limit(self, checks, now_ms=None):
        self.calls += 1
        if self.down:
            raise StoreError("memory rate_limit: down for the test", transient=True)
        return await super().rate_limit(checks, now_ms)


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(body())


async def ask(lim: RateLimiter, user: str = "u1", route: str = "r1") -> int:
    decision, _ = await lim.decide(Request("GET", "/x", {}, route=route), POLICY, Principal("jwt", user))
    return 200 if decision is None else decision.status


async def used(store: MemoryStore, lim: RateLimiter, rule: str, values: list[str]) -> int:
    return (await lim.usage(rule, values)).used


def sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_batched_rule_admits_exactly_its_limit_on_one_replica_with_few_store_calls():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(20)), store)
        local_before = sample("gateway_ratelimit_batch_decisions_total", rule="hot", path="local")
        statuses = [await ask(lim) for _ in range(30)]
        assert statuses == [200] * 20 + [429] * 10
        assert store.calls == 1                  # the first request; the rest decided here
        await lim.flush()
        assert await used(store, lim, "hot", ["r1"]) == 20
        assert sample("gateway_ratelimit_batch_decisions_total", rule="hot", path="local") - local_before == 19
        assert await ask(lim) == 429             # synced: spent, asked of the store, remembered
        await lim.close()
    run(body)


def test_the_flusher_syncs_every_interval_and_stops_when_closed():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(1_000)), store)
        for _ in range(10):
            assert await ask(lim) == 200
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while await used(store, lim, "hot", ["r1"]) != 10:     # polled: the flusher's own interval
            assert loop.time() < deadline, "the flusher never synced"
            await asyncio.sleep(0.005)
        flusher = lim._flusher
        assert flusher is not None and not flusher.done()
        await ask(lim)
        await lim.close()                        # a last flush, then the task ends
        assert flusher.done() and await used(store, lim, "hot", ["r1"]) == 11
        assert await ask(lim) == 200             # after close: per request, straight to the store
        assert await used(store, lim, "hot", ["r1"]) == 12
    run(body)


def test_mixed_rules_a_per_request_rejection_charges_no_batched_unit():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(100), per_user(3)), store)
        statuses = [await ask(lim) for _ in range(6)]
        assert statuses == [200] * 3 + [429] * 3
        await lim.flush()
        assert await used(store, lim, "hot", ["r1"]) == 3     # only the admitted requests
        assert await used(store, lim, "per-user", ["u1"]) == 3
        assert lim.batch.get(next(iter(lim.batch._entries))).reserved == 0
        await lim.close()
    run(body)


def test_mixed_rules_a_batched_rejection_needs_no_store_call_and_charges_nothing():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(2), per_user(100)), store)
        assert [await ask(lim, user=f"u{i}") for i in range(2)] == [200, 200]
        calls = store.calls
        decision, verdict = await lim.decide(Request("GET", "/x", {}, route="r1"), POLICY, Principal("jwt", "u9"))
        assert decision is not None and decision.status == 429 and store.calls == calls
        assert verdict is not None and verdict.rejected_by == ("hot",)
        headers = dict(verdict.headers())
        assert headers["x-ratelimit-remaining"] == "0" and int(headers["retry-after"]) >= 1
        assert await used(store, lim, "per-user", ["u9"]) == 0
        await lim.close()
    run(body)


def test_headers_of_an_admitted_request_come_from_the_local_state():
    async def body():
        lim = RateLimiter(rules_cfg(hot(10)), CountingStore())
        await ask(lim)
        _, verdict = await lim.decide(Request("GET", "/x", {}, route="r1"), POLICY, Principal("jwt", "u1"))
        assert verdict is not None and dict(verdict.headers())["x-ratelimit-remaining"] == "8"
        await lim.close()
    run(body)


def test_a_shadow_batched_rule_counts_and_never_rejects():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(3, mode="shadow")), store)
        before = sample("gateway_ratelimit_decisions_total", rule="hot", result="shadow_over_limit")
        assert [await ask(lim) for _ in range(6)] == [200] * 6
        assert sample("gateway_ratelimit_decisions_total", rule="hot", result="shadow_over_limit") - before == 3
        await lim.flush()
        assert await used(store, lim, "hot", ["r1"]) == 3
        await lim.close()
    run(body)


def test_store_down_during_a_flush_keeps_the_units_and_decides_on_the_last_known_state():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(50), store_timeout_ms=20), store)
        errors = sample("gateway_ratelimit_batch_flushes_total", result="error")
        assert await ask(lim) == 200
        store.down = True
        assert [await ask(lim) for _ in range(9)] == [200] * 9
        await lim.flush()                        # fails: the 9 units stay pending
        assert sample("gateway_ratelimit_batch_flushes_total", result="error") - errors == 1
        assert lim.batch.pending_units == 9 and not lim._store_ok
        assert [await ask(lim) for _ in range(5)] == [200] * 5        # fail-open on what was known
        assert lim.batch.pending_units == 14
        store.down = False
        await lim.flush()
        assert lim._store_ok and lim.batch.pending_units == 0
        assert await used(store, lim, "hot", ["r1"]) == 15
        await lim.close()
    run(body)


def test_a_refused_flush_saturates_the_store_and_counts_the_over_admission():
    async def body():
        store = CountingStore()
        cfg = rules_cfg(hot(10))
        a, b = RateLimiter(cfg, store), RateLimiter(cfg, store)        # two replicas
        assert await ask(a) == 200 and await ask(b) == 200             # both learn: 9 and 8 left
        admitted = 2
        for r in (a, b):
            for _ in range(9):
                admitted += await ask(r) == 200
        refused = sample("gateway_ratelimit_batch_units_total", rule="hot", result="refused")
        await a.flush()
        await b.flush()
        over = sample("gateway_ratelimit_batch_units_total", rule="hot", result="refused") - refused
        assert admitted - 10 == over > 0
        assert await used(store, a, "hot", ["r1"]) == 10              # saturated, not under-counted
        await a.flush()                          # a refresh: "a" synced before "b" saturated the key
        assert await ask(a) == 429 and await ask(b) == 429
        await a.close()
        await b.close()
    run(body)


def test_one_flush_charges_every_key_in_one_store_call():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(100)), store)
        routes = [f"r{i}" for i in range(5)]
        for route in routes:
            for _ in range(3):
                assert await ask(lim, route=route) == 200
        calls = store.calls
        await lim.flush()
        assert store.calls - calls == 1          # five keys' pending units, one request of the store
        for route in routes:
            assert await used(store, lim, "hot", [route]) == 3
        await lim.close()
    run(body)


def test_a_flush_with_one_key_at_its_limit_charges_the_others_and_saturates_it():
    async def body():
        store = CountingStore()
        a, b = RateLimiter(rules_cfg(hot(10)), store), RateLimiter(rules_cfg(hot(10)), store)
        for route in ("full", "room"):
            assert await ask(a, route=route) == 200          # a knows both keys: 9 left
        assert [await ask(b, route="full") for _ in range(9)] == [200] * 9    # b spends "full"
        await b.flush()
        for route in ("full", "room"):
            assert await ask(a, route=route) == 200          # a admits on what it last saw
        refused = sample("gateway_ratelimit_batch_units_total", rule="hot", result="refused")
        saturated = sample("gateway_ratelimit_batch_flushes_total", result="saturated")
        await a.flush()                          # one call refused as a whole, then key by key
        assert await used(store, a, "hot", ["full"]) == 10 and await used(store, a, "hot", ["room"]) == 2
        assert sample("gateway_ratelimit_batch_units_total", rule="hot", result="refused") - refused == 1
        assert sample("gateway_ratelimit_batch_flushes_total", result="saturated") - saturated == 1
        assert await ask(a, route="full") == 429 and await ask(a, route="room") == 200
        await a.close()
        await b.close()
    run(body)


def test_a_reload_carries_unchanged_rules_keys_over_and_flushes_the_rest():
    async def body():
        store = CountingStore()
        old = RateLimiter(rules_cfg(hot(100), {**per_user(100), "name": "other",
                                               "sync": {"mode": "batched", "interval_ms": 50}}), store)
        for _ in range(5):
            await ask(old)
        new = RateLimiter(rules_cfg(hot(100)), store)
        assert new.adopt(old) == 1               # "hot" unchanged; "other" is gone
        assert new.batch.pending_units == 4      # the units admitted locally came along
        await old.close()                        # flushes what it kept: "other"'s units
        assert await used(store, old, "other", ["u1"]) == 5
        await new.flush()
        assert await used(store, new, "hot", ["r1"]) == 5
        changed = RateLimiter(rules_cfg(hot(200)), store)
        assert changed.adopt(new) == 0           # a changed limit starts from the store again
        await new.close()
        await changed.close()
    run(body)


def test_a_runtime_reload_hands_the_keys_over_and_its_close_flushes():
    """extproc.app.Runtime: a reload builds the new limiter from the old one (adopt), closing
    the old runtime flushes what it kept, and closing the last one flushes the rest."""
    from extproc.app import Runtime

    def config(limit: int) -> cfgmod.Config:
        return cfgmod.Config.model_validate({"rate_limits": {"rules": [
            {**hot(limit), "sync": {"mode": "batched", "interval_ms": 1000}}]}})

    async def body():
        store = CountingStore()
        old = Runtime.build(config(100), store=store)
        for _ in range(5):
            assert await ask(old.ratelimiter) == 200
        new = Runtime.build(config(100), previous=old, store=store)
        assert new.ratelimiter.batch.pending_units == 4 and old.ratelimiter.batch.pending_units == 0
        await old.close()
        assert await ask(new.ratelimiter) == 200
        changed = Runtime.build(config(200), previous=new, store=store)      # a changed rule: not adopted
        await new.close()                        # flushes its 5 pending units
        assert await used(store, new.ratelimiter, "hot", ["r1"]) == 6
        await changed.close()
    run(body)


def test_an_admin_reset_forgets_the_local_state():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(hot(3)), store)
        assert [await ask(lim) for _ in range(4)] == [200, 200, 200, 429]
        await lim.flush()
        await lim.reset("hot", ["r1"])
        assert len(lim.batch) == 0 and await ask(lim) == 200
        await lim.close()
    run(body)


def test_without_batched_rules_nothing_changes():
    async def body():
        store = CountingStore()
        lim = RateLimiter(rules_cfg(per_user(2)), store)
        assert [await ask(lim) for _ in range(3)] == [200, 200, 429]
        assert store.calls == 3 and lim._flusher is None
        await lim.close()
    run(body)


def test_concurrent_requests_on_two_replicas_stay_within_the_bound():
    async def body():
        store = CountingStore()
        cfg = rules_cfg(hot(30))
        replicas = [RateLimiter(cfg, store) for _ in range(2)]
        refused = sample("gateway_ratelimit_batch_units_total", rule="hot", result="refused")
        statuses = await asyncio.gather(*(ask(replicas[i % 2]) for i in range(50)))
        for _ in range(2):                       # the second round: each learns the other's units
            for r in replicas:
                await r.flush()
        admitted = statuses.count(200)
        over = sample("gateway_ratelimit_batch_units_total", rule="hot", result="refused") - refused
        assert 30 <= admitted <= 30 + 30 and admitted - 30 == over
        assert await ask(replicas[0]) == 429 and await ask(replicas[1]) == 429
        for r in replicas:
            await r.close()
    run(body)

