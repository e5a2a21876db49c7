"""envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit: a drop-in for envoyproxy/ratelimit.

Envoy's native `envoy.filters.http.ratelimit` filter sends a domain and descriptors; the
domain's tree in extproc.yaml (`ratelimit_service`, matched by `core.descriptors` with
envoyproxy/ratelimit's rules) says which limit each descriptor hits, and the store counts it
with the sidecar's algorithms: fixed and sliding windows, token buckets, periods up to a
calendar month.

Per call:
* Every limited descriptor becomes one `RateCheck` (its cost: the descriptor's or the
  request's `hits_addend`, default 1). The enforced ones go to the store in ONE
  `store.rate_limit()` call, so the request is admitted or rejected as a whole and a rejected
  request is charged to none of them (envoyproxy/ratelimit charges every descriptor, even
  when another one rejects). Shadow descriptors are checked each on its own, in calls started
  together with the enforced one (concurrent, no sequential round trip; the Redis store
  pipelines calls made while another is outstanding): a shadow rule over its limit must never
  stop the enforced ones from being charged, and each shadow counter then tells what that
  rule alone would reject.
* All store calls together are bounded by `store_timeout_ms`. When they fail or time out,
  `failure_mode: open` answers OK with no headers (the filter lets the request through) and
  `closed` answers gRPC UNAVAILABLE (Envoy's `failure_mode_deny` then decides). The first
  failure and the recovery are logged once; every failure counts in
  `extproc_store_errors_total` and `extproc_rls_decisions_total{result="store_error"}`.
* A descriptor known to be over its limit is remembered (`DenyCache`) until it could pass:
  while it is, the enforced group is answered OVER_LIMIT without a store call (the store
  would reject it and charge nothing), and the other enforced descriptors' statuses carry
  their limit but no remaining count (`result="not_checked"`).
* The answer: `overall_code` OVER_LIMIT when any enforced descriptor is over (shadow ones
  never), one status per descriptor in order (`current_limit`, `limit_remaining`,
  `duration_until_reset`; an `unlimited` node answers OK with remaining 2**32-1, a descriptor
  no node limits answers OK with no limit), and `response_headers_to_add` with the
  X-RateLimit-* and draft-ietf-httpapi-ratelimit-headers `RateLimit-Policy` / `RateLimit`
  fields of the tightest enforced descriptor, plus `Retry-After` when over. Envoy adds them
  to the upstream's response, or to its own 429.
* An unknown domain answers OK for every descriptor (as envoyproxy/ratelimit), counted with
  `domain="unknown"`.

The compiled trees are rebuilt when the config object changes (reload), and the deny cache
is cleared with them. Counters survive a reload unless their node's name, algorithm or
period changed (see `core.descriptors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from ..core.descriptors import DescriptorRule, Descriptors, Hit, descriptor_hits
from ..core.ratelimit import DenyCache, Limit, Outcome, Verdict
from ..store import Store, StoreError
from ..store import keys as keymod
from ..store.base import RateCheck, RateResult
from ..telemetry import metrics

log = logging.getLogger("extproc.ratelimit_service")

SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name

# To move to telemetry/metrics.py. Labels: the configured domain (or "unknown"), the matched
# node's name (or "unmatched" / "override"), and one of RESULTS — bounded by the config.
RESULTS = ("ok", "over_limit", "shadow_over_limit", "unlimited", "no_limit", "unknown_domain", "store_error",
           "not_checked")

Response = rls_pb2.RateLimitResponse
Status = Response.DescriptorStatus
_OK = Response.OK
_OVER_LIMIT = Response.OVER_LIMIT
_UNIT_ENUM = {"second": Response.RateLimit.SECOND, "minute": Response.RateLimit.MINUTE,
              "hour": Response.RateLimit.HOUR, "day": Response.RateLimit.DAY, "week": Response.RateLimit.WEEK,
              "month": Response.RateLimit.MONTH}
_UNIT_NAME = {v: k for k, v in _UNIT_ENUM.items()}      # YEAR and UNKNOWN: no override
MAX_REMAINING = 2**32 - 1                                # limit_remaining is a uint32
UNKNOWN_DOMAIN = "unknown"
UNMATCHED = "unmatched"


class _Compiled:
    __slots__ = ("source", "descriptors")

    def __init__(self, source: Any, descriptors: Descriptors):
        self.source = source
        self.descriptors = descriptors


def _duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _current_limit(rule: DescriptorRule) -> Response.RateLimit:
    return Response.RateLimit(name=rule.name, requests_per_unit=rule.requests_per_unit,
                              unit=_UNIT_ENUM.get(rule.unit, Response.RateLimit.UNKNOWN))


class RateLimitServiceServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """ShouldRateLimit over the shared store.

    `runtime_ref()` returns the Runtime in force (its `config.ratelimit_service` is read on
    every call, so a reload applies at once); `store_ref()` returns the worker's store.
    `keyspace` defaults to the process-wide one; `clock` (Unix seconds) only times the deny
    cache — the store's own clock decides the windows.
    """

    def __init__(self, runtime_ref: Callable[[], Any], store_ref: Callable[[], Store], *,
                 keyspace: keymod.KeySpace | None = None, clock: Callable[[], float] = time.time,
                 deny_cache_entries: int = 10_000):
        self._runtime_ref = runtime_ref
        self._store_ref = store_ref
        self._keyspace = keyspace
        self._clock = clock
        self._deny = DenyCache(deny_cache_entries)
        self._compiled: _Compiled | None = None
        self._store_ok = True
        self._latency = metrics.child(metrics.DECISION_SECONDS, "rls")

    # -- config ---------------------------------------------------------------------------------
    def descriptors(self) -> tuple[Any, Descriptors]:
        """The `ratelimit_service` config in force and its compiled trees (rebuilt on reload)."""
        rls = self._runtime_ref().config.ratelimit_service
        compiled = self._compiled
        if compiled is None or compiled.source is not rls:
            descriptors = Descriptors.compile(rls)
            if descriptors.problems:
                log.error("ratelimit_service config problems; the first of duplicate descriptors wins",
                          extra={"problems": [str(p) for p in descriptors.problems]})
            compiled = self._compiled = _Compiled(rls, descriptors)
            self._deny.clear()
        return rls, compiled.descriptors

    # -- the RPC --------------------------------------------------------------------------------
    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,  # noqa: N802 - the gRPC method name
                              context: grpc.aio.ServicerContext) -> Response:
        started = time.perf_counter()
        try:
            return await self._decide(request, context)
        finally:
            self._latency.observe(time.perf_counter() - started)

    async def _decide(self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext) -> Response:
        rls, compiled = self.descriptors()
        domain = compiled.domain(request.domain)
        count = len(request.descriptors)
        if domain is None:
            if count:
                metrics.child(metrics.RLS_DECISIONS, UNKNOWN_DOMAIN, UNMATCHED, "unknown_domain").inc(count)
            return Response(overall_code=_OK, statuses=[Status(code=_OK) for _ in range(count)])

        hits = [self._hit(domain, d, request.hits_addend) for d in request.descriptors]
        keyspace = self._keyspace or keymod.current()
        keys: list[str | None] = [None] * count
        enforced: dict[str, tuple[Limit, int]] = {}
        shadow: dict[str, tuple[Limit, int]] = {}
        for i, hit in enumerate(hits):
            rule = hit.rule
            if rule is None or rule.limit is None:
                continue
            key = keys[i] = keyspace.rate_limit(hit.tag, rule.limit)
            group = shadow if rule.shadow else enforced
            if key in group:      # the same descriptor twice: one counter, charged for both
                limit, cost = group[key]
                group[key] = (limit, min(cost + hit.cost, limit.limit + 1))
            else:
                group[key] = (rule.limit, hit.cost)

        now_ms = int(self._clock() * 1000)
        outcomes: dict[str, Outcome] = {}
        known_over = False
        for key, (_, cost) in enforced.items():
            cached = self._deny.lookup(key, cost, now_ms)
            if cached is not None:
                outcomes[key] = cached
                known_over = True
        for key in list(shadow):
            cached = self._deny.lookup(key, shadow[key][1], now_ms)
            if cached is not None:
                outcomes[key] = cached
                del shadow[key]

        enforced_checks = [] if known_over else [RateCheck(k, lim, c) for k, (lim, c) in enforced.items()]
        shadow_checks = [RateCheck(k, lim, c) for k, (lim, c) in shadow.items()]
        shadow_failed = False
        if enforced_checks or shadow_checks:
            store = self._store_ref()
            answer, shadow_answers = await self._call_store(store, enforced_checks, shadow_checks,
                                                            rls.store_timeout_ms)
            failures = [a for a in (answer, *shadow_answers) if isinstance(a, BaseException)]
            self._note_store(store, failures, rls.failure_mode)
            if isinstance(answer, BaseException):
                return await self._failure_answer(rls.failure_mode, domain.name, hits, context)
            for check, result in zip(enforced_checks, answer, strict=True):
                outcomes[check.key] = result.outcome
                self._deny.remember(check.key, check.units, result.outcome, now_ms)
            for check, results in zip(shadow_checks, shadow_answers, strict=True):
                if isinstance(results, BaseException):
                    shadow_failed = True
                    continue
                outcomes[check.key] = results[0].outcome
                self._deny.remember(check.key, check.units, results[0].outcome, now_ms)
        return self._answer(domain.name, hits, keys, outcomes, shadow_failed)

    @staticmethod
    def _hit(domain: Any, descriptor: Any, request_hits: int) -> Hit:
        override = None
        if descriptor.HasField("limit"):
            unit = _UNIT_NAME.get(descriptor.limit.unit)
            if unit is not None:
                override = (descriptor.limit.requests_per_unit, unit)
        own = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else None
        entries = [(e.key, e.value) for e in descriptor.entries]
        return domain.hit(entries, hits=descriptor_hits(request_hits, own), override=override)

    async def _call_store(self, store: Store, enforced: list[RateCheck], shadow: list[RateCheck],
                          timeout_ms: int) -> tuple[list[RateResult] | BaseException, list]:
        """The enforced checks in one call and each shadow check in its own, all started in
        this tick and bounded together by `timeout_ms`. Returns (the enforced call's results,
        or its exception; one result list or exception per shadow check). A timeout fails
        them all."""
        calls = []
        if enforced:
            calls.append(store.rate_limit(enforced))
        calls.extend(store.rate_limit([check]) for check in shadow)
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_ms / 1000)
        except TimeoutError:
            timeout = StoreError(f"{store.name} rate_limit: no answer within store_timeout_ms={timeout_ms}",
                                 transient=True, timeout=True)
            return timeout, [timeout] * len(shadow)
        if not enforced:
            return [], results
        return results[0], results[1:]

    def _answer(self, domain: str, hits: list[Hit], keys: list[str | None], outcomes: dict[str, Outcome],
                shadow_failed: bool) -> Response:
        statuses = []
        enforced: dict[str, Outcome] = {}
        over = False
        for hit, key in zip(hits, keys, strict=True):
            rule = hit.rule
            if rule is None:
                statuses.append(Status(code=_OK))
                metrics.child(metrics.RLS_DECISIONS, domain, UNMATCHED, "no_limit").inc()
                continue
            if rule.limit is None:
                statuses.append(Status(code=_OK, limit_remaining=MAX_REMAINING))
                metrics.child(metrics.RLS_DECISIONS, domain, rule.name, "unlimited").inc()
                continue
            status = Status(code=_OK, current_limit=_current_limit(rule))
            outcome = outcomes.get(key) if key is not None else None
            if outcome is None:
                result = "store_error" if rule.shadow and shadow_failed else "not_checked"
            else:
                status.limit_remaining = min(outcome.remaining, MAX_REMAINING)
                status.duration_until_reset.CopyFrom(_duration(outcome.reset_after_ms))
                if outcome.allowed:
                    result = "ok"
                elif rule.shadow:
                    result = "shadow_over_limit"
                else:
                    result = "over_limit"
                    status.code = _OVER_LIMIT
                    over = True
                if not rule.shadow and key is not None:
                    enforced[key] = outcome
            statuses.append(status)
            metrics.child(metrics.RLS_DECISIONS, domain, rule.name, result).inc()
        response = Response(overall_code=_OVER_LIMIT if over else _OK, statuses=statuses)
        if enforced:
            for name, value in Verdict.of(list(enforced.values())).headers():
                response.response_headers_to_add.append(base_pb2.HeaderValue(key=name, value=value))
        return response

    async def _failure_answer(self, failure_mode: str, domain: str, hits: list[Hit],
                              context: grpc.aio.ServicerContext) -> Response:
        for hit in hits:
            if hit.rule is not None and hit.rule.limit is not None:
                metrics.child(metrics.RLS_DECISIONS, domain, hit.rule.name, "store_error").inc()
        if failure_mode == "closed":
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "rate limit store unavailable (ratelimit_service.failure_mode: closed)")
        return Response(overall_code=_OK, statuses=[Status(code=_OK) for _ in hits])

    # -- store state: logged once per transition -------------------------------------------------
    def _note_store(self, store: Store, failures: list[BaseException], failure_mode: str) -> None:
        for failure in dict.fromkeys(failures):     # a timeout fails every call with one error
            metrics.child(metrics.STORE_ERRORS, store.name, _kind(failure)).inc()
        if failures and self._store_ok:
            self._store_ok = False
            failure = failures[0]
            if isinstance(failure, StoreError):
                log.error("rate limit store failing; ratelimit_service.failure_mode decides",
                          extra={"store": store.name, "failure_mode": failure_mode, "error": str(failure)})
            else:
                log.error("rate limit store call failed unexpectedly; ratelimit_service.failure_mode decides",
                          exc_info=failure, extra={"store": store.name, "failure_mode": failure_mode})
        elif not failures and not self._store_ok:
            self._store_ok = True
            log.info("rate limit store answering again", extra={"store": store.name})


def _kind(exc: BaseException) -> str:
    if isinstance(exc, StoreError):
        return "timeout" if exc.timeout else "error"
    return "internal"


def add_to_server(server: grpc.aio.Server, runtime_ref: Callable[[], Any], store_ref: Callable[[], Store],
                  **options: Any) -> RateLimitServiceServicer:
    """Register ShouldRateLimit on `server`; returns the servicer (options: see its class)."""
    servicer = RateLimitServiceServicer(runtime_ref, store_ref, **options)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    return servicer
