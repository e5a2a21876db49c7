"""The pure rate-limit core: each algorithm at its exact boundaries, the sliding window's error
bound, the verdict over several rules, the answer headers, and the deny cache.

Time is an argument (Unix ms): nothing here sleeps or reads a clock. `Sim` drives the
reference algorithms the way a store does (state per key, dropped when its TTL ends), which is
also how the memory store runs them and what the Lua script is held to.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
import random
from fractions import Fraction

import http_sfv
import pytest

from extproc.core.ratelimit import (
    PPM,
    Algorithm,
    DenyCache,
    Limit,
    Outcome,
    Period,
    Verdict,
    check_and_charge,
    policy_field,
    refund,
    refunded,
    retry_after_seconds,
    service_limit_field,
)

T0 = 1_767_225_600_000          # 2026-01-01T00:00:00Z, a minute/hour/day/month boundary
MIN = 60_000


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) * 1000


def fixed(limit: int, period: str | int = "minute", name: str = "fw", cost: int = 1) -> Limit:
    return Limit(name, Algorithm.FIXED_WINDOW, limit, Period.parse(period), cost)


def sliding(limit: int, period: str | int = "minute", name: str = "sw", cost: int = 1) -> Limit:
    return Limit(name, Algorithm.SLIDING_WINDOW, limit, Period.parse(period), cost)


def bucket(capacity: int, refill_per_second: Fraction | float | int | str | None = None,
           period: str | int = "minute", name: str = "tb") -> Limit:
    return Limit(name, Algorithm.TOKEN_BUCKET, capacity, Period.parse(period),
                 refill_per_second=refill_per_second)


class Sim:
    """The reference algorithms over explicit state, with each state dropped when its TTL ends
    (as a store would; `expire=False` keeps states forever to show TTLs are only cleanup)."""

    def __init__(self, expire: bool = True):
        self.expire = expire
        self.states: dict[str, dict[str, int]] = {}
        self.expiry: dict[str, int] = {}

    def request(self, rules: list[tuple[str, Limit, int]], now: int) -> list[Outcome]:
        states = []
        for key, _, _ in rules:
            if self.expire and key in self.expiry and now >= self.expiry[key]:
                del self.states[key], self.expiry[key]
            states.append(self.states.get(key))
        admitted, charges = check_and_charge([(lim, st, cost) for (_, lim, cost), st in zip(rules, states, strict=True)], now)
        if admitted:
            for (key, _, _), charge in zip(rules, charges, strict=True):
                assert charge.state is not None and charge.ttl_ms >= 1
                self.states[key], self.expiry[key] = charge.state, now + charge.ttl_ms
        return [c.outcome for c in charges]

    def hit(self, limit: Limit, now: int, cost: int | None = None, key: str | None = None) -> Outcome:
        key = limit.name if key is None else key
        return self.request([(key, limit, limit.cost if cost is None else cost)], now)[0]

    def burst(self, limit: Limit, now: int, n: int) -> int:
        return sum(self.hit(limit, now).allowed for _ in range(n))


# -- periods ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("second", 1), ("minute", 60), ("hour", 3600), ("day", 86_400), ("30s", 30), ("5m", 300),
    ("2h", 7200), ("7d", 604_800), (" Minute ", 60), (10, 10)])
def test_period_parse(text: str | int, seconds: int) -> None:
    assert Period.parse(text) == Period(seconds)


def test_period_parse_month_and_refusals() -> None:
    assert Period.parse("month") is Period.MONTH and Period.MONTH.is_month
    assert (Period.MONTH.code, Period(60).code, str(Period(60)), str(Period.MONTH)) == ("1mo", "60s", "60s", "month")
    for bad in ("week", "0s", "-5s", "1.5m", "", 0, -1, True, 1.5, "101d"):
        with pytest.raises(ValueError):
            Period.parse(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("period", "now", "start", "end"), [
    ("second", T0 + 999, T0, T0 + 1000),
    ("second", T0 + 1000, T0 + 1000, T0 + 2000),
    ("minute", T0 - 1, T0 - MIN, T0),
    ("minute", T0, T0, T0 + MIN),
    ("hour", T0 + 3_599_999, T0, T0 + 3_600_000),
    ("day", utc_ms(2026, 3, 7, 23, 59, 59), utc_ms(2026, 3, 7), utc_ms(2026, 3, 8)),
    ("7s", 7000 * 5 + 6999, 35_000, 42_000),          # N-second windows are aligned to the epoch
])
def test_fixed_length_windows_are_epoch_aligned(period: str, now: int, start: int, end: int) -> None:
    wid, s, e = Period.parse(period).window(now)
    assert (s, e) == (start, end)
    assert wid == now // (end - start)


@pytest.mark.parametrize(("year", "month"), [(2026, 1), (2024, 2), (2023, 2), (2100, 2), (2000, 2),
                                             (2025, 12), (1970, 1), (2026, 4)])
def test_month_windows_follow_the_utc_calendar(year: int, month: int) -> None:
    start = utc_ms(year, month, 1)
    days = calendar.monthrange(year, month)[1]
    end = start + days * 86_400_000
    for now in (start, start + 1, end - 1):
        wid, s, e = Period.MONTH.window(now)
        assert (s, e) == (start, end)
        assert wid == year * 12 + month - 1
    assert Period.MONTH.window(end)[0] == year * 12 + month     # consecutive ids across the year end


# -- rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"limit": -1}, "limit"),
    ({"cost": 0}, "cost"),
    ({"name": ""}, "rule name"),
    ({"name": "has space"}, "rule name"),
    ({"name": "é"}, "rule name"),
    ({"limit": 4 * 10**9}, "below"),
    ({"refill_per_second": 5}, "token bucket only"),
])
def test_window_limits_are_validated(kwargs: dict, message: str) -> None:
    args = {"name": "r", "algorithm": Algorithm.FIXED_WINDOW, "limit": 5, "period": Period(60)} | kwargs
    with pytest.raises(ValueError, match=message):
        Limit(**args)


def test_token_bucket_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="calendar month"):
        bucket(10, period="month")
    with pytest.raises(ValueError, match="capacity"):
        bucket(0)
    with pytest.raises(ValueError, match="> 0"):
        bucket(10, refill_per_second=0)
    with pytest.raises(ValueError, match="exactly"):
        bucket(10**9, refill_per_second=Fraction(1, 10**9))
    with pytest.raises(ValueError):
        Limit("r", "leaky_bucket", 5, Period(60))  # type: ignore[arg-type]
    assert bucket(10, refill_per_second=0.1).refill_per_second == Fraction(1, 10)   # decimal, not binary
    assert bucket(10, refill_per_second="16.5").refill_per_second == Fraction(33, 2)
    assert bucket(10, period="month", refill_per_second=1).refill_per_second == 1    # an explicit rate
    lim = bucket(1000)        # 1000 per minute = 1/60 token per ms
    assert (lim.refill_units, lim.scale) == (1, 60)
    with pytest.raises(ValueError, match="cost"):
        lim.check_cost(0)


def test_limits_from_rules_as_operators_write_them() -> None:
    lim = Limit.from_rule("r", "token_bucket", 100, "minute", burst=20, cost=2)
    assert (lim.limit, lim.refill_per_second, lim.cost) == (20, Fraction(100, 60), 2)
    assert Limit.from_rule("r", "token_bucket", 100, "minute").limit == 100
    assert Limit.from_rule("r", "fixed_window", 5, "month") == fixed(5, "month", "r")
    with pytest.raises(ValueError, match="burst"):
        Limit.from_rule("r", "sliding_window", 5, "minute", burst=3)
    with pytest.raises(ValueError, match="monthly"):
        Limit.from_rule("r", "token_bucket", 5, "month")


def test_limits_take_strings_and_name_their_state() -> None:
    lim = Limit("per-user", "sliding_window", 100, "minute")  # type: ignore[arg-type]
    assert lim.algorithm is Algorithm.SLIDING_WINDOW and lim.period == Period(60)
    assert (lim.state_suffix, fixed(5, "month").state_suffix, bucket(5).state_suffix) == ("sw.60s", "fw.1mo", "tb")
    assert lim.script_args(3) == ("s", 100, 60_000, 0, 3)
    assert fixed(5, "month").script_args(1) == ("f", 5, 0, 0, 1)
    assert bucket(1000).script_args(2) == ("t", 1000, 1, 60, 2)


# -- fixed window -----------------------------------------------------------------------------

def test_fixed_window_admits_the_limit_up_to_the_last_millisecond() -> None:
    sim, lim = Sim(), fixed(3)
    end = T0 + MIN
    assert sim.hit(lim, end - 3) == Outcome("fw", True, 3, 2, 3, 0, MIN)
    assert sim.burst(lim, end - 2, 2) == 2
    assert sim.hit(lim, end - 1) == Outcome("fw", False, 3, 0, 1, 1, MIN)
    assert sim.hit(lim, end) == Outcome("fw", True, 3, 2, MIN, 0, MIN)     # a new window at the boundary


def test_fixed_window_rejected_costs_are_not_charged() -> None:
    sim, lim = Sim(), fixed(5)
    assert sim.hit(lim, T0, cost=3).remaining == 2
    rejected = sim.hit(lim, T0 + 10, cost=3)
    assert (rejected.allowed, rejected.remaining, rejected.retry_after_ms) == (False, 2, MIN - 10)
    assert sim.hit(lim, T0 + 20, cost=2).remaining == 0
    never = sim.hit(fixed(5, name="other"), T0, cost=6)      # above the limit: never fits
    assert (never.allowed, never.remaining, never.reset_after_ms, never.retry_after_ms) == (False, 5, 0, MIN)
    assert sim.hit(fixed(0, name="zero"), T0) == Outcome("zero", False, 0, 0, 0, MIN, MIN)


def test_a_fixed_window_admits_a_double_burst_across_its_boundary() -> None:
    sim, lim = Sim(), fixed(10)
    assert sim.burst(lim, T0 + MIN - 1, 10) == 10
    assert sim.burst(lim, T0 + MIN, 10) == 10          # 20 within 1 ms: the fixed window's flaw


def test_monthly_fixed_window_resets_at_the_first_instant_of_next_month() -> None:
    sim, lim = Sim(), fixed(2, "month")
    last = utc_ms(2024, 2, 29, 23, 59, 59) + 999           # leap day, last millisecond
    assert sim.burst(lim, last - 5000, 2) == 2
    full = sim.hit(lim, last)
    assert (full.allowed, full.retry_after_ms, full.reset_after_ms, full.window_ms) == (False, 1, 1, 29 * 86_400_000)
    assert sim.hit(lim, last + 1) == Outcome("fw", True, 2, 1, 31 * 86_400_000, 0, 31 * 86_400_000)


# -- token bucket -----------------------------------------------------------------------------

def test_token_bucket_bursts_to_capacity_then_refills_exactly() -> None:
    sim, lim = Sim(), bucket(3, refill_per_second=1)
    assert sim.burst(lim, T0, 3) == 3
    empty = sim.hit(lim, T0)
    assert empty == Outcome("tb", False, 3, 0, 3000, 1000, 3000)
    assert sim.hit(lim, T0 + 999).retry_after_ms == 1
    assert sim.hit(lim, T0 + 1000) == Outcome("tb", True, 3, 0, 3000, 0, 3000)
    assert sim.hit(lim, T0 + 1000 + 60_000) == Outcome("tb", True, 3, 2, 1000, 0, 3000)   # never past capacity


def test_token_bucket_with_a_fractional_rate_is_exact() -> None:
    sim, lim = Sim(), bucket(1000)                    # 1000/min: one token every 60 ms, exactly
    assert sim.burst(lim, T0, 1000) == 1000
    assert sim.hit(lim, T0 + 59).retry_after_ms == 1
    assert sim.hit(lim, T0 + 60).allowed
    slow = bucket(1, refill_per_second=0.1, name="slow")
    assert sim.hit(slow, T0).allowed
    assert sim.hit(slow, T0 + 1).retry_after_ms == 9_999
    assert sim.hit(slow, T0 + 10_000).allowed


def test_token_bucket_costs() -> None:
    sim, lim = Sim(), bucket(10, refill_per_second=2)
    assert sim.hit(lim, T0, cost=7).remaining == 3
    short = sim.hit(lim, T0, cost=5)
    assert (short.allowed, short.remaining, short.retry_after_ms) == (False, 3, 1000)
    assert sim.hit(lim, T0 + 1000, cost=5).remaining == 0
    never = sim.hit(lim, T0 + 1000, cost=11)
    assert (never.allowed, never.retry_after_ms) == (False, 5000)    # above capacity: a nominal full refill


# -- sliding window ---------------------------------------------------------------------------

def test_sliding_window_blocks_the_double_burst_a_fixed_window_admits() -> None:
    sim, lim = Sim(), sliding(10)
    assert sim.burst(lim, T0 + MIN - 1000, 10) == 10      # window 1 ends with a full burst
    assert sim.burst(lim, T0 + MIN + 1000, 10) == 0       # window 2 starts: estimate 10*59/60 + 1 > 10
    assert sim.burst(lim, T0 + MIN + 30_000, 10) == 5     # half-way the old burst weighs 5
    assert sim.burst(lim, T0 + 2 * MIN + 30_000, 10) == 7  # next window: 5 * 0.5 = 2.5 counted, 7 fit


def test_sliding_window_estimate_at_exact_weights() -> None:
    sim, lim = Sim(), sliding(10)
    assert sim.burst(lim, T0 + 10, 8) == 8
    at_half = sim.hit(lim, T0 + MIN + 30_000)          # 8 * 0.5 + 1 = 5
    assert (at_half.allowed, at_half.remaining, at_half.reset_after_ms) == (True, 5, 30_000 + MIN)
    alone = sim.hit(sliding(10, name="other"), T0 + 5)
    assert alone == Outcome("other", True, 10, 9, MIN - 5 + MIN, 0, MIN)


def test_sliding_window_retry_after_is_the_first_instant_it_fits() -> None:
    lim = sliding(10)
    # in this window: 10 at the end of window 1; at e=1 s one unit fits once 10*w <= 9, w <= 0.9
    sim = Sim()
    sim.burst(lim, T0 + MIN - 1, 10)
    retry = sim.hit(lim, T0 + MIN + 1000).retry_after_ms
    assert retry == 5000
    assert not sim.hit(lim, T0 + MIN + 1000 + retry - 1).allowed
    assert sim.hit(lim, T0 + MIN + 1000 + retry).allowed
    # next window: this window is full, so it fits once 10 * w <= 9 in the next one
    sim = Sim()
    sim.burst(lim, T0, 10)
    retry = sim.hit(lim, T0 + 20_000).retry_after_ms
    assert retry == 40_000 + 6000
    assert not sim.hit(lim, T0 + 20_000 + retry - 1).allowed
    assert sim.hit(lim, T0 + 20_000 + retry).allowed
    never = sim.hit(sliding(3, name="small"), T0 + 20_000, cost=4)
    assert (never.allowed, never.retry_after_ms) == (False, 40_000 + MIN)


def _trailing(log: list[tuple[int, int]], now: int, period: int) -> int:
    """Admitted units with a time in [now - period, now]."""
    return sum(units for t, units in log if now - period <= t <= now)


def test_sliding_window_worst_case_over_admission_is_prev_times_elapsed_share() -> None:
    # The previous window's traffic all at its very end, the current one's spread: the
    # estimate discounts units that are still inside the trailing window.
    L, P = 10, MIN
    sim, lim, log = Sim(), sliding(L), []
    for _ in range(L):
        assert sim.hit(lim, T0 + P - 1).allowed
        log.append((T0 + P - 1, 1))
    worst = 0
    for t in range(T0 + P, T0 + 2 * P, 100):
        if sim.hit(lim, t).allowed:
            log.append((t, 1))
            e = t - (T0 + P)
            a = _trailing(log, t, P)
            assert a <= L + Fraction(L * e, P)             # the bound: prev * e/P over the limit
            worst = max(worst, a)
    assert worst == 2 * L - 1                               # and it is reached: ~2x just before the end


def test_sliding_window_worst_case_under_admission_is_prev_times_remaining_share() -> None:
    # The previous window's traffic all at its very start: it has left the trailing window,
    # yet the estimate still counts prev * (1 - e/P) of it.
    L, P = 10, MIN
    sim, lim = Sim(), sliding(L)
    assert sim.burst(lim, T0, L) == L
    e = 15_000
    admitted = sim.burst(lim, T0 + P + e, L)
    assert admitted == 2                                     # true trailing count was 0: 8 refused
    # under-admission: prev * (1 - e/P) = 7.5 units still counted, so 8 whole units refused
    assert L - admitted == math.ceil(L * Fraction(P - e, P))


@pytest.mark.parametrize("seed", range(5))
def test_sliding_window_error_stays_within_the_bound_for_random_traffic(seed: int) -> None:
    rng = random.Random(seed)
    L, P = 20, 10_000
    sim, lim = Sim(), sliding(L, period=10)
    log: list[tuple[int, int]] = []
    per_window: dict[int, int] = {}
    t = T0
    for _ in range(3000):
        t += rng.choice([0, 0, 1, 5, 50, 400, 2500])          # bursts and gaps
        cost = rng.choice([1, 1, 1, 2, 3])
        out = sim.hit(lim, t, cost=cost)
        wid, start, _ = lim.period.window(t)
        prev, e = per_window.get(wid - 1, 0), t - start
        if out.allowed:
            log.append((t, cost))
            per_window[wid] = per_window.get(wid, 0) + cost
            assert _trailing(log, t, P) <= L + Fraction(prev * e, P)
        else:
            # refused only when the trailing count plus this cost could exceed the limit,
            # up to the estimate's under-count of prev * (1 - e/P) (and its rounding)
            current = per_window.get(wid, 0)
            assert current + cost > L - prev * Fraction(P - e, P) - Fraction(prev, PPM)


@pytest.mark.parametrize("gap_ms", [3000, 5000, 6000])
def test_sliding_window_is_within_one_unit_for_uniform_traffic(gap_ms: int) -> None:
    # Uniform arrivals at or above the limit's rate: the uniform assumption holds, so the
    # estimate is off by less than one request and every trailing window holds L - 1 or L.
    L, sim, lim = 10, Sim(), sliding(10)
    admitted = [t for t in range(T0 + 1000, T0 + 30 * MIN, gap_ms) if sim.hit(lim, t).allowed]
    for t in admitted[3 * L:]:
        assert L - 1 <= sum(1 for x in admitted if t - MIN < x <= t) <= L
    below = sliding(10, name="below")            # offered below the rate: everything passes
    assert all(sim.hit(below, t).allowed for t in range(T0, T0 + 10 * MIN, 7000))


def test_ttls_only_clean_up() -> None:
    # The same traffic with states dropped at their TTL and kept forever: identical answers.
    rng = random.Random(7)
    limits = [fixed(5, 2), sliding(5, 2), bucket(5, refill_per_second=Fraction(3, 2)), fixed(3, "month", "m"),
              sliding(4, "month", "sm")]
    a, b = Sim(expire=True), Sim(expire=False)
    t = utc_ms(2026, 1, 31, 23, 59, 50)
    for _ in range(2000):
        t += rng.choice([0, 1, 100, 700, 2000, 5000])
        lim = rng.choice(limits)
        key = f"{lim.name}-{rng.randrange(3)}"
        assert a.hit(lim, t, key=key) == b.hit(lim, t, key=key)


def test_a_clock_stepping_back_never_reopens_a_window() -> None:
    for lim in (fixed(2), sliding(2)):
        sim = Sim(expire=False)
        assert sim.burst(lim, T0 + MIN + 10, 2) == 2
        assert not sim.hit(lim, T0 + MIN - 10).allowed      # back into the previous window
    sim, lim = Sim(expire=False), bucket(1, refill_per_second=1)
    assert sim.hit(lim, T0 + 5000).allowed
    assert not sim.hit(lim, T0).allowed                      # no refill for negative elapsed time


# -- several rules: check all, then charge all or none ----------------------------------------

def test_a_request_rejected_by_one_rule_is_charged_to_none() -> None:
    sim = Sim()
    wide, narrow = fixed(5, name="wide"), bucket(2, refill_per_second=Fraction(1, 3600), name="narrow")
    rules = [("w", wide, 1), ("n", narrow, 1)]
    results = [sim.request(rules, T0 + i) for i in range(5)]
    assert [all(o.allowed for o in r) for r in results] == [True, True, False, False, False]
    assert results[-1][0] == Outcome("wide", True, 5, 3, MIN - 4, 0, MIN)   # would allow: not charged
    assert sim.hit(wide, T0 + 10, key="w").remaining == 2                  # 2 admitted + this one


def test_refund_gives_back_exactly_the_charge() -> None:
    for lim in (fixed(5), sliding(5), bucket(5, refill_per_second=Fraction(1, 60))):
        admitted, [charge] = check_and_charge([(lim, None, 2)], T0 + 100)
        assert admitted and charge.state is not None
        state, ttl = refund(lim, charge.state, T0 + 200, 2, charge.window)
        again = check_and_charge([(lim, state or None, 1)], T0 + 300)[1][0].outcome
        assert again.remaining == 4, lim.algorithm
    # a sliding window refunded after its window rolled: the charge is the previous window's
    lim = sliding(5)
    _, [first] = check_and_charge([(lim, None, 1)], T0)
    _, [second] = check_and_charge([(lim, first.state, 1)], T0 + MIN + 1)
    state, ttl = refund(lim, second.state, T0 + MIN + 2, 1, first.window)
    assert state == {"w": second.window, "c": 1, "p": 0} and ttl is None
    assert refund(fixed(5), None, T0, 1, 0) == (None, None)
    assert refund(fixed(5), {"w": 3, "c": 2}, T0, 1, 1) == (None, None)     # the charged window is over
    full = bucket(5, refill_per_second=1)
    _, [one] = check_and_charge([(full, None, 1)], T0)
    assert refund(full, one.state, T0, 1, 0) == ({}, 0)                       # full again: delete
    assert refunded(Outcome("r", True, 5, 4, 1, 0, 1), 3).remaining == 5


# -- verdict and headers ----------------------------------------------------------------------

def o(rule: str, allowed: bool, limit: int, remaining: int, reset: int = 30_000, retry: int = 0,
      window: int = MIN) -> Outcome:
    return Outcome(rule, allowed, limit, remaining, reset, retry, window)


def test_verdict_allows_iff_every_rule_allows_and_picks_the_tightest() -> None:
    v = Verdict.of([o("big", True, 100, 50), o("small", True, 10, 3), o("mid", True, 20, 10)])
    assert v.allowed and v.tightest is not None and v.tightest.rule == "small" and v.retry_after_ms == 0
    tie = Verdict.of([o("a", True, 100, 50), o("b", True, 10, 5, reset=1000), o("c", True, 10, 5, reset=9000)])
    assert tie.tightest is not None and tie.tightest.rule == "c"      # equal share: fewer left, then later reset
    rejected = Verdict.of([o("tight", True, 100, 0), o("no", False, 50, 10, retry=1200),
                           o("no2", False, 50, 20, retry=4000)])
    assert not rejected.allowed and rejected.rejected_by == ("no", "no2")
    assert rejected.tightest is not None and rejected.tightest.rule == "no"     # among the rejecting rules
    assert rejected.retry_after_ms == 4000                                      # passes only when all do
    empty = Verdict.of([])
    assert empty.allowed and empty.tightest is None and empty.headers() == []
    zero = Verdict.of([o("z", False, 0, 0, retry=10), o("x", False, 10, 0, retry=10)])
    assert zero.tightest is not None and zero.tightest.remaining == 0


def test_headers_of_an_allowed_request() -> None:
    v = Verdict.of([o("per-user", True, 1000, 999, reset=59_001, window=MIN), o("global", True, 10_000, 9995)])
    assert v.headers() == [
        ("x-ratelimit-limit", "1000"),
        ("x-ratelimit-remaining", "999"),
        ("x-ratelimit-reset", "60"),
        ("ratelimit-policy", '"per-user";q=1000;w=60'),
        ("ratelimit", '"per-user";r=999;t=60'),
    ]


def test_headers_of_a_rejected_request_carry_retry_after() -> None:
    v = Verdict.of([o("monthly", False, 5000, 0, reset=1, retry=1, window=31 * 86_400_000)])
    headers = dict(v.headers())
    assert headers["retry-after"] == "1"
    assert headers["ratelimit-policy"] == '"monthly";q=5000;w=2678400'
    assert headers["ratelimit"] == '"monthly";r=0;t=1'
    assert [retry_after_seconds(ms) for ms in (0, 1, 999, 1000, 1001, 59_999)] == [1, 1, 1, 1, 2, 60]


def test_structured_fields_parse_back_as_the_draft_defines_them() -> None:
    name = 'odd"name\\x'
    for text, params in ((policy_field(name, 7, 0), {"q": 7, "w": 1}),        # w is never 0
                         (service_limit_field(name, 0, 0), {"r": 0, "t": 0})):
        parsed = http_sfv.List()
        parsed.parse(text.encode())
        [item] = parsed
        assert item.value == name and isinstance(item.value, str)          # a String, escaped
        assert dict(item.params) == params


def test_the_ratelimit_field_is_what_the_structured_field_library_writes() -> None:
    """service_limit_field formats its Integers itself (it runs on every answer): the text is
    the library's for any name and value, the library's own path past its Integer range."""
    def reference(name: str, r: int, t: int) -> str:
        item = http_sfv.Item(name)
        item.params["r"] = r
        item.params["t"] = t
        return str(http_sfv.List([item]))

    for name in ("per-user", "a.b_c-9", 'odd"name\\x', "x"):
        for r, t in ((0, 0), (1, 1), (999, 60), (10**14, 31 * 86_400), (10**15 - 1, 0)):
            assert service_limit_field(name, r, t) == reference(name, r, t)
    with pytest.raises(ValueError):          # the library refuses what the field cannot carry
        service_limit_field("per-user", 10**15, 0)


# -- deny cache -------------------------------------------------------------------------------

def test_deny_cache_answers_until_the_rejection_could_pass() -> None:
    cache = DenyCache()
    denied = o("r", False, 10, 0, reset=5000, retry=2000)
    cache.remember("k", 1, denied, T0)
    assert cache.lookup("k", 1, T0 + 500) == o("r", False, 10, 0, reset=4500, retry=1500)
    assert cache.lookup("k", 3, T0 + 500) is not None          # a costlier request cannot fit either
    assert cache.lookup("other", 1, T0 + 500) is None
    assert cache.lookup("k", 1, T0 + 2000) is None              # it could pass now: ask the store
    assert len(cache) == 0


def test_deny_cache_keeps_only_rejections_and_asks_for_cheaper_requests() -> None:
    cache = DenyCache()
    cache.remember("allowed", 1, o("r", True, 10, 5), T0)
    cache.remember("no-retry", 1, o("r", False, 10, 0, retry=0), T0)
    assert len(cache) == 0
    cache.remember("k", 5, o("r", False, 10, 3, retry=1000), T0)
    assert cache.lookup("k", 2, T0) is None                     # 2 units may fit where 5 did not
    assert cache.lookup("k", 5, T0) is not None
    cache.forget("k")
    assert cache.lookup("k", 5, T0) is None


def test_deny_cache_is_bounded() -> None:
    cache = DenyCache(max_entries=3)
    for i in range(3):
        cache.remember(f"k{i}", 1, o("r", False, 1, 0, retry=10 + i), T0)
    cache.remember("k3", 1, o("r", False, 1, 0, retry=100), T0 + 10)       # k0 has expired: it goes
    assert cache.lookup("k1", 1, T0 + 10) is not None and cache.lookup("k0", 1, T0) is None
    cache.remember("k4", 1, o("r", False, 1, 0, retry=100), T0 + 10)       # full: the oldest goes
    assert len(cache) == 3 and cache.lookup("k1", 1, T0 + 10) is None
    cache.remember("k4", 1, o("r", False, 1, 0, retry=500), T0 + 10)       # re-remembering refreshes
    assert cache.lookup("k4", 1, T0 + 200) is not None
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        DenyCache(0)
