"""The embedded store: one process's state in a bounded dict, with Redis's answers.

Decides how the default (no Redis configured) backend behaves:

* Same results as Redis for a single replica: the same value types (counters read back as
  their decimal bytes), the same TTL rules (SET without TTL drops an old expiry, INCRBY
  keeps it, a TTL is applied by `incr` only when it creates the key), the same fixed-window
  algorithm as `lua/fixed_window.lua`, the same errors (a non-integer counter raises
  StoreError(transient=False)). The contract suite runs one body against both.
* Bounded: at most `max_keys` live entries. When a new key needs room, expired keys go
  first (found through a min-heap of expiry times, so no scan), then the least recently used
  key (reads and writes both count as use).
* Rate limits run `extproc.core.ratelimit`, the reference the Lua script is tested against,
  on the rate state held in the entry (a key holds bytes/a counter, a scored set, or a rule's
  rate state; using it as another type is WRONGTYPE). One call is one step of the loop, so all
  of a request's rules are checked and charged atomically. `rate_usage` runs the same reads
  and reports through `ratelimit.peek` and writes nothing. Windows follow the injected
  `wall_clock` (Unix seconds: calendar months need the civil time, which the monotonic
  `clock` is not); a state's expiry follows `clock` like every other key.
* Exact time: expiry is computed from the injected `clock` (seconds, monotonic) in whole
  microseconds, so tests step a fake clock instead of sleeping. A key set with `ttl_ms=T` at
  time t is gone from t + T on.
* Never blocks: every operation is O(1) or O(log n) dict/heap work with no `await` inside,
  which also makes each operation atomic with respect to other tasks on the loop
  (`zrange_from` sorts the set it reads: O(n log n), for rare bulk reads such as a resync).
* Scored sets are Redis sorted sets: a key holds either bytes/a counter or a set, and using
  it as the other type is the same permanent WRONGTYPE error; an emptied set disappears.
* Pub/sub is in-process fan-out to the subscribers of this MemoryStore, in publish order.
  Each subscriber buffers at most `max_pending_messages`; one that falls further behind has
  lost messages, so it is told so (StoreError on its next read) and dropped, exactly like a
  Redis subscriber whose connection died. Publishing never waits for a subscriber.
"""

from __future__ import annotations

import asyncio
import heapq
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from extproc.core import breaker, ratelimit
from extproc.store.base import (
    RateCheck,
    RateResult,
    StoreError,
    WindowResult,
    as_bytes,
    check_bound,
    check_member,
    check_rate_checks,
    check_score,
    check_ttl,
    check_window,
)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# Redis's string2ll: optional minus, no leading zeros, no spaces or plus sign.
_REDIS_INT = re.compile(rb"-?[1-9][0-9]{0,19}|0")


_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


class _ZSet(dict[str, float]):
    """A scored set's members; its own type so that bytes and counters never mix with it."""


class _RateState(dict[str, int]):
    """One rate-limit rule's state (a hash in Redis), as `extproc.core.ratelimit` reads it."""


class _Breaker(dict):
    """One circuit breaker's record (a hash in Redis), as `extproc.core.breaker.step` reads it."""


_CONTAINERS = (_ZSet, _RateState, _Breaker)


class _Entry:
    __slots__ = ("value", "expires_us")

    def __init__(self, value: bytes | int | _ZSet | _RateState | _Breaker, expires_us: int | None):
        self.value = value
        self.expires_us = expires_us


class MemorySubscription:
    """One subscriber of a MemoryStore channel; see `Subscription` in base.py for the contract."""

    def __init__(self, store: MemoryStore, channel: str, max_pending: int):
        self.channel = channel
        self._store = store
        self._max_pending = max_pending
        self._pending: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: StoreError | None = None
        self._closed = False

    def _deliver(self, message: bytes) -> None:
        if len(self._pending) >= self._max_pending:
            self._lose(StoreError(f"memory subscription to {self.channel!r}: more than {self._max_pending} "
                                  "messages waiting; the subscriber fell behind and messages were dropped",
                                  transient=True))
            return
        self._pending.append(message)
        self._wake()

    def _lose(self, error: StoreError) -> None:
        self._store._unsubscribe(self)
        self._pending.clear()
        self._lost = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> MemorySubscription:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._pending:
                return self._pending.popleft()
            if self._lost is not None:
                error, self._lost, self._closed = self._lost, None, True
                raise error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def close(self) -> None:
        self._closed = True
        self._pending.clear()
        self._store._unsubscribe(self)
        self._wake()


class MemoryStore:
    """In-process Store; see the module docstring for the rules it keeps."""

    name = "memory"
    never_blocks = True       # callers may skip their timeouts (see "Never blocks" above)

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic,
                 max_pending_messages: int = 10_000, wall_clock: Callable[[], float] = time.time):
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        if max_pending_messages < 1:
            raise ValueError(f"max_pending_messages must be >= 1, got {max_pending_messages!r}")
        self.max_keys = max_keys
        self.max_pending_messages = max_pending_messages
        self._subscribers: dict[str, dict[MemorySubscription, None]] = {}
        self._clock = clock
        self._wall_clock = wall_clock
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        # (expires_us, key) for every entry written with a TTL; stale items (key rewritten
        # or deleted) are skipped when popped and dropped when the heap is compacted.
        self._expiries: list[tuple[int, str]] = []

    def __len__(self) -> int:
        """Entries held, including expired ones not yet reclaimed."""
        return len(self._data)

    # -- Store protocol -------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._lookup(key, self._now_us())
        if entry is None:
            return None
        value = entry.value
        if isinstance(value, _CONTAINERS):
            raise StoreError(f"memory get: {_WRONGTYPE}", transient=False)
        return str(value).encode() if isinstance(value, int) else value

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        check_ttl(ttl_ms)
        now = self._now_us()
        expires = None if ttl_ms is None else now + ttl_ms * 1000
        self._insert(key, _Entry(as_bytes(value), expires), now)

    async def delete(self, *keys: str) -> int:
        now = self._now_us()
        removed = 0
        for key in keys:
            if self._lookup(key, now) is not None:
                del self._data[key]
                removed += 1
        return removed

    async def incr(self, key: str, amount: int = 1, ttl_ms: int | None = None) -> int:
        check_ttl(ttl_ms)
        now = self._now_us()
        entry = self._lookup(key, now)
        if entry is None:
            value = self._checked_sum(0, amount)
            expires = None if ttl_ms is None else now + ttl_ms * 1000
            self._insert(key, _Entry(value, expires), now)
            return value
        value = self._checked_sum(self._counter(entry, "incr"), amount)
        entry.value = value
        return value

    async def fixed_window_hit(self, key: str, limit: int, window_ms: int, cost: int = 1) -> WindowResult:
        # Mirrors lua/fixed_window.lua step by step.
        check_window(limit, window_ms, cost)
        now = self._now_us()
        entry = self._lookup(key, now)
        count = 0 if entry is None else self._counter(entry, "fixed_window_hit")
        ttl_ms = -1 if entry is None or entry.expires_us is None else _ceil_ms(entry.expires_us - now)

        if count + cost > limit:
            return WindowResult(False, count, max(0, limit - count), window_ms if ttl_ms < 0 else ttl_ms)

        count += cost
        if entry is None or entry.expires_us is None:
            self._insert(key, _Entry(count, now + window_ms * 1000), now)
            return WindowResult(True, count, max(0, limit - count), window_ms)
        entry.value = count
        return WindowResult(True, count, max(0, limit - count), ttl_ms)

    def _rate_rules(self, op: str, checks: Sequence[RateCheck], now_ms: int | None):
        """(now_ms, now_us, (limit, state, units) per check): what rate_limit and rate_usage read."""
        check_rate_checks(checks, now_ms)
        if now_ms is None:
            now_ms = round(self._wall_clock() * 1000)
        now = self._now_us()
        rules = []
        for check in checks:
            entry = self._lookup(check.key, now)
            if entry is not None and not isinstance(entry.value, _RateState):
                raise StoreError(f"memory {op}: {_WRONGTYPE}", transient=False)
            rules.append((check.limit, None if entry is None else entry.value, check.units))
        return now_ms, now, rules

    async def rate_limit(self, checks: Sequence[RateCheck], now_ms: int | None = None) -> list[RateResult]:
        now_ms, now, rules = self._rate_rules("rate_limit", checks, now_ms)
        if not checks:
            return []
        admitted, charges = ratelimit.check_and_charge(rules, now_ms)
        if admitted:
            for check, charge in zip(checks, charges, strict=True):
                assert charge.state is not None
                self._insert(check.key, _Entry(_RateState(charge.state), now + charge.ttl_ms * 1000), now)
        return [RateResult(charge.outcome, admitted) for charge in charges]

    async def rate_usage(self, checks: Sequence[RateCheck], now_ms: int | None = None) -> list[ratelimit.Outcome]:
        # lua/ratelimit.lua's "peek" mode: rate_limit's reads and reports, no write and no TTL
        # touched (a read counts as use for the LRU order, as Redis's reads do)
        now_ms, _, rules = self._rate_rules("rate_usage", checks, now_ms)
        return ratelimit.peek(rules, now_ms) if checks else []

    async def breaker(self, key: str, op: str, params: breaker.Params, now_ms: int, ttl_ms: int) -> breaker.Result:
        # lua/breaker.lua runs the same transitions in Redis
        if op not in breaker.OPS:
            raise ValueError(f"unknown breaker op {op!r}")
        check_ttl(ttl_ms)
        now = self._now_us()
        entry = self._lookup(key, now)
        if entry is not None and not isinstance(entry.value, _Breaker):
            raise StoreError(f"memory breaker: {_WRONGTYPE}", transient=False)
        rec = _Breaker() if entry is None else entry.value
        result = breaker.step(rec, op, now_ms, params)
        if entry is None:
            self._insert(key, _Entry(rec, now + ttl_ms * 1000), now)
        else:
            entry.expires_us = now + ttl_ms * 1000
        return result

    async def byte_usage(self, match: str, limit: int = 100_000) -> tuple[int, int, bool]:
        import fnmatch

        now = self._now_us()
        keys = size = 0
        for key in list(self._data):
            if not fnmatch.fnmatchcase(key, match):
                continue
            entry = self._data.get(key)           # not _lookup: statistics must not touch the LRU order
            if entry is None or (entry.expires_us is not None and now >= entry.expires_us) \
                    or not isinstance(entry.value, bytes):
                continue
            if keys >= limit:
                return keys, size, True
            keys += 1
            size += len(entry.value)
        return keys, size, False

    async def zadd(self, key: str, member: str, score: float) -> None:
        check_member(member)
        score = check_score(score)
        now = self._now_us()
        entry = self._lookup(key, now)
        if entry is None:
            self._insert(key, _Entry(_ZSet({member: score}), None), now)
            return
        self._zset(entry, "zadd")[member] = score

    async def zrange_from(self, key: str, min_score: float) -> list[tuple[str, float]]:
        min_score = check_bound(min_score)
        entry = self._lookup(key, self._now_us())
        if entry is None:
            return []
        members = self._zset(entry, "zrange_from")
        return sorted(((m, s) for m, s in members.items() if s >= min_score), key=lambda ms: (ms[1], ms[0]))

    async def zrem_below(self, key: str, max_score: float) -> int:
        max_score = check_bound(max_score)
        entry = self._lookup(key, self._now_us())
        if entry is None:
            return 0
        members = self._zset(entry, "zrem_below")
        doomed = [m for m, s in members.items() if s <= max_score]
        for m in doomed:
            del members[m]
        if not members:
            del self._data[key]   # as Redis: an emptied set does not exist
        return len(doomed)

    async def publish(self, channel: str, message: bytes) -> None:
        message = as_bytes(message)
        for sub in list(self._subscribers.get(channel, ())):
            sub._deliver(message)

    async def subscribe(self, channel: str) -> MemorySubscription:
        sub = MemorySubscription(self, channel, self.max_pending_messages)
        self._subscribers.setdefault(channel, {})[sub] = None
        return sub

    def _unsubscribe(self, sub: MemorySubscription) -> None:
        subs = self._subscribers.get(sub.channel)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._subscribers[sub.channel]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        # State belongs to the process, not to a connection; other holders may still use it.
        return None

    # -- internals ------------------------------------------------------------------------

    def _now_us(self) -> int:
        # Whole microseconds: float noise in `clock() + ttl` must not decide expiry.
        return round(self._clock() * 1_000_000)

    def _lookup(self, key: str, now: int) -> _Entry | None:
        """The live entry (marked most recently used), or None; reclaims an expired one."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_us is not None and now >= entry.expires_us:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry

    def _insert(self, key: str, entry: _Entry, now: int) -> None:
        data = self._data
        if key in data:
            data[key] = entry
            data.move_to_end(key)
        else:
            if len(data) >= self.max_keys:
                self._make_room(now)
            data[key] = entry
        if entry.expires_us is not None:
            heapq.heappush(self._expiries, (entry.expires_us, key))
            if len(self._expiries) > 2 * self.max_keys + 64:
                self._compact_expiries()

    def _make_room(self, now: int) -> None:
        """Free at least one slot: every expired key first, else the least recently used."""
        data, heap = self._data, self._expiries
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            entry = data.get(key)
            if entry is not None and entry.expires_us == expires:
                del data[key]
        while len(data) >= self.max_keys:
            data.popitem(last=False)

    def _compact_expiries(self) -> None:
        self._expiries = [(e.expires_us, k) for k, e in self._data.items() if e.expires_us is not None]
        heapq.heapify(self._expiries)

    @staticmethod
    def _zset(entry: _Entry, op: str) -> _ZSet:
        if not isinstance(entry.value, _ZSet):
            raise StoreError(f"memory {op}: {_WRONGTYPE}", transient=False)
        return entry.value

    def _counter(self, entry: _Entry, op: str) -> int:
        value = entry.value
        if isinstance(value, int):
            return value
        if isinstance(value, _CONTAINERS):
            raise StoreError(f"memory {op}: {_WRONGTYPE}", transient=False)
        if _REDIS_INT.fullmatch(value):
            number = int(value)
            if _INT64_MIN <= number <= _INT64_MAX:
                return number
        raise StoreError(f"memory {op}: value is not an integer or out of range", transient=False)

    @staticmethod
    def _checked_sum(current: int, amount: int) -> int:
        value = current + amount
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise StoreError("memory incr: increment or decrement would overflow", transient=False)
        return value


def _ceil_ms(us: int) -> int:
    return -(-us // 1000)
