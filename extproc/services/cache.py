"""Response caching for ext_proc: two tiers, fleet-wide invalidation, collapsed misses.

The rules of HTTP caching are in core/httpcache.py; this module keeps the entries and drives
the store. The ext_proc servicer (services/processor.py) calls it at request headers (look
up; a fresh hit becomes an ImmediateResponse), at response headers (store? revalidated?
invalidate?) and at the response body (store it).

Tiers
-----
An in-process LRU bounded by bytes (`cache.memory_max_bytes`) sits in front of the store
(`cache.shared`: Redis, shared by every replica; or the in-memory store of a single process).
A lookup reads the LRU, then the store (bounded by `cache.store_timeout_ms`); a store hit is
copied into the LRU. A write goes to the LRU at once and to the store in the background
(bounded: when too many writes are queued, the store copy is skipped and counted). A store
that fails or is slow makes the cache step aside: lookups count `gateway_cache_errors_total`
and go upstream, nothing else changes.

Keys
----
primary = digest(method class, host, path, normalised query, the rule's key headers and
claims, and the subject when the rule keys by user; the subject comes from ext_authz's
dynamic metadata, never from a header). A response with `Vary` is stored under
variant = digest(primary, the request's values of the Vary fields), and the primary key holds
a small stub that lists the Vary fields, so a lookup costs one read (two for a Vary response).
Headers that are not in the key and not in Vary cannot change what an entry holds: the
entry is the upstream's answer to the request that stored it.

Invalidation
------------
Every invalidation is a *purge record*: (kind, value, time) with kinds `path` (that path, any
query), `prefix`, `tag` (Cache-Tag / Surrogate-Key) and `key`. An entry is void when a record
matching it is not older than the request that stored it (so a response that was already on
its way when the purge happened cannot resurrect the old state). Records live in a scored set
in the store and travel by pub/sub: a replica applies its own at once and hears the others'
within a pub/sub delivery (milliseconds); it subscribes before it reads the set, so nothing
falls in between. A replica cut off from the store has no shared tier to serve from anyway.
The local copy is bounded (`cache.max_purge_records`): dropping the oldest record raises a
floor below which every entry counts as void, so bounding never resurrects anything. Records
older than the longest entry lifetime are trimmed.

Collapsed misses
----------------
Within a replica, the first miss for a key goes upstream; concurrent misses for that key wait
(at most `cache.collapse_timeout_ms`) for its answer and are served from it (HIT, counted as
collapsed), or go upstream themselves when the wait ends without a storable answer. A waiter
whose client aborts is cancelled with its stream and leaves nothing behind; the leader always
settles its future when its stream ends, however it ends. Across replicas misses are not
collapsed (a store lock would add a round trip to every miss): N replicas send at most N.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from .. import config as cfgmod
from .._proto.cache_entry_pb2 import CacheEntry
from ..core import httpcache as hc
from ..store import keys as storekeys
from ..store.base import Store, StoreError
from ..store.follow import follow
from ..telemetry import metrics

log = logging.getLogger("extproc.cache")

PURGES_TAG = "purges"
CHANNEL = "purges"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_BACKGROUND_WRITES = 256
PURGE_KINDS = ("path", "prefix", "tag", "key")
# Request headers an upstream may reflect into a response (absolute URLs, redirects, method
# overrides) although they are not part of the key: on a cached route they are removed before
# the request goes upstream, unless the rule keys by them, so no request can store an answer
# shaped by them for everyone else (cache poisoning through unkeyed headers).
UNKEYED_STRIPPED = ("x-forwarded-host", "x-forwarded-server", "x-forwarded-port", "x-forwarded-prefix",
                    "x-forwarded-scheme", "x-host", "x-original-url", "x-rewrite-url", "x-original-host",
                    "forwarded", "x-http-method-override", "x-http-method", "x-method-override")


# -- compiled rules -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    prefixes: tuple[str, ...]
    regex: re.Pattern[str] | None
    store: bool
    methods: frozenset[str]
    policy: hc.StorePolicy
    key_headers: tuple[str, ...]
    key_claims: tuple[str, ...]
    per_user: bool
    query: str
    query_ignore: tuple[str, ...]
    query_only: tuple[str, ...] | None
    invalidate_prefixes: tuple[str, ...]
    shadow: bool

    def matches(self, path: str) -> bool:
        if self.prefixes and not path.startswith(self.prefixes):
            return False
        return self.regex is None or self.regex.search(path) is not None


@dataclass(frozen=True, slots=True)
class CachePlan:
    """The rules of one config, indexed by the ext_proc policy name."""
    by_policy: Mapping[str, tuple[CompiledRule, ...]]
    any_policy: tuple[CompiledRule, ...]
    rules: tuple[CompiledRule, ...]
    horizon_s: float          # the longest an entry may be used (max TTL + stale windows + revalidation)

    @classmethod
    def compile(cls, cfg: cfgmod.Cache) -> CachePlan:
        compiled: list[tuple[cfgmod.CacheRule, CompiledRule]] = []
        horizon = 3600.0
        for r in cfg.rules:
            max_ttl = float(cfgmod.seconds_of(r.max_ttl))
            swr = float(cfgmod.seconds_of(r.stale_while_revalidate)) if r.stale_while_revalidate is not None else 0.0
            sie = float(cfgmod.seconds_of(r.stale_if_error)) if r.stale_if_error is not None else 0.0
            policy = hc.StorePolicy(
                statuses=frozenset(r.statuses),
                default_ttl=float(cfgmod.seconds_of(r.ttl)) if r.ttl is not None else None,
                max_ttl=max_ttl,
                max_body_bytes=cfg.max_body_bytes if r.max_body_bytes is None else r.max_body_bytes,
                per_user=r.key.per_user, stale_while_revalidate=swr, stale_if_error=sie)
            # a response may carry longer stale windows than the rule's: allow a day of them
            horizon = max(horizon, max_ttl + max(swr, sie, 86_400.0) + 3600.0)
            compiled.append((r, CompiledRule(
                name=r.name, prefixes=tuple(r.path_prefix),
                regex=re.compile(r.path_regex) if r.path_regex else None, store=r.store,
                methods=frozenset(r.methods), policy=policy, key_headers=tuple(r.key.headers),
                key_claims=tuple(r.key.claims), per_user=r.key.per_user, query=r.key.query,
                query_ignore=tuple(r.key.query_ignore),
                query_only=None if r.key.query_only is None else tuple(r.key.query_only),
                invalidate_prefixes=tuple(r.invalidate_prefixes), shadow=r.mode == "shadow")))
        by_policy: dict[str, list[CompiledRule]] = {}
        names = {p for r, _ in compiled for p in r.policies}
        for name in names:
            by_policy[name] = [c for r, c in compiled if not r.policies or name in r.policies]
        return cls({k: tuple(v) for k, v in by_policy.items()},
                   tuple(c for r, c in compiled if not r.policies), tuple(c for _, c in compiled), horizon)

    def rule_for(self, policy: str, path: str) -> CompiledRule | None:
        for rule in self.by_policy.get(policy, self.any_policy):
            if rule.matches(path):
                return rule
        return None

    def applies_to(self, policy: str) -> bool:
        return bool(self.by_policy.get(policy, self.any_policy))


# -- the in-process tier ------------------------------------------------------------------------

class MemoryTier:
    """LRU of decoded entries, bounded by the bytes their encodings take (plus a per-entry
    overhead), so the bound holds under any mix of sizes."""

    OVERHEAD = 3072     # the decoded message, its header objects (measured ~1.9 KB) and the reply headers

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[CacheEntry, int]] = OrderedDict()
        self._extra: dict[str, object] = {}     # what the servicer derives from an entry (its reply headers)
        self._gauges = (metrics.child(metrics.CACHE_ENTRIES, "memory"), metrics.child(metrics.CACHE_BYTES, "memory"))

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CacheEntry | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, entry: CacheEntry, size: int) -> None:
        size += self.OVERHEAD
        self.pop(key)
        if size > self.max_bytes:
            return
        self._items[key] = (entry, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            gone, (_, old) = self._items.popitem(last=False)
            self._extra.pop(gone, None)
            self.bytes -= old
        self._report()

    def pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        self._extra.pop(key, None)
        if item is not None:
            self.bytes -= item[1]
            self._report()

    def extra(self, key: str, entry: CacheEntry) -> object | None:
        item = self._items.get(key)
        return self._extra.get(key) if item is not None and item[0] is entry else None

    def set_extra(self, key: str, entry: CacheEntry, value: object) -> None:
        item = self._items.get(key)
        if item is not None and item[0] is entry:
            self._extra[key] = value

    def clear(self) -> None:
        self._extra.clear()
        self._items.clear()
        self.bytes = 0
        self._report()

    def _report(self) -> None:
        self._gauges[0].set(len(self._items))
        self._gauges[1].set(self.bytes)


# -- purge records ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Purge:
    kind: str       # path | prefix | tag | key
    value: str
    at_ms: int

    def member(self) -> str:
        return f"{self.kind}:{quote(self.value, safe='/')}"

    def message(self) -> bytes:
        return f"{self.at_ms} {self.member()}".encode()

    @classmethod
    def parse(cls, member: str, at_ms: float) -> Purge | None:
        kind, _, value = member.partition(":")
        if kind not in PURGE_KINDS or not value:
            return None
        return cls(kind, unquote(value), int(at_ms))

    @classmethod
    def from_message(cls, raw: bytes) -> Purge | None:
        try:
            at, _, member = raw.decode().partition(" ")
            return cls.parse(member, int(at))
        except (UnicodeDecodeError, ValueError):
            return None


class PurgeLog:
    """The fleet's purge records, with a local copy checked on every lookup (dict lookups; the
    prefixes are few). See the module docstring."""

    def __init__(self, store: Store | None, max_records: int = 10_000, horizon_s: float = 86_400.0,
                 clock: Callable[[], float] = time.time, retry_seconds: float = 2.0,
                 keyspace: storekeys.KeySpace | None = None):
        space = keyspace or storekeys.current()
        self.store = store
        self.max_records = max_records
        self.horizon_s = horizon_s
        self.clock = clock
        self.retry_seconds = retry_seconds
        self.index_key = space.key(storekeys.CACHE, PURGES_TAG)
        self.channel = space.channel(storekeys.CACHE, CHANNEL)
        self._records: dict[str, dict[str, int]] = {k: {} for k in PURGE_KINDS}
        self._order: list[tuple[int, str, str]] = []     # (at_ms, kind, value): oldest first
        self.floor_ms = 0                                # entries stored before this are void
        self.synced = store is None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._records.values())

    # -- the hot path ---------------------------------------------------------------------------
    def void(self, entry: CacheEntry, key: str) -> bool:
        at = entry.request_time_ms
        if at < self.floor_ms:
            return True
        rec = self._records
        if rec["key"] and rec["key"].get(key, -1) >= at:
            return True
        path = entry.url.partition("?")[0]
        if rec["path"] and rec["path"].get(path, -1) >= at:
            return True
        if rec["prefix"]:
            for prefix, when in rec["prefix"].items():
                if when >= at and path.startswith(prefix):
                    return True
        if rec["tag"] and entry.tags:
            tags = rec["tag"]
            for tag in entry.tags:
                if tags.get(tag, -1) >= at:
                    return True
        return False

    # -- recording ------------------------------------------------------------------------------
    def apply(self, p: Purge) -> None:
        records = self._records[p.kind]
        old = records.get(p.value)
        if old is not None and old >= p.at_ms:
            return
        records[p.value] = p.at_ms
        heapq.heappush(self._order, (p.at_ms, p.kind, p.value))
        while len(self) > self.max_records and self._order:
            at, kind, value = heapq.heappop(self._order)
            if self._records[kind].get(value) == at:
                del self._records[kind][value]
                self.floor_ms = max(self.floor_ms, at)
        if len(self._order) > 4 * self.max_records:
            self._order = [(at, k, v) for k, recs in self._records.items() for v, at in recs.items()]
            heapq.heapify(self._order)

    def trim(self, now: float) -> None:
        cutoff = int((now - self.horizon_s) * 1000)
        while self._order and self._order[0][0] < cutoff:
            at, kind, value = heapq.heappop(self._order)
            if self._records[kind].get(value) == at:
                del self._records[kind][value]

    async def record(self, purges: Iterable[Purge]) -> None:
        """Apply locally at once, then share (raises StoreError when it could not be shared)."""
        purges = list(purges)
        for p in purges:
            self.apply(p)
        metrics.child(metrics.CACHE_INVALIDATIONS, "local").inc(len(purges))
        if self.store is None or not purges:
            return
        for p in purges:
            await self.store.zadd(self.index_key, p.member(), p.at_ms)
            await self.store.publish(self.channel, p.message())
        await self.store.zrem_below(self.index_key, (self.clock() - self.horizon_s) * 1000)

    # -- following the fleet --------------------------------------------------------------------
    async def start(self, wait_s: float = 2.0) -> None:
        if self.store is None or self._task is not None:
            return
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(), name="cache-purges")
        try:
            await asyncio.wait_for(self._ready.wait(), wait_s)
        except TimeoutError:
            pass

    async def _follow(self) -> None:
        assert self.store is not None and self._ready is not None
        await follow(self.store, self.channel, resync=self._resync, on_message=self._on_message,
                     on_state=self._on_state, retry_seconds=self.retry_seconds, what="cache purge records", log=log,
                     lost="cache purge records: store unreachable; the shared tier is skipped until they are resynced")

    async def _resync(self) -> None:
        assert self.store is not None
        now = self.clock()
        for member, at in await self.store.zrange_from(self.index_key, (now - self.horizon_s) * 1000):
            p = Purge.parse(member, at)
            if p is not None:
                self.apply(p)
        self.trim(now)

    def _on_message(self, raw: bytes) -> None:
        p = Purge.from_message(raw)
        if p is not None:
            self.apply(p)
            metrics.CACHE_INVALIDATION_LAG.observe(max(0.0, self.clock() - p.at_ms / 1000))

    def _on_state(self, synced: bool) -> None:
        self.synced = synced
        assert self._ready is not None
        self._ready.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# -- one request's cache state ------------------------------------------------------------------

@dataclass(slots=True)
class Lookup:
    """What the request phase learnt, kept for the response phase of the same exchange."""
    rule: CompiledRule
    method: str
    url: str
    primary: str = ""
    key: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    authenticated: bool = False
    request_time: float = 0.0
    entry: CacheEntry | None = None       # a stored entry that was not served (stale), for 304 / stale-if-error
    revalidating: bool = False            # we added the entry's validators to the request
    strip: tuple[str, ...] = ()           # unkeyed headers removed before the request goes upstream
    leader: bool = False                  # this request registered the in-flight miss (under pending_key)
    pending_key: str = ""
    status: str = "BYPASS"                # X-Cache-Status for the response
    detail: str = ""                      # Cache-Status parameters
    verdict: hc.Storable | None = None    # the storable response's verdict, between headers and body
    response_status: int = 0
    response_headers: list[tuple[str, bytes]] = field(default_factory=list)
    response_time: float = 0.0


@dataclass(frozen=True, slots=True)
class Hit:
    """Serve `entry` at once. `status` is X-Cache-Status, `detail` the Cache-Status parameters."""
    entry: CacheEntry
    status: str
    detail: str
    not_modified: bool = False
    head: bool = False
    key: str = ""                # its key in the in-process tier


def collect_headers(header_map) -> dict[str, str]:
    """Envoy's HeaderMap as a dict (names are lower-case; repeats joined by ", ")."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        value = h.raw_value.decode("latin-1") if h.raw_value else h.value
        key = h.key
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def raw_headers(header_map) -> list[tuple[str, bytes]]:
    return [(h.key, h.raw_value if h.raw_value else h.value.encode("latin-1")) for h in header_map.headers]


def _same_origin_path(value: str, authority: str) -> str | None:
    """The path of a Location / Content-Location on this host (§4.4: only same-origin URIs)."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.netloc and parts.netloc.lower() != authority.lower():
        return None
    return parts.path or None


class ResponseCache:
    """The worker's cache: survives reloads (the plan is swapped in place)."""

    def __init__(self, cfg: cfgmod.Cache, store: Store | None, clock: Callable[[], float] = time.time,
                 keyspace: storekeys.KeySpace | None = None):
        self.space = keyspace or storekeys.current()
        self.clock = clock
        self.store = store
        self.plan = CachePlan.compile(cfg)
        self.cfg = cfg
        self.memory = MemoryTier(cfg.memory_max_bytes)
        self.purges = PurgeLog(store if cfg.shared else None, cfg.max_purge_records, self.plan.horizon_s,
                               clock, keyspace=self.space)
        self._pending: dict[str, asyncio.Future[CacheEntry | None]] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def reconfigure(self, cfg: cfgmod.Cache) -> None:
        if cfg is self.cfg:
            return
        self.cfg = cfg
        self.plan = CachePlan.compile(cfg)
        self.purges.horizon_s = self.plan.horizon_s
        self.purges.max_records = cfg.max_purge_records
        if cfg.memory_max_bytes != self.memory.max_bytes:
            self.memory = MemoryTier(cfg.memory_max_bytes)

    async def start(self) -> None:
        if self.cfg.rules or self.cfg.shared:
            await self.purges.start()

    async def close(self) -> None:
        await self.purges.close()
        writes = list(self._writes)
        for t in writes:
            t.cancel()
        await asyncio.gather(*writes, return_exceptions=True)

    @property
    def shared(self) -> bool:
        return self.cfg.shared and self.store is not None and self.purges.synced

    # -- keys -----------------------------------------------------------------------------------
    def primary_key(self, rule: CompiledRule, headers: Mapping[str, str], url: str,
                    identity: Mapping[str, str]) -> str:
        parts = ["GET", headers.get(":authority", "").lower(), url]
        for name in rule.key_headers:
            parts.append(name)
            parts.append(" ".join(headers.get(name, "").split()))
        for claim in rule.key_claims:
            parts.append("claim:" + claim)
            parts.append(identity.get(claim, ""))
        if rule.per_user:
            parts.append("sub")
            parts.append(identity.get("sub", ""))
        return hc.digest(*parts)

    def store_key(self, key: str) -> str:
        return self.space.key(storekeys.CACHE, key)

    # -- reading --------------------------------------------------------------------------------
    async def _read(self, key: str) -> CacheEntry | None:
        entry = self.memory.get(key)
        if entry is not None:
            if self.purges.void(entry, key):
                self.memory.pop(key)
                return None
            return entry
        if not self.shared:
            return None
        assert self.store is not None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.store_timeout_ms / 1000):
                raw = await self.store.get(self.store_key(key))
        except TimeoutError:
            metrics.child(metrics.CACHE_ERRORS, "store_timeout").inc()
            return None
        except StoreError:
            metrics.child(metrics.CACHE_ERRORS, "store_error").inc()
            return None
        finally:
            metrics.child(metrics.STORE_SECONDS, "cache_get").observe(time.perf_counter() - start)
        if raw is None:
            return None
        entry = hc.decode(raw)
        if entry is None:
            metrics.child(metrics.CACHE_ERRORS, "bad_entry").inc()
            return None
        if self.purges.void(entry, key):
            return None
        self.memory.put(key, entry, len(raw))
        return entry

    async def lookup(self, rule: CompiledRule, method: str, headers: Mapping[str, str],
                     identity: Mapping[str, str]) -> Lookup | Hit:
        """The request phase for a request on a cached route."""
        path, _, query = headers.get(":path", "/").partition("?")
        url = path + ("?" + q if (q := hc.normalise_query(query, rule.query, rule.query_ignore,
                                                           rule.query_only)) else "")
        look = Lookup(rule, method, url, headers=headers, authenticated=bool(identity.get("auth")),
                      request_time=self.clock())
        if method in UNSAFE_METHODS:
            look.status = ""            # invalidation happens at the response; no cache header
            return look
        look.strip = tuple(h for h in UNKEYED_STRIPPED if h in headers and h not in rule.key_headers)
        if not rule.store:
            look.detail = "fwd=bypass; detail=rule"
            self._count_bypass(rule, "rule")
            return look
        reason = hc.request_bypass(method, headers, rule.methods)
        if reason is None and self.cfg.shared and self.store is not None and not self.purges.synced:
            # without the fleet's purge records no entry can be trusted, not even this replica's
            reason = "store_unavailable"
            metrics.child(metrics.CACHE_ERRORS, "store_unavailable").inc()
        if reason is not None:
            look.detail = f"fwd=bypass; detail={reason}"
            self._count_bypass(rule, reason)
            return look
        look.primary = look.key = self.primary_key(rule, headers, url, identity)
        entry = await self._read(look.primary)
        if entry is not None and entry.vary_stub:
            look.key = hc.variant_key(look.primary, entry.vary, headers)
            entry = await self._read(look.key)
        revalidate = hc.request_wants_revalidation(headers)
        if entry is not None:
            st = hc.state(entry, self.clock(), revalidate)
            if st == "fresh" or st == "stale_revalidate" and look.key in self._pending:
                return self._hit(look, entry, "HIT" if st == "fresh" else "STALE",
                                 "hit" if st == "fresh" else "hit; fwd=stale")
            look.entry = entry
            # our validators replace the client's: a 304 refreshes the entry, and the client's own
            # conditionals are then answered from it (304 or the full response)
            look.revalidating = bool(entry.etag or entry.last_modified)
        # a miss (or a stale entry to revalidate): collapse onto the request already fetching it
        pending = self._pending.get(look.key)
        if pending is not None and self.cfg.collapse_timeout_ms > 0 and not rule.shadow:
            got = await self._wait(pending)
            if got is not None and not self.purges.void(got, look.key):
                metrics.child(metrics.CACHE_COLLAPSED, rule.name).inc()
                return self._hit(look, got, "HIT", "hit; detail=collapsed")
        elif pending is None and method == "GET":      # a HEAD's answer has no body to share
            self._pending[look.key] = asyncio.get_running_loop().create_future()
            look.leader, look.pending_key = True, look.key
        look.status = "MISS"
        look.detail = "fwd=stale" if look.entry is not None else "fwd=miss"
        metrics.child(metrics.CACHE_MISSES, rule.name).inc()
        return look

    def _hit(self, look: Lookup, entry: CacheEntry, status: str, detail: str) -> Lookup | Hit:
        rule = look.rule
        if rule.shadow:
            # counted as a would-be hit, never served
            metrics.child(metrics.CACHE_SHADOW_HITS, rule.name).inc()
            look.status, look.detail = "BYPASS", "fwd=bypass; detail=shadow"
            return look
        metrics.child(metrics.CACHE_HITS, rule.name).inc()
        if status == "STALE":
            metrics.child(metrics.CACHE_STALE, rule.name).inc()
        return Hit(entry, status, detail, not_modified=hc.not_modified(look.headers, entry.etag, entry.last_modified),
                   head=look.method == "HEAD", key=look.key)

    async def _wait(self, fut: asyncio.Future[CacheEntry | None]) -> CacheEntry | None:
        try:
            async with asyncio.timeout(self.cfg.collapse_timeout_ms / 1000):
                return await asyncio.shield(fut)
        except TimeoutError:
            return None

    def _count_bypass(self, rule: CompiledRule, reason: str) -> None:
        metrics.child(metrics.CACHE_BYPASS, rule.name, reason).inc()

    # -- the response ---------------------------------------------------------------------------
    def on_response(self, look: Lookup, status: int, headers: list[tuple[str, bytes]]) -> Hit | bool:
        """Response headers arrived. Returns a Hit to answer from the cache instead (a 304 that
        refreshed the entry, or stale-if-error), True when the body should be buffered and
        stored, else False."""
        now = self.clock()
        look.response_status, look.response_time = status, now
        hmap = {k: v.decode("latin-1") for k, v in headers}
        if look.method in UNSAFE_METHODS:
            if 200 <= status < 400:
                self._invalidate_after_write(look, hmap)
            return False
        if not look.primary or look.status != "MISS":
            return False
        if look.method != "GET":          # HEAD: nothing to store, nobody waits on it
            return False
        rule = look.rule
        entry = look.entry
        if entry is not None and status == 304 and look.revalidating:
            verdict = hc.storable(entry.status, {**{h.name: h.value.decode("latin-1") for h in entry.headers},
                                                 **hmap, "content-length": str(len(entry.body))},
                                  rule.policy, authenticated=look.authenticated, request_time=look.request_time,
                                  response_time=now)
            if verdict.ok:
                fresh = hc.refreshed(entry, headers, verdict, request_time=look.request_time, response_time=now)
                self._put(look, fresh)
                metrics.child(metrics.CACHE_REVALIDATED, rule.name).inc()
                self._settle(look, fresh)
                hit = self._hit(look, fresh, "REVALIDATED", "hit; fwd=stale; fwd-status=304")
                return hit if isinstance(hit, Hit) else False
        if entry is not None and status >= 500 and hc.may_stand_in(entry, now):
            metrics.child(metrics.CACHE_STALE, rule.name).inc()
            hit = Hit(entry, "STALE", f"hit; fwd=stale; fwd-status={status}; detail=stale-if-error",
                      not_modified=False, head=look.method == "HEAD")
            self._settle(look, None)
            if rule.shadow:
                return False
            metrics.child(metrics.CACHE_HITS, rule.name).inc()
            return hit
        if status >= 500:
            self._settle(look, None)      # an upstream 5xx never overwrites a good entry
            return False
        verdict = hc.storable(status, hmap, rule.policy, authenticated=look.authenticated,
                              request_time=look.request_time, response_time=now)
        if not verdict.ok:
            look.detail += f"; detail={verdict.reason}"
            self._count_bypass(rule, verdict.reason)
            self._settle(look, None)
            return False
        look.verdict = verdict
        look.response_headers = headers
        look.detail += "; stored"
        return True

    def on_body(self, look: Lookup, body: bytes) -> None:
        """The whole body of a storable response (BUFFERED)."""
        verdict = look.verdict
        if verdict is None:
            return
        if len(body) > verdict_limit(look):
            self._count_bypass(look.rule, "too_large")
            self._settle(look, None)
            return
        hmap = dict(look.response_headers)
        entry = hc.build_entry(
            look.response_status, look.response_headers, body, verdict, url=look.url,
            tags=hc.tags_of({k: v.decode("latin-1") for k, v in hmap.items()}), request_time=look.request_time,
            response_time=look.response_time, etag=hmap.get("etag", b"").decode("latin-1"),
            last_modified=hmap.get("last-modified", b"").decode("latin-1"))
        if verdict.vary:
            self._put_stub(look, verdict.vary)
            look.key = hc.variant_key(look.primary, verdict.vary, look.headers)
        self._put(look, entry)
        metrics.child(metrics.CACHE_STORES, look.rule.name).inc()
        self._settle(look, entry)

    def finish(self, look: Lookup) -> None:
        """The stream ended (any way): a leader that did not settle wakes its waiters empty."""
        self._settle(look, None)

    def _settle(self, look: Lookup, entry: CacheEntry | None) -> None:
        if look.leader:
            look.leader = False
            fut = self._pending.pop(look.pending_key, None)
            if fut is not None and not fut.done():
                fut.set_result(entry)

    # -- writing --------------------------------------------------------------------------------
    def _put(self, look: Lookup, entry: CacheEntry) -> None:
        # shadow rules store too (entries are what would-be hits are counted against); they never serve
        raw = entry.SerializeToString()
        self.memory.put(look.key, entry, len(raw))
        metrics.child(metrics.CACHE_WRITTEN_BYTES, "memory").inc(len(raw))
        if self.shared:
            self._background(self._write(self.store_key(look.key), raw, hc.keep_ms(entry, self.clock())))

    def _put_stub(self, look: Lookup, vary: tuple[str, ...]) -> None:
        stub = hc.vary_stub(vary, look.url, look.request_time, self.clock() + self.plan.horizon_s)
        raw = stub.SerializeToString()
        self.memory.put(look.primary, stub, len(raw))
        if self.shared:
            self._background(self._write(self.store_key(look.primary), raw, int(self.plan.horizon_s * 1000)))

    async def _write(self, key: str, raw: bytes, ttl_ms: int) -> None:
        assert self.store is not None
        try:
            async with asyncio.timeout(max(0.25, self.cfg.store_timeout_ms / 1000 * 5)):
                await self.store.set(key, raw, ttl_ms)
            metrics.child(metrics.CACHE_WRITTEN_BYTES, "store").inc(len(raw))
        except (TimeoutError, StoreError):
            metrics.child(metrics.CACHE_ERRORS, "store_write").inc()

    def _background(self, coro) -> None:
        if len(self._writes) >= MAX_BACKGROUND_WRITES:
            coro.close()
            metrics.child(metrics.CACHE_ERRORS, "write_queue_full").inc()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # -- invalidation ---------------------------------------------------------------------------
    def _invalidate_after_write(self, look: Lookup, response: Mapping[str, str]) -> None:
        """§4.4: a successful unsafe request invalidates its URL, its Location and
        Content-Location (same origin), and the rule's related prefixes."""
        authority = look.headers.get(":authority", "")
        at = int(self.clock() * 1000)
        purges = [Purge("path", look.url.partition("?")[0], at)]
        for name in ("location", "content-location"):
            p = _same_origin_path(response.get(name, ""), authority)
            if p is not None:
                purges.append(Purge("path", p, at))
        purges.extend(Purge("prefix", p, at) for p in look.rule.invalidate_prefixes)
        self._background(self._share(purges))

    async def purge(self, kind: str, value: str) -> Purge:
        """Admin purge; raises StoreError when it could not reach the other replicas."""
        if kind not in PURGE_KINDS or not value:
            raise ValueError(f"purge by one of {', '.join(PURGE_KINDS)} with a non-empty value")
        p = Purge(kind, value, int(self.clock() * 1000))
        if kind == "key":
            self.memory.pop(value)
        await self.purges.record([p])
        return p

    async def _share(self, purges: list[Purge]) -> None:
        try:
            await self.purges.record(purges)
        except StoreError:
            metrics.child(metrics.CACHE_ERRORS, "purge_share").inc()

    # -- statistics -----------------------------------------------------------------------------
    async def store_usage(self, limit: int = 100_000) -> dict | None:
        """Entries and bytes held by the shared tier (a SCAN over the cache's keys: admin use only,
        bounded by `limit` keys and a 2 s timeout), or None without a shared tier."""
        if not self.cfg.shared or self.store is None:
            return None
        match = f"{self.space.prefix}:{storekeys.CACHE}:{{{'?' * 40}}}"     # entry keys, not the purge index
        try:
            async with asyncio.timeout(2.0):
                entries, size, truncated = await self.store.byte_usage(match, limit)
        except (TimeoutError, StoreError) as exc:
            return {"error": str(exc) or "timed out"}
        return {"entries": entries, "bytes": size, "truncated": truncated}

    def stats(self) -> dict:
        return {"memory": {"entries": len(self.memory), "bytes": self.memory.bytes,
                           "max_bytes": self.memory.max_bytes},
                "purge_records": len(self.purges), "shared": self.shared,
                "in_flight_misses": len(self._pending)}


def verdict_limit(look: Lookup) -> int:
    return look.rule.policy.max_body_bytes


def identity_of(metadata_context) -> dict[str, str]:
    """ext_authz's dynamic metadata (forwarded to ext_proc): the verified identity, as strings."""
    fm = metadata_context.filter_metadata
    if "envoy.filters.http.ext_authz" not in fm:
        return {}
    out: dict[str, str] = {}
    for k, v in fm["envoy.filters.http.ext_authz"].fields.items():
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            out[k] = v.string_value
        elif kind == "number_value":
            out[k] = repr(v.number_value)
        elif kind == "bool_value":
            out[k] = "true" if v.bool_value else "false"
    return out
