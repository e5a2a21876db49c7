"""Fixtures that run one test body against every store backend.

Decides how the contract suite gets its backends: ONE standalone Redis and ONE 3-master
Redis Cluster per session (started on first use, stopped by PID at the end), a fresh
`MemoryStore` per test, and a unique key prefix per test (`keys`) so tests never flush or
share state. Store clients are created per test and closed in the test's own event loop
(`run`), because redis.asyncio connections belong to the loop that opened them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from extproc.store import MemoryStore, Store
from extproc.store.keys import KeySpace
from extproc.store.redis import RedisStore
from tests.support.redis_servers import RedisCluster, RedisServer

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", id="redis-cluster", marks=pytest.mark.redis),
]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-standalone"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3)
    yield cluster
    cluster.stop()


@pytest.fixture
def run() -> Iterator[Runner]:
    """Run coroutines on this test's event loop (one loop per test, closed at teardown)."""
    with asyncio.Runner() as runner:
        yield runner.run


@dataclass
class Backend:
    name: str
    url: str | None = None
    flush_scripts: Callable[[], object] = lambda: None

    def make(self) -> Store:
        if self.name == "memory":
            return MemoryStore()
        assert self.url is not None
        # A generous timeout: the suite fires 50 concurrent calls on a busy 2-core machine.
        return RedisStore(self.url, cluster=self.name == "redis-cluster", timeout_ms=2000)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory")
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Backend("redis", server.url, lambda: server.command("SCRIPT", "FLUSH"))
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return Backend("redis-cluster", cluster.url, lambda: cluster.command_all("SCRIPT", "FLUSH"))


@pytest.fixture
def keys() -> KeySpace:
    """A key space no other test uses: isolation by prefix, never by flushing."""
    return KeySpace(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(backend: Backend, run: Runner) -> Iterator[Store]:
    s = backend.make()
    yield s
    run(s.close())


@pytest.fixture
def store_pair(backend: Backend, run: Runner) -> Iterator[tuple[Store, Store]]:
    """Two clients of one backend, standing for two sidecar replicas.

    Memory state is per process, so two replicas sharing it means one shared instance.
    """
    if backend.name == "memory":
        shared = backend.make()
        yield shared, shared
        run(shared.close())
        return
    a, b = backend.make(), backend.make()
    yield a, b
    run(a.close())
    run(b.close())
