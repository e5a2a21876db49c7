"""The store contract, part two: scored sets and pub/sub on memory, Redis and Redis Cluster.

Decides what every backend answers identically for the two primitives the revocation list
is built on: a scored set (members ordered by score, pruned by score, read completely in
pages) and pub/sub (a message published after `subscribe` returned reaches every subscriber
of the channel, in order, also across two clients standing for two replicas, and a lost
subscription says so once — StoreError — instead of silently dropping messages). Loss is
caused for real: an overflowing subscriber on memory, `CLIENT KILL TYPE pubsub` on Redis,
a TCP proxy that stops forwarding for the silent partition. Nothing sleeps to synchronise:
reads wait with a deadline, server-side effects are polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import pytest
import redis

from extproc.store import Store, StoreError
from extproc.store.base import Subscription
from extproc.store.keys import KeySpace
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.support.procs import free_port

DEADLINE_S = 5.0


async def next_message(sub: Subscription, within: float = DEADLINE_S) -> bytes:
    return await asyncio.wait_for(anext(sub), within)


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, within: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


class TcpProxy:
    """A loopback TCP proxy a test can break: `freeze()` keeps connections open but forwards
    nothing (a silent partition), `cut()` closes every connection and refuses new ones
    until `heal()`. Runs on the test's event loop."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.frozen = False
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self.frozen:
                    dst.write(data)
                    await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()
            self._writers.discard(dst)

    def freeze(self) -> None:
        self.frozen = True

    def cut(self) -> None:
        self.refusing = True
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def heal(self) -> None:
        self.frozen = False
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def lose_subscriptions(backend, request: pytest.FixtureRequest, store: Store, channel: str) -> None:
    """Make the backend drop its subscribers, as a crash or a dead connection would."""
    if backend.name == "redis":
        request.getfixturevalue("redis_server").command("CLIENT", "KILL", "TYPE", "pubsub")
    elif backend.name == "redis-cluster":
        request.getfixturevalue("redis_cluster").command_all("CLIENT", "KILL", "TYPE", "pubsub")
    else:
        assert isinstance(store, MemoryStore)


# -- scored sets --------------------------------------------------------------------------------

def test_zrange_from_orders_by_score_then_member(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("z", "set")
        for member, score in [("b", 2.0), ("a", 2.0), ("c", 1.5), ("d", -3.25), ("e", 1e12 + 0.125)]:
            await store.zadd(k, member, score)
        assert await store.zrange_from(k, -math.inf) == [("d", -3.25), ("c", 1.5), ("a", 2.0), ("b", 2.0),
                                                          ("e", 1e12 + 0.125)]
        assert await store.zrange_from(k, 2.0) == [("a", 2.0), ("b", 2.0), ("e", 1e12 + 0.125)]
        assert await store.zrange_from(k, 1e13) == []
        assert await store.zrange_from(keys.key("z", "missing"), 0) == []
    run(body())


def test_zadd_moves_an_existing_member(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("z", "set")
        await store.zadd(k, "m", 10)
        await store.zadd(k, "m", 3)
        await store.zadd(k, "text with spaces:{and braces}", 4)
        assert await store.zrange_from(k, 0) == [("m", 3.0), ("text with spaces:{and braces}", 4.0)]
    run(body())


def test_zrem_below_is_inclusive_and_an_emptied_set_is_gone(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("z", "set")
        for i in range(5):
            await store.zadd(k, f"m{i}", i)
        assert await store.zrem_below(k, 1) == 2
        assert [m for m, _ in await store.zrange_from(k, -math.inf)] == ["m2", "m3", "m4"]
        assert await store.zrem_below(k, 1) == 0
        assert await store.zrem_below(k, math.inf) == 3
        assert await store.zrange_from(k, -math.inf) == []
        assert await store.delete(k) == 0                  # as Redis: no empty sets
        assert await store.zrem_below(keys.key("z", "missing"), 10) == 0
    run(body())


def test_zrange_from_reads_a_large_set_completely(store: Store, keys: KeySpace, run) -> None:
    # 2500 members: past Redis's listpack encoding, so ZSCAN really pages through a hash table
    async def body() -> None:
        k = keys.key("z", "big")
        for i in range(2500):
            await store.zadd(k, f"member-{i:05d}", float(i))
        everything = await store.zrange_from(k, 0)
        assert everything == [(f"member-{i:05d}", float(i)) for i in range(2500)]
        assert len(await store.zrange_from(k, 2000)) == 500
    run(body())


def test_scored_sets_and_values_do_not_mix(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        zset, plain = keys.key("z", "set"), keys.key("z", "plain")
        await store.zadd(zset, "m", 1)
        await store.set(plain, b"v")
        for call in (store.get(zset), store.incr(zset), store.fixed_window_hit(zset, 5, 1000),
                     store.zadd(plain, "m", 1), store.zrange_from(plain, 0), store.zrem_below(plain, 1)):
            with pytest.raises(StoreError) as info:
                await call
            assert info.value.transient is False and info.value.timeout is False
            assert not isinstance(info.value, redis.RedisError)
        await store.set(zset, b"now bytes")     # SET replaces a value of any type
        assert await store.get(zset) == b"now bytes"
    run(body())


def test_scored_set_arguments_are_checked_before_any_io(store: Store, keys: KeySpace, run) -> None:
    k = keys.key("z", "set")
    for call in (lambda: store.zadd(k, "m", math.nan), lambda: store.zadd(k, "m", math.inf),
                 lambda: store.zadd(k, "m", True), lambda: store.zrange_from(k, math.nan),
                 lambda: store.zrem_below(k, math.nan)):
        with pytest.raises(ValueError):
            run(call())
    with pytest.raises(TypeError):
        run(store.zadd(k, b"bytes", 1))  # type: ignore[arg-type]


def test_a_scored_set_is_shared_by_two_replicas(store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair

    async def body() -> None:
        k = keys.key("z", "shared")
        await asyncio.gather(*((a if i % 2 else b).zadd(k, f"m{i}", i) for i in range(50)))
        assert [m for m, _ in await b.zrange_from(k, 0)] == [f"m{i}" for i in range(50)]
        assert await b.zrem_below(k, 9) == 10
        assert len(await a.zrange_from(k, 0)) == 40
    run(body())


# -- pub/sub ------------------------------------------------------------------------------------

def test_subscriber_gets_every_message_in_order(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        channel = keys.channel("ps", "events")
        sub = await store.subscribe(channel)
        try:
            assert isinstance(sub, Subscription) and sub.channel == channel
            payloads = [b"first", b"", bytes(range(256)), b"x" * 100_000] + [f"m{i}".encode() for i in range(50)]
            for p in payloads:
                await store.publish(channel, p)
            assert [await next_message(sub) for _ in payloads] == payloads
        finally:
            await sub.close()
    run(body())


def test_every_subscriber_of_a_channel_and_only_of_it(store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair

    async def body() -> None:
        channel, other = keys.channel("ps", "events"), keys.channel("ps", "other")
        subs = [await b.subscribe(channel), await a.subscribe(channel), await b.subscribe(other)]
        try:
            await a.publish(channel, b"from a")
            await b.publish(channel, b"from b")
            await a.publish(other, b"elsewhere")
            for sub in subs[:2]:
                assert [await next_message(sub), await next_message(sub)] == [b"from a", b"from b"]
            assert await next_message(subs[2]) == b"elsewhere"
        finally:
            for sub in subs:
                await sub.close()
    run(body())


def test_publishing_to_nobody_is_fine(store: Store, keys: KeySpace, run) -> None:
    run(store.publish(keys.channel("ps", "nobody"), b"lost in space"))
    with pytest.raises(TypeError):
        run(store.publish(keys.channel("ps", "nobody"), "text"))  # type: ignore[arg-type]


def test_close_ends_the_iteration_even_for_a_waiting_reader(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        channel = keys.channel("ps", "events")
        sub = await store.subscribe(channel)
        waiting = asyncio.create_task(anext(sub))
        await asyncio.sleep(0)            # let the reader block (no message is coming)
        await sub.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, DEADLINE_S)
        await sub.close()                 # idempotent
        await store.publish(channel, b"after close")
        assert [m async for m in sub] == []
    run(body())


def test_a_lost_subscription_raises_once_and_a_new_one_works(store: Store, keys: KeySpace, run, backend,
                                                             request: pytest.FixtureRequest) -> None:
    async def body() -> None:
        channel = keys.channel("ps", "events")
        if isinstance(store, MemoryStore):
            store.max_pending_messages = 3
        sub = await store.subscribe(channel)
        await store.publish(channel, b"before")
        assert await next_message(sub) == b"before"
        if isinstance(store, MemoryStore):
            for i in range(4):            # a subscriber that falls behind has lost messages
                await store.publish(channel, f"m{i}".encode())
        else:
            lose_subscriptions(backend, request, store, channel)
        with pytest.raises(StoreError) as info:
            await next_message(sub)
        assert info.value.transient is True
        assert not isinstance(info.value, redis.RedisError)
        assert [m async for m in sub] == []   # then it ends; it never resumes by itself
        again = await store.subscribe(channel)
        try:
            await store.publish(channel, b"after")
            assert await next_message(again) == b"after"
        finally:
            await again.close()
    run(body())


def test_closing_the_store_ends_its_subscriptions(backend, keys: KeySpace, run) -> None:
    async def body() -> None:
        store = backend.make()
        sub = await store.subscribe(keys.channel("ps", "events"))
        await store.close()
        if backend.name == "memory":      # memory state outlives its holders; close the sub itself
            await sub.close()
        with pytest.raises(StopAsyncIteration):
            await next_message(sub)
    run(body())


# -- how Redis pub/sub fails --------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_subscribing_to_unreachable_redis_is_a_quick_transient_error(cluster: bool, run, caplog) -> None:
    caplog.set_level(logging.WARNING)
    port = free_port()

    async def body() -> None:
        store = RedisStore(f"redis://127.0.0.1:{port}", cluster=cluster)
        try:
            for call in (store.subscribe("ch"), store.publish("ch", b"m"), store.zrange_from("k", 0)):
                started = time.monotonic()
                with pytest.raises(StoreError) as info:
                    await call
                assert time.monotonic() - started < 1.0
                assert info.value.transient is True
        finally:
            await store.close()
    run(body())
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.redis
def test_an_idle_subscription_stays_alive_across_pings(redis_server, keys: KeySpace, run) -> None:
    def pings() -> int:
        stats = redis_server.command("INFO", "commandstats")
        for line in stats.splitlines():
            if line.startswith("cmdstat_ping:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0

    async def body() -> None:
        store = RedisStore(redis_server.url, pubsub_ping_seconds=0.05, timeout_ms=1000)
        try:
            channel = keys.channel("ps", "idle")
            sub = await store.subscribe(channel)
            reader = asyncio.create_task(anext(sub))
            before = pings()
            await eventually(lambda: pings() >= before + 3, "three idle PINGs answered")
            assert not reader.done()
            await store.publish(channel, b"still here")
            assert await asyncio.wait_for(reader, DEADLINE_S) == b"still here"
        finally:
            await store.close()
    run(body())


@pytest.mark.redis
def test_a_silent_partition_is_caught_by_the_ping(redis_server, keys: KeySpace, run) -> None:
    async def body() -> None:
        proxy = await TcpProxy(redis_server.port).start()
        store = RedisStore(proxy.url, pubsub_ping_seconds=0.1, timeout_ms=200)
        try:
            channel = keys.channel("ps", "events")
            sub = await store.subscribe(channel)
            await store.publish(channel, b"through the proxy")
            assert await next_message(sub) == b"through the proxy"
            proxy.freeze()                # no FIN, no RST: only the missing PONG tells
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await next_message(sub)
            # ping interval + pong timeout (max(1 s, timeout)), with room for a busy machine
            assert time.monotonic() - started < 0.1 + 1.0 + 1.0
            assert info.value.transient and info.value.timeout
            assert "PING" in str(info.value)
            assert [m async for m in sub] == []
        finally:
            await store.close()
            await proxy.close()
    run(body())


@pytest.mark.redis
def test_a_redis_restart_ends_the_subscription_with_an_error(tmp_path, keys: KeySpace, run) -> None:
    from tests.support.redis_servers import RedisServer

    server = RedisServer(tmp_path, name="redis-pubsub-restart")

    async def body() -> None:
        store = RedisStore(server.url)
        try:
            sub = await store.subscribe(keys.channel("ps", "events"))
            reader = asyncio.create_task(anext(sub))
            await asyncio.sleep(0)
            await asyncio.to_thread(server.stop)
            with pytest.raises(StoreError) as info:
                await asyncio.wait_for(reader, DEADLINE_S)
            assert info.value.transient
            with pytest.raises(StoreError):
                await store.subscribe(keys.channel("ps", "events"))
        finally:
            await store.close()
    try:
        run(body())
    finally:
        with contextlib.suppress(Exception):
            server.stop()
