"""RateLimitService/ShouldRateLimit on a real grpc.aio server, in process, over real stores.

Each test runs the servicer on its own server (two servers sharing a store stand for two
sidecar replicas) with a MemoryStore (a fake clock where windows must move: sliding window,
calendar month, deny cache), a real standalone Redis, a 3-master Redis Cluster, a Redis that
is not running, and a TCP peer that never answers. Requests are shaped as Envoy's native
ratelimit filter sends them. Keys are isolated per test by prefix; metrics are asserted as
deltas. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import REGISTRY

from extproc import config as cfgmod
from extproc.core.ratelimit import Period
from extproc.services import ratelimit_service
from extproc.store import MemoryStore, Store, StoreError
from extproc.store.keys import KeySpace
from extproc.store.redis import RedisStore
from tests.support.procs import free_port
from tests.support.redis_servers import RedisCluster, RedisServer

Response = rls_pb2.RateLimitResponse
OK, OVER = Response.OK, Response.OVER_LIMIT
T0 = 1_767_225_600_000            # 2026-01-01T00:00:00Z

CONFIG = """
ratelimit_service:
  failure_mode: {failure_mode}
  store_timeout_ms: {timeout}
  domains:
  - domain: webshop
    descriptors:
    - key: fw
      rate_limit: {{unit: day, requests_per_unit: 10}}
    - key: sw
      rate_limit: {{unit: hour, requests_per_unit: 10, algorithm: sliding_window}}
    - key: tb
      rate_limit: {{unit: day, requests_per_unit: 10, algorithm: token_bucket}}
    - key: user
      name: per-user
      rate_limit: {{unit: minute, requests_per_unit: 3}}
    - key: plan
      value: gold
      descriptors:
      - key: user
        name: gold-user
        rate_limit: {{unit: hour, requests_per_unit: 5}}
    - key: plan
      descriptors:
      - key: user
        name: plan-user
        rate_limit: {{unit: hour, requests_per_unit: 2}}
      - key: user
        value: vip
        rate_limit: {{unlimited: true}}
    - key: minute
      descriptors:
      - {{key: sliding, rate_limit: {{unit: minute, requests_per_unit: 10, algorithm: sliding_window}}}}
      - {{key: fixed, rate_limit: {{unit: minute, requests_per_unit: 10}}}}
    - key: quota
      name: monthly
      rate_limit: {{unit: month, requests_per_unit: 3}}
    - key: beta
      name: beta-shadow
      shadow_mode: true
      rate_limit: {{unit: hour, requests_per_unit: 1}}
    - key: free
      rate_limit: {{unlimited: true}}
  - domain: other
    descriptors:
    - key: user
      rate_limit: {{unit: hour, requests_per_unit: 1}}
"""


def config(failure_mode: str = "open", timeout: int = 1000) -> cfgmod.Config:
    return cfgmod.parse(CONFIG.format(failure_mode=failure_mode, timeout=timeout), "<test>")


def descriptor(*entries: tuple[str, str], hits: int | None = None,
               override: tuple[int, int] | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
    if hits is not None:
        d.hits_addend.value = hits
    if override is not None:
        d.limit.requests_per_unit, d.limit.unit = override
    return d


def request(*descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "webshop",
            hits_addend: int = 0) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)


def headers(resp: Response) -> dict[str, str]:
    return {h.key: h.value for h in resp.response_headers_to_add}


def decisions(domain: str, descriptor: str, result: str) -> float:
    return REGISTRY.get_sample_value("extproc_rls_decisions_total",
                                     {"domain": domain, "descriptor": descriptor, "result": result}) or 0.0


def store_errors(store: str, kind: str) -> float:
    return REGISTRY.get_sample_value("extproc_store_errors_total", {"store": store, "kind": kind}) or 0.0


class Clock:
    """Wall and monotonic time for the memory store and the servicer, moved by the test."""

    def __init__(self, ms: int):
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


class CountingStore:
    """A real store that counts the rate_limit calls reaching it."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.calls = 0
        self.name = inner.name

    async def rate_limit(self, checks, now_ms=None):
        self.calls += 1
        return await self.inner.rate_limit(checks, now_ms)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Replica:
    stub: rls_pb2_grpc.RateLimitServiceStub
    servicer: ratelimit_service.RateLimitServiceServicer
    runtime: types.SimpleNamespace

    async def __call__(self, req: rls_pb2.RateLimitRequest) -> Response:
        return await self.stub.ShouldRateLimit(req, timeout=10)


@dataclass
class Harness:
    keys: KeySpace = field(default_factory=lambda: KeySpace(f"rls-{uuid.uuid4().hex[:12]}"))

    @contextlib.asynccontextmanager
    async def replica(self, store: Store | CountingStore, cfg: cfgmod.Config | None = None,
                      clock: Any = None) -> AsyncIterator[Replica]:
        runtime = types.SimpleNamespace(config=cfg or config())
        server = grpc.aio.server()
        options: dict[str, Any] = {"keyspace": self.keys}
        if clock is not None:
            options["clock"] = clock
        servicer = ratelimit_service.add_to_server(server, lambda: runtime, lambda: store, **options)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Replica(rls_pb2_grpc.RateLimitServiceStub(channel), servicer, runtime)
        finally:
            await channel.close()
            await server.stop(None)


def unique(prefix: str = "v") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -------------------------------------------------------------------------------- backends ---

@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("rls-redis"), name="rls-redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("rls-redis-cluster"), masters=3)
    yield cluster
    cluster.stop()


@dataclass
class Backend:
    name: str
    url: str | None = None

    def make(self, clock: Clock | None = None) -> Store:
        if self.name == "memory":
            return MemoryStore(clock=clock, wall_clock=clock) if clock else MemoryStore()
        assert self.url is not None
        return RedisStore(self.url, cluster=self.name == "redis-cluster", timeout_ms=2000)

    def pair(self) -> tuple[Store, Store]:
        """Two clients standing for two replicas (the memory store is per process: shared)."""
        if self.name == "memory":
            shared = self.make()
            return shared, shared
        return self.make(), self.make()


def _backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory")
    if request.param == "redis":
        return Backend("redis", request.getfixturevalue("redis_server").url)
    return Backend("redis-cluster", request.getfixturevalue("redis_cluster").url)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> Backend:
    return _backend(request)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("redis-cluster", marks=pytest.mark.redis)])
def any_backend(request: pytest.FixtureRequest) -> Backend:
    return _backend(request)


async def close(*stores: Store) -> None:
    for s in dict.fromkeys(stores):
        await s.close()


# ------------------------------------------------------------------------------ exactness ---

@pytest.mark.parametrize("key", ["fw", "sw", "tb"])
def test_n_plus_k_concurrent_calls_on_two_replicas_admit_exactly_n(any_backend: Backend, key: str):
    """10 per window (a token bucket refilling one token per 2.4 h): 16 concurrent calls
    spread over two servers sharing the store, exactly 10 OK."""
    async def body():
        a, b = any_backend.pair()
        h = Harness()
        try:
            async with h.replica(a) as one, h.replica(b) as two:
                value = unique()
                calls = [(one if i % 2 else two)(request(descriptor((key, value)))) for i in range(16)]
                replies = await asyncio.gather(*calls)
                assert sorted(r.overall_code for r in replies) == [OK] * 10 + [OVER] * 6
                over = [r for r in replies if r.overall_code == OVER]
                assert all(r.statuses[0].limit_remaining == 0 for r in over)
                assert all(headers(r)["x-ratelimit-remaining"] == "0" and "retry-after" in headers(r) for r in over)
                # the next one too, and an unrelated value is untouched
                assert (await one(request(descriptor((key, value))))).overall_code == OVER
                assert (await two(request(descriptor((key, unique()))))).overall_code == OK
        finally:
            await close(a, b)
    asyncio.run(body())


def test_a_rejected_request_charges_none_of_its_descriptors(any_backend: Backend):
    """Two descriptors per request (different hash tags: different Cluster slots, decided
    with charge-and-refund): once per-user (3/min) rejects, the 5/h gold limit is not charged."""
    async def body():
        store = any_backend.make()
        try:
            async with Harness().replica(store) as rls:
                user = unique("u")
                both = request(descriptor(("user", user)), descriptor(("plan", "gold"), ("user", user)))
                codes = [(await rls(both)).overall_code for _ in range(5)]
                assert codes == [OK, OK, OK, OVER, OVER]
                alone = await rls(request(descriptor(("plan", "gold"), ("user", user))))
                assert alone.overall_code == OK
                assert alone.statuses[0].limit_remaining == 5 - 3 - 1
        finally:
            await close(store)
    asyncio.run(body())


# --------------------------------------------------------------------------- the tree -------

def test_value_less_keys_count_each_value_apart(backend: Backend):
    async def body():
        store = backend.make()
        try:
            async with Harness().replica(store) as rls:
                alice, bob = unique("alice"), unique("bob")
                assert [(await rls(request(descriptor(("user", alice))))).overall_code for _ in range(4)] == \
                    [OK, OK, OK, OVER]
                bob_first = await rls(request(descriptor(("user", bob))))
                assert bob_first.overall_code == OK and bob_first.statuses[0].limit_remaining == 2
        finally:
            await close(store)
    asyncio.run(body())


def test_nested_descriptors_take_the_most_specific_node(backend: Backend):
    async def body():
        store = backend.make()
        try:
            async with Harness().replica(store) as rls:
                user = unique("u")
                resp = await rls(request(descriptor(("plan", "gold"), ("user", user)),
                                         descriptor(("plan", "silver"), ("user", user)),
                                         descriptor(("plan", "silver"), ("user", "vip")),
                                         descriptor(("plan", "gold")),
                                         descriptor(("nope", "x"))))
                assert resp.overall_code == OK
                gold, silver, vip, gold_alone, unmatched = resp.statuses
                assert (gold.current_limit.name, gold.current_limit.requests_per_unit, gold.current_limit.unit) == \
                    ("gold-user", 5, Response.RateLimit.HOUR)
                assert gold.limit_remaining == 4
                assert (silver.current_limit.name, silver.current_limit.requests_per_unit) == ("plan-user", 2)
                assert silver.limit_remaining == 1
                assert vip.code == OK and not vip.HasField("current_limit") and vip.limit_remaining == 2**32 - 1
                for status in (gold_alone, unmatched):
                    assert status.code == OK and not status.HasField("current_limit")
                # the tightest descriptor's headers: plan-user with 1 of 2 left
                h = headers(resp)
                assert (h["x-ratelimit-limit"], h["x-ratelimit-remaining"]) == ("2", "1")
                assert h["ratelimit-policy"] == '"plan-user";q=2;w=3600'
                assert h["ratelimit"].startswith('"plan-user";r=1;t=')
                assert "retry-after" not in h
        finally:
            await close(store)
    asyncio.run(body())


def test_unlimited_and_unmatched_descriptors_never_touch_the_store():
    async def body():
        store = CountingStore(MemoryStore())
        async with Harness().replica(store) as rls:
            before = decisions("webshop", "unmatched", "no_limit"), decisions("webshop", "free", "unlimited")
            for _ in range(50):
                resp = await rls(request(descriptor(("free", "x")), descriptor(("nope", "y"))))
                assert resp.overall_code == OK and not resp.response_headers_to_add
                assert resp.statuses[0].limit_remaining == 2**32 - 1
            assert store.calls == 0 and len(store.inner) == 0
            assert decisions("webshop", "unmatched", "no_limit") - before[0] == 50
            assert decisions("webshop", "free", "unlimited") - before[1] == 50
    asyncio.run(body())


def test_unknown_domain_is_ok_and_counted():
    async def body():
        store = CountingStore(MemoryStore())
        async with Harness().replica(store) as rls:
            before = decisions("unknown", "unmatched", "unknown_domain")
            resp = await rls(request(descriptor(("user", "a")), descriptor(("fw", "b")), domain="no-such-domain"))
            assert resp.overall_code == OK and [s.code for s in resp.statuses] == [OK, OK]
            assert not resp.response_headers_to_add and store.calls == 0
            assert decisions("unknown", "unmatched", "unknown_domain") - before == 2
            # the same descriptor in another configured domain has that domain's limit
            assert (await rls(request(descriptor(("user", "a")), domain="other"))).statuses[0].current_limit \
                .requests_per_unit == 1
    asyncio.run(body())


def test_shadow_descriptors_are_counted_but_never_over_limit(backend: Backend):
    """beta: 1 per hour in shadow mode. Over it, the status stays OK (remaining 0), the metric
    says shadow_over_limit, and the enforced descriptor next to it is still charged."""
    async def body():
        store = backend.make()
        try:
            async with Harness().replica(store) as rls:
                beta, user = unique("beta"), unique("u")
                before = decisions("webshop", "beta-shadow", "shadow_over_limit")
                replies = [await rls(request(descriptor(("beta", beta)), descriptor(("user", user))))
                           for _ in range(3)]
                assert [r.overall_code for r in replies] == [OK, OK, OK]
                assert [r.statuses[0].code for r in replies] == [OK, OK, OK]
                assert [r.statuses[0].limit_remaining for r in replies] == [0, 0, 0]
                assert [r.statuses[1].limit_remaining for r in replies] == [2, 1, 0]   # per-user charged
                assert decisions("webshop", "beta-shadow", "shadow_over_limit") - before == 2
                # the headers describe enforced descriptors only
                assert headers(replies[-1])["ratelimit-policy"].startswith('"per-user"')
                # the enforced one now rejects; the shadow one still never does
                fourth = await rls(request(descriptor(("beta", beta)), descriptor(("user", user))))
                assert fourth.overall_code == OVER
                assert [s.code for s in fourth.statuses] == [OK, OVER]
        finally:
            await close(store)
    asyncio.run(body())


def test_hits_addend_of_the_request_and_of_a_descriptor(backend: Backend):
    async def body():
        store = backend.make()
        try:
            async with Harness().replica(store) as rls:
                a, b = unique("a"), unique("b")
                first = await rls(request(descriptor(("fw", a)), hits_addend=7))
                assert first.overall_code == OK and first.statuses[0].limit_remaining == 3
                assert (await rls(request(descriptor(("fw", a)), hits_addend=4))).overall_code == OVER
                # the descriptor's own hits_addend wins over the request's
                mixed = await rls(request(descriptor(("fw", a), hits=3), descriptor(("fw", b)), hits_addend=4))
                assert mixed.overall_code == OK
                assert [s.limit_remaining for s in mixed.statuses] == [0, 6]
                # a huge cost is just over the limit, never an error
                assert (await rls(request(descriptor(("fw", b), hits=2**63)))).overall_code == OVER
        finally:
            await close(store)
    asyncio.run(body())


def test_a_descriptor_override_replaces_the_configured_limit():
    async def body():
        clock = Clock(T0 + 1_000)      # no hour's boundary between the two requests
        store = MemoryStore(clock=clock, wall_clock=clock)
        async with Harness().replica(store, clock=clock) as rls:
            user = unique("u")
            over = descriptor(("user", user), override=(1, Response.RateLimit.HOUR))
            first = await rls(request(over))
            assert first.statuses[0].current_limit.name == "override"
            assert first.statuses[0].current_limit.requests_per_unit == 1
            assert (await rls(request(over))).overall_code == OVER
            # YEAR cannot be expressed: the tree decides (per-user, 3 per minute)
            year = await rls(request(descriptor(("user", user), override=(1, Response.RateLimit.YEAR))))
            assert year.statuses[0].current_limit.name == "per-user"
    asyncio.run(body())


# --------------------------------------------------------------------------- windows --------

def test_the_sliding_window_refuses_the_burst_a_fixed_window_admits():
    """10 per minute each: 10 hits in the last 100 ms of a minute, then 10 in the first 100 ms
    of the next. The fixed window admits all 20; the sliding window none of the second 10."""
    async def body():
        clock = Clock(T0 + 59_900)
        store = MemoryStore(clock=clock, wall_clock=clock)
        async with Harness().replica(store, clock=clock) as rls:
            user = unique("u")
            pair = request(descriptor(("minute", user), ("sliding", "s")), descriptor(("minute", user), ("fixed", "f")))
            sliding = request(descriptor(("minute", user), ("sliding", "s")))
            fixed = request(descriptor(("minute", user), ("fixed", "f")))
            assert [(await rls(pair)).overall_code for _ in range(10)] == [OK] * 10
            clock.ms = T0 + 60_100
            assert [(await rls(fixed)).overall_code for _ in range(10)] == [OK] * 10
            refused = await rls(sliding)
            assert refused.overall_code == OVER
            # retry-after: until the previous minute's weight lets one request through
            assert int(headers(refused)["retry-after"]) >= 6
    asyncio.run(body())


def test_a_monthly_quota_resets_at_the_first_instant_of_the_next_utc_month():
    async def body():
        jan31_end = int(dt.datetime(2026, 1, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp() * 1000)
        feb1 = int(dt.datetime(2026, 2, 1, tzinfo=dt.UTC).timestamp() * 1000)
        mar1 = int(dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp() * 1000)
        clock = Clock(jan31_end)
        store = MemoryStore(clock=clock, wall_clock=clock)
        async with Harness().replica(store, clock=clock) as rls:
            q = request(descriptor(("quota", unique())))
            replies = [await rls(q) for _ in range(4)]
            assert [r.overall_code for r in replies] == [OK, OK, OK, OVER]
            status = replies[0].statuses[0]
            assert status.current_limit.unit == Response.RateLimit.MONTH
            assert status.duration_until_reset.ToMilliseconds() == feb1 - jan31_end
            assert headers(replies[-1])["retry-after"] == "1"
            assert headers(replies[-1])["ratelimit-policy"] == f'"monthly";q=3;w={(feb1 - T0) // 1000}'
            clock.ms = feb1
            february = await rls(q)
            assert february.overall_code == OK and february.statuses[0].limit_remaining == 2
            assert february.statuses[0].duration_until_reset.ToMilliseconds() == mar1 - feb1
    asyncio.run(body())


@pytest.mark.redis
def test_a_monthly_quota_on_redis_resets_at_the_end_of_the_month(redis_server: RedisServer):
    """Redis' clock decides the window: the reset lies between the month ends seen by this
    process before and after the call (both the same month but for a call made on the turn)."""
    async def body():
        store = RedisStore(redis_server.url, timeout_ms=2000)
        try:
            async with Harness().replica(store) as rls:
                q = request(descriptor(("quota", unique())))
                before = dt.datetime.now(dt.UTC).timestamp() * 1000
                resp = await rls(q)
                after = dt.datetime.now(dt.UTC).timestamp() * 1000
                status = resp.statuses[0]
                assert status.current_limit.unit == Response.RateLimit.MONTH and status.limit_remaining == 2
                _, _, end_before = Period.MONTH.window(int(before))
                _, _, end_after = Period.MONTH.window(int(after))
                reset = status.duration_until_reset.ToMilliseconds()
                assert end_before - after - 1000 <= reset <= end_after - before + 1000
                assert [(await rls(q)).overall_code for _ in range(3)] == [OK, OK, OVER]
        finally:
            await store.close()
    asyncio.run(body())


# ---------------------------------------------------------------------- deny cache, reload --

def test_a_flood_over_the_limit_costs_no_store_calls_until_it_could_pass():
    async def body():
        clock = Clock(T0 + 1_000)
        store = CountingStore(MemoryStore(clock=clock, wall_clock=clock))
        async with Harness().replica(store, clock=clock) as rls:
            user, other = unique("u"), unique("o")
            flood = request(descriptor(("user", user)), descriptor(("fw", other)))
            assert [(await rls(flood)).overall_code for _ in range(4)] == [OK, OK, OK, OVER]
            calls = store.calls
            before = decisions("webshop", "fw", "not_checked")
            for _ in range(100):
                resp = await rls(flood)
                assert resp.overall_code == OVER and resp.statuses[0].code == OVER
                assert resp.statuses[1].code == OK and resp.statuses[1].current_limit.requests_per_unit == 10
            assert store.calls == calls
            assert decisions("webshop", "fw", "not_checked") - before == 100
            # the other descriptor was never charged by the rejected requests
            clock.ms = T0 + 60_000          # per-user's window is over: asked again, admitted
            resp = await rls(flood)
            assert resp.overall_code == OK and store.calls == calls + 1
            assert resp.statuses[1].limit_remaining == 10 - 4
    asyncio.run(body())


def test_a_reload_applies_at_once_and_keeps_the_counters_of_unchanged_rules():
    async def body():
        # a fixed clock: on the wall clock a minute's boundary between the requests resets the window
        clock = Clock(T0 + 1_000)
        store = MemoryStore(clock=clock, wall_clock=clock)
        async with Harness().replica(store, clock=clock) as rls:
            user = unique("u")
            assert [(await rls(request(descriptor(("user", user))))).overall_code for _ in range(4)] == \
                [OK, OK, OK, OVER]
            text = CONFIG.format(failure_mode="open", timeout=1000).replace(
                "name: per-user\n      rate_limit: {unit: minute, requests_per_unit: 3}",
                "name: per-user\n      rate_limit: {unit: minute, requests_per_unit: 5}")
            rls.runtime.config = cfgmod.parse(text, "<reloaded>")
            resp = await rls(request(descriptor(("user", user))))
            assert resp.overall_code == OK and resp.statuses[0].limit_remaining == 1     # 4th of 5
    asyncio.run(body())


# ------------------------------------------------------------------------------ failures ----

def _dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
def test_a_dead_redis_follows_failure_mode(failure_mode: str, caplog: pytest.LogCaptureFixture):
    async def body():
        store = RedisStore(_dead_redis_url(), timeout_ms=200, connect_timeout_ms=200)
        try:
            async with Harness().replica(store, config(failure_mode)) as rls:
                before = (decisions("webshop", "per-user", "store_error"), store_errors("redis", "error"))
                req = request(descriptor(("user", "a")), descriptor(("free", "x")))
                if failure_mode == "open":
                    resp = await rls(req)
                    assert resp.overall_code == OK and [s.code for s in resp.statuses] == [OK, OK]
                    assert not resp.response_headers_to_add
                    assert not resp.statuses[0].HasField("current_limit")
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await rls(req)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert decisions("webshop", "per-user", "store_error") - before[0] == 1
                assert store_errors("redis", "error") - before[1] == 1
                # a request with no limited descriptor needs no store: answered as usual
                assert (await rls(request(descriptor(("free", "x"))))).overall_code == OK
                # the failure is logged once, not per request
                for _ in range(3):
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await rls(req)
        finally:
            await store.close()
    with caplog.at_level("INFO", logger="extproc.ratelimit_service"):
        asyncio.run(body())
    assert [r.getMessage() for r in caplog.records] == [
        "rate limit store failing; ratelimit_service.failure_mode decides"]


class SwitchableStore(CountingStore):
    """A real memory store that can be taken down (every call raises a transient StoreError)."""

    down = False

    async def rate_limit(self, checks, now_ms=None):
        if self.down:
            raise StoreError("memory rate_limit: down for the test", transient=True)
        return await super().rate_limit(checks, now_ms)


def test_the_store_coming_back_is_picked_up_and_each_transition_logged_once(caplog: pytest.LogCaptureFixture):
    async def body():
        store = SwitchableStore(MemoryStore())
        async with Harness().replica(store) as rls:
            user = unique("u")
            req = request(descriptor(("user", user)))
            assert (await rls(req)).statuses[0].limit_remaining == 2
            store.down = True
            for _ in range(3):
                resp = await rls(req)
                assert resp.overall_code == OK and not resp.statuses[0].HasField("current_limit")
            store.down = False
            for remaining in (1, 0):
                assert (await rls(req)).statuses[0].limit_remaining == remaining
            assert (await rls(req)).overall_code == OVER

    with caplog.at_level("INFO", logger="extproc.ratelimit_service"):
        asyncio.run(body())
    assert [r.getMessage() for r in caplog.records] == [
        "rate limit store failing; ratelimit_service.failure_mode decides", "rate limit store answering again"]


@contextlib.asynccontextmanager
async def silent_peer() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers (a hung Redis)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, family=socket.AF_INET)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
def test_a_hung_store_is_bounded_by_store_timeout_ms(failure_mode: str):
    """Redis' own socket timeout is 10 s here: only store_timeout_ms (50 ms) can end the wait."""
    async def body():
        async with silent_peer() as port:
            store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_ms=10_000, connect_timeout_ms=10_000)
            try:
                async with Harness().replica(store, config(failure_mode, timeout=50)) as rls:
                    before = store_errors("redis", "timeout")
                    req = request(descriptor(("user", "a")))
                    if failure_mode == "open":
                        assert (await rls(req)).overall_code == OK
                    else:
                        with pytest.raises(grpc.aio.AioRpcError) as err:
                            await rls(req)
                        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert store_errors("redis", "timeout") - before == 1
            finally:
                await store.close()
    asyncio.run(body())


def test_config_problems_are_reported_and_the_first_duplicate_wins():
    text = """
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: user, rate_limit: {requests_per_unit: 1}}
    - {key: user, rate_limit: {requests_per_unit: 9}}
"""

    async def body():
        import yaml

        unchecked = cfgmod.Config.model_validate(yaml.safe_load(text))   # check-config refuses it
        async with Harness().replica(MemoryStore(), unchecked) as rls:
            _, compiled = rls.servicer.descriptors()
            assert len(compiled.problems) == 1
            user = unique("u")
            assert [(await rls(request(descriptor(("user", user)), domain="d"))).overall_code
                    for _ in range(2)] == [OK, OVER]
    asyncio.run(body())
