"""OpenTelemetry traces: a span per decision, continuing the trace Envoy started.

Off by default (`telemetry.tracing.enabled`). When on, each ext_authz Check and each ext_proc
stream is a SERVER span whose parent is the context Envoy sends in the gRPC metadata
(`traceparent` / `tracestate`, W3C trace context: Envoy's OpenTelemetry tracer, configured in
envoy.yaml, propagates it into its ext_authz and ext_proc calls), so Envoy's span and the
sidecar's share one trace id. Sampling is parent-based: a trace Envoy sampled is recorded, one it
did not is not; `sampling_ratio` applies to calls that arrive without a trace context. Spans are
batched and exported over OTLP/gRPC (`otlp_endpoint`, e.g. a collector, Jaeger or Tempo) off the
request path; a collector that is down costs dropped spans, never a request.

The grpc instrumentation package's aio server interceptor is not used: it wraps streaming
handlers as async generators, and the ext_proc handler is a coroutine writing with
`context.write` (see services/processor.py); two small functions here do the same job for both.
When tracing is off the services test one module flag and pay nothing else.
"""

from __future__ import annotations

import logging

log = logging.getLogger("extproc.tracing")

ACTIVE = False
_tracer = None
_provider = None
_propagator = None
_TRACE_KEYS = ("traceparent", "tracestate")


def setup(cfg) -> None:
    """Configure tracing for this process from `telemetry.tracing` (idempotent)."""
    global ACTIVE, _tracer, _provider, _propagator
    if not cfg.enabled or ACTIVE:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}),
                               sampler=ParentBased(TraceIdRatioBased(cfg.sampling_ratio)))
    _provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.insecure),
        schedule_delay_millis=cfg.export_interval_ms))
    _tracer = _provider.get_tracer("extproc")
    _propagator = TraceContextTextMapPropagator()
    ACTIVE = True
    log.info("tracing on", extra={"otlp_endpoint": cfg.otlp_endpoint, "sampling_ratio": cfg.sampling_ratio})


def shutdown() -> None:
    """Flush what is batched (bounded by the exporter's timeout) and stop."""
    global ACTIVE
    if _provider is not None and ACTIVE:
        ACTIVE = False
        _provider.shutdown()


def start(name: str, context) -> object:
    """A SERVER span for one call or stream, child of the context Envoy sent (or a root)."""
    from opentelemetry.trace import SpanKind

    carrier = {}
    for key, value in context.invocation_metadata() or ():
        if key in _TRACE_KEYS:
            carrier[key] = value if isinstance(value, str) else value.decode()
    return _tracer.start_span(name, context=_propagator.extract(carrier), kind=SpanKind.SERVER)


def trace_id_of_call(context) -> str:
    """The trace id Envoy propagated into this gRPC call (its `traceparent` metadata), or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return trace_id_of(value if isinstance(value, str) else value.decode(errors="replace"))
    return ""


def trace_id_of(traceparent: str | None) -> str:
    """The trace id of a W3C traceparent header (for log lines), or ""."""
    if traceparent and len(traceparent) >= 55 and traceparent[2] == "-":
        return traceparent[3:35]
    return ""
