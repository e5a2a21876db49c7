"""Rate limits: what each algorithm admits, what a request's rules decide together, and what
the client is told.

Theory of operation
-------------------
A rule (`Limit`) counts `cost` units per request against a `limit` with one of three
algorithms. Everything here is integer arithmetic on explicit state, with the time passed in
(`now_ms`, Unix milliseconds): the same functions are the in-memory store's implementation and
the oracle that `store/lua/ratelimit.lua` is tested against, so both give identical answers.

Windows are aligned to the Unix epoch in UTC: a `minute` window is [hh:mm:00, hh:mm+1:00), a
`day` is a UTC day, N-second periods are [k*N, (k+1)*N) s since the epoch, and a `month` is a
calendar month in UTC (its `reset` is the first instant of the next month). Aligned windows mean
every replica (and Redis) derives the same window from the same clock without coordinating.

* Token bucket: `limit` is the capacity (the burst); the bucket refills continuously at
  `refill_per_second` (default: `limit` per `period`) and starts full. A request fits when the
  bucket holds `cost` tokens. Exact: the level is kept in units of 1/P token where R/P is the
  refill rate in tokens per millisecond as a reduced fraction, so no refill is ever rounded.
* Fixed window: at most `limit` units per window; the counter starts at 0 in each window.
  A burst at the end of one window and another at the start of the next both pass (2x limit
  within a short span): that is what a fixed window is; use the sliding window to prevent it.
* Sliding window, a weighted two-window counter (Cloudflare's): with `prev` units in the
  previous aligned window and `curr` in the current one, `e` ms into a window of length P,

      estimate = prev * weight + curr,   weight = ceil_ppm(1 - e/P)

  where the weight is rounded *up* to a millionth (`PPM`), so rounding can only make the
  estimate higher (never admit more); it keeps every product below 2**53 so the Lua script
  (doubles) is exact for limits up to 3e9 per window. A request fits when
  `estimate + cost <= limit`.

  Error bound. The estimate assumes the previous window's units were spread uniformly over
  it. Let A be the true number of admitted units in the trailing window (now - P, now]. The
  `prev` units that really fall in the trailing window lie between 0 and `prev`, so

      -prev * e/P  <=  estimate - A  <=  prev * (1 - e/P)      (+ < prev/10**6 from rounding)

  Hence, `e` ms into a window:
  - OVER-admission: the trailing window can hold at most `limit + prev * e/P` units, i.e.
    `prev * e/P` (< limit) too many. Reached when the previous window's traffic sat at its
    very end and the current window's is spread out: just before the window ends A can
    reach 2*limit - 1 (`tests/unit/test_ratelimit.py` constructs it).
  - UNDER-admission: a request can be refused while the trailing window holds only
    `limit - cost - prev * (1 - e/P)` units, i.e. up to ceil(prev * (1 - e/P)) whole units
    refused below the limit. Reached when the previous window's traffic sat at its very
    start (it has left the trailing window, the estimate still counts it).
  - Uniform traffic: off by less than one request (the trailing window holds limit - 1 or
    limit units when over-offered).
  What it does NOT admit is the fixed window's double burst: right after a boundary the
  previous window still weighs ~100 %, so a full burst at the end of window 1 blocks a burst
  at the start of window 2 (within d ms after a boundary it admits at most limit * d/P more).

Stale state is decided by window ids, never by key expiry: TTLs only let idle state
disappear (a fixed window's state lives until its window ends, a sliding window's until the
next one ends, a bucket's until it is full again, which is exactly when its absence means the
same thing). A clock that steps back never reopens a window: state from a later window is
used as is.

A request under several rules is admitted iff every rule admits it, and a rejected request is
charged to NO rule (`check_and_charge` checks all, then charges all). The `Verdict` picks the
tightest rule for the answer headers (`X-RateLimit-*`, `RateLimit-Policy`, `RateLimit`, and
`Retry-After` on rejection). `DenyCache` remembers rejections locally until they can pass, so
a flood from one client costs no store calls. `peek` runs the same checks and reports and
charges nothing: what a partition has used and has left (the admin's usage view).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache
from typing import ClassVar

#: Weights of the sliding window are millionths (see the module docstring).
PPM = 1_000_000
#: Lua numbers are doubles: every integer the script handles stays below this.
EXACT = 2**53

_DAY_MS = 86_400_000
_MAX_PERIOD_S = 100 * 86_400      # (P - e) * PPM < 2**53 for any period up to ~104 days
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_RULE_NAME = re.compile(r"[!-~]{1,128}")    # printable ASCII: a Redis key part and an sf-string


class Algorithm(StrEnum):
    TOKEN_BUCKET = "token_bucket"
    FIXED_WINDOW = "fixed_window"
    SLIDING_WINDOW = "sliding_window"


# -- periods ----------------------------------------------------------------------------------

_NAMED_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
_PERIOD_TEXT = re.compile(r"([1-9][0-9]*)\s*(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


@dataclass(frozen=True, slots=True)
class Period:
    """A window length: `seconds` > 0, or 0 for the calendar month in UTC.

    `Period.parse` accepts `second`, `minute`, `hour`, `day`, `month`, `<N>s|m|h|d` and a
    positive int of seconds. Windows of N seconds are aligned to the Unix epoch.
    """

    seconds: int

    MONTH: ClassVar[Period]

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int) or self.seconds < 0:
            raise ValueError(f"a period is a positive number of seconds (or a month), got {self.seconds!r}")
        if self.seconds > _MAX_PERIOD_S:
            raise ValueError(f"periods longer than {_MAX_PERIOD_S // 86_400} days are not supported "
                             f"(got {self.seconds} s); use 'month' for monthly quotas")

    @classmethod
    def parse(cls, value: str | int) -> Period:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"a period is a positive number of seconds, got {value!r}")
            return cls(value)
        if not isinstance(value, str):
            raise ValueError(f"a period is a name or a number of seconds, got {value!r}")
        text = value.strip().lower()
        if text == "month":
            return cls.MONTH
        if text in _NAMED_PERIODS:
            return cls(_NAMED_PERIODS[text])
        match = _PERIOD_TEXT.fullmatch(text)
        if match is None:
            raise ValueError(f"unknown period {value!r}: use second, minute, hour, day, month or "
                             "<N>s, <N>m, <N>h, <N>d")
        return cls(int(match[1]) * _UNIT_SECONDS[match[2]])

    @property
    def is_month(self) -> bool:
        return self.seconds == 0

    @property
    def ms(self) -> int:
        """The fixed length in ms; 0 for the calendar month (the script's encoding too)."""
        return self.seconds * 1000

    @property
    def code(self) -> str:
        """Short stable text for key names: `60s`, `1mo`."""
        return "1mo" if self.is_month else f"{self.seconds}s"

    def window(self, now_ms: int) -> tuple[int, int, int]:
        """(window id, start ms, end ms) of the window holding `now_ms`; end is exclusive."""
        if self.seconds:
            length = self.seconds * 1000
            wid = now_ms // length
            return wid, wid * length, wid * length + length
        t = _EPOCH + dt.timedelta(milliseconds=now_ms)
        start = dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC)
        stop = dt.datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=dt.UTC)
        return t.year * 12 + t.month - 1, (start - _EPOCH) // _MS, (stop - _EPOCH) // _MS

    def __str__(self) -> str:
        return "month" if self.is_month else f"{self.seconds}s"


Period.MONTH = Period(0)


# -- rules ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limit:
    """One rate-limit rule: `limit` units per `period` counted by `algorithm`, `cost` per hit.

    For the token bucket `limit` is the capacity (= burst) and the refill rate is
    `refill_per_second` tokens per second (default `limit / period`); its `period` is only the
    default rate's denominator, so it cannot be a calendar month. Validation happens here,
    once, at config load: a Limit that exists can be evaluated exactly by the Lua script.
    """

    name: str
    algorithm: Algorithm
    limit: int
    period: Period
    cost: int = 1
    refill_per_second: Fraction | None = None
    # token bucket: refill of `refill_units` per `scale` ms, reduced; the level is kept in 1/scale tokens
    refill_units: int = field(init=False, default=0, compare=False)
    scale: int = field(init=False, default=0, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _RULE_NAME.fullmatch(self.name):
            raise ValueError(f"a rule name is 1-128 printable ASCII characters without spaces, got {self.name!r}")
        object.__setattr__(self, "algorithm", Algorithm(self.algorithm))
        if not isinstance(self.period, Period):
            object.__setattr__(self, "period", Period.parse(self.period))
        for what, value, low in (("limit", self.limit, 0), ("cost", self.cost, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"rule {self.name!r}: {what} must be an integer >= {low}, got {value!r}")
        if self.algorithm is Algorithm.TOKEN_BUCKET:
            self._init_bucket()
            return
        if self.refill_per_second is not None:
            raise ValueError(f"rule {self.name!r}: refill_per_second applies to the token bucket only")
        if 3 * max(self.limit, self.cost) * PPM >= EXACT:
            raise ValueError(f"rule {self.name!r}: limit and cost must be below {EXACT // PPM // 3}")

    def _init_bucket(self) -> None:
        if self.limit < 1:
            raise ValueError(f"rule {self.name!r}: a token bucket needs a capacity >= 1")
        if self.refill_per_second is None:
            if self.period.is_month:
                raise ValueError(f"rule {self.name!r}: a token bucket refills at a constant rate; give "
                                 "refill_per_second or a fixed period instead of a calendar month")
            rate = Fraction(self.limit, self.period.seconds)
        else:
            rate = _fraction(self.refill_per_second)
            if rate <= 0:
                raise ValueError(f"rule {self.name!r}: refill_per_second must be > 0, got {self.refill_per_second!r}")
        object.__setattr__(self, "refill_per_second", rate)
        per_ms = rate / 1000
        units, scale = per_ms.numerator, per_ms.denominator
        if (max(self.limit, self.cost) + 1) * scale + units >= EXACT:
            raise ValueError(f"rule {self.name!r}: capacity {self.limit} with refill {rate} tokens/s cannot be "
                             "counted exactly; use a simpler rate (e.g. fewer decimals)")
        object.__setattr__(self, "refill_units", units)
        object.__setattr__(self, "scale", scale)

    @classmethod
    def from_rule(cls, name: str, algorithm: Algorithm | str, limit: int, period: Period | str | int, *,
                  burst: int | None = None, cost: int = 1) -> Limit:
        """A rule as operators write it: `limit` per `period`; for a token bucket that is the
        refill rate and `burst` (default `limit`) the capacity."""
        period = period if isinstance(period, Period) else Period.parse(period)
        if Algorithm(algorithm) is not Algorithm.TOKEN_BUCKET:
            if burst is not None:
                raise ValueError(f"rule {name!r}: burst applies to the token bucket only")
            return cls(name, Algorithm(algorithm), limit, period, cost)
        if period.is_month:
            raise ValueError(f"rule {name!r}: a token bucket refills at a constant rate; use a window "
                             "for monthly quotas")
        return cls(name, Algorithm.TOKEN_BUCKET, limit if burst is None else burst, period, cost,
                   refill_per_second=Fraction(limit, period.seconds))

    def check_cost(self, cost: int) -> None:
        """A request's cost for this rule: an integer >= 1 the script can count exactly."""
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"rule {self.name!r}: cost must be an integer >= 1, got {cost!r}")
        unit = self.scale if self.algorithm is Algorithm.TOKEN_BUCKET else 3 * PPM
        if cost * unit >= EXACT:
            raise ValueError(f"rule {self.name!r}: cost {cost} is too large to count exactly")

    @property
    def state_suffix(self) -> str:
        """The last key part: algorithm and period, so a changed rule never reads old state."""
        if self.algorithm is Algorithm.TOKEN_BUCKET:
            return "tb"
        return ("fw." if self.algorithm is Algorithm.FIXED_WINDOW else "sw.") + self.period.code

    def script_args(self, cost: int) -> tuple[str, int, int, int, int]:
        """This rule's five arguments of lua/ratelimit.lua (see the script's header)."""
        if self.algorithm is Algorithm.TOKEN_BUCKET:
            return ("t", self.limit, self.refill_units, self.scale, cost)
        alg = "f" if self.algorithm is Algorithm.FIXED_WINDOW else "s"
        return (alg, self.limit, self.period.ms, 0, cost)


def _fraction(value: Fraction | int | float | str) -> Fraction:
    if isinstance(value, bool):
        raise ValueError(f"not a rate: {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a rate: {value!r}")
        return Fraction(repr(value))   # 0.1 means 1/10, not the binary double
    return Fraction(value)


# -- outcomes ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Outcome:
    """One rule's answer for one request.

    `allowed`: this rule alone admits the request (the request passes iff all its rules do).
    `remaining` (>= 0): whole units left after this request (before it, when not charged).
    `reset_after_ms`: until the whole limit is available again if no more requests come (a
    fixed window: its end; a sliding window: when the estimate falls to 0; a bucket: when it
    is full); 0 when it already is. `retry_after_ms`: 0 when allowed, else the earliest time
    the same request could pass if nothing else is admitted meanwhile (a cost above the limit
    never fits: then a nominal full period). `window_ms`: the policy window (a month's actual
    length; for a bucket the time to refill from empty).
    """

    rule: str
    allowed: bool
    limit: int
    remaining: int
    reset_after_ms: int
    retry_after_ms: int
    window_ms: int


State = dict[str, int]


@dataclass(frozen=True, slots=True)
class Charge:
    """What evaluating one rule at one instant produced (the script returns the same)."""

    outcome: Outcome
    window: int              # the window charged (refunds name it); 0 for a bucket
    state: State | None      # to write when the request is charged
    ttl_ms: int              # the written state's time to live


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ceil_ppm(part: int, whole: int) -> int:
    return _ceil_div(part * PPM, whole)


class _Fixed:
    """Fixed window; state {w: window id, c: units}."""

    def __init__(self, limit: Limit, state: Mapping[str, int] | None, now: int):
        wid, start, end = limit.period.window(now)
        self.limit, self.now, self.start, self.end = limit, now, start, end
        self.wid, self.count = wid, 0
        if state is not None and state.get("w", -1) >= wid:
            self.wid, self.count = state["w"], state.get("c", 0)

    def fits(self, cost: int) -> bool:
        return self.count + cost <= self.limit.limit

    def charge(self, cost: int) -> tuple[State, int]:
        self.count += cost
        return {"w": self.wid, "c": self.count}, self.end - self.now

    def report(self, allowed: bool, cost: int) -> Outcome:
        left = self.end - self.now
        retry = 0 if allowed else left
        return Outcome(self.limit.name, allowed, self.limit.limit, max(0, self.limit.limit - self.count),
                       left if self.count > 0 else 0, retry, self.end - self.start)


class _Sliding:
    """Weighted two-window counter; state {w: window id, c: units in w, p: units in w - 1}."""

    def __init__(self, limit: Limit, state: Mapping[str, int] | None, now: int):
        wid, start, end = limit.period.window(now)
        self.limit, self.now, self.start, self.end = limit, now, start, end
        self.wid, self.curr, self.prev = wid, 0, 0
        if state is not None:
            w = state.get("w", -1)
            if w >= wid:
                self.wid, self.curr, self.prev = w, state.get("c", 0), state.get("p", 0)
            elif w == wid - 1:
                self.prev = state.get("c", 0)
        length = end - start
        self.weight = _ceil_ppm(length - (now - start), length)

    def estimate_ppm(self) -> int:
        return self.prev * self.weight + self.curr * PPM

    def fits(self, cost: int) -> bool:
        return self.estimate_ppm() + cost * PPM <= self.limit.limit * PPM

    def _next_length(self) -> int:
        _, start, end = self.limit.period.window(self.end)
        return end - start

    def charge(self, cost: int) -> tuple[State, int]:
        self.curr += cost
        return {"w": self.wid, "c": self.curr, "p": self.prev}, self.end - self.now + self._next_length()

    def report(self, allowed: bool, cost: int) -> Outcome:
        lim = self.limit.limit
        remaining = max(0, (lim * PPM - self.estimate_ppm()) // PPM)
        left = self.end - self.now
        if self.curr > 0:
            reset = left + self._next_length()
        elif self.prev > 0 and self.weight > 0:
            reset = left
        else:
            reset = 0
        return Outcome(self.limit.name, allowed, lim, remaining, reset,
                       0 if allowed else self._retry(cost), self.end - self.start)

    def _retry(self, cost: int) -> int:
        lim, length = self.limit.limit, self.end - self.start
        left = self.end - self.now
        if cost > lim:
            return left + self._next_length()
        room = lim - cost - self.curr
        if room >= 0:
            # in this window: wait until prev * weight(e') <= room, weight(e') = ceil_ppm(1 - e'/P)
            k = room * PPM // self.prev
            return length - k * length // PPM - (self.now - self.start)
        # next window: curr becomes prev, and nothing is current
        nxt = self._next_length()
        k = (lim - cost) * PPM // self.curr
        return left + nxt - k * nxt // PPM


class _Bucket:
    """Token bucket; state {l: level in 1/scale tokens, t: ms of that level, s: scale}."""

    def __init__(self, limit: Limit, state: Mapping[str, int] | None, now: int):
        self.limit, self.now = limit, now
        self.full = limit.limit * limit.scale
        self.level = self.full
        if state is not None and state.get("s") == limit.scale:
            level = min(state.get("l", self.full), self.full)
            elapsed = max(0, now - state.get("t", now))
            missing = self.full - level
            if missing > 0:
                level = self.full if elapsed >= _ceil_div(missing, limit.refill_units) \
                    else level + elapsed * limit.refill_units
            self.level = level

    def fits(self, cost: int) -> bool:
        return self.level >= cost * self.limit.scale

    def charge(self, cost: int) -> tuple[State, int]:
        self.level -= cost * self.limit.scale
        return {"l": self.level, "t": self.now, "s": self.limit.scale}, self._until_full()

    def _until_full(self) -> int:
        return _ceil_div(self.full - self.level, self.limit.refill_units)

    def report(self, allowed: bool, cost: int) -> Outcome:
        lim = self.limit
        window = _ceil_div(self.full, lim.refill_units)
        if allowed:
            retry = 0
        elif cost > lim.limit:
            retry = window
        else:
            retry = _ceil_div(cost * lim.scale - self.level, lim.refill_units)
        return Outcome(lim.name, allowed, lim.limit, self.level // lim.scale, self._until_full(), retry, window)


_ALGORITHMS = {Algorithm.FIXED_WINDOW: _Fixed, Algorithm.SLIDING_WINDOW: _Sliding,
               Algorithm.TOKEN_BUCKET: _Bucket}


def check_and_charge(rules: Sequence[tuple[Limit, Mapping[str, int] | None, int]],
                     now_ms: int) -> tuple[bool, list[Charge]]:
    """All of one request's rules at `now_ms`, as lua/ratelimit.lua does in "charge" mode.

    `rules` holds (limit, current state or None, cost). Every rule is checked first; only
    when all of them admit is every rule charged. Returns (admitted, one Charge per rule);
    a Charge's `state` is what to store (with `ttl_ms`) when admitted, else None.
    """
    views = [_ALGORITHMS[limit.algorithm](limit, state, now_ms) for limit, state, _ in rules]
    fits = [view.fits(cost) for view, (_, _, cost) in zip(views, rules, strict=True)]
    admitted = all(fits)
    charges = []
    for view, ok, (limit, _, cost) in zip(views, fits, rules, strict=True):
        state, ttl = view.charge(cost) if admitted else (None, 0)
        window = 0 if limit.algorithm is Algorithm.TOKEN_BUCKET else view.wid
        charges.append(Charge(view.report(ok, cost), window, state, ttl))
    return admitted, charges


def peek(rules: Sequence[tuple[Limit, Mapping[str, int] | None, int]], now_ms: int) -> list[Outcome]:
    """What `check_and_charge` would answer at `now_ms`, charging nothing: the script's "peek"
    mode (the admin's usage view). One Outcome per rule, the rule's own: `allowed` says this
    rule alone would admit a request of that cost, `remaining` is what is left now, before any
    request. So at the same instant, on the same state, a charge that rejects answers exactly
    this Outcome, and one that admits answers `remaining - cost` (and its own reset).
    """
    views = [_ALGORITHMS[limit.algorithm](limit, state, now_ms) for limit, state, _ in rules]
    return [view.report(view.fits(cost), cost) for view, (_, _, cost) in zip(views, rules, strict=True)]


def refund(limit: Limit, state: Mapping[str, int] | None, now_ms: int, cost: int,
           window: int) -> tuple[State | None, int | None]:
    """Give back a charge of `cost` made in `window`, as the script's "refund" mode does.

    Returns (new state, ttl): (None, None) when there is nothing to change (the state is gone
    or the charged window is over), a state with ttl None to write keeping the key's expiry,
    or a state with a ttl. A bucket that is full again returns ({}, 0): delete the key.
    """
    if state is None:
        return None, None
    if limit.algorithm is Algorithm.TOKEN_BUCKET:
        if state.get("s") != limit.scale:
            return None, None
        bucket = _Bucket(limit, state, now_ms)
        bucket.level = min(bucket.full, bucket.level + cost * limit.scale)
        if bucket.level >= bucket.full:
            return {}, 0
        return {"l": bucket.level, "t": now_ms, "s": limit.scale}, bucket._until_full()
    new = dict(state)
    w = new.get("w", -1)
    if w == window:
        new["c"] = max(0, new.get("c", 0) - cost)
    elif w == window + 1 and limit.algorithm is Algorithm.SLIDING_WINDOW:
        new["p"] = max(0, new.get("p", 0) - cost)
    else:
        return None, None
    return new, None


def refunded(outcome: Outcome, cost: int) -> Outcome:
    """The outcome a charged rule reports once its charge was given back (its
    `reset_after_ms` stays the charged one: an upper bound)."""
    return replace(outcome, remaining=min(outcome.limit, outcome.remaining + cost))


# -- the request's verdict and its headers ----------------------------------------------------

#: Header names as sent (lowercase: HTTP/2 and Envoy's header mutations want lowercase).
X_RATELIMIT_LIMIT = "x-ratelimit-limit"
X_RATELIMIT_REMAINING = "x-ratelimit-remaining"
X_RATELIMIT_RESET = "x-ratelimit-reset"
RATELIMIT_POLICY = "ratelimit-policy"
RATELIMIT = "ratelimit"
RETRY_AFTER = "retry-after"


def _seconds(ms: int) -> int:
    return _ceil_div(ms, 1000) if ms > 0 else 0


@lru_cache(maxsize=4096)
def policy_field(rule: str, quota: int, window_s: int) -> str:
    """`RateLimit-Policy` of draft-ietf-httpapi-ratelimit-headers-11 §3: a List with one
    String item naming the policy, `q` (quota) and `w` (window seconds, >= 1)."""
    import http_sfv  # the structured-field serialiser (RFC 9651); imported on first use only

    item = http_sfv.Item(rule)
    item.params["q"] = quota
    item.params["w"] = max(1, window_s)
    return str(http_sfv.List([item]))


def service_limit_field(rule: str, available: int, window_s: int) -> str:
    """`RateLimit` of draft-ietf-httpapi-ratelimit-headers-11 §4: a List with one String
    item naming the policy, `r` (available quota) and `t` (effective window seconds). Built on
    every answer, so the String is serialised once per name (`_sf_string`) and the two Integers
    (RFC 9651 §4.1.4: decimal, at most 15 digits) are formatted here."""
    if 0 <= available < _SF_INT_MAX and 0 <= window_s < _SF_INT_MAX:
        return f"{_sf_string(rule)};r={available};t={window_s}"
    import http_sfv

    item = http_sfv.Item(rule)
    item.params["r"] = available
    item.params["t"] = window_s
    return str(http_sfv.List([item]))


_SF_INT_MAX = 10 ** 15


@lru_cache(maxsize=4096)
def _sf_string(value: str) -> str:
    """An sf-string (RFC 9651 §4.1.6), serialised by the structured-field library."""
    import http_sfv

    return str(http_sfv.Item(value))


def retry_after_seconds(ms: int) -> int:
    """`Retry-After` as delay-seconds: whole seconds, rounded up, at least 1."""
    return max(1, _seconds(ms))


def _tighter(a: Outcome, b: Outcome) -> bool:
    """a is tighter than b: smaller remaining/limit (exactly), then fewer remaining, then
    the later reset."""
    left, right = a.remaining * b.limit, b.remaining * a.limit
    if left != right:
        return left < right
    return (a.remaining, -a.reset_after_ms) < (b.remaining, -b.reset_after_ms)


@dataclass(frozen=True, slots=True)
class Verdict:
    """All of a request's rules together: allowed iff every rule allows.

    `tightest` is the rule the answer headers describe: among the rejecting rules when the
    request is rejected, else among all, the one with the smallest remaining/limit.
    `retry_after_ms` is the largest of the rejecting rules' (the request passes only when all
    do), 0 when allowed.
    """

    allowed: bool
    outcomes: tuple[Outcome, ...]
    tightest: Outcome | None
    retry_after_ms: int

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> Verdict:
        outcomes = tuple(outcomes)
        rejecting = [o for o in outcomes if not o.allowed]
        candidates = rejecting or outcomes
        tightest = None
        for o in candidates:
            if tightest is None or _tighter(o, tightest):
                tightest = o
        retry = max((o.retry_after_ms for o in rejecting), default=0)
        return cls(not rejecting, outcomes, tightest, retry)

    @property
    def rejected_by(self) -> tuple[str, ...]:
        """The names of the rules that rejected (for the 429 body), in rule order."""
        return tuple(o.rule for o in self.outcomes if not o.allowed)

    def headers(self) -> list[tuple[str, str]]:
        """The answer's headers for the tightest rule; `retry-after` too when rejected.

        `x-ratelimit-reset` and the `t` parameter are delay-seconds (rounded up) until the
        rule's whole limit is back; `w` is the policy window in seconds.
        """
        t = self.tightest
        if t is None:
            return []
        reset_s = _seconds(t.reset_after_ms)
        headers = [
            (X_RATELIMIT_LIMIT, str(t.limit)),
            (X_RATELIMIT_REMAINING, str(t.remaining)),
            (X_RATELIMIT_RESET, str(reset_s)),
            (RATELIMIT_POLICY, policy_field(t.rule, t.limit, _seconds(t.window_ms))),
            (RATELIMIT, service_limit_field(t.rule, t.remaining, reset_s)),
        ]
        if not self.allowed:
            headers.append((RETRY_AFTER, str(retry_after_seconds(self.retry_after_ms))))
        return headers


# -- deny cache -------------------------------------------------------------------------------

class DenyCache:
    """Rejections remembered locally until they could pass, so a flood costs no store calls.

    `remember(key, cost, outcome, now_ms)` after a rejecting rule (the key is the rule's store
    key); `lookup(key, cost, now_ms)` before asking the store: while the remembered rejection
    holds, a request on that key with at least the remembered cost is rejected again without
    a store call (the store would reject it too and, a rejected request charging nothing,
    skipping it changes no counter). A rejection holds until its `retry_after_ms`, which
    assumes nothing else is admitted meanwhile; other replicas' admissions only push the real
    time later, so the cache never rejects what the store would admit (except after a
    refund or an admin reset: `forget`/`clear`). Bounded to `max_entries` (oldest first out).
    """

    def __init__(self, max_entries: int = 10_000):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, int, int, Outcome]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, cost: int, now_ms: int) -> Outcome | None:
        """The remembered rejection, its times made relative to `now_ms`, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, reset_at, denied_cost, outcome = entry
        if now_ms >= until:
            del self._entries[key]
            return None
        if cost < denied_cost:
            return None       # a cheaper request may fit: ask the store
        return replace(outcome, retry_after_ms=until - now_ms, reset_after_ms=max(0, reset_at - now_ms))

    def remember(self, key: str, cost: int, outcome: Outcome, now_ms: int) -> None:
        if outcome.allowed or outcome.retry_after_ms <= 0:
            return
        if key in self._entries:
            del self._entries[key]
        elif len(self._entries) >= self.max_entries:
            self._drop_expired(now_ms)
            if len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
        self._entries[key] = (now_ms + outcome.retry_after_ms, now_ms + outcome.reset_after_ms, cost, outcome)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def _drop_expired(self, now_ms: int) -> None:
        for key in [k for k, (until, *_) in self._entries.items() if now_ms >= until]:
            del self._entries[key]
