"""Circuit breakers in the real Worker over real gRPC (the e2e tests drive them through Envoy):
shadow mode computes and counts but never rejects; a stream ending before its response frees a
half-open probe slot; the upstream comes from the `xds.cluster_name` attribute."""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from tests.service.conftest import Sidecar, eventually, request_headers, response_headers, run, sample

OK = grpc.StatusCode.OK


def to_cluster(name: str) -> pb.ProcessingRequest:
    msg = request_headers("/status/500")
    attrs = struct_pb2.Struct()
    attrs.update({"xds.cluster_name": name})
    msg.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return msg


def config(sidecar: Sidecar, **breaker) -> dict:
    cfg = sidecar.config()
    cfg["circuit_breakers"] = {"upstreams": {"svc": {"consecutive_failures": 3, "open_seconds": 60,
                                                     "half_open_probes": 1, **breaker}}}
    return cfg


async def exchange(rt, status: int) -> str:
    """One request to cluster `svc` answered `status`; returns the kind of the first reply."""
    call = rt.process(policy="public")
    await call.write(to_cluster("svc"))
    first = (await call.read()).WhichOneof("response")
    if first == "request_headers":
        await call.write(response_headers(status))
        await call.read()
    await call.done_writing()
    assert await call.code() == OK
    return first


def test_shadow_mode_counts_would_be_rejections_and_rejects_nothing(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar, mode="shadow")) as rt:
            shadow_before = sample("gateway_circuit_breaker_shadow_rejected_total", upstream="svc")
            rejected_before = sample("gateway_circuit_breaker_rejected_total", upstream="svc")
            trips_before = sample("gateway_circuit_breaker_transitions_total", upstream="svc", **{"from": "closed",
                                                                                                  "to": "open"})
            for _ in range(3):
                assert await exchange(rt, 500) == "request_headers"
            await eventually(lambda: sample("gateway_circuit_breaker_state", upstream="svc") == 1, what="open")
            for _ in range(4):                          # open, but in shadow: every request passes
                assert await exchange(rt, 500) == "request_headers"
            assert sample("gateway_circuit_breaker_shadow_rejected_total", upstream="svc") == shadow_before + 4
            assert sample("gateway_circuit_breaker_rejected_total", upstream="svc") == rejected_before
            assert sample("gateway_circuit_breaker_transitions_total", upstream="svc",
                          **{"from": "closed", "to": "open"}) == trips_before + 1
    run(body)


def test_enforced_it_rejects_and_a_probe_whose_client_leaves_frees_its_slot(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar, open_seconds=0.2)) as rt:
            for _ in range(3):
                assert await exchange(rt, 503) == "request_headers"
            assert await exchange(rt, 200) == "immediate_response"
            # after the open time one probe is admitted; its client goes away (no response headers)
            probe = rt.process(policy="public")

            async def probe_admitted() -> bool:
                nonlocal probe
                await probe.write(to_cluster("svc"))
                if (await probe.read()).WhichOneof("response") == "request_headers":
                    return True
                await probe.done_writing()
                probe = rt.process(policy="public")
                return False

            await eventually(probe_admitted, what="a probe admitted")
            assert await exchange(rt, 200) == "immediate_response"     # the only slot is taken
            probe.cancel()                                             # the client went away
            async def admitted() -> bool:
                return await exchange(rt, 200) == "request_headers"

            await eventually(admitted, what="the slot freed, the next probe admitted")
            await eventually(lambda: sample("gateway_circuit_breaker_state", upstream="svc") == 0,
                             what="its success closed it")
    run(body)


def test_other_clusters_are_not_guarded(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            call = rt.process(policy="public")
            await call.write(to_cluster("elsewhere"))
            assert (await call.read()).WhichOneof("response") == "request_headers"
            await call.done_writing()
    run(body)


def test_a_failure_rate_over_the_window_trips_it(sidecar: Sidecar):
    async def body():
        cfg = config(sidecar, consecutive_failures=0,
                     failure_rate={"percent": 50, "window_seconds": 30, "min_calls": 6})
        async with sidecar.run(cfg) as rt:
            # alternating: never 2 failures in a row, but half of the calls fail
            for status in (500, 200, 500, 200, 500):
                assert await exchange(rt, status) == "request_headers"
            assert sample("gateway_circuit_breaker_state", upstream="svc") == 0     # 5 calls < min_calls
            assert await exchange(rt, 200) == "request_headers"                   # 3 of 6 failed: 50 %
            await eventually(lambda: sample("gateway_circuit_breaker_state", upstream="svc") == 1, what="tripped")
            assert await exchange(rt, 200) == "immediate_response"
    run(body)
