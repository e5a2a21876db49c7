"""MemoryStore rules the contract suite cannot see: the key bound, LRU order, exact expiry.

Time is a fake clock stepped in whole milliseconds, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from extproc.store import MemoryStore, StoreError, WindowResult

T = TypeVar("T")


class FakeClock:
    def __init__(self, start_ms: int = 1_000_000):
        self.ms = start_ms

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def completes_without_suspending(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine one step: it must finish without ever yielding to the loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("MemoryStore operation suspended: it could interleave with other tasks")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_ttl_expires_exactly_at_the_deadline(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)

    async def body() -> None:
        await store.set("k", b"v", ttl_ms=200)
        clock.advance(199)
        assert await store.get("k") == b"v"
        clock.advance(1)
        assert await store.get("k") is None
        assert await store.delete("k") == 0
    run(body())


def test_fractional_clock_values_do_not_blur_expiry() -> None:
    # 0.1 + 0.2 != 0.3 in floats; the store works in whole microseconds.
    now = [0.1]
    store = MemoryStore(clock=lambda: now[0])

    async def body() -> None:
        await store.set("k", b"v", ttl_ms=200)
        now[0] = 0.1 + 0.1999
        assert await store.get("k") == b"v"
        now[0] = 0.3
        assert await store.get("k") is None
    run(body())


def test_incr_ttl_on_create_only_and_set_drops_ttl(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)

    async def body() -> None:
        assert await store.incr("c", ttl_ms=100) == 1
        clock.advance(60)
        assert await store.incr("c", ttl_ms=100) == 2    # does not restart the TTL
        clock.advance(40)
        assert await store.get("c") is None
        await store.set("s", b"x", ttl_ms=100)
        await store.set("s", b"y")                      # plain SET: no expiry any more
        clock.advance(10_000)
        assert await store.get("s") == b"y"
    run(body())


def test_fixed_window_reset_follows_the_clock(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)

    async def body() -> None:
        assert await store.fixed_window_hit("w", 2, 1000) == WindowResult(True, 1, 1, 1000)
        clock.advance(250)
        assert await store.fixed_window_hit("w", 2, 1000) == WindowResult(True, 2, 0, 750)
        clock.advance(500)
        assert await store.fixed_window_hit("w", 2, 1000) == WindowResult(False, 2, 0, 250)
        clock.advance(250)
        assert await store.fixed_window_hit("w", 2, 1000) == WindowResult(True, 1, 1, 1000)
    run(body())


def test_key_count_never_exceeds_the_bound() -> None:
    store = MemoryStore(max_keys=100)

    async def body() -> None:
        for i in range(1000):
            await store.set(f"k{i}", b"v")
            assert len(store) <= 100
        assert [await store.get(f"k{i}") for i in range(900, 1000)] == [b"v"] * 100
        assert await store.get("k899") is None
    run(body())


def test_least_recently_used_key_is_evicted() -> None:
    store = MemoryStore(max_keys=3)

    async def body() -> None:
        for k in ("a", "b", "c"):
            await store.set(k, b"1")
        await store.get("a")                     # a read counts as use
        await store.incr("b")                    # so does a counter update
        await store.set("d", b"1")               # c is now the least recently used
        assert await store.get("c") is None
        assert [await store.get(k) for k in ("a", "b", "d")] == [b"1", b"2", b"1"]
        await store.fixed_window_hit("a", 5, 1000)
        await store.set("e", b"v")               # b: used before a, d and e
        assert await store.get("b") is None
    run(body())


def test_expired_keys_are_evicted_before_live_ones(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=3, clock=clock)

    async def body() -> None:
        await store.set("old", b"v")
        await store.set("older", b"v")
        await store.set("fresh-but-expiring", b"v", ttl_ms=10)  # most recently used, yet expired
        clock.advance(10)
        await store.set("new", b"v")
        assert [await store.get(k) for k in ("old", "older", "new")] == [b"v"] * 3
        assert await store.get("fresh-but-expiring") is None
    run(body())


def test_expiry_index_stays_bounded_under_rewrites(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=10, clock=clock)

    async def body() -> None:
        for i in range(10_000):
            await store.set(f"k{i % 3}", b"v", ttl_ms=60_000)
        assert len(store._expiries) <= 2 * 10 + 64 + 1
        assert len(store) == 3
    run(body())


def test_counters_read_back_as_decimal_and_reject_non_integers() -> None:
    store = MemoryStore()

    async def body() -> None:
        await store.incr("c", 7)
        assert await store.get("c") == b"7"
        for bad in (b"1.5", b" 1", b"+1", b"01", b"", b"99999999999999999999"):
            await store.set("x", bad)
            with pytest.raises(StoreError) as info:
                await store.incr("x")
            assert info.value.transient is False
        await store.set("x", b"-12")
        assert await store.incr("x") == -11
        await store.set("big", str(2**63 - 1).encode())
        with pytest.raises(StoreError, match="overflow"):
            await store.incr("big")
    run(body())


def test_operations_never_yield_to_the_event_loop(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=2, clock=clock)
    completes_without_suspending(store.set("a", b"v", ttl_ms=5))
    assert completes_without_suspending(store.get("a")) == b"v"
    assert completes_without_suspending(store.incr("n", ttl_ms=5)) == 1
    assert completes_without_suspending(store.fixed_window_hit("w", 1, 5)).allowed
    assert completes_without_suspending(store.delete("a", "n", "w")) >= 1
    assert completes_without_suspending(store.ping()) is None


def test_constructor_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError):
        MemoryStore(max_keys=0)
