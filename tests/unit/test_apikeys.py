"""API keys: the pure core (format, digest, lookup, expiry, absurd input) and the registry
(config keys, store keys on a MemoryStore, the local cache on a fake monotonic clock,
revocation across two replicas, the index, store failures)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from datetime import UTC, datetime

import pytest

from extproc import config as cfgmod
from extproc.core import apikeys as core
from extproc.core.apikeys import KeyRecord, KeyTable
from extproc.core.reasons import Reason
from extproc.services.apikeys import (
    ApiKeyRegistry,
    ConfigManagedKey,
    KeyIdConflict,
    StoreNotEnabled,
)
from extproc.store.base import StoreError
from extproc.store.keys import KeySpace
from extproc.store.memory import MemoryStore

NOW = 1_800_000_000.0          # a fixed wall-clock instant (epoch seconds)
KEY_A = core.generate(bytes(range(32)))
KEY_B = core.generate(bytes(range(1, 33)))


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def counter_bytes():
    """Deterministic 'random' bytes: each call differs."""
    state = {"n": 0}

    def draw(n: int) -> bytes:
        state["n"] += 1
        return hashlib.sha256(f"draw-{state['n']}".encode()).digest()[:n].ljust(n, b"\0")
    return draw


def api_key(key_id: str, raw: str, **kw) -> cfgmod.ApiKey:
    return cfgmod.ApiKey(id=key_id, digest=core.digest(raw), owner=kw.pop("owner", "team-a"), **kw)


def registry(config_keys=(), store=None, **kw) -> ApiKeyRegistry:
    kw.setdefault("clock", FakeClock())
    kw.setdefault("wall_clock", lambda: NOW)
    kw.setdefault("random_bytes", counter_bytes())
    kw.setdefault("keyspace", KeySpace("t-apikeys"))
    return ApiKeyRegistry(list(config_keys), store, **kw)


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------ format ---

def test_generated_key_is_prefix_plus_43_base64url_chars_of_the_given_bytes():
    key = core.generate(b"\xff" * 32)
    assert re.fullmatch(r"xp_[A-Za-z0-9_-]{43}", key)
    assert len(key) == core.KEY_CHARS == 46
    assert key == "xp_" + "_" * 42 + "8"            # 0xff.. in base64url: 42 x 6 bits, then 1111+00
    assert core.generate(bytes(32)) == core.generate(bytes(32))
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="exactly 32 random bytes"):
            core.generate(bad)


def test_digest_is_sha256_hex_of_the_key_and_matches_the_config_pattern():
    d = core.digest(KEY_A)
    assert d == "sha256:" + hashlib.sha256(KEY_A.encode()).hexdigest()
    assert core.is_digest(d) and core.digest_hex(d) == d[7:]
    cfgmod.ApiKey(id="a", digest=d, owner="o")            # the config model accepts it


# ------------------------------------------------------------------------------------ lookup ---

def test_config_key_lookup_ok_wrong_key_invalid():
    table = KeyTable.from_config([api_key("a", KEY_A, scopes=["read"], tier="gold")])
    record, reason = table.lookup(KEY_A, NOW)
    assert reason is Reason.OK
    assert record == KeyRecord(id="a", digest=core.digest(KEY_A), owner="team-a", scopes=("read",), tier="gold",
                               expires_at=None, source="config")
    assert table.lookup(KEY_B, NOW) == (None, Reason.API_KEY_INVALID)
    assert table.lookup(KEY_A[:-1], NOW) == (None, Reason.API_KEY_INVALID)


def test_expiry_is_exact_at_expires_at_and_naive_datetimes_are_utc():
    exp = datetime(2027, 1, 15, 12, 0, 0)                  # no zone: taken as UTC
    table = KeyTable.from_config([api_key("a", KEY_A, expires_at=exp)])
    at = datetime(2027, 1, 15, 12, 0, 0, tzinfo=UTC).timestamp()
    assert table.by_id("a").expires_at == at
    assert table.lookup(KEY_A, at - 0.001)[1] is Reason.OK
    assert table.lookup(KEY_A, at) == (None, Reason.API_KEY_EXPIRED)
    assert table.lookup(KEY_A, at + 86400) == (None, Reason.API_KEY_EXPIRED)


@pytest.mark.parametrize("raw", ["", "x" * 257, "xp_abc\x00def", "xp_abc def", "xp_\tabc", "xp_ключ",
                                 "xp_abc\n", "\x7f"])
def test_absurd_input_is_invalid_without_hashing(raw, monkeypatch):
    table = KeyTable.from_config([api_key("a", KEY_A)])
    monkeypatch.setattr(core, "digest", lambda _raw: pytest.fail("absurd input must not be hashed"))
    assert table.lookup(raw, NOW) == (None, Reason.API_KEY_INVALID)


def test_huge_input_is_refused_by_length_first(monkeypatch):
    table = KeyTable.from_config([api_key("a", KEY_A)])
    monkeypatch.setattr(core, "digest", lambda _raw: pytest.fail("huge input must not be hashed"))
    monkeypatch.setattr(core, "_VISIBLE_ASCII", None)    # not even a character scan: length decides
    assert table.lookup("x" * 10_000_000, NOW) == (None, Reason.API_KEY_INVALID)
    assert table.lookup(None, NOW) == (None, Reason.API_KEY_INVALID)       # type: ignore[arg-type]


def test_longest_plausible_key_is_hashed_and_looked_up():
    raw = "k" * core.MAX_PRESENTED_CHARS
    table = KeyTable.from_config([api_key("legacy", raw)])
    assert table.lookup(raw, NOW)[1] is Reason.OK


def test_judge_confirms_the_full_digest_in_constant_time():
    record = KeyRecord(id="a", digest=core.digest(KEY_A), owner="o")
    assert core.judge(record, core.digest(KEY_A), NOW) == (record, Reason.OK)
    assert core.judge(record, core.digest(KEY_B), NOW) == (None, Reason.API_KEY_INVALID)


def test_rotation_several_keys_per_owner_are_independent():
    table = KeyTable.from_config([api_key("a-2024", KEY_A, owner="acme"), api_key("a-2025", KEY_B, owner="acme")])
    assert table.lookup(KEY_A, NOW)[0].id == "a-2024"
    assert table.lookup(KEY_B, NOW)[0].id == "a-2025"
    table.remove("a-2024")
    assert table.lookup(KEY_A, NOW) == (None, Reason.API_KEY_INVALID)
    assert table.lookup(KEY_B, NOW)[1] is Reason.OK


def test_table_refuses_duplicate_digests_ids_and_malformed_digests():
    with pytest.raises(ValueError, match="'b' has the same digest as 'a'"):
        KeyTable.from_config([api_key("a", KEY_A), api_key("b", KEY_A)])
    table = KeyTable([KeyRecord(id="a", digest=core.digest(KEY_A), owner="o")])
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        table.add(KeyRecord(id="a", digest=core.digest(KEY_B), owner="o"))
    with pytest.raises(ValueError, match="sha256:<64 lower-case hex>"):
        table.add(KeyRecord(id="c", digest="sha256:ABC", owner="o"))


def test_config_file_keys_feed_the_table():
    cfg = cfgmod.parse(f"""
api_keys:
  keys:
    - {{id: ci, digest: "{core.digest(KEY_A)}", owner: ci-bot, scopes: [deploy], tier: internal,
        expires_at: "2030-01-01T00:00:00Z"}}
""")
    table = KeyTable.from_config(cfg.api_keys.keys)
    record, reason = table.lookup(KEY_A, NOW)
    assert reason is Reason.OK and record.owner == "ci-bot" and record.scopes == ("deploy",)
    assert record.expires_at == datetime(2030, 1, 1, tzinfo=UTC).timestamp()


# ---------------------------------------------------------------------------------- registry ---

def test_registry_config_key_needs_no_store_call():
    store = MemoryStore()
    reg = registry([api_key("a", KEY_A)], store)
    record, reason = run(reg.lookup(KEY_A, NOW))
    assert reason is Reason.OK and record.source == "config"
    assert reg.store_calls == 0


def test_registry_without_store_answers_from_config_only():
    reg = registry([api_key("a", KEY_A)], None)
    assert run(reg.lookup(KEY_B, NOW)) == (None, Reason.API_KEY_INVALID)
    with pytest.raises(StoreNotEnabled, match="api_keys.from_store is off"):
        run(reg.create("o"))
    assert run(reg.revoke("nope")) is None
    assert [r.id for r in run(reg.list())] == ["a"]


def test_store_key_create_lookup_and_only_the_digest_is_stored():
    store = MemoryStore()
    reg = registry([], store)

    async def body():
        raw, record = await reg.create("team-b", ["read", "write"], "gold", key_id="b-1")
        assert re.fullmatch(r"xp_[A-Za-z0-9_-]{43}", raw)
        assert record.digest == core.digest(raw) and record.source == "store" and record.created_at == NOW
        found, reason = await reg.lookup(raw, NOW)
        assert reason is Reason.OK
        assert found == record
        doc = json.loads(await store.get(KeySpace("t-apikeys").key("apikey", core.digest_hex(record.digest))))
        assert doc == {"id": "b-1", "owner": "team-b", "scopes": ["read", "write"], "tier": "gold",
                       "expires_at": None, "created_at": NOW}
        for k, entry in store._data.items():
            assert raw not in k and raw.encode() not in bytes(str(entry.value), "utf-8")
        return raw
    run(body())


def test_store_key_record_key_is_hash_tagged_by_digest():
    from extproc.store.keys import hash_tag

    reg = registry([], MemoryStore())
    d = core.digest(KEY_A)
    assert hash_tag(reg._record_key(d)) == core.digest_hex(d)
    assert reg._record_key(d) == f"t-apikeys:apikey:{{{core.digest_hex(d)}}}"


def test_store_key_expiry_is_judged_on_every_lookup_even_when_cached():
    reg = registry([], MemoryStore())

    async def body():
        raw, _ = await reg.create("o", expires_at=NOW + 100)
        assert (await reg.lookup(raw, NOW + 99.9))[1] is Reason.OK
        assert await reg.lookup(raw, NOW + 100) == (None, Reason.API_KEY_EXPIRED)
        assert reg.store_calls == 1
    run(body())


def test_negative_answers_are_cached_for_cache_seconds():
    clock = FakeClock()
    reg = registry([], MemoryStore(), cache_seconds=5.0, clock=clock)

    async def body():
        for _ in range(100):
            assert await reg.lookup(KEY_B, NOW) == (None, Reason.API_KEY_INVALID)
        assert reg.store_calls == 1
        clock.t += 4.999
        await reg.lookup(KEY_B, NOW)
        assert reg.store_calls == 1
        clock.t += 0.001
        await reg.lookup(KEY_B, NOW)
        assert reg.store_calls == 2
    run(body())


def test_concurrent_lookups_of_one_key_share_one_store_call():
    reg = registry([], MemoryStore())

    async def body():
        results = await asyncio.gather(*(reg.lookup(KEY_B, NOW) for _ in range(50)))
        assert set(results) == {(None, Reason.API_KEY_INVALID)}
        assert reg.store_calls == 1
    run(body())


def test_negative_cache_is_bounded():
    reg = registry([], MemoryStore(), max_cache=3)

    async def body():
        keys = [core.generate(bytes([i]) * 32) for i in range(10)]
        for k in keys:
            await reg.lookup(k, NOW)
        assert reg.cached == 3 and reg.store_calls == 10
        await reg.lookup(keys[-1], NOW)                     # most recent: still cached
        assert reg.store_calls == 10
        await reg.lookup(keys[0], NOW)                      # evicted: asks again
        assert reg.store_calls == 11
    run(body())


def test_cache_seconds_zero_disables_the_cache():
    reg = registry([], MemoryStore(), cache_seconds=0)

    async def body():
        await reg.lookup(KEY_B, NOW)
        await reg.lookup(KEY_B, NOW)
        assert reg.store_calls == 2 and reg.cached == 0
    run(body())


def test_revoke_is_immediate_here_and_within_cache_seconds_on_another_replica():
    store = MemoryStore()                                   # shared state, as Redis would be
    clock_a, clock_b = FakeClock(), FakeClock()
    a = registry([], store, clock=clock_a, cache_seconds=5)
    b = registry([], store, clock=clock_b, cache_seconds=5)

    async def body():
        raw, record = await a.create("o", key_id="rot-1")
        assert (await a.lookup(raw, NOW))[1] is Reason.OK
        assert (await b.lookup(raw, NOW))[1] is Reason.OK        # b caches the positive answer
        revoked = await a.revoke("rot-1")
        assert revoked is not None and revoked.id == "rot-1" and revoked.owner == "o"
        assert await a.lookup(raw, NOW) == (None, Reason.API_KEY_INVALID)
        clock_b.t += 4.9
        assert (await b.lookup(raw, NOW))[1] is Reason.OK        # within the documented bound
        clock_b.t += 0.1
        assert await b.lookup(raw, NOW) == (None, Reason.API_KEY_INVALID)
        assert await a.revoke("rot-1") is None
    run(body())


def test_list_marks_sources_and_follows_the_index():
    store = MemoryStore()
    wall = FakeClock(NOW)
    reg = registry([api_key("cfg-1", KEY_A)], store, wall_clock=wall)

    async def body():
        await reg.create("o1", key_id="s-1")
        wall.t += 1
        await reg.create("o2", ["read"], "gold", expires_at=NOW + 3600)
        listed = await reg.list()
        assert [(r.id, r.source) for r in listed][:2] == [("cfg-1", "config"), ("s-1", "store")]
        assert listed[2].id.startswith("key-") and listed[2].scopes == ("read",) and listed[2].owner == "o2"
        index = json.loads(await store.get(KeySpace("t-apikeys").key("apikey-index", "all")))
        assert index == {r.id: r.digest for r in listed[1:]}
        await reg.revoke("s-1")
        assert [r.id for r in await reg.list()] == ["cfg-1", listed[2].id]
        # a second registry (another replica) sees the same store keys
        other = registry([], store)
        assert [r.id for r in await other.list()] == [listed[2].id]
    run(body())


def test_index_update_survives_a_lost_write():
    """A concurrent writer overwriting the index right after our write: our change is re-applied."""
    class RacingStore(MemoryStore):
        clobber = 1

        async def set(self, key, value, ttl_ms=None):
            await super().set(key, value, ttl_ms)
            if key.endswith("{all}") and self.clobber:
                self.clobber -= 1
                await super().set(key, b"{}")              # another replica's stale read-modify-write

    store = RacingStore()
    reg = registry([], store)

    async def body():
        await reg.create("o", key_id="k-1")
        assert [r.id for r in await reg.list()] == ["k-1"]
    run(body())


def test_management_errors():
    reg = registry([api_key("cfg-1", KEY_A)], MemoryStore())

    async def body():
        with pytest.raises(KeyIdConflict, match="config key"):
            await reg.create("o", key_id="cfg-1")
        await reg.create("o", key_id="s-1")
        with pytest.raises(KeyIdConflict, match="already in use"):
            await reg.create("o", key_id="s-1")
        with pytest.raises(ValueError, match="key id 'Bad Id'"):
            await reg.create("o", key_id="Bad Id")
        with pytest.raises(ValueError, match="in the past"):
            await reg.create("o", expires_at=NOW)
        with pytest.raises(ValueError, match="owner must be"):
            await reg.create("")
        with pytest.raises(ValueError, match="scope must be"):
            await reg.create("o", ["ok", "bad\nscope"])
        with pytest.raises(ConfigManagedKey, match="remove it there and reload"):
            await reg.revoke("cfg-1")
        assert await reg.revoke("missing") is None
    run(body())


def test_update_config_swaps_config_keys():
    reg = registry([api_key("a", KEY_A)], None)
    reg.update_config([api_key("b", KEY_B)])
    assert run(reg.lookup(KEY_A, NOW)) == (None, Reason.API_KEY_INVALID)
    assert run(reg.lookup(KEY_B, NOW))[1] is Reason.OK


def test_unreadable_store_record_is_no_key(caplog):
    store = MemoryStore()
    reg = registry([], store)
    run(store.set(reg._record_key(core.digest(KEY_B)), b"not json"))
    with caplog.at_level(logging.WARNING, "extproc.apikeys"):
        assert run(reg.lookup(KEY_B, NOW)) == (None, Reason.API_KEY_INVALID)
    assert "unreadable api key record" in caplog.text
    assert KEY_B not in caplog.text


class FlakyStore(MemoryStore):
    """A MemoryStore whose reads fail while `down` is set, as a Redis outage would."""

    down = False

    async def get(self, key):
        if self.down:
            raise StoreError("test get: connection refused", transient=True, timeout=True)
        return await super().get(key)


def test_store_error_is_raised_not_cached_and_config_keys_still_work():
    store = FlakyStore()
    reg = registry([api_key("cfg", KEY_A)], store)

    async def body():
        raw, _ = await reg.create("o")
        reg._cache.clear()
        store.down = True
        with pytest.raises(StoreError) as err:
            await reg.lookup(raw, NOW)
        assert err.value.timeout
        assert (await reg.lookup(KEY_A, NOW))[1] is Reason.OK          # config keys need no store
        # concurrent waiters all see the error
        outcomes = await asyncio.gather(*(reg.lookup(raw, NOW) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(o, StoreError) for o in outcomes)
        assert reg.cached == 0
        store.down = False
        assert (await reg.lookup(raw, NOW))[1] is Reason.OK
        store.down = True
        with pytest.raises(StoreError):
            await reg.list()
    run(body())


def test_a_cancelled_lookup_does_not_cancel_the_shared_fetch():
    class SlowStore(MemoryStore):
        gate: asyncio.Event

        async def get(self, key):
            await self.gate.wait()
            return await super().get(key)

    store = SlowStore()
    reg = registry([], store)

    async def body():
        store.gate = asyncio.Event()
        first = asyncio.create_task(reg.lookup(KEY_B, NOW))
        second = asyncio.create_task(reg.lookup(KEY_B, NOW))
        await asyncio.sleep(0)
        first.cancel()
        store.gate.set()
        assert await second == (None, Reason.API_KEY_INVALID)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert reg.store_calls == 1
    run(body())


def test_raw_keys_never_reach_the_logs(caplog):
    reg = registry([api_key("a", KEY_A)], MemoryStore())

    async def body():
        raw, _ = await reg.create("o", key_id="s-1")
        await reg.lookup(raw, NOW)
        await reg.lookup(KEY_A, NOW)
        await reg.lookup(KEY_B, NOW)
        await reg.revoke("s-1")
        return raw
    with caplog.at_level(logging.DEBUG):
        raw = run(body())
    for rec in caplog.records:
        text = json.dumps(rec.__dict__, default=str)
        assert raw not in text and KEY_A not in text and KEY_B not in text
