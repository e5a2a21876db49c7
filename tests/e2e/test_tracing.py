"""Traces through the real Envoy: Envoy's span and the sidecar's spans share one trace id.

An in-test OTLP/gRPC receiver (opentelemetry-proto's TraceService, on a free loopback port)
collects what Envoy's OpenTelemetry tracer (the shipped envoy.yaml's, sampling raised to 100 %
and flushing every 200 ms for the test) and the sidecar (telemetry.tracing enabled) export.
The sidecar also writes one decision log line per request (telemetry.decision_logs).
"""

from __future__ import annotations

import json
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from extproc.demo import idp
from tests.support.http import get
from tests.support.procs import free_port, wait_until
from tests.support.stack import ROOT, new_stack

pytestmark = pytest.mark.e2e

OTLP_PORT = 4317        # the collector port in the shipped envoy.yaml


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append({
                            "service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                            "attrs": {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes}})
        return trace_service_pb2.ExportTraceServiceResponse()

    def find(self, **match) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if all(s.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    d = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    s = new_stack(d / "stack")
    try:
        boot = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["tracing"]["random_sampling"] = {"value": 100}
        fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
        fmt.setdefault("cache", "%DYNAMIC_METADATA(envoy.filters.http.ext_proc:cache)%")
        fmt.setdefault("breaker", "%DYNAMIC_METADATA(envoy.filters.http.ext_proc:breaker)%")
        ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
        ext_proc["metadata_options"].setdefault("receiving_namespaces", {"untyped": ["envoy.filters.http.ext_proc"]})
        boot["layered_runtime"] = {"layers": [{"name": "test", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": 200}}]}
        path = Path(d / "envoy-traced.yaml")
        path.write_text(yaml.safe_dump(boot, sort_keys=False))
        s.start_upstream()
        s.write_sidecar_config({"telemetry": {"tracing": {"enabled": True, "otlp_endpoint": f"127.0.0.1:{port}",
                                                          "export_interval_ms": 200},
                                              "decision_logs": True}})
        s.start_sidecar()
        s.start_envoy(bootstrap=path, extra_map={OTLP_PORT: port})
        yield s, receiver
    finally:
        s.stop()
        server.stop(grace=None)


def test_envoy_and_the_sidecar_share_one_trace(traced):
    s, receiver = traced
    token = idp.load_or_create(s.dir).mint("tracer", scopes=["read"])
    r = get(f"{s.external}/api/products/1", token)
    assert r.status == 200
    request_id = r.header("x-request-id")

    def joined():
        for authz in receiver.find(service="extproc", name="extproc.ext_authz"):
            envoy = [x for x in receiver.spans if x["service"] == "envoy-gateway" and x["trace_id"] == authz["trace_id"]]
            proc = receiver.find(service="extproc", name="extproc.ext_proc", trace_id=authz["trace_id"])
            if envoy and proc and authz["attrs"].get("extproc.policy") == "api":
                return authz, envoy, proc
        return None

    authz, envoy, proc = wait_until(joined, timeout=15, what="Envoy's and the sidecar's spans in one trace")
    assert authz["attrs"]["extproc.result"] == "allow" and authz["attrs"]["extproc.reason"] == "ok"
    assert authz["parent"], "the sidecar's span continues Envoy's (it has a parent)"
    assert proc[0]["attrs"]["extproc.policy"] == "api"
    assert proc[0]["attrs"].get("extproc.cache") in ("HIT", "MISS")
    # the decision log line names the request and the trace
    log = (s.dir / "logs" / "sidecar.log").read_text()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{") and '"decision"' in x]
    mine = [x for x in lines if x.get("request_id") == request_id]
    assert mine and mine[0]["trace_id"] == authz["trace_id"] and mine[0]["reason"] == "ok", lines[-3:]


def test_a_client_trace_context_is_continued(traced):
    s, receiver = traced
    token = idp.load_or_create(s.dir).mint("tracer", scopes=["read"])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = get(f"{s.external}/api/products/2", token, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert r.status == 200
    wait_until(lambda: receiver.find(service="extproc", name="extproc.ext_authz", trace_id=trace_id)
               and [x for x in receiver.spans if x["service"] == "envoy-gateway" and x["trace_id"] == trace_id],
               timeout=15, what="spans of the client's trace")


def test_a_denial_is_traced_with_its_reason(traced):
    s, receiver = traced
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    r = get(f"{s.external}/api/products/1", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    assert r.status == 401
    span = wait_until(lambda: receiver.find(service="extproc", name="extproc.ext_authz", trace_id=trace_id),
                      timeout=15, what="the denial's span")[0]
    assert span["attrs"]["extproc.result"] == "deny" and span["attrs"]["extproc.reason"] == "token_missing"
    assert span["attrs"]["extproc.status"] == 401


def test_envoys_access_log_line_carries_the_cache_status_and_the_breaker(traced):
    """The sidecar's decisions reach Envoy's access log through dynamic metadata (the bootstrap of
    this module adds the two fields the shipped format will carry)."""
    s, _ = traced
    token = idp.load_or_create(s.dir).mint("logged", scopes=["read"])
    for _ in range(2):
        assert get(f"{s.external}/api/products/3", token).status == 200
    assert get(f"{s.external}/api/payments/p1", token).status == 404

    def lines() -> list[dict]:
        text = (s.dir / "logs" / "envoy.log").read_text()
        return [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"cache"' in x]

    got = wait_until(lambda: [x for x in lines() if x.get("path") in ("/api/products/3", "/api/payments/p1")]
                     if len([x for x in lines() if x.get("path") in ("/api/products/3", "/api/payments/p1")]) >= 3
                     else None, timeout=10, what="the access-log lines")
    products = [x["cache"] for x in got if x["path"] == "/api/products/3"]
    assert products[-2:] == ["MISS", "HIT"] or products[-1] == "HIT", got
    payments = [x for x in got if x["path"] == "/api/payments/p1"]
    assert payments[-1]["breaker"] == "payments:closed", payments
