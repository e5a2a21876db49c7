"""envoy.service.auth.v3.Authorization/Check: Envoy's CheckRequest in, a Decision's reply out.

Thin by design: build the plain Request, ask core.policy, translate the Decision. An allowed
request may get headers added or removed on its way upstream and dynamic metadata for later
filters (ext_proc reads the subject from it); a denied one gets the status, headers and JSON
body the client should see. Internal failures become gRPC UNAVAILABLE so Envoy's
`status_on_error` answers honestly; they are never an OK reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import OrderedDict

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from ..core import policy as core_policy
from ..core.authorize import ANONYMOUS
from ..core.decision import Decision, deny
from ..core.reasons import Reason
from ..core.request import Request
from ..telemetry import metrics, tracing
from .checkwire import response_headers_bytes
from .express import Express, Tally, timing_bytes
from .ratelimit import add_answer_headers

log = logging.getLogger("extproc.authz")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK_STATUS = status_pb2.Status(code=grpc.StatusCode.OK.value[0])
_DENIED_STATUS = status_pb2.Status(code=grpc.StatusCode.PERMISSION_DENIED.value[0])
_UNAUTHENTICATED_STATUS = status_pb2.Status(code=grpc.StatusCode.UNAUTHENTICATED.value[0])
_PLAIN_OK = pb.CheckResponse(status=_OK_STATUS, ok_response=pb.OkHttpResponse())
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"   # where Envoy files what we return
UNAVAILABLE_REASONS = frozenset({Reason.INTROSPECTION_UNAVAILABLE, Reason.REVOCATION_UNKNOWN, Reason.STORE_ERROR,
                                 Reason.STORE_TIMEOUT})


_parse = pb.CheckRequest.FromString


def add_to_server(service: AuthorizationService, server) -> None:
    """Register Check like the generated add_AuthorizationServicer_to_server, but on bytes both
    ways: Check parses the request itself (the express lane also needs its serialised length) and
    returns serialised replies (the express lane's are stored that way). No Python-level
    deserializer or serializer call per request."""
    handlers = {"Check": grpc.unary_unary_rpc_method_handler(service.Check)}
    name = pb.DESCRIPTOR.services_by_name["Authorization"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def request_from_check(check: pb.CheckRequest) -> Request:
    attrs = check.attributes
    http = attrs.request.http
    headers = dict(http.headers)
    return Request(
        method=http.method,
        path=http.path,
        headers=headers,
        policy=attrs.context_extensions.get("policy"),
        route=attrs.context_extensions.get("route", ""),
        client_ip=attrs.source.address.socket_address.address,
        request_id=headers.get("x-request-id", ""),
    )


def header_bytes(headers: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in headers.items())


def _header_options(headers: tuple[tuple[str, str], ...]) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE)
            for k, v in headers]


_IDENTITY_PARTS: OrderedDict[int, tuple] = OrderedDict()
_IDENTITY_PARTS_MAX = 10_000         # ~0.5 KB each: as many grants as the default decision cache holds


def ok_reply_bytes(d: Decision) -> bytes:
    """An allowed Decision's serialised CheckResponse, without Server-Timing. The part that comes
    from the grant (status, identity headers, headers to remove, dynamic metadata) is the same
    for every request of a repeat credential: it is serialised once per grant (keyed by its
    metadata dict, checked by identity, bounded) and the per-request rate-limit headers are
    appended (`response_headers_bytes`)."""
    meta = d.metadata
    if not meta:
        base = _ok_identity_part(d)
    else:
        got = _IDENTITY_PARTS.get(id(meta))
        if (got is not None and got[0] is meta and got[1] is d.headers and got[2] is d.remove_headers
                and got[3] is d.remove_query):
            base = got[4]
        else:
            base = _ok_identity_part(d)
            if len(_IDENTITY_PARTS) >= _IDENTITY_PARTS_MAX:
                _IDENTITY_PARTS.popitem(last=False)        # the oldest first
            _IDENTITY_PARTS[id(meta)] = (meta, d.headers, d.remove_headers, d.remove_query, base)
    if d.response_headers:
        return base + response_headers_bytes(d.response_headers)
    return base


def _ok_identity_part(d: Decision) -> bytes:
    return to_check_response(dataclasses.replace(d, response_headers=())).SerializeToString()


def reply_bytes(d: Decision, elapsed: float) -> bytes:
    """The serialised reply to send: allowed ones with `server-timing: authz;dur=<elapsed>`."""
    if d.allowed:
        return ok_reply_bytes(d) + timing_bytes(elapsed)
    return to_check_response(d).SerializeToString()


def to_check_response(d: Decision) -> pb.CheckResponse:
    """The Decision's reply as a message (Check sends allowed ones through `reply_bytes`)."""
    if d.allowed:
        if not d.headers and not d.remove_headers and not d.metadata and not d.response_headers:
            return _PLAIN_OK
        ok = pb.OkHttpResponse(headers=_header_options(d.headers), headers_to_remove=list(d.remove_headers),
                               query_parameters_to_remove=list(d.remove_query),
                               response_headers_to_add=_header_options(d.response_headers))
        resp = pb.CheckResponse(status=_OK_STATUS, ok_response=ok)
        if d.metadata:
            meta = struct_pb2.Struct()
            meta.update(d.metadata)
            resp.dynamic_metadata.CopyFrom(meta)
        return resp
    denied = pb.DeniedHttpResponse(status=http_status_pb2.HttpStatus(code=d.status),
                                   headers=_header_options(d.headers), body=d.body.decode())
    status = _UNAUTHENTICATED_STATUS if d.status == 401 else _DENIED_STATUS
    resp = pb.CheckResponse(status=status, denied_response=denied)
    if d.policy:
        # the access log (and gateway_requests_total) name the policy and the reason of a denial too
        meta = struct_pb2.Struct()
        meta.update({"policy": d.policy, "reason": d.reason.value, **({"rule": d.rule} if d.rule else {})})
        resp.dynamic_metadata.CopyFrom(meta)
    return resp


class AuthorizationService(pb_grpc.AuthorizationServicer):
    def __init__(self, runtime_ref, breakers=None):
        # runtime_ref() returns the Runtime in force; a reload swaps it between calls
        self._runtime = runtime_ref
        self.breakers = breakers         # services.breaker.Breakers: the lean wiring's check
        self.in_flight = 0
        # fail-fast answers while a lean breaker is open: one Decision and reply per (upstream, policy,
        # Retry-After second), built once (a rejection must cost less than the request it spares)
        self._open_decisions: dict[tuple, Decision] = {}
        self._open_replies: dict[int, tuple[Decision, bytes]] = {}
        self._open_cfg = None
        self._express: Express | None = None       # the express lane of the Runtime in force
        self._tally = Tally(metrics.child(metrics.DECISION_SECONDS, "authz"))

    async def _lean_breaker(self, rt, policy: str, request_id: str, decision):
        """The lean wiring: the breaker of this policy's upstream, checked in the call the route
        already pays for (outcomes come from Envoy's access-log stream)."""
        breakers = self.breakers
        if breakers.cfg is not rt.config.circuit_breakers:
            breakers.reconfigure(rt.config.circuit_breakers)
        spec = breakers.lean_for(policy)
        if spec is None:
            return decision
        adm = await breakers.admit(spec)
        if adm.probe:
            # the access-log entry carries this back to whichever worker receives it
            return dataclasses.replace(decision, metadata={**decision.metadata, "breaker_probe": spec.name})
        if not adm.rejected:
            return decision
        if self._open_cfg is not breakers.cfg:       # a reload may change a fallback: build afresh
            self._open_cfg = breakers.cfg
            self._open_decisions.clear()
            self._open_replies.clear()
        key = (spec.name, policy, adm.retry_after_s)
        cached = self._open_decisions.get(key)
        if cached is not None:
            return cached
        if len(self._open_decisions) > 1024:
            self._open_decisions.clear()
        self._open_decisions[key] = made = self._open_decision(spec, policy, adm)
        return made

    @staticmethod
    def _open_decision(spec, policy: str, adm) -> Decision:
        marks = (("retry-after", str(adm.retry_after_s)), ("x-circuit-breaker", "open"))
        fb = spec.fallback
        if fb is not None:
            return Decision(False, Reason.CIRCUIT_OPEN, status=fb.status, policy=policy, rule=f"breaker:{spec.name}",
                            headers=(("content-type", fb.content_type), *marks,
                                     *((k.lower(), v) for k, v in fb.headers.items())), body=fb.body.encode())
        body = json.dumps({"error": "upstream_unavailable", "reason": "circuit_open", "upstream": spec.name,
                           "retry_after": adm.retry_after_s}, separators=(",", ":")).encode()
        return Decision(False, Reason.CIRCUIT_OPEN, status=503, policy=policy, rule=f"breaker:{spec.name}",
                        headers=(("content-type", "application/json"), *marks), body=body)

    def express(self, rt) -> Express:
        ex = self._express
        if ex is None or ex.rt is not rt:
            self._express = ex = Express(rt, self._tally)
        return ex

    async def Check(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Envoy's serialised CheckRequest in, a serialised CheckResponse out (see add_to_server)."""
        start = time.perf_counter()
        try:
            request = _parse(data)
        except Exception:  # noqa: BLE001 - bytes that are no CheckRequest are the caller's error, said so
            log.warning("CheckRequest does not parse", extra={"bytes": len(data)})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "extproc: malformed CheckRequest")
            raise  # unreachable: abort raises
        ex = self.express(self._runtime())
        if ex.lanes and not tracing.ACTIVE and not log.isEnabledFor(logging.DEBUG):
            # a repeat credential of an express policy: its stored reply (see services/express.py)
            reply = ex.answer(request, len(data), start)
            if reply is not None:
                return reply
        self.in_flight += 1          # read by the worker's sampler (no metric call per request)
        try:
            if not tracing.ACTIVE:
                return await self._check(request, context, None)
            span = tracing.start("extproc.ext_authz", context)
            try:
                return await self._check(request, context, span)
            except BaseException as exc:
                span.set_attribute("extproc.result", "error")
                span.record_exception(exc)
                raise
            finally:
                span.end()
        finally:
            self.in_flight -= 1

    async def _check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext, span) -> bytes:
        start = time.perf_counter()
        rt = self._runtime()
        try:
            req = request_from_check(request)
            if header_bytes(req.headers) > rt.max_header_bytes:
                decision = deny(431, Reason.HEADERS_TOO_LARGE, "request headers too large")
            else:
                policy = rt.policies.select(req.policy)
                if policy is None:
                    decision = core_policy.unknown_policy(req.policy or "", rt.policies)
                else:
                    decision = await rt.identity.decide(req, policy, time.time())
                    if decision.allowed and not decision.would_deny and not rt.ratelimiter.empty:
                        limited, verdict = await rt.ratelimiter.decide(req, policy, decision.principal or ANONYMOUS)
                        if limited is not None:
                            decision = limited
                        elif verdict is not None and rt.ratelimiter.cfg.headers:
                            decision = add_answer_headers(decision, verdict)
                    if decision.allowed and self.breakers is not None:
                        decision = await self._lean_breaker(rt, policy.name, req.request_id, decision)
        except Exception:  # noqa: BLE001 - a request we cannot judge is an UNAVAILABLE, never a crash
            log.exception("check failed")
            metrics.child(metrics.DECISIONS, "authz", "", "error", Reason.INTERNAL.value).inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "extproc could not judge this request")
            raise  # unreachable: abort raises
        if not decision.allowed and decision.reason in UNAVAILABLE_REASONS:
            # a dependency failed and no fallback decided: a gRPC error Envoy can act on (its
            # status_on_error answers 503), never a reply that hides the failure
            metrics.child(metrics.DECISIONS, "authz", rt.policy_label(req.policy), "error", decision.reason.value).inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"extproc: {decision.reason.value}")
        elapsed = time.perf_counter() - start
        result = "allow" if decision.allowed else "deny"
        if decision.would_deny:
            result = "shadow_deny"
        label = rt.policy_label(req.policy)
        # counted at the tally's next flush (every 100 ms, and before any render), as the express lane's
        self._tally.add((metrics.child(metrics.DECISIONS, "authz", label, result, decision.reason.value),
                         metrics.child(metrics.AUTH_DECISIONS, label, result)), elapsed)
        if span is not None:
            span.set_attributes({"extproc.policy": decision.policy or label, "extproc.result": result,
                                 "extproc.reason": decision.reason.value, "extproc.rule": decision.rule or "",
                                 "extproc.status": decision.status if not decision.allowed else 200})
        if rt.config.telemetry.decision_logs or log.isEnabledFor(logging.DEBUG):
            principal = decision.principal
            log.info("decision", extra={
                "request_id": req.request_id, "trace_id": tracing.trace_id_of_call(context),
                "policy": decision.policy or label, "result": result, "reason": decision.reason.value,
                "rule": decision.rule or None, "status": None if decision.allowed else decision.status,
                "sub": principal.subject if principal is not None and principal.subject else None,
                "method": req.method, "path": req.path, "duration_us": round(elapsed * 1e6)})
        if decision.allowed and decision.principal is not None and span is None:
            self.express(rt).learn(request, decision, time.time(), ok_reply_bytes)
        if decision.reason is Reason.CIRCUIT_OPEN:
            got = self._open_replies.get(id(decision))
            if got is not None and got[0] is decision:
                return got[1]
            reply = reply_bytes(decision, elapsed)
            if len(self._open_replies) > 1024:
                self._open_replies.clear()
            self._open_replies[id(decision)] = (decision, reply)
            return reply
        return reply_bytes(decision, elapsed)
