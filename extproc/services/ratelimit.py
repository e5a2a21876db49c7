"""Rate limits decided inside ext_authz, after identity: one store round trip per request.

Theory of operation. Each configured rule that matches the request (its policies, its `when`
conditions, its API-key tiers) becomes one counter, keyed by the rule and the values it counts by
(user, org, API key, IP, route, policy, method, a header or a claim; `global` is one counter for
everyone). All of a request's enforced counters go to the store in ONE call: counters whose keys
share a hash tag are checked and charged atomically in one script, and a rejected request is
charged against none of them (across Cluster slots: charge, then refund on rejection). The
hash tag is the request's first count-by value, so "per user" and "per user and route" share a
slot. Shadow rules are sent as separate calls in the same event-loop tick (the store pipelines
them into the same round trip), so a shadow rule's rejection never changes what is charged.

A key known to be over its limit is remembered locally until its reset (no store call for a
flood from one client).

Batched rules (`sync: {mode: batched, interval_ms: N}`, for very hot keys) are decided against
the last known store state with no store call on the request path (`core/ratebatch.py` says
when a request still goes to the store: a cold, stale or spent key). Mixed with per-request
rules, the batched rules are decided first and their units only *reserved*: a batched rule that
rejects answers at once (no store call at all); otherwise the per-request rules go to the store
and the reservation is confirmed when the request is admitted, released when it is not, so a
rejected request is charged to no rule. One flusher task per RateLimiter (started on the
running loop at the first batched decision, ended when no key is left, stopped by `close()`
after a last flush) charges every key's pending units every interval in one store call (all
admitted, the common case; else key by key, in one pipeline). A key the store refuses is then
charged what remains (saturated, not under-counted); a flush that fails keeps its units for the
next interval, and local decisions go on against the last known state (fail-open), the
transition logged once. Shadow batched rules are decided and charged the same way and never
enforced. On reload the new limiter adopts the keys of unchanged batched rules (`adopt`); the
old one flushes the rest when it is closed.

When the store does not answer within `store_timeout_ms`: fail-open
rules keep limiting per replica on an in-memory store (`local_fallback`), fail-closed rules
answer 503 with Retry-After (the client did nothing wrong); the transition is logged once.
A count-by value that is absent (no user on an anonymous request) skips the rule, or counts by
the client IP when the rule says `missing: ip` — never one shared bucket by accident.

The admin reads a partition's counter with `usage` (the store's read-only `rate_usage`, the
script's "peek" mode: nothing charged, no TTL touched) and forgets it with `reset`; both build
the key exactly as a request's check does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .. import config as cfgmod
from ..core.authorize import Principal, RuleSet
from ..core.decision import Decision, deny
from ..core.policy import CompiledPolicy
from ..core.ratebatch import BatchTable, Flush, Local, Route
from ..core.ratelimit import DenyCache, Limit, Outcome, Verdict, refunded
from ..core.reasons import Reason
from ..core.request import Request
from ..store import StoreError
from ..store import keys as keyspace
from ..store.base import RateCheck, RateResult
from ..telemetry import metrics

log = logging.getLogger("extproc.ratelimit")


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    policies: frozenset[str]
    match: RuleSet | None
    api_key_tiers: frozenset[str]
    count_by: tuple[str, ...]
    limit: Limit
    tier_limits: dict[str, Limit]
    shadow: bool
    fail_closed: bool
    missing_ip: bool
    batch_ms: int = 0          # sync mode batched: the flush interval; 0: per request


def _compile(rule: cfgmod.RateRule) -> CompiledRule:
    def limit_for(limit: int, burst: int | None) -> Limit:
        return Limit.from_rule(rule.name, rule.algorithm, limit, rule.period, burst=burst, cost=rule.cost)

    match = None
    if rule.when != cfgmod.Conditions():
        match = RuleSet.compile([cfgmod.Rule(name=rule.name, effect="allow", when=rule.when)])
    return CompiledRule(
        name=rule.name, policies=frozenset(rule.policies), match=match, api_key_tiers=frozenset(rule.api_key_tiers),
        count_by=tuple(rule.count_by), limit=limit_for(rule.limit, rule.burst),
        tier_limits={t: limit_for(tl.limit, tl.burst) for t, tl in rule.tiers.items()},
        shadow=rule.mode == "shadow", fail_closed=rule.fail == "closed", missing_ip=rule.missing == "ip",
        batch_ms=rule.sync.batch_ms)


def _part(kind: str, req: Request, policy: CompiledPolicy, p: Principal) -> str | None:
    if kind == "user":
        return p.subject or None
    if kind == "org":
        v = p.claims.get("org")
        return str(v) if isinstance(v, str | int) and not isinstance(v, bool) and v != "" else None
    if kind == "api_key":
        v = p.claims.get("key_id") if p.kind == "api_key" else None
        return v if isinstance(v, str) and v else None
    if kind == "ip":
        return req.client_ip or None
    if kind == "route":
        return req.route or policy.name
    if kind == "policy":
        return policy.name
    if kind == "method":
        return req.method
    if kind == "global":
        return "*"
    what, _, name = kind.partition(":")
    if what == "header":
        return req.headers.get(name) or None
    if what == "claim":
        v = p.claims.get(name)
        return str(v) if isinstance(v, str | int) and not isinstance(v, bool) and v != "" else None
    return None


def _tag(value: str) -> str:
    # hash tags must not contain braces; long or odd values become a short digest
    if len(value) <= 64 and "}" not in value and "{" not in value and ":" not in value:
        return value
    return "h" + hashlib.sha256(value.encode()).hexdigest()[:24]


def _state_key(rule: CompiledRule, values: Sequence[str], limit: Limit) -> str:
    """The store key of one partition of `rule`, built as `checks_for` builds it inline (the
    hot path keeps its own copy; tests/service/test_ratelimit_usage.py holds the two equal)."""
    tag = _tag(values[0] if rule.count_by[0] != "global" else f"global.{rule.name}")
    extra = [_tag(v) for v in values[1:]]
    return keyspace.key("rl", tag, rule.name, *extra, limit.state_suffix)


def partition(rule: CompiledRule, values: Sequence[str]) -> tuple[str, ...]:
    """An operator's count-by values for `rule`, one per `count_by` entry in order; `global`
    entries may be left out (they are `*`). ValueError says what the rule counts by."""
    values = tuple(values)
    if any(not isinstance(v, str) or not v for v in values):
        raise ValueError("count-by values are non-empty strings")
    n, globals_ = len(rule.count_by), rule.count_by.count("global")
    if len(values) == n - globals_ and globals_:
        given = iter(values)
        return tuple("*" if kind == "global" else next(given) for kind in rule.count_by)
    if len(values) != n:
        raise ValueError(f"rule {rule.name!r} counts by [{', '.join(rule.count_by)}]: give {n} value(s), "
                         f"one per entry in that order (got {len(values)})")
    return values


@dataclass(frozen=True, slots=True)
class Usage:
    """One partition of one rule as the store holds it now, charged nothing (`RateLimiter.usage`).

    `outcome` is `extproc.core.ratelimit.peek`'s: `remaining` left before any request,
    `allowed` whether a request of `cost` would pass this rule now. `used` is what the
    algorithm counts against the limit: a fixed window's count, a sliding window's weighted
    estimate rounded up, a bucket's missing tokens rounded up (`limit - remaining`).
    """

    rule: CompiledRule
    values: tuple[str, ...]
    tier: str | None
    limit: Limit
    cost: int
    key: str
    outcome: Outcome

    @property
    def used(self) -> int:
        return max(0, self.outcome.limit - self.outcome.remaining)


#: Keys the batched rules of one RateLimiter hold locally; past it, new keys stay per-request.
BATCH_MAX_KEYS = 10_000
#: How often idle batched keys are looked for (they go after BatchTable.idle_ms unused).
_EVICT_EVERY_MS = 100
#: A flush is off the request path: it may wait longer than a request would.
_FLUSH_TIMEOUT_S = 0.25


class RateLimiter:
    """All rate-limit rules of one config; counters live in the store (and survive reloads).
    `clock` (Unix seconds) is for tests; `close()` flushes batched rules' pending units."""

    def __init__(self, cfg: cfgmod.RateLimits, store, fallback=None, clock=time.time):
        self.cfg = cfg
        self.rules = tuple(_compile(r) for r in cfg.rules)
        self.store = store
        self.fallback = fallback           # per-replica MemoryStore for fail-open rules
        self.timeout = cfg.store_timeout_ms / 1000
        self.deny_cache = DenyCache()
        self._store_ok = True
        self._refund_failures = getattr(store, "refund_failures", 0)
        self._clock = clock
        batched = [r.batch_ms for r in self.rules if r.batch_ms]
        self._tick = min(batched) / 1000 if batched else None     # the flusher's period
        self.batch = BatchTable(max_keys=BATCH_MAX_KEYS, grace_ms=cfg.store_timeout_ms)
        self._flusher: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._flush_timeout = max(self.timeout, _FLUSH_TIMEOUT_S)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @property
    def empty(self) -> bool:
        return not self.rules

    def checks_for(self, req: Request, policy: CompiledPolicy, p: Principal) -> list[tuple[CompiledRule, RateCheck]]:
        out = []
        tier = p.claims.get("tier") if p.claims else None
        for rule in self.rules:
            if rule.policies and policy.name not in rule.policies:
                continue
            if rule.api_key_tiers and not (p.kind == "api_key" and tier in rule.api_key_tiers):
                continue
            if rule.match is not None and not rule.match.evaluate(req, p).allowed:
                continue
            parts = []
            for kind in rule.count_by:
                v = _part(kind, req, policy, p)
                if v is None:
                    if rule.missing_ip and req.client_ip:
                        v = "ip=" + req.client_ip
                    else:
                        parts = None
                        break
                parts.append(v)
            if parts is None:
                continue           # documented: an absent count-by value skips the rule
            limit = rule.tier_limits.get(tier, rule.limit) if isinstance(tier, str) else rule.limit
            tag = _tag(parts[0] if rule.count_by[0] != "global" else f"global.{rule.name}")
            extra = [_tag(v) for v in parts[1:]]
            key = keyspace.key("rl", tag, rule.name, *extra, limit.state_suffix)
            out.append((rule, RateCheck(key, limit)))
        return out

    async def _call(self, store, checks: list[RateCheck]) -> list[RateResult]:
        if getattr(store, "never_blocks", False):
            # the in-memory store answers without suspending: a timer per request would only cost
            return await store.rate_limit(checks)
        # asyncio.timeout, not wait_for: no extra task per request on the hot path
        async with asyncio.timeout(self.timeout):
            return await store.rate_limit(checks)

    async def _settle(self, call) -> list[RateResult] | BaseException:
        try:
            return await call
        except (StoreError, TimeoutError) as exc:
            return exc

    def _mark_store(self, ok: bool, error: str = "") -> None:
        if ok != self._store_ok:
            self._store_ok = ok
            if ok:
                log.info("rate-limit store answering again")
            else:
                log.error("rate-limit store not answering; fail-open rules use the local limiter, "
                          "fail-closed rules answer 503", extra={"error": error})

    async def decide(self, req: Request, policy: CompiledPolicy, p: Principal) -> tuple[Decision | None, Verdict | None]:
        """(a deny decision or None, the verdict for the answer headers or None)."""
        pairs = self.checks_for(req, policy, p)
        if not pairs:
            return None, None
        now_ms = self._now_ms()
        if self._tick is None or self._closing:
            # no batched rule (or this limiter is being replaced): every rule per request
            enforced = [(r, c) for r, c in pairs if not r.shadow]
            shadow = [(r, c) for r, c in pairs if r.shadow]
            decision, verdict, _ = await self._decide(policy, now_ms, enforced, shadow, [], [])
            return decision, verdict

        enforced, shadow = [], []
        local: list[tuple[CompiledRule, RateCheck, Local]] = []
        known_over: list[Outcome] = []
        batched = False
        for r, c in pairs:
            if not r.batch_ms:
                (shadow if r.shadow else enforced).append((r, c))
                continue
            batched = True
            d = self.batch.decide(c.key, c.limit, c.units, now_ms, store_ok=self._store_ok)
            metrics.child(metrics.RATELIMIT_BATCH_DECISIONS, r.name, d.route.value).inc()
            if d.route is Route.STORE:
                (shadow if r.shadow else enforced).append((r, c))
            elif r.shadow:
                self.batch.confirm(d, now_ms)        # charged like any shadow rule, never enforced
                assert d.outcome is not None
                metrics.child(metrics.RATELIMIT_DECISIONS, r.name,
                              "shadow_ok" if d.outcome.allowed else "shadow_over_limit").inc()
            elif d.route is not Route.LOCAL:          # OVER or CACHED: rejected here
                assert d.outcome is not None
                known_over.append(d.outcome)
            else:
                local.append((r, c, d))
        if batched:
            self._ensure_flusher()
        admitted = False
        try:
            decision, verdict, admitted = await self._decide(policy, now_ms, enforced, shadow, local, known_over)
        finally:
            # reserved units become pending only for an admitted request (also when cancelled:
            # a cancelled call decides deny)
            for _, _, d in local:
                if admitted:
                    self.batch.confirm(d, now_ms)
                else:
                    self.batch.release(d)
        return decision, verdict

    async def _decide(self, policy: CompiledPolicy, now_ms: int, enforced: list, shadow: list,
                      local: list[tuple[CompiledRule, RateCheck, Local]],
                      known_over: list[Outcome]) -> tuple[Decision | None, Verdict | None, bool]:
        """The request's rules that need the store, plus the batched ones decided locally:
        (deny decision or None, verdict, admitted)."""
        # a key known to be over its limit answers without a store call
        hits = list(known_over)
        hits.extend(o for _, c in enforced if (o := self.deny_cache.lookup(c.key, c.units, now_ms)) is not None)
        if hits:
            verdict = Verdict.of(hits)
            for o in hits:
                metrics.child(metrics.RATELIMIT_DECISIONS, o.rule, "over_limit_cached").inc()
            return self._reject(policy, verdict), verdict, False

        results: list = []
        if enforced or shadow:
            calls = []
            if enforced:
                calls.append(self._call(self.store, [c for _, c in enforced]))
            calls.extend(self._call(self.store, [c]) for _, c in shadow)
            # batched rules' keys asked of the store: their answers update the batch table
            tracked = [(r, c) for r, c in (*enforced, *shadow) if r.batch_ms] if self._tick is not None else []
            for r, c in tracked:
                self.batch.sending(c.key, c.limit, r.batch_ms, now_ms)
            t0 = time.perf_counter()
            try:
                if len(calls) == 1:
                    results = [await self._settle(calls[0])]      # the common case: no task, one round trip
                else:
                    # shadow rules go as their own calls in the same loop tick: one pipelined round trip
                    results = await asyncio.gather(*calls, return_exceptions=True)
                metrics.child(metrics.STORE_SECONDS, "rate_limit").observe(time.perf_counter() - t0)
                if tracked:
                    self._learn(enforced, shadow, results)
            finally:
                for _, c in tracked:
                    self.batch.finish(c.key)

        outcomes: list[Outcome] = []
        if enforced:
            first = results[0]
            if isinstance(first, BaseException):
                decision, fallback_outcomes = await self._store_failed(first, policy, enforced)
                if decision is not None:
                    return decision, None, False
                outcomes = fallback_outcomes
            else:
                self._mark_store(True)
                outcomes = [r.outcome for r in first]
                failed_refunds = getattr(self.store, "refund_failures", 0)
                if failed_refunds != self._refund_failures:
                    # a cross-slot refund that failed leaves its charge counted until the reset
                    metrics.child(metrics.STORE_ERRORS, getattr(self.store, "name", "store"), "refund").inc(
                        max(0, failed_refunds - self._refund_failures))
                    self._refund_failures = failed_refunds
        for (rule, _), res in zip(shadow, results[1 if enforced else 0:], strict=False):
            if isinstance(res, BaseException):
                continue
            o = res[0].outcome
            metrics.child(metrics.RATELIMIT_DECISIONS, rule.name, "shadow_over_limit" if not o.allowed
                          else "shadow_ok").inc()
        outcomes.extend(d.outcome for _, _, d in local if d.outcome is not None)
        verdict = Verdict.of(outcomes) if outcomes else None
        if verdict is None:
            return None, None, True
        for o in outcomes:
            metrics.child(metrics.RATELIMIT_DECISIONS, o.rule, "ok" if o.allowed else "over_limit").inc()
            if o.allowed and o.remaining * 5 < o.limit:
                # within 20 % of the limit: the early warning envoyproxy/ratelimit calls near_limit
                metrics.child(metrics.RATELIMIT_DECISIONS, o.rule, "near_limit").inc()
        if verdict.allowed:
            return None, verdict, True
        for (_, c), o in zip(enforced, outcomes, strict=False):
            if not o.allowed:
                self.deny_cache.remember(c.key, c.units, o, now_ms)
        if local:
            # the batched rules' reservations are released: report them uncharged
            n = len(outcomes) - len(local)
            outcomes[n:] = [refunded(o, c.units) for o, (_, c, _) in zip(outcomes[n:], local, strict=True)]
            verdict = Verdict.of(outcomes)
        return self._reject(policy, verdict), verdict, False

    def _learn(self, enforced: list, shadow: list, results: list) -> None:
        """The store's answers about batched rules' keys: what those keys have left."""
        now_ms = self._now_ms()
        answered = []
        if enforced and not isinstance(results[0], BaseException):
            answered.extend(zip(enforced, (r.outcome for r in results[0]), strict=True))
        for pair, res in zip(shadow, results[1 if enforced else 0:], strict=False):
            if not isinstance(res, BaseException):
                answered.append((pair, res[0].outcome))
        for (rule, check), o in answered:
            if rule.batch_ms:
                self.batch.learn(check.key, check.limit, rule.batch_ms, o, check.units, now_ms)

    # -- the batched rules' flusher -----------------------------------------------------------
    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="rl-batch-flush")

    async def _flush_loop(self) -> None:
        """Every interval, charge the pending units; ends when no batched key is left (the
        next batched decision starts it again) or after a last flush once `close()` asked."""
        assert self._tick is not None
        wake = self._wake = asyncio.Event()
        last_evict = self._now_ms()
        while True:
            if not self._closing:
                try:
                    async with asyncio.timeout(self._tick):
                        await wake.wait()
                except TimeoutError:
                    pass
            closing = self._closing
            try:
                await self.flush(force=closing)
            except Exception:  # noqa: BLE001 - the flusher must outlive any surprise
                log.exception("rate-limit batch flush failed")
            if closing:
                metrics.RATELIMIT_BATCH_PENDING.set(self.batch.pending_units)
                return
            now = self._now_ms()
            metrics.RATELIMIT_BATCH_PENDING.set(self.batch.pending_units)
            if now - last_evict >= _EVICT_EVERY_MS:
                last_evict = now
                self.batch.evict(now)
                metrics.RATELIMIT_BATCH_KEYS.set(len(self.batch))
            if not len(self.batch):
                metrics.RATELIMIT_BATCH_KEYS.set(0)
                return

    async def flush(self, force: bool = True) -> None:
        """One sync: every due key's pending units (all of them with `force`) charged in ONE
        store call, and the keys to refresh read in one more. The flusher calls it every
        interval; tests and `close()` call it too."""
        flushes, dropped = self.batch.take(self._now_ms(), force)
        for name, units in dropped.items():
            metrics.child(metrics.RATELIMIT_BATCH_UNITS, name, "dropped").inc(units)
        if not flushes:
            return
        charges = [f for f in flushes if f.units]
        refreshes = [f for f in flushes if not f.units]
        if charges and refreshes:
            results = await asyncio.gather(self._charge(charges), self._refresh(refreshes))
            result = results[0] if results[0] != "ok" else results[1]
        else:
            result = await (self._charge(charges) if charges else self._refresh(refreshes))
        metrics.child(metrics.RATELIMIT_BATCH_FLUSHES, result).inc()

    async def _charge(self, flushes: list[Flush]) -> str:
        """Every key's pending units as one request of the store (all admitted: the common case).
        The store admits all or none, so when a key has fewer units left than it carries, each
        key is charged on its own (`_flush_key`, in the same loop tick: one pipeline)."""
        if len(flushes) == 1:
            return await self._flush_key(flushes[0])
        try:
            async with asyncio.timeout(self._flush_timeout):
                results = await self.store.rate_limit([RateCheck(f.entry.key, f.limit, f.units) for f in flushes])
        except Exception as exc:  # noqa: BLE001 - whatever failed, the units must not stay in flight
            self._flush_failed(flushes, exc)
            return "error"
        self._mark_store(True)
        if not all(r.charged for r in results):
            # nothing was charged (across Cluster slots: refunded); key by key, with saturation
            each = await asyncio.gather(*(self._flush_key(f) for f in flushes))
            return "error" if "error" in each else "saturated" if "saturated" in each else "ok"
        now = self._now_ms()
        for f, r in zip(flushes, results, strict=True):
            self.batch.settle(f, r.outcome, f.units, now)
            metrics.child(metrics.RATELIMIT_BATCH_UNITS, f.limit.name, "charged").inc(f.units)
        return "ok"

    async def _refresh(self, flushes: list[Flush]) -> str:
        """What the store holds now for keys used lately, charging nothing (the admin's read)."""
        try:
            async with asyncio.timeout(self._flush_timeout):
                outcomes = await self.store.rate_usage([RateCheck(f.entry.key, f.limit) for f in flushes])
        except Exception as exc:  # noqa: BLE001 - whatever failed, the calls must be counted back
            self._flush_failed(flushes, exc)
            return "error"
        self._mark_store(True)
        now = self._now_ms()
        for f, outcome in zip(flushes, outcomes, strict=True):
            self.batch.settle(f, outcome, 0, now)
        return "ok"

    def _flush_failed(self, flushes: list[Flush], exc: BaseException) -> None:
        if isinstance(exc, StoreError | TimeoutError):
            kind = "timeout" if isinstance(exc, TimeoutError) or getattr(exc, "timeout", False) else "error"
            metrics.child(metrics.STORE_ERRORS, getattr(self.store, "name", "store"), kind).inc()
            self._mark_store(False, f"{type(exc).__name__}: {exc}")
        else:
            log.exception("rate-limit batch flush failed", exc_info=exc)
        # kept for the next interval. A call that timed out may have been applied by the store:
        # sent again, its units count twice (never under-counted)
        now = self._now_ms()
        for f in flushes:
            over = self.batch.failed(f, now)
            if over:
                metrics.child(metrics.RATELIMIT_BATCH_UNITS, f.limit.name, "dropped").inc(over)

    async def _flush_key(self, f: Flush) -> str:
        """One key's pending units; when fewer remain, exactly what remains (saturation)."""
        key, name = f.entry.key, f.limit.name
        try:
            async with asyncio.timeout(self._flush_timeout):
                [res] = await self.store.rate_limit([RateCheck(key, f.limit, f.units)])
                answer, charged = res.outcome, f.units if res.charged else 0
                left = min(res.outcome.remaining, f.units - 1)
                if not res.charged and left >= 1:
                    # fewer units remain than were admitted: charge what remains, so the store
                    # is saturated (every replica then sees the key exhausted), not under-counted
                    [res] = await self.store.rate_limit([RateCheck(key, f.limit, left)])
                    answer, charged = res.outcome, left if res.charged else 0
        except Exception as exc:  # noqa: BLE001 - whatever failed, the units must not stay in flight
            self._flush_failed([f], exc)
            return "error"
        self._mark_store(True)
        refused = self.batch.settle(f, answer, charged, self._now_ms())
        if charged:
            metrics.child(metrics.RATELIMIT_BATCH_UNITS, name, "charged").inc(charged)
        if refused:
            metrics.child(metrics.RATELIMIT_BATCH_UNITS, name, "refused").inc(refused)
            return "saturated"
        return "ok"

    def adopt(self, previous: RateLimiter) -> int:
        """After a reload: take over `previous`'s batched keys whose rule is unchanged (same
        name, limit and store), pending units and all. Returns how many keys moved."""
        if previous is self or previous.store is not self.store or self._tick is None:
            return 0
        batched = {r.name: r for r in self.rules if r.batch_ms}

        def interval_for(entry) -> int | None:
            rule = batched.get(entry.limit.name)
            if rule is None or (entry.limit != rule.limit and entry.limit not in rule.tier_limits.values()):
                return None
            return rule.batch_ms

        moved = self.batch.adopt(previous.batch, interval_for)
        if moved:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return moved
            self._ensure_flusher()
        return moved

    async def close(self) -> None:
        """Stop the flusher after a last flush of every pending unit (reload, shutdown);
        requests decided after this take every rule per request."""
        self._closing = True
        task = self._flusher
        if task is not None and not task.done():
            if self._wake is not None:
                self._wake.set()
            await asyncio.gather(task, return_exceptions=True)
        elif self.batch.pending_units:
            await self.flush()

    async def _store_failed(self, exc: BaseException, policy: CompiledPolicy, enforced):
        kind = "timeout" if isinstance(exc, TimeoutError) or getattr(exc, "timeout", False) else "error"
        if not isinstance(exc, StoreError | TimeoutError):
            raise exc
        metrics.child(metrics.STORE_ERRORS, getattr(self.store, "name", "store"), kind).inc()
        self._mark_store(False, f"{type(exc).__name__}: {exc}")
        closed = [r.name for r, _ in enforced if r.fail_closed]
        if closed:
            for name in closed:
                metrics.child(metrics.RATELIMIT_DECISIONS, name, "store_unavailable").inc()
            # the configured answer of a fail-closed rule: 503 with Retry-After (not 429: the
            # client did nothing wrong), a reply Envoy passes on as it is
            return deny(503, Reason.RATELIMIT_UNAVAILABLE, "rate limits cannot be checked right now", policy=policy.name, rule=closed[0],
                        headers=(("retry-after", "1"),)), []
        if self.fallback is None or not self.cfg.local_fallback:
            for r, _ in enforced:
                metrics.child(metrics.RATELIMIT_DECISIONS, r.name, "fail_open").inc()
            return None, []
        results = await self.fallback.rate_limit([c for _, c in enforced])
        for r, _ in enforced:
            metrics.child(metrics.RATELIMIT_DECISIONS, r.name, "local_fallback").inc()
        return None, [res.outcome for res in results]

    def _reject(self, policy: CompiledPolicy, verdict: Verdict) -> Decision:
        rule = verdict.rejected_by[0] if verdict.rejected_by else ""
        return deny(429, Reason.RATE_LIMITED, f"rate limit {rule} exceeded", policy=policy.name, rule=rule,
                    headers=tuple(verdict.headers()))

    def rule(self, name: str) -> CompiledRule:
        """The rule called `name`; KeyError when there is none."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    async def usage(self, rule_name: str, values: Sequence[str], *, tier: str | None = None,
                    cost: int | None = None, now_ms: int | None = None) -> Usage:
        """How much of `rule_name` the partition `values` has used and has left, charging nothing
        (admin API). The key is the one a request with these count-by values is charged on.

        `tier` picks the limit a request of that API-key tier (or `tier` claim) is held to; without
        it, the rule's own limit (tiers share the partition's counter, only the limit differs).
        `cost` defaults to the rule's. KeyError: no such rule; ValueError: wrong values, an unknown
        tier or a bad cost; StoreError: the store did not answer. `now_ms` is for tests and tools.
        """
        rule = self.rule(rule_name)
        parts = partition(rule, values)
        if tier is None:
            limit = rule.limit
        elif tier in rule.tier_limits:
            limit = rule.tier_limits[tier]
        else:
            known = ", ".join(sorted(rule.tier_limits)) or "none"
            raise ValueError(f"rule {rule.name!r} has no tier {tier!r} (its tiers: {known})")
        check = RateCheck(_state_key(rule, parts, limit), limit, cost)
        [outcome] = await self.store.rate_usage([check], now_ms)
        return Usage(rule, parts, tier, limit, check.units, check.key, outcome)

    async def reset(self, rule_name: str, values: list[str]) -> int:
        """Forget one partition's counters of a rule (admin API). Returns keys deleted.
        KeyError: no such rule; ValueError: values that do not fit its count_by."""
        rule = self.rule(rule_name)
        parts = partition(rule, values)
        limits = [rule.limit, *rule.tier_limits.values()]
        keys = list(dict.fromkeys(_state_key(rule, parts, lim) for lim in limits))
        for k in keys:
            self.deny_cache.forget(k)
            self.batch.forget(k)
        n = await self.store.delete(*keys)
        if self.fallback is not None:
            await self.fallback.delete(*keys)
        # every replica forgets its local "known over limit" memory of these keys
        await self.store.publish(keyspace.channel("rl", "reset"), json.dumps(keys).encode())
        return n

    def forget(self, raw: bytes) -> None:
        try:
            keys = json.loads(raw)
        except ValueError:
            return
        if isinstance(keys, list):
            for k in keys:
                if isinstance(k, str):
                    self.deny_cache.forget(k)
                    self.batch.forget(k)


def add_answer_headers(d: Decision, verdict: Verdict | None) -> Decision:
    """Allowed responses carry the tightest rule's rate-limit headers."""
    if verdict is None or not d.allowed:
        return d
    return replace(d, response_headers=tuple(verdict.headers()))
