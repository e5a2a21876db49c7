"""envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs: per-request outcomes, off the
request path.

Envoy's gRPC access logger (`envoy.access_loggers.http_grpc` in envoy.yaml) batches finished
requests (every `buffer_flush_interval` or `buffer_size_bytes`) onto one long-lived stream per
Envoy worker thread. From each entry the sidecar counts:

* `gateway_requests_total{route,method,status}` and `gateway_request_duration_seconds{route}`:
  `route` is the policy ext_authz decided with (its dynamic metadata, in the entry), or `none`
  for routes without ext_authz; method from a fixed set; status the response code. The labels
  stay bounded whatever the traffic (never paths or users).
* The lean wiring of the circuit breakers: for breakers with `wiring: lean` the outcome of every
  request to their upstream cluster (`upstream_cluster` in the entry) is recorded here instead
  of in an ext_proc stream; a half-open probe is matched to its entry by the request id ext_authz
  saw. Failures are therefore counted with the flush interval's lag.

Entries are counted as they arrive; a stream that breaks (Envoy restart, sidecar reload) loses
at most the entries in flight, never the sidecar.
"""

from __future__ import annotations

import logging

from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from ..telemetry import metrics

log = logging.getLogger("extproc.accesslog")

SERVICE_NAME = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
_METHODS = {v: k for k, v in base_pb2.RequestMethod.items() if v}
_AUTHZ = "envoy.filters.http.ext_authz"


def add_to_server(server, runtime_ref, breakers_ref) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogService(runtime_ref, breakers_ref), server)


def _seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, runtime_ref, breakers_ref):
        self._runtime = runtime_ref            # () -> Runtime (policy names bound the route label)
        self._breakers = breakers_ref          # () -> Breakers | None

    async def StreamAccessLogs(self, request_iterator, context):
        async for message in request_iterator:
            if not message.HasField("http_logs"):
                continue
            breakers = self._breakers()
            label = self._runtime().policy_label
            lean = breakers.lean_upstreams() if breakers is not None else frozenset()
            metrics.ACCESS_LOG_ENTRIES.inc(len(message.http_logs.log_entry))
            for entry in message.http_logs.log_entry:
                common = entry.common_properties
                route = "none"
                probe = False
                fm = common.metadata.filter_metadata
                if _AUTHZ in fm:
                    fields = fm[_AUTHZ].fields
                    if "policy" in fields and fields["policy"].string_value:
                        route = label(fields["policy"].string_value)   # a configured name or "unknown"
                    probe = "breaker_probe" in fields
                code = entry.response.response_code.value if entry.response.HasField("response_code") else 0
                method = _METHODS.get(entry.request.request_method, "OTHER")
                duration = _seconds(common.duration) if common.HasField("duration") else \
                    _seconds(common.time_to_last_downstream_tx_byte)
                metrics.child(metrics.REQUESTS, route, method, str(code)).inc()
                metrics.child(metrics.REQUEST_SECONDS, route).observe(duration)
                if common.upstream_cluster in lean:
                    await breakers.record_logged(common.upstream_cluster, probe, code,
                                                 _seconds(common.time_to_last_upstream_rx_byte)
                                                 if common.HasField("time_to_last_upstream_rx_byte") else duration,
                                                 aborted=code == 0 or
                                                 common.response_flags.downstream_connection_termination)
        return als_pb2.StreamAccessLogsResponse()
