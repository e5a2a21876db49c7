"""The store contract: the same test bodies on memory, Redis and Redis Cluster.

Decides what every backend must answer identically (values, TTL rules, counters, the
fixed-window algorithm, exactness under concurrency, also across two clients standing for
two replicas), and how a Redis backend fails (StoreError, quickly, transient or timeout).
Expiry is observed by polling with a deadline, never by sleeping a fixed time; "did not
expire" is observed against a sentinel key written later with the same TTL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
import redis

from extproc.store import Store, StoreError, WindowResult
from extproc.store.keys import KeySpace, hash_tag
from extproc.store.redis import RedisStore
from tests.support.procs import free_port

TTL_MS = 100
DEADLINE_S = 3.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until true; fail after DEADLINE_S (a deadline, not a synchronising sleep)."""
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S}s: {what}")
        await asyncio.sleep(0.01)


async def gone(store: Store, key: str) -> bool:
    return await store.get(key) is None


# -- bytes ----------------------------------------------------------------------------------

def test_backend_is_a_store(store: Store, backend) -> None:
    assert isinstance(store, Store)
    assert store.name == backend.name


def test_get_missing_is_none(store: Store, keys: KeySpace, run) -> None:
    assert run(store.get(keys.key("t", "a"))) is None


def test_set_then_get_returns_the_bytes(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("t", "a", "v")
        value = bytes(range(256))
        await store.set(k, value)
        assert await store.get(k) == value
        await store.set(k, b"")
        assert await store.get(k) == b""
    run(body())


def test_delete_counts_the_keys_that_existed(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        # different tags: on Cluster these live in different slots
        a, b, missing = keys.key("t", "a"), keys.key("t", "b"), keys.key("t", "c")
        await store.set(a, b"1")
        await store.set(b, b"2")
        assert await store.delete(a, b, missing) == 2
        assert await store.get(a) is None and await store.get(b) is None
        assert await store.delete(a) == 0
        assert await store.delete() == 0
    run(body())


def test_set_with_ttl_expires(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("t", "a")
        await store.set(k, b"v", ttl_ms=TTL_MS)
        assert await store.get(k) == b"v"
        await eventually(lambda: gone(store, k), "key with a TTL expires")
    run(body())


def test_set_without_ttl_drops_an_old_ttl(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k, sentinel = keys.key("t", "a"), keys.key("t", "sentinel")
        await store.set(k, b"old", ttl_ms=TTL_MS)
        await store.set(k, b"new")
        await store.set(sentinel, b"s", ttl_ms=TTL_MS)
        await eventually(lambda: gone(store, sentinel), "sentinel expires")
        assert await store.get(k) == b"new"
    run(body())


def test_bad_arguments_raise_before_any_io(store: Store, keys: KeySpace, run) -> None:
    k = keys.key("t", "a")
    for call in (lambda: store.set(k, b"v", ttl_ms=0), lambda: store.incr(k, ttl_ms=-5),
                 lambda: store.fixed_window_hit(k, -1, 1000), lambda: store.fixed_window_hit(k, 5, 0),
                 lambda: store.fixed_window_hit(k, 5, 1000, cost=0)):
        with pytest.raises(ValueError):
            run(call())
    with pytest.raises(TypeError):
        run(store.set(k, "text"))  # type: ignore[arg-type]


# -- counters -------------------------------------------------------------------------------

def test_incr_counts_from_zero_and_reads_back_as_decimal(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("t", "a")
        assert await store.incr(k) == 1
        assert await store.incr(k, 5) == 6
        assert await store.incr(k, -10) == -4
        assert await store.get(k) == b"-4"
        s = keys.key("t", "b")
        await store.set(s, b"41")
        assert await store.incr(s) == 42
    run(body())


def test_incr_on_a_non_integer_is_a_permanent_error(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("t", "a")
        await store.set(k, b"not a number")
        for call in (store.incr(k), store.incr(k, ttl_ms=1000), store.fixed_window_hit(k, 5, 1000)):
            with pytest.raises(StoreError) as info:
                await call
            assert info.value.transient is False and info.value.timeout is False
            assert not isinstance(info.value, redis.RedisError)
        assert await store.get(k) == b"not a number"
    run(body())


def test_incr_ttl_applies_only_when_the_key_is_created(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        created = keys.key("t", "created")
        assert await store.incr(created, ttl_ms=TTL_MS) == 1
        assert await store.incr(created, ttl_ms=600_000) == 2   # must not extend
        assert await store.incr(created) == 3                   # must not drop the TTL
        await eventually(lambda: gone(store, created), "counter created with a TTL expires")

        permanent, sentinel = keys.key("t", "permanent"), keys.key("t", "sentinel")
        assert await store.incr(permanent) == 1
        assert await store.incr(permanent, ttl_ms=TTL_MS) == 2  # existing key: no TTL added
        await store.set(sentinel, b"s", ttl_ms=TTL_MS)
        await eventually(lambda: gone(store, sentinel), "sentinel expires")
        assert await store.get(permanent) == b"2"
    run(body())


# -- fixed window ---------------------------------------------------------------------------

def test_fixed_window_admits_up_to_the_limit(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("rl", "client", "minute")
        first = await store.fixed_window_hit(k, 3, 60_000)
        assert first == WindowResult(True, 1, 2, 60_000)
        results = [await store.fixed_window_hit(k, 3, 60_000) for _ in range(3)]
        assert [(r.allowed, r.count, r.remaining) for r in results] == [
            (True, 2, 1), (True, 3, 0), (False, 3, 0)]
        assert all(0 < r.reset_after_ms <= 60_000 for r in results)
        assert await store.get(k) == b"3"
    run(body())


def test_fixed_window_rejected_hit_is_not_charged(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("rl", "client")
        assert (await store.fixed_window_hit(k, 5, 60_000, cost=3)).count == 3
        rejected = await store.fixed_window_hit(k, 5, 60_000, cost=3)
        assert (rejected.allowed, rejected.count, rejected.remaining) == (False, 3, 2)
        fits = await store.fixed_window_hit(k, 5, 60_000, cost=2)
        assert (fits.allowed, fits.count, fits.remaining) == (True, 5, 0)
    run(body())


def test_fixed_window_too_costly_first_hit_starts_no_window(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("rl", "client")
        assert await store.fixed_window_hit(k, 2, 5_000, cost=3) == WindowResult(False, 0, 2, 5_000)
        assert await store.fixed_window_hit(keys.key("rl", "zero"), 0, 5_000) == WindowResult(False, 0, 0, 5_000)
        assert await store.get(k) is None
    run(body())


def test_fixed_window_starts_at_first_hit_and_resets(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("rl", "client")
        assert (await store.fixed_window_hit(k, 2, TTL_MS)).reset_after_ms == TTL_MS
        await store.fixed_window_hit(k, 2, TTL_MS)
        full = await store.fixed_window_hit(k, 2, TTL_MS)
        assert not full.allowed and 0 <= full.reset_after_ms <= TTL_MS

        async def admitted_again() -> bool:
            return (await store.fixed_window_hit(k, 2, TTL_MS)).allowed
        await eventually(admitted_again, "a new window admits again")
        assert await store.get(k) == b"1"  # the new window counts from its first hit
    run(body())


def test_fixed_window_repairs_a_counter_without_ttl(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("rl", "client")
        await store.incr(k)  # a counter with no expiry would otherwise block forever
        assert await store.fixed_window_hit(k, 5, TTL_MS) == WindowResult(True, 2, 3, TTL_MS)
        await eventually(lambda: gone(store, k), "the repaired window expires")
    run(body())


def test_fixed_window_survives_losing_the_script_cache(store: Store, keys: KeySpace, run, backend) -> None:
    async def body() -> None:
        k = keys.key("rl", "client")
        assert (await store.fixed_window_hit(k, 5, 60_000)).count == 1
        backend.flush_scripts()  # as after a Redis restart or failover
        assert (await store.fixed_window_hit(k, 5, 60_000)).count == 2
        assert await store.incr(keys.key("t", "c"), ttl_ms=60_000) == 1
    run(body())


# -- exactness under concurrency ------------------------------------------------------------

N, LIMIT = 50, 10


def test_concurrent_hits_admit_exactly_the_limit(store: Store, keys: KeySpace, run) -> None:
    # Also the first use of a fresh client: on Cluster, a burst issued before the topology
    # is known once turned into a MOVED storm and dropped connections (see store/redis.py).
    async def body() -> None:
        k = keys.key("rl", "hot")
        results = await asyncio.gather(*(store.fixed_window_hit(k, LIMIT, 60_000) for _ in range(N)))
        admitted = [r for r in results if r.allowed]
        assert len(admitted) == LIMIT
        assert sorted(r.count for r in admitted) == list(range(1, LIMIT + 1))
        assert all(r.count == LIMIT and r.remaining == 0 for r in results if not r.allowed)
        assert await store.get(k) == str(LIMIT).encode()
    run(body())


def test_concurrent_hits_from_two_replicas_admit_exactly_the_limit(store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair

    async def body() -> None:
        k = keys.key("rl", "hot")
        hits = [(a if i % 2 else b).fixed_window_hit(k, LIMIT, 60_000) for i in range(N)]
        results = await asyncio.gather(*hits)
        assert sum(r.allowed for r in results) == LIMIT
        assert sorted(r.count for r in results if r.allowed) == list(range(1, LIMIT + 1))

        costly = keys.key("rl", "costly")
        hits = [(a if i % 2 else b).fixed_window_hit(costly, LIMIT, 60_000, cost=3) for i in range(N)]
        assert sum(r.allowed for r in await asyncio.gather(*hits)) == 3   # 9 of 10 units
        assert await a.get(costly) == b"9" and await b.get(costly) == b"9"
    run(body())


def test_concurrent_incr_from_two_replicas_loses_nothing(store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair

    async def body() -> None:
        k = keys.key("cc", "counter")
        values = await asyncio.gather(*((a if i % 2 else b).incr(k, ttl_ms=60_000) for i in range(N)))
        assert sorted(values) == list(range(1, N + 1))
    run(body())


def test_ping_answers_when_healthy(store: Store, run) -> None:
    run(store.ping())


# -- how Redis fails --------------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_unreachable_redis_is_a_quick_transient_store_error(cluster: bool, run, caplog, capfd) -> None:
    caplog.set_level(logging.WARNING)
    port = free_port()  # nothing listens here: connection refused

    async def body() -> None:
        store = RedisStore(f"redis://127.0.0.1:{port}", cluster=cluster)  # no I/O yet
        try:
            for call in (store.get("k"), store.ping(), store.fixed_window_hit("k", 1, 1000)):
                started = time.monotonic()
                with pytest.raises(StoreError) as info:
                    await call
                assert time.monotonic() - started < 1.0
                assert info.value.transient is True and info.value.timeout is False
                assert not isinstance(info.value, redis.RedisError)
        finally:
            await store.close()
    run(body())
    assert [r.getMessage() for r in caplog.records] == []
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_silent_redis_is_a_timeout_store_error(cluster: bool, run, caplog) -> None:
    caplog.set_level(logging.WARNING)
    # Accepts connections (the kernel completes the handshake) and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]

        async def body() -> None:
            store = RedisStore(f"redis://127.0.0.1:{port}", cluster=cluster, timeout_ms=50,
                               connect_timeout_ms=200)
            try:
                started = time.monotonic()
                with pytest.raises(StoreError) as info:
                    await store.get("k")
                assert time.monotonic() - started < 1.0
                assert info.value.timeout is True and info.value.transient is True
                # A burst of requests fails within one timeout, not one timeout per request.
                started = time.monotonic()
                errors = await asyncio.gather(*(store.get(f"k{i}") for i in range(20)),
                                              return_exceptions=True)
                assert time.monotonic() - started < 0.5
                assert all(isinstance(e, StoreError) and e.timeout for e in errors)
            finally:
                await store.close()
        run(body())
    assert [r.getMessage() for r in caplog.records] == []


def test_store_error_carries_its_flags() -> None:
    err = StoreError("redis get: timed out", transient=False, timeout=True)
    assert err.timeout and err.transient  # a timeout is always worth retrying later
    assert str(err) == "redis get: timed out"


# -- key layout -------------------------------------------------------------------------------

def test_keys_share_a_hash_tag_and_carry_the_prefix() -> None:
    space = KeySpace("t1")
    counter, companion = space.key("rl", "api-7", "minute"), space.key("rl", "api-7", "burst")
    assert counter == "t1:rl:{api-7}:minute"
    assert hash_tag(counter) == hash_tag(companion) == "api-7"
    assert space.key("cache", "GET example.com/a:b") == "t1:cache:{GET example.com/a:b}"


@pytest.mark.parametrize("bad", [("rl", ""), ("rl", "a}b"), ("r{l", "a"), ("", "a")])
def test_keys_refuse_what_would_move_the_hash_tag(bad: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        KeySpace("t1").key(*bad)
    with pytest.raises(ValueError):
        KeySpace("pre{fix}")


# -- statistics -----------------------------------------------------------------------------------

def test_byte_usage_counts_matching_byte_strings_only(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        for i in range(7):
            await store.set(keys.key("stats", f"k{i:02d}"), b"x" * (i + 1))
        await store.set(keys.key("other", "k"), b"y" * 100)
        await store.zadd(keys.key("stats", "zset"), "m", 1.0)          # another type: skipped
        count, size, truncated = await store.byte_usage(f"{keys.prefix}:stats:*")
        assert (count, size, truncated) == (7, sum(range(1, 8)), False)
        count, size, truncated = await store.byte_usage(f"{keys.prefix}:stats:*", limit=3)
        assert truncated and count <= 3
        assert (await store.byte_usage(f"{keys.prefix}:nothing:*"))[:2] == (0, 0)

    run(body())
