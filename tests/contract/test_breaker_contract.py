"""The circuit-breaker transition on every backend: memory (core/breaker.py) and Redis / Redis
Cluster (lua/breaker.lua) must answer identically, op for op."""

from __future__ import annotations

import asyncio
import random

import pytest

from extproc.core import breaker as br
from extproc.store import Store, StoreError
from extproc.store.keys import KeySpace

WEBSHOP = br.Params(consecutive=5, window=0, window_ms=0, open_ms=30_000, probes=3, close_after=3)
DUAL_PORT = br.Params(consecutive=0, window=3, window_ms=10_500, open_ms=30_000, probes=1, close_after=1)
TTL = 60_000
T0 = 1_800_000_000_000


def test_consecutive_failures_open_then_probes_close(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("br", "a")
        for i in range(4):
            r = await store.breaker(k, "failure", WEBSHOP, T0 + i, TTL)
            assert (r.state, r.consecutive) == (br.CLOSED, i + 1)
        r = await store.breaker(k, "success", WEBSHOP, T0 + 5, TTL)          # a success resets the run
        assert r.consecutive == 0
        for i in range(5):
            r = await store.breaker(k, "failure", WEBSHOP, T0 + 10 + i, TTL)
        assert r.state == br.OPEN and r.previous == br.CLOSED and r.changed and r.opened_at_ms == T0 + 14
        r = await store.breaker(k, "acquire", WEBSHOP, T0 + 1000, TTL)
        assert r.outcome == br.REJECT and r.retry_after_ms == 30_000 - 986
        # after the open duration exactly 3 probes are admitted
        outcomes = [(await store.breaker(k, "acquire", WEBSHOP, T0 + 31_000, TTL)).outcome for _ in range(5)]
        assert outcomes == [br.PROBE] * 3 + [br.REJECT] * 2
        r = await store.breaker(k, "read", WEBSHOP, T0 + 31_000, TTL)
        assert r.state == br.HALF_OPEN
        await store.breaker(k, "release", WEBSHOP, T0 + 31_001, TTL)         # a client abort frees its slot
        assert (await store.breaker(k, "acquire", WEBSHOP, T0 + 31_002, TTL)).outcome == br.PROBE
        for _ in range(2):
            r = await store.breaker(k, "probe_success", WEBSHOP, T0 + 31_100, TTL)
            assert r.state == br.HALF_OPEN
        r = await store.breaker(k, "probe_success", WEBSHOP, T0 + 31_200, TTL)
        assert r.state == br.CLOSED and r.changed
        assert (await store.breaker(k, "acquire", WEBSHOP, T0 + 31_300, TTL)).outcome == br.ALLOW

    run(body())


def test_a_probe_failure_reopens(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("br", "b")
        await store.breaker(k, "trip", WEBSHOP, T0, TTL)
        assert (await store.breaker(k, "acquire", WEBSHOP, T0 + 30_000, TTL)).outcome == br.PROBE
        r = await store.breaker(k, "probe_failure", WEBSHOP, T0 + 30_010, TTL)
        assert r.state == br.OPEN and r.opened_at_ms == T0 + 30_010
        # late outcomes of requests admitted while closed count for nothing now
        r = await store.breaker(k, "failure", WEBSHOP, T0 + 30_020, TTL)
        assert r.state == br.OPEN and not r.changed

    run(body())


def test_failures_within_a_time_window(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("br", "c")
        await store.breaker(k, "failure", DUAL_PORT, T0, TTL)
        await store.breaker(k, "failure", DUAL_PORT, T0 + 5_000, TTL)
        r = await store.breaker(k, "failure", DUAL_PORT, T0 + 11_000, TTL)   # the first left the window
        assert r.state == br.CLOSED
        r = await store.breaker(k, "failure", DUAL_PORT, T0 + 12_000, TTL)
        assert r.state == br.OPEN

    run(body())


def test_forcing_and_reset(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("br", "d")
        r = await store.breaker(k, "force_open", WEBSHOP, T0, TTL)
        assert (r.state, r.forced) == (br.OPEN, 1)
        assert (await store.breaker(k, "acquire", WEBSHOP, T0 + 10**9, TTL)).outcome == br.REJECT   # held open
        r = await store.breaker(k, "force_close", WEBSHOP, T0 + 1, TTL)
        assert (r.state, r.forced) == (br.CLOSED, 2)
        for i in range(10):
            r = await store.breaker(k, "failure", WEBSHOP, T0 + 2 + i, TTL)
        assert r.state == br.CLOSED                                            # held closed
        r = await store.breaker(k, "reset", WEBSHOP, T0 + 20, TTL)
        assert (r.state, r.forced) == (br.CLOSED, 0)
        with pytest.raises(ValueError):
            await store.breaker(k, "explode", WEBSHOP, T0, TTL)

    run(body())


def test_the_store_matches_the_reference_on_random_sequences(store: Store, keys: KeySpace, run) -> None:
    rng = random.Random(7)
    ops = ["acquire", "acquire", "failure", "failure", "success", "probe_failure", "probe_success", "release",
           "trip", "read"]

    async def body() -> None:
        for params in (WEBSHOP, DUAL_PORT):
            k = keys.key("br", f"rand-{params.consecutive}")
            ref: dict = {}
            now = T0
            for _ in range(300):
                now += rng.choice((1, 50, 900, 4_000, 31_000))
                op = rng.choice(ops)
                got = await store.breaker(k, op, params, now, TTL)
                want = br.step(ref, op, now, params)
                assert got == want, (op, now, got, want)

    run(body())


def test_probe_slots_are_exact_under_concurrency_across_two_clients(store_pair, keys: KeySpace, run) -> None:
    a, b = store_pair

    async def body() -> None:
        k = keys.key("br", "race")
        await a.breaker(k, "trip", WEBSHOP, T0, TTL)
        claims = await asyncio.gather(*[(a if i % 2 else b).breaker(k, "acquire", WEBSHOP, T0 + 30_000, TTL)
                                        for i in range(40)])
        assert sum(c.outcome == br.PROBE for c in claims) == WEBSHOP.probes

    run(body())


def test_a_key_of_another_type_is_refused(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("br", "typed")
        await store.set(k, b"x")
        with pytest.raises(StoreError):
            await store.breaker(k, "read", WEBSHOP, T0, TTL)

    run(body())


def test_probe_slots_never_reported_are_freed_after_an_open_duration(store: Store, keys: KeySpace, run) -> None:
    async def body() -> None:
        k = keys.key("br", "lost-probes")
        await store.breaker(k, "trip", WEBSHOP, T0, TTL)
        t = T0 + 30_000
        claims = [(await store.breaker(k, "acquire", WEBSHOP, t, TTL)).outcome for _ in range(3)]
        assert claims == [br.PROBE] * 3                       # their replicas die: no outcome ever comes
        assert (await store.breaker(k, "acquire", WEBSHOP, t + 29_999, TTL)).outcome == br.REJECT
        assert (await store.breaker(k, "acquire", WEBSHOP, t + 30_000, TTL)).outcome == br.PROBE
        r = await store.breaker(k, "read", WEBSHOP, t + 30_000, TTL)
        assert r.state == br.HALF_OPEN

    run(body())
