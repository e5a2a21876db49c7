"""envoy.service.ext_proc.v3.ExternalProcessor/Process: drives core.exchange over the stream.

Only I/O lives here: read each ProcessingRequest, ask the Exchange what to do, send the reply
it names. Envoy half-closes and resets every stream when it is done (ENVOY-NOTES): the handler
sees either the end of the iterator or a cancellation, both normal ends.

Concurrency caps (core/concurrency.py): the permit is taken at request headers and released in
the handler's `finally`, so every way a stream can end gives it back: the iterator ending after
the response, a client abort (Envoy sends nothing, the stream just ends), Envoy's reset (a
cancellation), an abort or a bug here. The handler is a coroutine writing with
`context.write`, not an async generator: a cancelled coroutine runs its `finally` at once,
whereas a generator suspended at `yield` is only closed when the garbage collector finds it.
Over the cap, the answer is an ImmediateResponse (429 or 503, `Retry-After: 1`, a JSON body,
`x-extproc-concurrency: global|route`), after an optional bounded wait for a permit; the wait
is the only asyncio here (a future per waiter, woken when a release grants it a permit).

One limiter lives as long as this servicer (the worker), so in-flight counts survive reloads:
when the runtime's config changes, the limiter is reconfigured in place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from ..core import httpcache
from ..core.concurrency import ConcurrencyLimiter, Grant, Permit, Rejection, Ticket
from ..core.exchange import Action, Exchange, server_timing
from ..telemetry import metrics, tracing
from .breaker import Admission, Breakers
from .cache import Hit, Lookup, ResponseCache, collect_headers, identity_of, raw_headers

log = logging.getLogger("extproc.processor")
POLICY_METADATA = "x-extproc-policy"


_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _timing_reply(seconds: float) -> pb.ProcessingResponse:
    opt = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="server-timing", raw_value=server_timing(seconds).encode()),
        append_action=_APPEND)
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(
        response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[opt]))))


_BUFFER_BODY = processing_mode_pb2.ProcessingMode(response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED)


def _option(key: str, value: bytes, action=_OVERWRITE) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value), append_action=action)


def _cache_options(look: Lookup) -> list[base_pb2.HeaderValueOption]:
    if not look.status:
        return []
    return [_option("x-cache-status", look.status.encode()),
            _option("cache-status", f"extproc; {look.detail}".encode() if look.detail else b"extproc")]


def hit_reply(hit: Hit, now: float, seconds: float, tier=None) -> pb.ProcessingResponse:
    """The stored response as an ImmediateResponse (Envoy adds content-length, date, server)."""
    entry = hit.entry
    ttl = int(entry.expires_at_ms / 1000 - now)
    marks = [_option("age", str(httpcache.age(entry, now)).encode()),
             _option("x-cache-status", hit.status.encode()),
             _option("cache-status", f"extproc; {hit.detail}; ttl={ttl}".encode()),
             _option("server-timing", server_timing(seconds).encode(), _APPEND)]
    if hit.not_modified:
        # RFC 9110 §15.4.5: the fields a 200 would carry that describe the representation's validators
        kept = [_option(h.name, h.value, _APPEND) for h in entry.headers if h.name in _NOT_MODIFIED_FIELDS]
        return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=304), headers=pb.HeaderMutation(set_headers=kept + marks),
            details="extproc_cache_not_modified"))
    headers = pb.HeaderMutation()
    headers.CopyFrom(_stored_headers(entry, hit.key, tier))      # built once per entry; a C copy per hit
    headers.set_headers.extend(marks)
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=entry.status), headers=headers,
        body=b"" if hit.head else entry.body, details="extproc_cache_hit"))


def _stored_headers(entry, key: str, tier) -> pb.HeaderMutation:
    """The entry's stored headers as a HeaderMutation, kept beside the entry in the in-process tier
    (building the option messages is most of a hit's own cost); built afresh for an entry the tier
    does not hold."""
    if tier is not None:
        got = tier.extra(key, entry)
        if got is not None:
            return got
    mutation = pb.HeaderMutation(set_headers=[_option(h.name, h.value, _APPEND) for h in entry.headers])
    if tier is not None:
        tier.set_extra(key, entry, mutation)
    return mutation


_NOT_MODIFIED_FIELDS = frozenset({"cache-control", "content-location", "etag", "expires", "vary", "last-modified"})


def request_reply(look: Lookup) -> pb.ProcessingResponse:
    """Forward without the unkeyed headers, and with the stored validators when revalidating (the
    upstream answers 304 when the entry still holds)."""
    opts = []
    entry = look.entry
    if look.revalidating and entry is not None:
        if entry.etag:
            opts.append(_option("if-none-match", entry.etag.encode("latin-1")))
        if entry.last_modified:
            opts.append(_option("if-modified-since", entry.last_modified.encode("latin-1")))
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=opts, remove_headers=list(look.strip)))))


def response_reply(look: Lookup | None, seconds: float, store: bool, flow=None) -> pb.ProcessingResponse:
    opts = [_option("server-timing", server_timing(seconds).encode(), _APPEND)]
    if look is not None:
        opts += _cache_options(look)
    reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
        response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=opts))))
    if store:
        reply.mode_override.CopyFrom(_BUFFER_BODY)
    if flow is not None:
        with_metadata(reply, flow)
    return reply


_NAMESPACE = "envoy.filters.http.ext_proc"


def with_metadata(reply: pb.ProcessingResponse, flow, cache_status: str = "", breaker_state: str = ""):
    """What the cache and the breaker did, as dynamic metadata for Envoy's access log
    (%DYNAMIC_METADATA(envoy.filters.http.ext_proc:cache)% and `:breaker`)."""
    fields = {}
    look, adm = flow.look, flow.admission
    status = cache_status or (look.status if look is not None else "")
    if status:
        fields["cache"] = status
    if flow.breaker or adm is not None:
        fields["breaker"] = f"{flow.breaker or adm.spec.name}:" + (
            breaker_state or ("open" if flow.breaker else "half_open" if adm.probe else "closed"))
    if fields:
        reply.dynamic_metadata.update({_NAMESPACE: fields})
    return reply


def rejection_reply(rej: Rejection) -> pb.ProcessingResponse:
    """The ImmediateResponse for a request over its cap; Envoy adds content-length, date, server."""
    headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                          append_action=_OVERWRITE) for k, v in rej.headers()]
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=rej.status), headers=pb.HeaderMutation(set_headers=headers),
        body=rej.body(), details=f"extproc_concurrency_limit_{rej.scope.value}"))


def policy_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == POLICY_METADATA:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class ExternalProcessorService(pb_grpc.ExternalProcessorServicer):
    def __init__(self, runtime_ref, concurrency: ConcurrencyLimiter | None = None,
                 cache: ResponseCache | None = None, breakers: Breakers | None = None):
        self._runtime = runtime_ref
        self.cache = cache
        self.breakers = breakers
        self.in_flight = 0
        self._timing = metrics.child(metrics.DECISION_SECONDS, "ext_proc")
        self._waiters: dict[Ticket, asyncio.Future[Permit]] = {}
        self._replies: dict[Rejection, pb.ProcessingResponse] = {}
        cfg = runtime_ref().config.concurrency
        # the worker's in-flight state: outlives reloads (see sync_limits)
        self.concurrency = concurrency if concurrency is not None else ConcurrencyLimiter.compile(cfg)
        self._limits_from = None            # the config object the limiter's limits came from
        self.sync_limits(cfg)

    # -- concurrency ------------------------------------------------------------------------------
    def sync_limits(self, cfg) -> ConcurrencyLimiter:
        """Follow a reload: same limiter (same counts), the new runtime's limits. Called per
        stream (an identity check); the worker may also call it right after a reload so that
        waiters a raised cap admits are woken at once."""
        if cfg is not self._limits_from:
            self._limits_from = cfg
            grants = self.concurrency.reconfigure(cfg)
            if grants:
                self._hand_over(grants)
        return self.concurrency

    def _gauge(self, route: str) -> None:
        metrics.child(metrics.CONCURRENT_REQUESTS, route).set(self.concurrency.in_flight(route))

    def _release(self, permit: Permit) -> None:
        if permit.held:
            grants = self.concurrency.release(permit)
            self._gauge(permit.route)
            if grants:
                self._hand_over(grants)

    def _hand_over(self, grants: Iterable[Grant]) -> None:
        """Wake the waiters a release admitted; a waiter that just left passes its permit on."""
        pending = deque(grants)
        while pending:
            ticket, permit = pending.popleft()
            fut = self._waiters.pop(ticket, None)
            if fut is not None and not fut.done():
                fut.set_result(permit)
            elif permit.held:
                pending.extend(self.concurrency.release(permit))
            if permit.route:
                self._gauge(permit.route)

    async def _wait(self, ticket: Ticket, seconds: float) -> Permit | None:
        """Wait in the queue for a permit, at most `seconds`. Returns the permit (the caller
        then owns it) or None; when cancelled, whatever it was granted is released."""
        fut: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = fut
        try:
            async with asyncio.timeout(seconds):
                await fut
        except TimeoutError:
            pass
        except BaseException:
            self._leave(ticket, fut, keep=False)
            raise
        return self._leave(ticket, fut, keep=True)

    def _leave(self, ticket: Ticket, fut: asyncio.Future[Permit], *, keep: bool) -> Permit | None:
        self._waiters.pop(ticket, None)
        self.concurrency.abandon(ticket)
        if fut.done() and not fut.cancelled():     # granted, possibly in the same instant as the timeout
            permit = fut.result()
            if keep:
                return permit
            self._release(permit)
        return None

    async def _admit(self, limiter: ConcurrencyLimiter, route: str, rejection: Rejection) -> Permit | Rejection:
        ticket = limiter.enqueue(route)
        if ticket is None:
            return rejection
        permit = await self._wait(ticket, limiter.limits.queue_timeout_ms / 1000)
        return rejection if permit is None else permit

    def _reply_for(self, rej: Rejection) -> pb.ProcessingResponse:
        reply = self._replies.get(rej)
        if reply is None:
            if len(self._replies) > 1024:    # bounded by configured routes; a reload changes limits
                self._replies.clear()
            reply = self._replies[rej] = rejection_reply(rej)
        return reply

    # -- the stream -------------------------------------------------------------------------------
    async def Process(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        self.in_flight += 1          # read by the worker's sampler (no metric call per stream)
        try:
            await self._process(request_iterator, context)
        finally:
            self.in_flight -= 1

    async def _process(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        rt = self._runtime()
        named = policy_of(context)
        policy = rt.policy_label(named)
        limiter = self.sync_limits(rt.config.concurrency)
        ex = Exchange()
        permit: Permit | None = None
        cache, breakers, flow = self._features(rt, policy)
        span = tracing.start("extproc.ext_proc", context) if tracing.ACTIVE else None
        reporting = span is not None or rt.config.telemetry.decision_logs
        request_id = ""
        end = "error"        # until the stream ends normally or by Envoy's reset
        try:
            async for msg in request_iterator:
                start = time.perf_counter()
                kind = msg.WhichOneof("request")
                rejected: Rejection | None = None
                if reporting and kind == "request_headers":
                    request_id = next((h.raw_value.decode(errors="replace") or h.value
                                       for h in msg.request_headers.headers.headers if h.key == "x-request-id"), "")
                if not named and kind == "request_headers":
                    # no x-extproc-policy (Istio, Envoy Gateway: no per-route ext_proc metadata):
                    # the policy ext_authz decided with, from its forwarded dynamic metadata
                    named = identity_of(msg.metadata_context).get("policy", "")
                    if named:
                        policy = rt.policy_label(named)
                        cache, breakers, flow = self._features(rt, policy)
                if permit is None and ex.opens(kind):
                    got = limiter.try_acquire(policy)
                    if isinstance(got, Rejection):
                        metrics.child(metrics.CONCURRENCY_LIMIT_REACHED, policy).inc()
                        got = await self._admit(limiter, policy, got)
                    if isinstance(got, Rejection):
                        rejected = got
                    else:
                        permit = got
                        if permit.held:
                            self._gauge(policy)
                            if permit.over is not None:       # shadow mode: counted, let through
                                metrics.child(metrics.CONCURRENCY_LIMIT_REACHED, policy).inc()
                if flow is not None and rejected is None:
                    reply = await self._flow_step(cache, breakers, flow, ex, kind, msg, policy, start)
                    if reply is not None:
                        await context.write(reply)
                        continue
                action = ex.step(kind, rejected is not None)
                if action is Action.CONTINUE_WITH_TIMING:
                    ex.decision_seconds += time.perf_counter() - start
                    reply = _timing_reply(ex.decision_seconds)
                else:
                    if action is Action.REJECT:
                        assert rejected is not None
                        reply = self._reply_for(rejected)
                    else:
                        reply = _CONTINUE.get(kind)
                        if reply is None:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected message {kind!r}")
                    ex.decision_seconds += time.perf_counter() - start
                await context.write(reply)
            end = ex.end_kind()
        except asyncio.CancelledError:
            # Envoy resets every finished stream; a cancel is an error only mid-exchange
            end = ex.end_kind()
            raise
        finally:
            if flow is not None:
                if flow.look is not None:
                    self.cache.finish(flow.look)
                if flow.admission is not None and not flow.recorded:
                    self.breakers.abandon(flow.admission)      # the client went away: a probe frees its slot
            if permit is not None:
                self._release(permit)
            self._timing.observe(ex.decision_seconds)
            metrics.child(metrics.STREAMS, policy, end).inc()
            if reporting:
                self._report(span, rt, policy, end, flow, ex, request_id)

    def _report(self, span, rt, policy: str, end: str, flow: Flow | None, ex: Exchange, request_id: str) -> None:
        """The stream's span attributes and decision log line (only when tracing or decision logs are on)."""
        attrs = {"extproc.policy": policy, "extproc.end": end,
                 "extproc.decision_us": round(ex.decision_seconds * 1e6)}
        if flow is not None and flow.look is not None and flow.look.status:
            attrs["extproc.cache"] = flow.look.status
            attrs["extproc.cache_rule"] = flow.look.rule.name
        if flow is not None and (flow.admission or flow.breaker):
            adm = flow.admission
            attrs["extproc.breaker"] = (adm.spec.name if adm is not None else flow.breaker)
            attrs["extproc.breaker_state"] = ("open" if flow.breaker else
                                              "half_open_probe" if adm.probe else "closed")
        if span is not None:
            span.set_attributes(attrs)
            span.end()
        if rt.config.telemetry.decision_logs:
            log.info("stream", extra={"request_id": request_id,
                                      **{k.removeprefix("extproc."): v for k, v in attrs.items()}})

    # -- the cache and the circuit breaker --------------------------------------------------------
    def _features(self, rt, policy: str) -> tuple[ResponseCache | None, Breakers | None, Flow | None]:
        """The cache (when a rule can match this policy) and the breakers (when any is configured)."""
        cache = self.cache
        if cache is not None:
            cache.reconfigure(rt.config.cache)
            if not cache.plan.applies_to(policy):
                cache = None
        breakers = self.breakers
        if breakers is not None:
            if breakers.cfg is not rt.config.circuit_breakers:
                breakers.reconfigure(rt.config.circuit_breakers)
            if not breakers.has_ext_proc:
                breakers = None
        return cache, breakers, (Flow() if cache is not None or breakers is not None else None)

    async def _flow_step(self, cache: ResponseCache | None, breakers: Breakers | None, flow: Flow, ex: Exchange,
                         kind: str, msg, policy: str, start: float) -> pb.ProcessingResponse | None:
        """The cache's and the breaker's part of one message: the reply, or None when they have
        nothing to add (the ordinary step then answers)."""
        if kind == "request_headers":
            return await self._on_request(cache, breakers, flow, ex, msg, policy, start)
        if kind == "response_headers" and (flow.look is not None or flow.admission is not None):
            hdrs = raw_headers(msg.response_headers.headers)
            status = next((int(v) for k, v in hdrs if k == ":status" and v.isdigit()), 0)
            adm = flow.admission
            if adm is not None:
                grpc_status = next((int(v) for k, v in hdrs if k == "grpc-status" and v.isdigit()), None)
                if adm.spec.grpc and status == 200 and grpc_status is None:
                    flow.grpc_pending = True          # decided by the grpc-status trailer
                else:
                    flow.recorded = True
                    await breakers.record(adm, status, time.perf_counter() - flow.started, grpc_status)
            look = flow.look
            got = cache.on_response(look, status, hdrs) if look is not None else False
            ex.decision_seconds += time.perf_counter() - start
            if isinstance(got, Hit):
                ex.answer()
                return with_metadata(hit_reply(got, cache.clock(), ex.decision_seconds, cache.memory), flow,
                                     cache_status=got.status)
            ex.step(kind)
            if got:
                ex.expect_body()
            return response_reply(look, ex.decision_seconds, store=got, flow=flow)
        if kind == "response_trailers" and flow.grpc_pending and flow.admission is not None:
            trailers = raw_headers(msg.response_trailers.trailers)
            grpc_status = next((int(v) for k, v in trailers if k == "grpc-status" and v.isdigit()), 2)
            flow.grpc_pending, flow.recorded = False, True
            await breakers.record(flow.admission, 200, time.perf_counter() - flow.started, grpc_status)
            ex.decision_seconds += time.perf_counter() - start
            return _CONTINUE[kind]
        if kind == "response_body" and flow.look is not None:
            body = msg.response_body
            if body.end_of_stream:
                cache.on_body(flow.look, body.body)
                ex.step(kind)
            ex.decision_seconds += time.perf_counter() - start
            return _CONTINUE[kind]
        return None

    async def _on_request(self, cache: ResponseCache | None, breakers: Breakers | None, flow: Flow, ex: Exchange,
                          msg, policy: str, start: float) -> pb.ProcessingResponse | None:
        flow.started = start
        look: Lookup | None = None
        rule = None
        headers: dict[str, str] = {}
        if cache is not None:
            headers = collect_headers(msg.request_headers.headers)
            rule = cache.plan.rule_for(policy, headers.get(":path", "/").partition("?")[0])
            if rule is not None:
                got = await cache.lookup(rule, headers.get(":method", ""), headers, identity_of(msg.metadata_context))
                if isinstance(got, Hit):          # a fresh hit never reaches the upstream: no breaker involved
                    ex.answer()
                    ex.decision_seconds += time.perf_counter() - start
                    return with_metadata(hit_reply(got, cache.clock(), ex.decision_seconds, cache.memory), flow,
                                         cache_status=got.status)
                look = flow.look = got
        if breakers is not None:
            spec = breakers.spec_for(cluster_of(msg))
            if spec is not None:
                adm = await breakers.admit(spec)
                if adm.rejected:
                    flow.breaker = spec.name
                    ex.answer()
                    ex.decision_seconds += time.perf_counter() - start
                    if spec.stale_from_cache and look is not None and look.entry is not None \
                            and not look.entry.vary_stub and not look.rule.shadow:
                        metrics.child(metrics.CACHE_HITS, look.rule.name).inc()
                        metrics.child(metrics.CACHE_STALE, look.rule.name).inc()
                        stale = Hit(look.entry, "STALE", "hit; fwd=stale; detail=circuit-open",
                                    head=look.method == "HEAD")
                        return with_metadata(hit_reply(stale, cache.clock(), ex.decision_seconds, cache.memory),
                                             flow, cache_status="STALE")
                    return with_metadata(self._open_reply(adm), flow)
                flow.admission = adm
        if look is None:
            return None
        ex.step("request_headers")
        ex.decision_seconds += time.perf_counter() - start
        if (look.revalidating and look.entry is not None) or look.strip:
            return request_reply(look)
        return _CONTINUE["request_headers"]

    def _open_reply(self, adm: Admission) -> pb.ProcessingResponse:
        spec = adm.spec
        marks = [_option("x-circuit-breaker", b"open"), _option("retry-after", str(adm.retry_after_s).encode())]
        fb = spec.fallback
        if fb is not None:
            hdrs = [_option("content-type", fb.content_type.encode()), *marks,
                    *(_option(k.lower(), v.encode()) for k, v in fb.headers.items())]
            return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=fb.status), headers=pb.HeaderMutation(set_headers=hdrs),
                body=fb.body.encode(), details="extproc_circuit_open_fallback"))
        body = json.dumps({"error": "upstream_unavailable", "reason": "circuit_open", "upstream": spec.name,
                           "retry_after": adm.retry_after_s}, separators=(",", ":")).encode()
        hdrs = [_option("content-type", b"application/json"), *marks]
        return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=503), headers=pb.HeaderMutation(set_headers=hdrs),
            body=body, details="extproc_circuit_open"))


@dataclass(slots=True)
class Flow:
    """One exchange's cache and breaker state, between its messages."""
    look: Lookup | None = None
    admission: Admission | None = None
    recorded: bool = False
    started: float = 0.0
    breaker: str = ""               # the breaker that answered (open)
    grpc_pending: bool = False      # a gRPC upstream's outcome waits for its trailers


def cluster_of(msg) -> str:
    """The upstream cluster Envoy routed the request to (the `xds.cluster_name` request attribute)."""
    attrs = msg.attributes
    if "envoy.filters.http.ext_proc" in attrs:
        fields = attrs["envoy.filters.http.ext_proc"].fields
        if "xds.cluster_name" in fields:
            return fields["xds.cluster_name"].string_value
    return ""
