"""Two replicas' RevocationLists on two clients of the same real Redis (standalone and Cluster).

What is shown: a revocation made through one replica reaches the other through pub/sub; a
replica started later, or one that was cut off, learns what it missed by resync; a Redis
restart makes both say `known_complete = False` while what they knew still holds, and they
recover on their own. The partitions are real where the topology allows it: Redis is stopped
and restarted, a TCP proxy drops one replica's connections, `CLIENT KILL` ends
subscriptions server-side; on Cluster, whose nodes announce their own addresses (no proxy),
a client-side gate keeps the cut-off replica from reconnecting. Every wait polls with a
deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.services.revocation import RevocationList
from extproc.store import StoreError
from extproc.store.keys import KeySpace
from extproc.store.redis import RedisStore
from tests.contract.test_store_pubsub import TcpProxy
from tests.support.procs import Proc
from tests.support.redis_servers import RedisCluster, RedisServer

pytestmark = pytest.mark.redis

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("revocation-redis"), name="revocation-redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("revocation-cluster"), masters=3)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["redis", "redis-cluster"])
def backend(request: pytest.FixtureRequest) -> tuple[str, bool, Callable[..., object]]:
    """(url, cluster, run-a-command-on-every-node)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url, False, server.command
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return cluster.url, True, cluster.command_all


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace(f"test-{uuid.uuid4().hex[:12]}")


def run(body: Coroutine[Any, Any, Any]) -> Any:
    """One event loop per test: every client the body opens, it closes."""
    return asyncio.run(body)


async def eventually(check: Callable[[], bool], what: str, within: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


def store_for(url: str, cluster: bool) -> RedisStore:
    # generous timeouts: a busy 2-core machine runs these next to other suites
    return RedisStore(url, cluster=cluster, timeout_ms=1000, connect_timeout_ms=500)


def replica(store: Any, keys: KeySpace, **kw: Any) -> RevocationList:
    kw.setdefault("retry_seconds", 0.05)
    return RevocationList(store, keyspace=keys, exp_grace_seconds=0, **kw)


class Gate:
    """Client-side partition of one replica: while closed, every store call fails."""

    def __init__(self, inner: RedisStore):
        self.inner = inner
        self.name = inner.name
        self.open = True

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.inner, name)

        async def gated(*args: Any, **kwargs: Any) -> Any:
            if not self.open:
                raise StoreError(f"gated {name}: connection refused", transient=True)
            return await method(*args, **kwargs)
        return gated


def now() -> float:
    return time.time()


# -- propagation ---------------------------------------------------------------------------------

def test_a_revocation_on_one_replica_reaches_the_other(backend, keys: KeySpace) -> None:
    url, cluster, _ = backend

    async def body() -> None:
        sa, sb = store_for(url, cluster), store_for(url, cluster)
        a, b = replica(sa, keys), replica(sb, keys)
        try:
            await a.start()
            await b.start()
            assert a.known_complete and b.known_complete
            digest = "ab" * 32
            await a.revoke_token("jti-1", now() + 600)
            await b.revoke_token(digest, now() + 600)
            await a.revoke_subject("alice", ttl_seconds=600)
            await eventually(lambda: b.is_revoked("jti-1", "", None, None, now()), "b learns the jti")
            await eventually(lambda: a.is_revoked(None, digest, None, None, now()), "a learns the digest")
            await eventually(lambda: b.is_revoked("other", "", "alice", now() - 1, now()), "b learns the logout")
            assert not b.is_revoked("other", "", "alice", now() + 1, now())   # a token issued afterwards
            assert not b.is_revoked("jti-2", "cd" * 32, "bob", now(), now())
        finally:
            await a.close()
            await b.close()
            await sa.close()
            await sb.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}
    run(body())


def test_a_revocation_expires_with_its_token(backend, keys: KeySpace) -> None:
    url, cluster, _ = backend

    async def body() -> None:
        sa, sb = store_for(url, cluster), store_for(url, cluster)
        a, b = replica(sa, keys), replica(sb, keys)
        try:
            await a.start()
            await b.start()
            exp = now() + 1.0                                   # the shortest life an entry gets
            await a.revoke_token("short-lived", exp)
            await eventually(lambda: b.is_revoked("short-lived", "", None, None, now()), "b learns it")
            await eventually(lambda: not b.is_revoked("short-lived", "", None, None, now()),
                             "the entry ends with the token")
            assert now() >= exp
            assert await sb.zrange_from(b.index_key, now()) == []   # a resync would not bring it back
            await a.revoke_token("next", now() + 600)              # a write trims what is dead
            assert [m for m, _ in await sb.zrange_from(b.index_key, float("-inf"))] == ["token:next"]
        finally:
            await a.close()
            await b.close()
            await sa.close()
            await sb.close()
    run(body())


def test_a_replica_started_later_learns_by_resync(backend, keys: KeySpace) -> None:
    url, cluster, _ = backend

    async def body() -> None:
        sa, sb = store_for(url, cluster), store_for(url, cluster)
        a = replica(sa, keys)
        try:
            await a.revoke_token("early", now() + 600)            # before anyone listens
            await a.revoke_subject("alice", ttl_seconds=600)
            b = replica(sb, keys)
            assert not b.known_complete
            await b.start()
            try:
                assert b.known_complete                            # start() waited for the first sync
                assert b.is_revoked("early", "", None, None, now())
                assert b.is_revoked(None, "", "alice", now() - 5, now())
            finally:
                await b.close()
        finally:
            await sa.close()
            await sb.close()
    run(body())


def test_a_cut_off_replica_resyncs_what_it_missed(backend, keys: KeySpace) -> None:
    """B's subscription is killed server-side; a gate keeps B from reconnecting meanwhile."""
    url, cluster, on_every_node = backend

    async def body() -> None:
        sa, sb = store_for(url, cluster), store_for(url, cluster)
        gate = Gate(sb)
        a, b = replica(sa, keys), replica(gate, keys)
        try:
            await a.start()
            await b.start()
            await a.revoke_token("known", now() + 600)
            await eventually(lambda: b.is_revoked("known", "", None, None, now()), "b learns 'known'")

            gate.open = False
            on_every_node("CLIENT", "KILL", "TYPE", "pubsub")      # both lose their subscription
            await eventually(lambda: not b.known_complete, "b knows it may miss revocations")
            await eventually(lambda: a.known_complete, "a resubscribed")
            await a.revoke_token("missed", now() + 600)
            await a.revoke_subject("mallory", ttl_seconds=600)
            assert b.is_revoked("known", "", None, None, now())    # what b knew still holds
            assert not b.is_revoked("missed", "", None, None, now())

            gate.open = True
            await eventually(lambda: b.known_complete, "b resynced")
            assert b.is_revoked("missed", "", None, None, now())
            assert b.is_revoked(None, "", "mallory", now() - 1, now())
            await a.revoke_token("after", now() + 600)             # and b listens again
            await eventually(lambda: b.is_revoked("after", "", None, None, now()), "b hears again")
        finally:
            await a.close()
            await b.close()
            await sa.close()
            await sb.close()
    run(body())


# -- real outages (standalone: one process to stop, one port to proxy) -----------------------------

def _restart(server: RedisServer, log_dir: Path) -> None:
    """Start redis-server again with the same arguments, on the same port (no persistence)."""
    server.proc = Proc("revocation-redis-restarted", server.proc.argv, log_dir)
    server.proc.wait_ready(lambda: server.command("PING").startswith("+PONG"), timeout=15)


def test_a_redis_restart_makes_both_incomplete_and_both_recover(tmp_path: Path, keys: KeySpace) -> None:
    server = RedisServer(tmp_path, name="revocation-redis-restart")

    async def body() -> None:
        sa, sb = store_for(server.url, False), store_for(server.url, False)
        a, b = replica(sa, keys), replica(sb, keys)
        try:
            await a.start()
            await b.start()
            await a.revoke_token("before-restart", now() + 600)
            await eventually(lambda: b.is_revoked("before-restart", "", None, None, now()), "b learns it")

            await asyncio.to_thread(server.stop)
            await eventually(lambda: not a.known_complete and not b.known_complete, "both incomplete")
            for r in (a, b):
                assert r.is_revoked("before-restart", "", None, None, now())
            with pytest.raises(StoreError):
                await b.revoke_token("during-outage", now() + 600)   # refused fleet-wide ...
            assert b.is_revoked("during-outage", "", None, None, now())   # ... enforced locally

            await asyncio.to_thread(_restart, server, tmp_path)
            await eventually(lambda: a.known_complete and b.known_complete, "both resynced")
            # the restarted Redis kept nothing, the replicas still enforce what they knew
            assert await sa.zrange_from(a.index_key, 0) == []
            assert a.is_revoked("before-restart", "", None, None, now())
            await b.revoke_token("during-outage", now() + 600)        # the retry shares it
            await eventually(lambda: a.is_revoked("during-outage", "", None, None, now()), "a learns it")
        finally:
            await a.close()
            await b.close()
            await sa.close()
            await sb.close()
    try:
        run(body())
    finally:
        server.stop()


def test_a_network_partition_of_one_replica_heals_by_resync(redis_server: RedisServer, keys: KeySpace) -> None:
    async def body() -> None:
        proxy = await TcpProxy(redis_server.port).start()
        sa, sb = store_for(redis_server.url, False), store_for(proxy.url, False)
        a, b = replica(sa, keys), replica(sb, keys)
        try:
            await a.start()
            await b.start()
            assert b.known_complete
            proxy.cut()                                            # b's connections reset, reconnects refused
            await eventually(lambda: not b.known_complete, "b notices the partition")
            assert a.known_complete
            await a.revoke_token("during-partition", now() + 600)
            await a.revoke_subject("eve", ttl_seconds=600)
            assert not b.is_revoked("during-partition", "", None, None, now())

            proxy.heal()
            await eventually(lambda: b.known_complete, "b resynced after the partition")
            assert b.is_revoked("during-partition", "", None, None, now())
            assert b.is_revoked(None, "", "eve", now() - 1, now())
        finally:
            await a.close()
            await b.close()
            await sa.close()
            await sb.close()
            await proxy.close()
    run(body())


def test_a_silent_partition_is_noticed_by_the_ping(redis_server: RedisServer, keys: KeySpace) -> None:
    async def body() -> None:
        proxy = await TcpProxy(redis_server.port).start()
        sb = RedisStore(proxy.url, timeout_ms=200, pubsub_ping_seconds=0.1)
        b = replica(sb, keys)
        try:
            await b.start()
            assert b.known_complete
            proxy.freeze()                                         # nothing forwarded, nothing closed
            await eventually(lambda: not b.known_complete, "b notices the silence", within=5)
            proxy.heal()
            await eventually(lambda: b.known_complete, "b resynced on a fresh connection")
        finally:
            await b.close()
            await sb.close()
            await proxy.close()
    run(body())
