"""A circuit breaker on a gRPC upstream, through the real Envoy: gRPC answers errors with HTTP
200 and a `grpc-status` trailer, so the breaker reads the status from the trailers (the route
sends them to ext_proc: ExtProcPerRoute processing_mode response_trailer_mode SEND).

The upstream is an in-test gRPC server (generic handler, raw bytes) whose method fails with
UNAVAILABLE while a flag is set, and counts the calls that reach it. The Envoy bootstrap is the
shipped envoy.yaml plus one route and one HTTP/2 cluster for it.
"""

from __future__ import annotations

import copy
import threading
from concurrent import futures

import grpc
import pytest
import yaml

from tests.support.procs import free_port, wait_until
from tests.support.stack import ROOT, get_json, new_stack

pytestmark = pytest.mark.e2e

METHOD = "/test.Flaky/Call"
UPSTREAM_PORT = 19090      # a placeholder in the bootstrap, mapped to the test server's free port


class Flaky:
    def __init__(self) -> None:
        self.failing = False
        self.calls = 0
        self.lock = threading.Lock()

    def call(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
        if self.failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected")
        if request == b"not-found":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")     # a client error: never counts
        return b"ok"


def bootstrap(path) -> None:
    boot = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    api = next(r for r in routes if r["match"].get("prefix") == "/api/")
    route = copy.deepcopy(api)
    route["match"] = {"prefix": "/test.Flaky/"}
    route["route"] = {"cluster": "grpc_upstream", "timeout": "5s"}
    per = route["typed_per_filter_config"]
    per["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"] = {"policy": "public"}
    per["envoy.filters.http.ext_proc"]["overrides"] = {
        "grpc_initial_metadata": [{"key": "x-extproc-policy", "value": "public"}],
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "response_trailer_mode": "SEND"}}
    routes.insert(routes.index(api), route)
    boot["static_resources"]["clusters"].append({
        "name": "grpc_upstream", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "grpc_upstream", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": UPSTREAM_PORT}}}}]}]}})
    path.write_text(yaml.safe_dump(boot, sort_keys=False))


@pytest.fixture(scope="module")
def grpc_stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("breaker-grpc")
    flaky = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Flaky", {"Call": grpc.unary_unary_rpc_method_handler(flaky.call)})])
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    s = new_stack(d / "stack")
    try:
        s.start_upstream()
        s.write_sidecar_config({"circuit_breakers.upstreams.grpc_upstream": {
            "grpc": True, "consecutive_failures": 3, "open_seconds": 1, "half_open_probes": 1}})
        s.start_sidecar()
        path = d / "envoy-grpc.yaml"
        bootstrap(path)
        s.start_envoy(bootstrap=path, extra_map={UPSTREAM_PORT: port})
        channel = grpc.insecure_channel(s.external.removeprefix("http://"))
        yield s, flaky, channel.unary_unary(METHOD)
        channel.close()
    finally:
        s.stop()
        server.stop(grace=None)


def code_of(call, payload: bytes = b"x") -> grpc.StatusCode:
    try:
        call(payload, timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def state(s) -> str:
    return next(b for b in get_json(f"{s.sidecar_admin}/breakers")["breakers"]
                if b["upstream"] == "grpc_upstream")["state"]


def test_grpc_status_trailers_trip_it_and_client_errors_do_not(grpc_stack):
    s, flaky, call = grpc_stack
    assert [code_of(call, b"not-found") for _ in range(5)] == [grpc.StatusCode.NOT_FOUND] * 5
    assert state(s) == "closed"
    flaky.failing = True
    before = flaky.calls
    codes = [code_of(call) for _ in range(3)]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
    assert state(s) == "open"
    for _ in range(4):            # answered by the breaker (an HTTP 503: UNAVAILABLE to the client)
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE
    assert flaky.calls == before + 3
    flaky.failing = False
    wait_until(lambda: code_of(call) == grpc.StatusCode.OK, timeout=5, what="a probe after the open time")
    wait_until(lambda: state(s) == "closed", timeout=5, what="closed by the probe's OK trailer")
