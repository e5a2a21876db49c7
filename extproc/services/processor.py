"""envoy.service.ext_proc.v3.ExternalProcessor/Process: drives core.exchange over the stream.

Only I/O lives here: read each ProcessingRequest, ask the Exchange what to do, send the reply
it names. Envoy half-closes and resets every stream when it is done (ENVOY-NOTES): the handler
sees either the end of the iterator or a cancellation, both normal ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

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


def _timing_reply(seconds: float) -> pb.ProcessingResponse:
    opt = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="server-timing", raw_value=server_timing(seconds).encode()),
        append_action=_APPEND)
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(
        response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[opt]))))


def policy_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == POLICY_METADATA:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class ExternalProcessorService(pb_grpc.ExternalProcessorServicer):
    def __init__(self, runtime_ref):
        self._runtime = runtime_ref
        self._timing = metrics.child(metrics.DECISION_SECONDS, "ext_proc")

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext):
        policy = self._runtime().policy_label(policy_of(context))
        ex = Exchange()
        end = "error"        # until the stream ends normally or by Envoy's reset
        try:
            async for msg in request_iterator:
                start = time.perf_counter()
                kind = msg.WhichOneof("request")
                action = ex.step(kind)
                if action is Action.CONTINUE_WITH_TIMING:
                    ex.decision_seconds += time.perf_counter() - start
                    reply = _timing_reply(ex.decision_seconds)
                else:
                    reply = _CONTINUE.get(kind)
                    if reply is None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected message {kind!r}")
                    ex.decision_seconds += time.perf_counter() - start
                yield reply
            end = ex.end_kind()
        except asyncio.CancelledError:
            # Envoy resets every finished stream; a cancel is an error only mid-exchange
            end = ex.end_kind()
            raise
        finally:
            self._timing.observe(ex.decision_seconds)
            metrics.child(metrics.STREAMS, policy, end).inc()
