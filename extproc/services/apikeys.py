"""The API key registry: config keys, store-managed keys, and their management.

Lookup order. A presented key is first checked for plausibility and hashed once (see
`core.apikeys`); its digest is looked up among the config keys (no I/O), then, when
`api_keys.from_store` is set, in the store under `<prefix>:apikey:{<digest hex>}` (one key per
digest, hash-tagged by the digest, holding JSON `{id, owner, scopes, tier, expires_at,
created_at}`). The raw key is never stored, cached or logged; only digests are.

Local cache. Store answers, found and not found alike, are kept for `cache_seconds` in a
bounded LRU (`max_cache` digests) on the injected monotonic clock. Concurrent lookups of the
same digest share one store call. So a flood of bad keys costs at most one store call per
distinct key per `cache_seconds` on each replica, and a good key one call per interval.
Expiry is not cached: it is judged against the `now` of each lookup.

Revocation bound. Revoking a store key deletes its record at once, and drops it from the
cache of the replica that served the admin call; every other replica stops accepting it
within `cache_seconds` (when its cached answer ages out). Config keys are revoked by editing
extproc.yaml (a reload applies at once); `revoke` refuses them with `ConfigManagedKey`.

Store failures. A `StoreError` during lookup is raised to the caller, never turned into
`api_key_invalid`: the calling policy applies its fail-open/closed setting and reports
`store_error`/`store_timeout`. Failures are not cached, so the next lookup retries.

Index. `list()` and `revoke(id)` need ids, so `create` also records `{id: digest}` in one JSON
object at `<prefix>:apikey-index:{all}`. The store has no compare-and-set, so updating it is
read-modify-write: two admin calls racing on different replicas could drop one entry. Admin
calls are rare and each update re-reads the index after writing and re-applies its change
when it was lost (a few rounds), which closes the window in practice. A key whose index entry
was nonetheless lost still works, but is not listed or revocable by id until re-indexed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ..config import ApiKey
from ..core import apikeys as core
from ..core.apikeys import KeyRecord, KeyTable
from ..core.reasons import Reason
from ..store import keys as storekeys
from ..store.base import Store, StoreError

log = logging.getLogger("extproc.apikeys")

NAMESPACE = "apikey"
INDEX_NAMESPACE = "apikey-index"
INDEX_TAG = "all"
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")     # the same rule as extproc.yaml's api_keys.keys[].id
_INDEX_ROUNDS = 3


class ApiKeyError(Exception):
    """A management request that cannot be done; the message is for the operator."""


class ConfigManagedKey(ApiKeyError):
    """The key is defined in extproc.yaml: remove it there (and reload) to revoke it."""


class KeyIdConflict(ApiKeyError):
    """The requested id is already used by a config or store key."""


class StoreNotEnabled(ApiKeyError):
    """`api_keys.from_store` is off: keys are managed in extproc.yaml only."""


class ApiKeyRegistry:
    """Answers lookups for the authz path and serves the admin API's create/list/revoke."""

    def __init__(self, config_keys: Iterable[ApiKey], store: Store | None, cache_seconds: float = 5.0,
                 max_cache: int = 10_000, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes,
                 keyspace: storekeys.KeySpace | None = None):
        if cache_seconds < 0:
            raise ValueError(f"cache_seconds must be >= 0, got {cache_seconds!r}")
        if max_cache < 1:
            raise ValueError(f"max_cache must be >= 1, got {max_cache!r}")
        self.table = KeyTable.from_config(config_keys)
        self.store = store
        self.cache_seconds = cache_seconds
        self.max_cache = max_cache
        self._clock = clock
        self._wall_clock = wall_clock
        self._random_bytes = random_bytes
        self._keyspace = keyspace
        # digest -> (fetched at, on the monotonic clock; record or None for "not in the store")
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self.store_calls = 0   # lookups that reached the store (tests and debugging)

    # -- configuration ----------------------------------------------------------------------------
    def update_config(self, config_keys: Iterable[ApiKey]) -> None:
        """Swap in the config keys of a reloaded extproc.yaml; the store cache stays valid."""
        self.table = KeyTable.from_config(config_keys)

    def _ks(self) -> storekeys.KeySpace:
        return self._keyspace or storekeys.current()

    def _record_key(self, digest: str) -> str:
        return self._ks().key(NAMESPACE, core.digest_hex(digest))

    def _index_key(self) -> str:
        return self._ks().key(INDEX_NAMESPACE, INDEX_TAG)

    # -- the request path ---------------------------------------------------------------------------
    async def lookup(self, raw: str, now: float) -> tuple[KeyRecord | None, Reason]:
        """`(record, OK)`, or `(None, API_KEY_INVALID | API_KEY_EXPIRED)`; raises StoreError.

        `now` is epoch seconds (expiry); the cache runs on the injected monotonic clock.
        """
        if not core.plausible(raw):
            return None, Reason.API_KEY_INVALID
        presented = core.digest(raw)
        record = self.table.find(presented)
        if record is None and self.store is not None:
            record = await self._store_record(presented)
        if record is None:
            return None, Reason.API_KEY_INVALID
        return core.judge(record, presented, now)

    async def _store_record(self, digest: str) -> KeyRecord | None:
        hit = self._cache.get(digest)
        if hit is not None:
            if self._clock() - hit[0] < self.cache_seconds:
                self._cache.move_to_end(digest)
                return hit[1]
            del self._cache[digest]
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._fetch(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t, d=digest: self._inflight.pop(d) if self._inflight.get(d) is t else None)
        # shielded: a cancelled request must not cancel the fetch other requests are waiting on
        return await asyncio.shield(task)

    async def _fetch(self, digest: str) -> KeyRecord | None:
        assert self.store is not None
        self.store_calls += 1
        raw = await self.store.get(self._record_key(digest))
        record = None if raw is None else self._parse(digest, raw)
        self._remember(digest, record)
        return record

    def _remember(self, digest: str, record: KeyRecord | None) -> None:
        if self.cache_seconds <= 0:
            return
        self._cache[digest] = (self._clock(), record)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_cache:
            self._cache.popitem(last=False)

    def _forget(self, digest: str) -> None:
        self._cache.pop(digest, None)

    @staticmethod
    def _parse(digest: str, raw: bytes) -> KeyRecord | None:
        try:
            doc = json.loads(raw)
            expires_at = doc.get("expires_at")
            created_at = doc.get("created_at")
            return KeyRecord(id=str(doc["id"]), digest=digest, owner=str(doc["owner"]),
                             scopes=tuple(str(s) for s in doc.get("scopes", ())), tier=str(doc.get("tier", "default")),
                             expires_at=None if expires_at is None else float(expires_at), source="store",
                             created_at=None if created_at is None else float(created_at))
        except (ValueError, TypeError, KeyError, AttributeError):
            # the digest identifies the record without revealing the key
            log.warning("unreadable api key record in the store; treated as no key",
                        extra={"digest": digest})
            return None

    @property
    def cached(self) -> int:
        return len(self._cache)

    # -- management (admin API) ---------------------------------------------------------------------
    async def create(self, owner: str, scopes: Iterable[str] = (), tier: str = "default",
                     expires_at: float | None = None,
                     key_id: str | None = None) -> tuple[str, KeyRecord]:
        """Issue a store-managed key: `(raw key, record)`. The raw key exists only in the result."""
        store = self._require_store()
        scopes = tuple(scopes)
        _check_text("owner", owner)
        _check_text("tier", tier)
        for s in scopes:
            _check_text("scope", s)
        now = self._wall_clock()
        if expires_at is not None and expires_at <= now:
            raise ValueError("expires_at is in the past")
        index = await self._read_index()
        if key_id is None:
            key_id = "key-" + self._random_bytes(6).hex()
        elif not _ID.fullmatch(key_id):
            raise ValueError(f"key id {key_id!r}: use 1-63 of a-z 0-9 _ . - starting with a letter or digit")
        if key_id in self.table:
            raise KeyIdConflict(f"key id {key_id!r} is a config key in extproc.yaml")
        if key_id in index:
            raise KeyIdConflict(f"key id {key_id!r} is already in use")
        raw = core.generate(self._random_bytes(core.RANDOM_BYTES))
        d = core.digest(raw)
        record = KeyRecord(id=key_id, digest=d, owner=owner, scopes=scopes, tier=tier, expires_at=expires_at,
                           source="store", created_at=now)
        doc = {"id": key_id, "owner": owner, "scopes": list(scopes), "tier": tier, "expires_at": expires_at,
               "created_at": now}
        await store.set(self._record_key(d), json.dumps(doc, separators=(",", ":")).encode())
        await self._update_index(lambda idx: idx.__setitem__(key_id, d), lambda idx: idx.get(key_id) == d)
        self._forget(d)
        log.debug("api key created", extra={"key_id": key_id, "owner": owner})
        return raw, record

    async def list(self) -> list[KeyRecord]:
        """Config keys (source "config") then store keys (source "store", oldest first)."""
        out = self.table.records()
        if self.store is None:
            return out
        stored = []
        for key_id, d in (await self._read_index()).items():
            raw = await self.store.get(self._record_key(d))
            record = None if raw is None else self._parse(d, raw)
            if record is not None and record.id == key_id:
                stored.append(record)
        stored.sort(key=lambda r: (r.created_at or 0.0, r.id))
        return out + stored

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Delete a store key by id: its record when it existed (truthy), else None.

        Config keys raise ConfigManagedKey. The record lets the caller audit whose key it was.
        """
        if key_id in self.table:
            raise ConfigManagedKey(f"key {key_id!r} is defined in extproc.yaml (api_keys.keys): remove it "
                                   "there and reload to revoke it")
        if self.store is None:
            return None
        d = (await self._read_index()).get(key_id)
        if d is None:
            return None
        raw = await self.store.get(self._record_key(d))
        record = (None if raw is None else self._parse(d, raw)) or KeyRecord(
            id=key_id, digest=d, owner="", source="store")
        await self.store.delete(self._record_key(d))
        await self._update_index(lambda idx: idx.pop(key_id, None), lambda idx: key_id not in idx)
        self._forget(d)
        return record

    def _require_store(self) -> Store:
        if self.store is None:
            raise StoreNotEnabled("api_keys.from_store is off: keys are managed in extproc.yaml; run "
                                  "`extproc apikey digest` to make one, or set api_keys.from_store: true")
        return self.store

    async def _read_index(self) -> dict[str, str]:
        assert self.store is not None
        raw = await self.store.get(self._index_key())
        if raw is None:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise StoreError(f"api key index {self._index_key()} is not a JSON object", transient=False)
        return {str(k): str(v) for k, v in doc.items() if core.is_digest(str(v))}

    async def _update_index(self, change: Callable[[dict[str, str]], Any],
                            applied: Callable[[dict[str, str]], bool]) -> None:
        # read-modify-write, then read back: a concurrent writer's overwrite is re-applied
        assert self.store is not None
        for _ in range(_INDEX_ROUNDS):
            index = await self._read_index()
            change(index)
            await self.store.set(self._index_key(), json.dumps(index, sort_keys=True).encode())
            if applied(await self._read_index()):
                return
        log.warning("api key index changed concurrently; the last change may be missing from it")


def _check_text(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
        raise ValueError(f"{what} must be a non-empty printable string of at most 256 characters")
