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
* Exact time: expiry is computed from the injected `clock` (seconds, monotonic) in whole
  microseconds, so tests step a fake clock instead of sleeping. A key set with `ttl_ms=T` at
  time t is gone from t + T on.
* Never blocks: every operation is O(1) or O(log n) dict/heap work with no `await` inside,
  which also makes each operation atomic with respect to other tasks on the loop.
"""

from __future__ import annotations

import heapq
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from extproc.store.base import StoreError, WindowResult, as_bytes, check_ttl, check_window

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# Redis's string2ll: optional minus, no leading zeros, no spaces or plus sign.
_REDIS_INT = re.compile(rb"-?[1-9][0-9]{0,19}|0")


class _Entry:
    __slots__ = ("value", "expires_us")

    def __init__(self, value: bytes | int, expires_us: int | None):
        self.value = value
        self.expires_us = expires_us


class MemoryStore:
    """In-process Store; see the module docstring for the rules it keeps."""

    name = "memory"

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.max_keys = max_keys
        self._clock = clock
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

    def _counter(self, entry: _Entry, op: str) -> int:
        value = entry.value
        if isinstance(value, int):
            return value
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
