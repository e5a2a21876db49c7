"""RevocationList on the in-memory store with a fake clock: the hot-path rules, the bound, the
background sync and its states.

The clock is stepped by hand (`now` is also passed explicitly to `is_revoked`), so expiry
needs no sleeping; the background task is observed by polling with a deadline. A
`GatedStore` stands for a replica cut off from the store: while closed every call raises
StoreError and its live subscriptions are lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.admin import revocation as revocation_admin
from extproc.services.revocation import Revocation, RevocationList
from extproc.store import MemoryStore, StoreError
from extproc.store.keys import KeySpace
from extproc.store.memory import MemorySubscription

T = TypeVar("T")
T0 = 1_700_000_000.0
DEADLINE_S = 5.0


class FakeClock:
    def __init__(self, start: float = T0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S}s: {what}")
        await asyncio.sleep(0.005)


class GatedStore:
    """A MemoryStore seen through a gate: `cut()` fails every call and loses live
    subscriptions (as a partition would), `heal()` lets calls through again."""

    def __init__(self, inner: MemoryStore):
        self.inner = inner
        self.name = inner.name
        self.open = True
        self.subscribes = 0
        self._subs: list[MemorySubscription] = []

    def cut(self) -> None:
        self.open = False
        for sub in self._subs:
            sub._lose(StoreError("gated: connection lost", transient=True))
        self._subs.clear()

    def heal(self) -> None:
        self.open = True

    def _check(self, op: str) -> None:
        if not self.open:
            raise StoreError(f"gated {op}: connection refused", transient=True)

    async def subscribe(self, channel: str) -> MemorySubscription:
        self.subscribes += 1
        self._check("subscribe")
        sub = await self.inner.subscribe(channel)
        self._subs.append(sub)
        return sub

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.inner, name)

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self._check(name)
            return await method(*args, **kwargs)
        return gated


def revocations(store: Any, clock: FakeClock, **kw: Any) -> RevocationList:
    kw.setdefault("keyspace", KeySpace("unit"))
    kw.setdefault("exp_grace_seconds", 0.0)
    kw.setdefault("retry_seconds", 0.01)
    return RevocationList(store, clock, **kw)


# -- the hot path ---------------------------------------------------------------------------------

def test_a_revoked_jti_or_digest_is_revoked_until_its_exp() -> None:
    async def body() -> None:
        clock = FakeClock()
        rl = revocations(MemoryStore(), clock)
        await rl.revoke_token("jti-1", T0 + 60)
        await rl.revoke_token("ab" * 32, T0 + 30)
        now = T0 + 1
        assert rl.is_revoked("jti-1", "", "alice", T0 - 10, now)
        assert rl.is_revoked(None, "ab" * 32, None, None, now)
        assert rl.is_revoked("other", "ab" * 32, None, None, now)     # the digest alone suffices
        assert not rl.is_revoked("jti-2", "cd" * 32, "alice", T0 - 10, now)
        assert not rl.is_revoked(None, "", None, None, now)
        assert rl.is_revoked("jti-1", "", None, None, T0 + 59.999)
        assert not rl.is_revoked("jti-1", "", None, None, T0 + 60)     # past exp: the token is dead anyway
        assert len(rl) == 1                                              # and the entry was dropped
    run(body())


def test_the_exp_grace_covers_the_verifier_leeway_and_a_dead_token_lives_a_second() -> None:
    async def body() -> None:
        clock = FakeClock()
        rl = revocations(MemoryStore(), clock, exp_grace_seconds=30)
        rev = await rl.revoke_token("jti-1", T0 + 60)
        assert rev.until == T0 + 90
        assert rl.is_revoked("jti-1", "", None, None, T0 + 89)
        late = await rl.revoke_token("jti-old", T0 - 3600)
        assert late.until == T0 + 1                                      # at least 1 s
    run(body())


def test_subject_revocation_covers_tokens_issued_before_not_before() -> None:
    async def body() -> None:
        clock = FakeClock()
        rl = revocations(MemoryStore(), clock, subject_ttl_seconds=3600)
        rev = await rl.revoke_subject("alice")
        assert (rev.not_before, rev.until) == (T0, T0 + 3600)
        now = T0 + 10
        assert rl.is_revoked("j", "", "alice", T0 - 1, now)
        assert rl.is_revoked("j", "", "alice", None, now)                # no iat: cannot show it is newer
        assert not rl.is_revoked("j", "", "alice", T0, now)              # issued at/after the logout
        assert not rl.is_revoked("j", "", "bob", T0 - 1, now)
        assert not rl.is_revoked("j", "", "alice", T0 - 1, T0 + 3600)   # every such token has expired
    run(body())


def test_a_later_logout_of_the_same_subject_extends_the_first() -> None:
    async def body() -> None:
        clock = FakeClock()
        rl = revocations(MemoryStore(), clock)
        await rl.revoke_subject("alice", T0 - 100, ttl_seconds=1000)
        await rl.revoke_subject("alice", T0 - 500, ttl_seconds=100)      # older and shorter: no change
        assert not rl.is_revoked(None, "", "alice", T0 - 100, T0)
        await rl.revoke_subject("alice", T0, ttl_seconds=2000)
        assert rl.is_revoked(None, "", "alice", T0 - 1, T0 + 1500)
        assert not rl.is_revoked(None, "", "alice", T0, T0 + 1)
    run(body())


def test_fractional_not_before_is_kept_to_the_millisecond_and_rounded_up() -> None:
    rev = Revocation("sub", "alice", T0 + 10, T0 + 0.0004)
    parsed = Revocation.parse(rev.member(), rev.until)
    assert parsed is not None and parsed.not_before == T0 + 0.001


@pytest.mark.parametrize("ident", ["plain", "with:colons", "{tag}", "spaces and %25", "ünïcode", "a" * 500])
def test_entries_round_trip_through_set_members_and_messages(ident: str) -> None:
    for rev in (Revocation("token", ident, T0 + 5.125), Revocation("sub", ident, T0 + 7, T0 - 1.5)):
        assert Revocation.parse(rev.member(), rev.until) == rev
        assert Revocation.from_message(rev.message()) == rev


@pytest.mark.parametrize("raw", [b"", b"garbage", b"nan token:x", b"1.5 unknown:x", b"1.5 sub:x:notms",
                                 b"\xff\xfe", b"inf token:x"])
def test_unknown_messages_are_ignored(raw: bytes) -> None:
    assert Revocation.from_message(raw) is None


def test_bad_arguments_are_refused() -> None:
    async def body() -> None:
        rl = revocations(MemoryStore(), FakeClock())
        for call in (rl.revoke_token("", T0), rl.revoke_subject(""), rl.revoke_subject("a", ttl_seconds=0),
                     rl.revoke_subject("a", float("nan"))):
            with pytest.raises(ValueError):
                await call
        assert len(rl) == 0
    run(body())
    with pytest.raises(ValueError):
        RevocationList(MemoryStore(), max_entries=0)


# -- bounded ---------------------------------------------------------------------------------------

def test_expired_entries_are_pruned() -> None:
    async def body() -> None:
        clock = FakeClock()
        rl = revocations(MemoryStore(), clock)
        for i in range(10):
            await rl.revoke_token(f"j{i}", T0 + 10 + i)
        await rl.revoke_subject("alice", T0, ttl_seconds=15)
        clock.advance(14.5)
        assert rl.prune() == 5
        assert len(rl) == 6
        clock.advance(100)
        assert rl.prune() == 6 and len(rl) == 0
    run(body())


def test_a_full_list_drops_the_soonest_expiring_and_says_it_is_incomplete(caplog) -> None:
    caplog.set_level(logging.INFO, "extproc.revocation")

    async def body() -> None:
        clock = FakeClock()
        store = MemoryStore()
        states: list[bool] = []
        rl = revocations(store, clock, max_entries=3, on_state=states.append)
        await rl.start()
        try:
            assert rl.known_complete and states == [True]
            for i in range(3):
                await rl.revoke_token(f"j{i}", T0 + 100 + i)
            await rl.revoke_token("j-late", T0 + 500)
            await rl.revoke_token("j-later", T0 + 600)
            assert len(rl) == 3
            assert not rl.is_revoked("j0", "", None, None, T0)         # evicted: it expired soonest
            assert rl.is_revoked("j-later", "", None, None, T0)
            assert not rl.known_complete and states == [True, False]
            full = [r for r in caplog.records if "full" in r.getMessage()]
            assert len(full) == 1                                      # logged once, not per eviction

            clock.advance(150)                                         # j0..j2 are dead now
            await rl.resync()                                          # the store's set fits again
            assert rl.known_complete and states == [True, False, True]
            assert rl.is_revoked("j-late", "", None, None, clock())
        finally:
            await rl.close()
    run(body())


# -- the background sync ---------------------------------------------------------------------------

def test_two_replicas_on_one_store_share_revocations_at_once() -> None:
    async def body() -> None:
        clock, store = FakeClock(), MemoryStore()
        a, b = revocations(store, clock), revocations(store, clock)
        await a.start()
        await b.start()
        try:
            assert a.known_complete and b.known_complete
            await a.revoke_token("j1", T0 + 60)
            await a.revoke_subject("alice")
            await eventually(lambda: b.is_revoked("j1", "", None, None, T0), "b learns the jti")
            await eventually(lambda: b.is_revoked(None, "", "alice", T0 - 1, T0), "b learns the logout")
        finally:
            await a.close()
            await b.close()
    run(body())


def test_a_replica_started_later_learns_by_resync_and_skips_what_expired() -> None:
    async def body() -> None:
        clock, store = FakeClock(), MemoryStore()
        a = revocations(store, clock)
        await a.revoke_token("short", T0 + 5)
        await a.revoke_token("long", T0 + 500)
        await a.revoke_subject("alice", ttl_seconds=50)
        clock.advance(10)
        b = revocations(store, clock)
        assert not b.known_complete                                 # nothing synced yet
        await b.start()                                             # waits for the first attempt
        try:
            assert b.known_complete
            assert b.is_revoked("long", "", None, None, clock())
            assert b.is_revoked(None, "", "alice", T0 - 1, clock())
            assert len(b) == 2                                      # "short" was dead already
        finally:
            await b.close()
    run(body())


def test_a_cut_off_replica_keeps_what_it_knew_and_resyncs_what_it_missed(caplog) -> None:
    caplog.set_level(logging.INFO, "extproc.revocation")

    async def body() -> None:
        clock, store = FakeClock(), MemoryStore()
        a = revocations(store, clock)
        gate = GatedStore(store)
        states: list[bool] = []
        b = revocations(gate, clock, on_state=states.append)
        await a.start()
        await b.start()
        try:
            await a.revoke_token("before", T0 + 60)
            await eventually(lambda: b.is_revoked("before", "", None, None, T0), "b learns 'before'")

            # the version moves with every revocation applied and every change of
            # known_complete (the express lane re-checks a token only when it moved)
            v = b.version
            gate.cut()
            await eventually(lambda: not b.known_complete, "b knows it is cut off")
            assert b.version > v
            v = b.version
            attempts = gate.subscribes
            await eventually(lambda: gate.subscribes >= attempts + 3, "b keeps retrying")
            assert b.is_revoked("before", "", None, None, T0)         # what it knew still holds
            await a.revoke_token("missed", T0 + 60)                   # published while b hears nothing
            await a.revoke_subject("alice")
            assert not b.is_revoked("missed", "", None, None, T0)

            assert b.version == v                                      # nothing learnt while cut off
            gate.heal()
            await eventually(lambda: b.known_complete, "b resynced")
            assert b.version >= v + 3                                  # two entries and the state
            assert b.is_revoked("missed", "", None, None, T0)
            assert b.is_revoked(None, "", "alice", T0 - 1, T0)
            assert states == [True, False, True]
        finally:
            await a.close()
            await b.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "extproc.revocation"]
        assert sum("unreachable" in m for m in messages) == 1         # once, however many retries
        assert sum("resynced after store loss" in m for m in messages) == 1
    run(body())


def test_a_subscriber_that_fell_behind_resyncs() -> None:
    async def body() -> None:
        clock = FakeClock()
        store = MemoryStore(max_pending_messages=1)
        a, b = revocations(store, clock), revocations(store, clock)
        await a.start()
        await b.start()
        try:
            # two publishes without yielding: b's buffer (1) overflows, so b lost a message
            await store.publish(b.channel, Revocation("token", "ghost", T0 + 60).message())
            await a.revoke_token("real", T0 + 60)
            await eventually(lambda: b.is_revoked("real", "", None, None, T0), "b recovers 'real'")
            assert b.known_complete
            assert not b.is_revoked("ghost", "", None, None, T0)      # never stored: a resync cannot find it
        finally:
            await a.close()
            await b.close()
    run(body())


def test_a_replica_that_never_reached_the_store_is_incomplete_but_enforces_its_own() -> None:
    async def body() -> None:
        clock = FakeClock()
        gate = GatedStore(MemoryStore())
        gate.cut()
        rl = revocations(gate, clock)
        await rl.start()                                  # returns after the failed first attempt
        try:
            assert not rl.known_complete
            with pytest.raises(StoreError):
                await rl.revoke_token("local", T0 + 60)   # not shared: the caller is told
            assert rl.is_revoked("local", "", None, None, T0)
            gate.heal()
            await eventually(lambda: rl.known_complete, "first sync")
        finally:
            await rl.close()
    run(body())


def test_periodic_resync_repairs_a_lost_publish() -> None:
    async def body() -> None:
        clock, store = FakeClock(), MemoryStore()
        b = revocations(store, clock, resync_seconds=0.02)
        await b.start()
        try:
            # written to the set, never published (as when PUBLISH failed after the write)
            rev = Revocation("token", "unpublished", T0 + 60)
            await store.zadd(b.index_key, rev.member(), rev.until)
            await eventually(lambda: b.is_revoked("unpublished", "", None, None, T0), "periodic resync")
        finally:
            await b.close()
    run(body())


def test_close_leaves_no_task_behind() -> None:
    async def body() -> None:
        clock = FakeClock()
        gate = GatedStore(MemoryStore())
        rl = revocations(gate, clock)
        await rl.start()
        await rl.close()
        assert not rl.known_complete
        await rl.close()                                  # idempotent
        gate.cut()
        cut = revocations(gate, clock)
        await cut.start()                                 # a listener sleeping between retries
        await cut.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        unstarted = revocations(gate, clock)
        await unstarted.close()
    run(body())


# -- the admin route -------------------------------------------------------------------------------

ADMIN_TOKEN = "admin-secret"


def _authorize(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
        return web.json_response({"error": "bearer token required"}, status=401)
    return None


def admin_scenario(body: Callable[[TestClient, RevocationList, GatedStore, FakeClock], Awaitable[None]]) -> None:
    async def main() -> None:
        clock = FakeClock()
        gate = GatedStore(MemoryStore())
        rl = revocations(gate, clock)
        app = web.Application()
        revocation_admin.add_routes(app, rl, _authorize, logging.getLogger("test.audit"), clock=clock)
        async with TestClient(TestServer(app)) as client:
            await body(client, rl, gate, clock)
    asyncio.run(main())


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _audit(caplog) -> list[dict[str, Any]]:
    return [{k: getattr(r, k, None) for k in ("action", "result", "jti", "token_digest", "sub", "until")}
            for r in caplog.records if r.name == "test.audit"]


def test_admin_revokes_a_jti_a_digest_and_a_subject(caplog) -> None:
    caplog.set_level(logging.INFO, "test.audit")

    async def body(client: TestClient, rl: RevocationList, gate: GatedStore, clock: FakeClock) -> None:
        resp = await client.post("/revoke", json={"jti": "j-1", "exp": T0 + 60}, headers=AUTH)
        assert resp.status == 200
        assert await resp.json() == {"revoked": {"kind": "token", "jti": "j-1", "until": T0 + 60}}
        digest = "AB" * 32
        resp = await client.post("/revoke", json={"token_digest": digest, "exp": T0 + 60}, headers=AUTH)
        assert (await resp.json())["revoked"]["token_digest"] == digest.lower()
        resp = await client.post("/revoke", json={"sub": "alice"}, headers=AUTH)
        assert (await resp.json())["revoked"] == {"kind": "subject", "sub": "alice", "not_before": T0,
                                                  "until": T0 + rl.subject_ttl_seconds}
        resp = await client.post("/revoke", json={"sub": "bob", "before": T0 - 100}, headers=AUTH)
        assert (await resp.json())["revoked"]["not_before"] == T0 - 100
        assert rl.is_revoked("j-1", "", None, None, T0)
        assert rl.is_revoked(None, digest.lower(), None, None, T0)
        assert rl.is_revoked(None, "", "alice", T0 - 1, T0)
        stored = {m for m, _ in await gate.inner.zrange_from(rl.index_key, 0)}
        assert {"token:j-1", "token:" + "ab" * 32, f"sub:alice:{int(T0 * 1000)}"} <= stored
    admin_scenario(body)
    assert _audit(caplog) == [
        {"action": "revoke.jti", "result": "ok", "jti": "j-1", "token_digest": None, "sub": None, "until": T0 + 60},
        {"action": "revoke.digest", "result": "ok", "jti": None, "token_digest": "ab" * 32, "sub": None,
         "until": T0 + 60},
        {"action": "revoke.subject", "result": "ok", "jti": None, "token_digest": None, "sub": "alice",
         "until": T0 + 24 * 3600},
        {"action": "revoke.subject", "result": "ok", "jti": None, "token_digest": None, "sub": "bob",
         "until": T0 - 100 + 24 * 3600},
    ]


@pytest.mark.parametrize("payload", [
    [], "jti", {}, {"jti": "j"}, {"jti": "", "exp": T0 + 1}, {"jti": "j", "exp": "tomorrow"},
    {"jti": "j", "exp": True}, {"jti": "j", "exp": -1}, {"jti": "j", "exp": T0 + 400 * 86400},
    {"jti": "j", "sub": "alice", "exp": T0 + 1}, {"jti": "j", "exp": T0 + 1, "before": T0},
    {"token_digest": "abc", "exp": T0 + 1}, {"token_digest": "zz" * 32, "exp": T0 + 1},
    {"sub": "alice", "before": T0 + 3600}, {"sub": "alice", "exp": T0 + 1}, {"sub": 7},
    {"jti": "j" * 1025, "exp": T0 + 1},
])
def test_admin_refuses_bad_bodies_with_400(payload: Any, caplog) -> None:
    caplog.set_level(logging.INFO, "test.audit")

    async def body(client: TestClient, rl: RevocationList, gate: GatedStore, clock: FakeClock) -> None:
        resp = await client.post("/revoke", json=payload, headers=AUTH)
        assert resp.status == 400
        assert "error" in await resp.json()
        assert len(rl) == 0
    admin_scenario(body)
    assert [(a["action"], a["result"]) for a in _audit(caplog)] == [("revoke", "invalid")]


def test_admin_needs_authorization_and_json(caplog) -> None:
    caplog.set_level(logging.INFO, "test.audit")

    async def body(client: TestClient, rl: RevocationList, gate: GatedStore, clock: FakeClock) -> None:
        resp = await client.post("/revoke", json={"jti": "j", "exp": T0 + 60})
        assert resp.status == 401
        assert len(rl) == 0
        resp = await client.post("/revoke", data=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
        assert resp.status == 400
    admin_scenario(body)
    assert [(a["action"], a["result"]) for a in _audit(caplog)] == [("revoke", "invalid")]


def test_admin_says_503_when_the_revocation_could_not_be_shared(caplog) -> None:
    caplog.set_level(logging.INFO, "test.audit")

    async def body(client: TestClient, rl: RevocationList, gate: GatedStore, clock: FakeClock) -> None:
        gate.cut()
        resp = await client.post("/revoke", json={"jti": "j-1", "exp": T0 + 60}, headers=AUTH)
        assert resp.status == 503
        assert (await resp.json())["enforced_here"] is True
        assert rl.is_revoked("j-1", "", None, None, T0)
        gate.heal()
        resp = await client.post("/revoke", json={"jti": "j-1", "exp": T0 + 60}, headers=AUTH)
        assert resp.status == 200
    admin_scenario(body)
    assert [(a["action"], a["result"]) for a in _audit(caplog)] == [("revoke.jti", "store_unavailable"),
                                                                     ("revoke.jti", "ok")]
