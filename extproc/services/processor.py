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
import logging
import time
from collections import deque
from collections.abc import Iterable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from ..core.concurrency import ConcurrencyLimiter, Grant, Permit, Rejection, Ticket
from ..core.exchange import Action, Exchange, server_timing
from ..telemetry import metrics

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
    def __init__(self, runtime_ref, concurrency: ConcurrencyLimiter | None = None):
        self._runtime = runtime_ref
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
        rt = self._runtime()
        policy = rt.policy_label(policy_of(context))
        limiter = self.sync_limits(rt.config.concurrency)
        ex = Exchange()
        permit: Permit | None = None
        end = "error"        # until the stream ends normally or by Envoy's reset
        try:
            async for msg in request_iterator:
                start = time.perf_counter()
                kind = msg.WhichOneof("request")
                rejected: Rejection | None = None
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
            if permit is not None:
                self._release(permit)
            self._timing.observe(ex.decision_seconds)
            metrics.child(metrics.STREAMS, policy, end).inc()
