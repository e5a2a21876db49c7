"""Fleet-wide token revocation, checked against a local copy: the hot path never waits on the store.

What it decides: whether a token that verified is nevertheless revoked — by its `jti`, by the
SHA-256 digest of the token (tokens without a jti, opaque tokens), or because its subject
logged out everywhere ("every token of `sub` issued before `not_before`").

Theory of operation
-------------------
* The store holds the truth: one scored set (`<prefix>:revoked:{index}`) whose members name
  the revocations and whose scores are the epoch second each one stops mattering (`until`):
  the token's `exp` plus `exp_grace_seconds` (the verifier's leeway still accepts a token a
  little past exp; never less than 1 s from now), or, for a subject, `not_before` plus the
  longest token lifetime (`subject_ttl_seconds`, 24 h by default: no token issued before
  `not_before` outlives that). Revoking records the entry locally first (this replica enforces
  it at once, even with the store down), then adds it to the set, trims members already
  past their `until`, and publishes it on `<prefix>:revoked:events`.
* Every replica keeps the live entries in dicts; `is_revoked()` is three dict lookups, O(1),
  no I/O. Entries past `until` are ignored, dropped when met, and pruned every
  `resync_seconds`. The copy is bounded (`max_entries`): when full, entries already dead go
  first, then those that expire soonest — and since the copy is then known to be
  incomplete, `known_complete` turns False (logged once) until a resync fits again.
* A background task subscribes to the channel, *then* reads the whole set (a resync), then
  applies each message as it arrives. Subscribing before reading leaves no gap: a revocation
  written before the subscription is in the set, one written after it is delivered. A lost
  subscription (connection closed, Redis restarted, a silent partition caught by the
  subscription's PING) turns `known_complete` False, logged once; the task retries every
  `retry_seconds`, and the next successful subscribe + resync turns it True again. A resync
  every `resync_seconds` also repairs the one gap pub/sub leaves: a revoke whose PUBLISH failed
  after its write succeeded.
* Merging is union-only (an entry is never removed except by reaching its `until`), so a
  resync can run while messages are applied, and a replica that outlived a Redis restart
  without persistence keeps enforcing what it knew.

Propagation bound (what the README states)
------------------------------------------
A revocation made through any replica is enforced by that replica at once, and by every other
replica connected to the store within the pub/sub latency (a Redis round trip, typically
well under 10 ms). A replica cut off from the store (partition, Redis restart or failover)
misses messages meanwhile; it notices — at once when the connection drops, within
`pubsub_ping_seconds` + max(1 s, timeout) (6 s by default) for a silent partition — and
reports `known_complete = False` until it has resubscribed and re-read the whole set, which
it retries every `retry_seconds` (2 s by default): a partition heals at most `retry_seconds`
plus one resync after the store is reachable again. While `known_complete` is False the
revocations the replica already knew still hold, and for every other token the provider's
`revocation_fail` decides: `open` accepts it (it may have been revoked in the meantime),
`closed` answers `revocation_unknown` (401). A replica that has never reached the store since
it started has no copy at all: `known_complete` is False from the start, so `closed` providers
refuse every token and `open` ones accept every token until the first resync. Revocations
live in Redis: run it with persistence (AOF) or a Redis restart (or a failover that loses
unreplicated writes) forgets them for replicas started afterwards; replicas that were running
keep enforcing what they had heard. With the in-memory store, revocation is per process.

Keys: a revocation names a token by its `jti` or by the SHA-256 hex digest of the whole token
(one namespace: a jti equal to some other token's digest is a preimage). Neither a jti nor a
subject is scoped by issuer; when several providers share one sidecar and their `sub` values
may collide, pass a provider-qualified subject on both sides.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..store import keys as storekeys
from ..store.base import Store, StoreError, Subscription
from ..telemetry import metrics

log = logging.getLogger("extproc.revocation")

INDEX_TAG = "index"
CHANNEL_NAME = "events"
DEFAULT_SUBJECT_TTL_SECONDS = 24 * 3600.0
DEFAULT_EXP_GRACE_SECONDS = 600.0     # the largest leeway a provider may configure
MIN_LIFETIME_SECONDS = 1.0
_TOKEN = "token"
_SUBJECT = "sub"
_YIELD_EVERY = 5_000                  # a resync of a large set yields the loop this often


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation as stored and published.

    kind "token": `id` is a jti or a token's SHA-256 hex digest.
    kind "sub":   `id` is a subject; tokens with `iat < not_before` are revoked.
    `until`: epoch second from which the entry no longer matters.
    """

    kind: str
    id: str
    until: float
    not_before: float | None = None

    def member(self) -> str:
        if self.kind == _TOKEN:
            return f"{_TOKEN}:{quote(self.id, safe='')}"
        assert self.not_before is not None
        return f"{_SUBJECT}:{quote(self.id, safe='')}:{math.ceil(self.not_before * 1000)}"

    def message(self) -> bytes:
        return f"{self.until!r} {self.member()}".encode()

    @classmethod
    def parse(cls, member: str, until: float) -> Revocation | None:
        """The entry a set member names, or None for a member this version does not know."""
        kind, _, rest = member.partition(":")
        if kind == _TOKEN and rest:
            return cls(_TOKEN, unquote(rest), until)
        if kind == _SUBJECT:
            quoted, _, nb_ms = rest.rpartition(":")
            if quoted and nb_ms.isdigit():
                return cls(_SUBJECT, unquote(quoted), until, int(nb_ms) / 1000)
        return None

    @classmethod
    def from_message(cls, raw: bytes) -> Revocation | None:
        try:
            until_text, _, member = raw.decode().partition(" ")
            until = float(until_text)
        except (UnicodeDecodeError, ValueError):
            return None
        return cls.parse(member, until) if math.isfinite(until) else None


class RevocationList:
    """The fleet's revocations, with a local copy for the hot path; see the module docstring."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time, max_entries: int = 1_000_000, *,
                 keyspace: storekeys.KeySpace | None = None,
                 subject_ttl_seconds: float = DEFAULT_SUBJECT_TTL_SECONDS,
                 exp_grace_seconds: float = DEFAULT_EXP_GRACE_SECONDS,
                 retry_seconds: float = 2.0, resync_seconds: float = 300.0, start_wait_seconds: float = 5.0,
                 on_state: Callable[[bool], None] | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        if subject_ttl_seconds <= 0 or exp_grace_seconds < 0 or retry_seconds <= 0 or resync_seconds <= 0:
            raise ValueError("subject_ttl_seconds, retry_seconds and resync_seconds must be > 0, "
                             "exp_grace_seconds >= 0")
        space = keyspace or storekeys.current()
        self.store = store
        self.clock = clock
        self.max_entries = max_entries
        self.subject_ttl_seconds = subject_ttl_seconds
        self.exp_grace_seconds = exp_grace_seconds
        self.retry_seconds = retry_seconds
        self.resync_seconds = resync_seconds
        self.start_wait_seconds = start_wait_seconds
        self.index_key = space.key(storekeys.REVOKED, INDEX_TAG)
        self.channel = space.channel(storekeys.REVOKED, CHANNEL_NAME)
        self._on_state = on_state
        # the local copy: token id -> until; subject -> (not_before, until)
        self._tokens: dict[str, float] = {}
        self._subjects: dict[str, tuple[float, float]] = {}
        # (until, kind, id) for every entry written; stale items are skipped when popped
        self._expiries: list[tuple[float, str, str]] = []
        self._synced = False          # subscribed and resynced, subscription not lost since
        self._overflow = False        # entries were evicted for room since the last full resync
        self._evictions = 0
        self._complete = False
        # bumped by every revocation applied and every change of known_complete: a check that
        # found a token not revoked stays true while the version is the same (entries expiring
        # only ever un-revoke)
        self.version = 0
        self._lost_logged = False
        self._resync_failing = False
        self.synced_at: float | None = None
        self.messages_ignored = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._attempted: asyncio.Event | None = None

    # -- the hot path ---------------------------------------------------------------------------

    def is_revoked(self, jti: str | None, token_digest: str, sub: str | None, iat: float | None,
                   now: float) -> bool:
        """True when the token is revoked as far as this replica knows. O(1), no I/O.

        `token_digest` may be "" (not computed); a subject revocation also revokes a token
        without `iat`, since it cannot show it was issued after `not_before`.
        """
        tokens = self._tokens
        if tokens:
            if jti:
                until = tokens.get(jti)
                if until is not None:
                    if until > now:
                        return True
                    del tokens[jti]
            if token_digest:
                until = tokens.get(token_digest)
                if until is not None:
                    if until > now:
                        return True
                    del tokens[token_digest]
        if sub and self._subjects:
            entry = self._subjects.get(sub)
            if entry is not None:
                not_before, until = entry
                if until <= now:
                    del self._subjects[sub]
                elif iat is None or iat < not_before:
                    return True
        return False

    @property
    def known_complete(self) -> bool:
        """Whether the local copy is believed to hold every live revocation (see the docstring)."""
        return self._complete

    def __len__(self) -> int:
        return len(self._tokens) + len(self._subjects)

    def status(self) -> dict:
        """For readiness detail and the admin API."""
        return {"complete": self._complete, "entries": len(self), "synced_at": self.synced_at,
                "overflow": self._overflow}

    # -- revoking -------------------------------------------------------------------------------

    async def revoke_token(self, jti_or_digest: str, exp: float) -> Revocation:
        """Revoke one token (by jti, or by the SHA-256 hex digest of the token) until `exp`.

        Enforced here at once; raises StoreError when it could not be shared with the other
        replicas (this replica still enforces it; retrying is safe).
        """
        if not isinstance(jti_or_digest, str) or not jti_or_digest:
            raise ValueError("a token is revoked by a non-empty jti or digest")
        now = self.clock()
        until = max(float(exp) + self.exp_grace_seconds, now + MIN_LIFETIME_SECONDS)
        rev = Revocation(_TOKEN, jti_or_digest, until)
        await self._record(rev, now)
        return rev

    async def revoke_subject(self, sub: str, not_before: float | None = None,
                             ttl_seconds: float | None = None) -> Revocation:
        """Revoke every token of `sub` issued before `not_before` (default: now).

        The entry lives `ttl_seconds` (default `subject_ttl_seconds`, the longest token
        lifetime) past `not_before`. Same failure rule as `revoke_token`.
        """
        if not isinstance(sub, str) or not sub:
            raise ValueError("a subject is a non-empty string")
        now = self.clock()
        nb = now if not_before is None else float(not_before)
        ttl = self.subject_ttl_seconds if ttl_seconds is None else float(ttl_seconds)
        if not math.isfinite(nb) or not ttl > 0:
            raise ValueError("not_before must be a finite epoch and ttl_seconds > 0")
        nb = math.ceil(nb * 1000) / 1000   # as stored and published: every replica holds the same value
        rev = Revocation(_SUBJECT, sub, max(nb + ttl, now + MIN_LIFETIME_SECONDS), nb)
        await self._record(rev, now)
        return rev

    async def _record(self, rev: Revocation, now: float) -> None:
        self._apply(rev, now)
        metrics.child(metrics.REVOCATIONS, "token" if rev.kind == _TOKEN else "subject").inc()
        await self.store.zadd(self.index_key, rev.member(), rev.until)
        await self.store.zrem_below(self.index_key, now)
        await self.store.publish(self.channel, rev.message())

    # -- the local copy -------------------------------------------------------------------------

    def _apply(self, rev: Revocation, now: float) -> None:
        if rev.until <= now:
            return
        if rev.kind == _TOKEN:
            current = self._tokens.get(rev.id)
            if current is not None and current >= rev.until:
                return
            if current is None:
                self._make_room(now)
            self._tokens[rev.id] = rev.until
        else:
            assert rev.not_before is not None
            old = self._subjects.get(rev.id)
            if old is None:
                self._make_room(now)
                entry = (rev.not_before, rev.until)
            else:
                # several logouts of one subject: the latest not_before covers the earlier ones
                entry = (max(old[0], rev.not_before), max(old[1], rev.until))
                if entry == old:
                    return
            self._subjects[rev.id] = entry
        self.version += 1
        heapq.heappush(self._expiries, (rev.until, rev.kind, rev.id))
        if len(self._expiries) > 2 * self.max_entries + 64:
            self._compact()

    def _live_until(self, kind: str, ident: str) -> float | None:
        if kind == _TOKEN:
            return self._tokens.get(ident)
        entry = self._subjects.get(ident)
        return None if entry is None else entry[1]

    def _drop(self, kind: str, ident: str) -> None:
        if kind == _TOKEN:
            del self._tokens[ident]
        else:
            del self._subjects[ident]

    def prune(self, now: float | None = None) -> int:
        """Drop entries past their `until`; returns how many."""
        now = self.clock() if now is None else now
        heap, dropped = self._expiries, 0
        while heap and heap[0][0] <= now:
            until, kind, ident = heapq.heappop(heap)
            if self._live_until(kind, ident) == until:
                self._drop(kind, ident)
                dropped += 1
        return dropped

    def _make_room(self, now: float) -> None:
        if len(self) < self.max_entries:
            return
        self.prune(now)
        heap = self._expiries
        while len(self) >= self.max_entries and heap:
            until, kind, ident = heapq.heappop(heap)
            if self._live_until(kind, ident) == until:
                self._drop(kind, ident)
                self._evictions += 1
                if not self._overflow:
                    self._overflow = True
                    log.warning("revocation list full: dropping the revocations that expire soonest; "
                                "the local copy is incomplete until it fits again",
                                extra={"max_entries": self.max_entries})
                    self._update_state()

    def _compact(self) -> None:
        self._expiries = [(u, _TOKEN, i) for i, u in self._tokens.items()]
        self._expiries += [(e[1], _SUBJECT, s) for s, e in self._subjects.items()]
        heapq.heapify(self._expiries)

    def _update_state(self) -> None:
        complete = self._synced and not self._overflow
        if complete != self._complete:
            self._complete = complete
            self.version += 1
            if self._on_state is not None:
                try:
                    self._on_state(complete)
                except Exception:  # noqa: BLE001 - a metrics hook must not stop the listener
                    log.exception("revocation on_state hook failed")

    def _on_message(self, raw: bytes) -> None:
        rev = Revocation.from_message(raw)
        if rev is None:
            self.messages_ignored += 1
            return
        self._apply(rev, self.clock())

    async def resync(self) -> int:
        """Read the whole set from the store and merge it; returns the entries read.

        Raises StoreError. A resync that fits without evicting clears an overflow.
        """
        now = self.clock()
        members = await self.store.zrange_from(self.index_key, now)
        self.prune(now)
        evictions = self._evictions
        for n, (member, until) in enumerate(members, 1):
            rev = Revocation.parse(member, until)
            if rev is None:
                self.messages_ignored += 1
            else:
                self._apply(rev, now)
            if n % _YIELD_EVERY == 0:
                await asyncio.sleep(0)   # a large set must not stall the requests on this loop
        if self._overflow and self._evictions == evictions:
            self._overflow = False
            log.info("revocation list fits again", extra={"entries": len(self)})
        self.synced_at = now
        self._update_state()
        return len(members)

    # -- background -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening; waits (at most `start_wait_seconds`) for the first sync attempt, so a
        replica that can reach the store serves with a complete copy from its first request."""
        if self._tasks:
            return
        self._attempted = asyncio.Event()
        self._tasks = [asyncio.create_task(self._listen(), name="revocation-listen"),
                       asyncio.create_task(self._maintain(), name="revocation-resync")]
        try:
            await asyncio.wait_for(self._attempted.wait(), self.start_wait_seconds)
        except TimeoutError:
            pass

    async def _listen(self) -> None:
        assert self._attempted is not None
        while True:
            sub: Subscription | None = None
            try:
                sub = await self.store.subscribe(self.channel)
                entries = await self.resync()
                self._synced = True
                self._update_state()
                log.info("revocation list resynced after store loss" if self._lost_logged
                         else "revocation list synced",
                         extra={"entries": entries, "held": len(self), "complete": self._complete})
                self._lost_logged = False
                self._attempted.set()
                async for raw in sub:
                    self._on_message(raw)
                raise StoreError(f"{self.store.name} subscription to {self.channel!r} ended", transient=True)
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any failure
                self._synced = False
                self._update_state()
                if not self._lost_logged:
                    self._lost_logged = True
                    if isinstance(exc, StoreError):
                        error = exc.message
                    else:   # a bug, not an outage: keep the traceback
                        log.exception("revocation listener failed")
                        error = f"{type(exc).__name__}: {exc}"
                    log.error("revocation store unreachable: the local copy may miss revocations; each "
                              "provider's revocation_fail decides for tokens not known to be revoked",
                              extra={"store": self.store.name, "error": error,
                                     "known": len(self), "retry_seconds": self.retry_seconds})
                self._attempted.set()
            finally:
                if sub is not None:
                    await sub.close()
            await asyncio.sleep(self.retry_seconds)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            self.prune()
            if not self._synced:
                continue          # the listener resyncs when it gets the subscription back
            try:
                await self.resync()
                if self._resync_failing:
                    self._resync_failing = False
                    log.info("periodic revocation resync works again")
            except StoreError as exc:
                if not self._resync_failing:
                    self._resync_failing = True
                    log.warning("periodic revocation resync failed; pub/sub still delivers",
                                extra={"store": self.store.name, "error": exc.message})

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._synced = False
        self._update_state()
