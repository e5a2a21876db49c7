"""In-flight caps in the real Worker over real gRPC: the cap + 1st stream is answered with an
ImmediateResponse, and every way a stream ends gives its permit back (response done, Envoy's
reset, a client abort before response headers, a sidecar error, a waiter that leaves).

The in-flight count is read from the `gateway_concurrent_requests{route}` gauge (the servicer
sets it from the limiter after every change) and proven by behaviour: after the streams end, a
full cap's worth of new streams is admitted again. Nothing sleeps: `eventually` polls.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.service.conftest import (
    Running,
    Sidecar,
    eventually,
    request_headers,
    response_headers,
    run,
    sample,
    write_atomic,
)

OK = grpc.StatusCode.OK


def in_flight(route: str) -> float:
    return sample("gateway_concurrent_requests", route=route)


def reached(route: str) -> float:
    return sample("gateway_concurrency_limit_reached_total", route=route)


def streams(policy: str, end: str) -> float:
    return sample("extproc_streams_total", policy=policy, end=end)


def with_concurrency(sidecar: Sidecar, **concurrency: Any) -> dict:
    cfg = sidecar.config()
    cfg["server"]["max_in_flight"] = 256          # gRPC's own cap must not be what stops a stream
    cfg["policies"]["sse"] = {"auth": "none"}
    cfg["concurrency"] = concurrency
    return cfg


async def open_stream(rt: Running, policy: str):
    """A stream whose request headers were sent and answered: (call, first reply)."""
    call = rt.process(policy=policy)
    await call.write(request_headers())
    return call, await call.read()


async def admitted(rt: Running, policy: str):
    call, reply = await open_stream(rt, policy)
    assert reply.WhichOneof("response") == "request_headers", reply
    return call


async def finish(call) -> None:
    """The normal end: response headers answered, then Envoy half-closes."""
    await call.write(response_headers())
    assert (await call.read()).WhichOneof("response") == "response_headers"
    await call.done_writing()
    assert await call.code() == OK


def immediate(reply: pb.ProcessingResponse) -> tuple[int, dict[str, str], dict]:
    assert reply.WhichOneof("response") == "immediate_response", reply
    ir = reply.immediate_response
    headers = {o.header.key: o.header.raw_value.decode() for o in ir.headers.set_headers}
    return ir.status.code, headers, json.loads(ir.body)


async def rejected(rt: Running, policy: str) -> tuple[int, dict[str, str], dict]:
    call, reply = await open_stream(rt, policy)
    answer = immediate(reply)
    await call.done_writing()                     # Envoy ends the stream after an immediate response
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == OK
    return answer


async def drained(route: str, what: str = "permits released") -> None:
    await eventually(lambda: in_flight(route) == 0, what=what)


# ----------------------------------------------------------------------------------- the caps ---

def test_the_cap_plus_first_stream_is_rejected_with_an_immediate_response(sidecar: Sidecar):
    async def body():
        async with sidecar.run(with_concurrency(sidecar, global_limit=50, default_route_limit=3)) as rt:
            reached_before, rejected_before = reached("public"), streams("public", "rejected")
            held = [await admitted(rt, "public") for _ in range(3)]
            assert in_flight("public") == 3
            status, headers, doc = await rejected(rt, "public")
            assert status == 503
            assert headers == {"content-type": "application/json", "retry-after": "1",
                               "x-extproc-concurrency": "route"}
            assert doc["reason"] == "concurrency_limit" and doc["limit"] == "route"
            assert doc["route"] == "public" and doc["max_in_flight"] == 3
            assert reached("public") == reached_before + 1
            await eventually(lambda: streams("public", "rejected") == rejected_before + 1, what="rejected counted")
            assert in_flight("public") == 3                # the rejected stream took nothing
            other = await admitted(rt, "api")              # another route has its own cap
            for call in (*held, other):
                await finish(call)
            await drained("public")
            # a full cap's worth again
            again = [await admitted(rt, "public") for _ in range(3)]
            for call in again:
                await finish(call)
            await drained("public")
    run(body)


def test_global_cap_and_429(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, global_limit=2, default_route_limit=10, over_limit_status=429)
        async with sidecar.run(cfg) as rt:
            a, b = await admitted(rt, "api"), await admitted(rt, "public")
            status, headers, doc = await rejected(rt, "api-shadow")
            assert status == 429 and headers["x-extproc-concurrency"] == "global" and headers["retry-after"] == "1"
            assert doc == {"error": "too_many_requests", "reason": "concurrency_limit",
                           "message": "too many requests in flight for all routes (limit 2); retry later",
                           "limit": "global", "max_in_flight": 2, "route": "api-shadow"}
            await finish(a)
            await eventually(lambda: in_flight("api") == 0, what="api released")
            await finish(await admitted(rt, "api-shadow"))
            await finish(b)
            await drained("public")
    run(body)


def test_excluded_policies_take_no_permit(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, global_limit=1, default_route_limit=1, exclude_policies=["sse"])
        async with sidecar.run(cfg) as rt:
            held = await admitted(rt, "api")
            long_lived = [await admitted(rt, "sse") for _ in range(5)]   # over both caps: not counted
            assert in_flight("sse") == 0
            assert (await rejected(rt, "public"))[1]["x-extproc-concurrency"] == "global"
            for call in long_lived:
                await finish(call)
            await finish(held)
            await drained("api")
    run(body)


def test_shadow_mode_counts_and_admits(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, default_route_limit=1, mode="shadow")
        async with sidecar.run(cfg) as rt:
            before = reached("public")
            held = [await admitted(rt, "public") for _ in range(3)]
            assert in_flight("public") == 3
            assert reached("public") == before + 2
            for call in held:
                await finish(call)
            await drained("public")
    run(body)


# ------------------------------------------------------------------------- every end releases ---

def test_every_way_a_stream_ends_releases_its_permit(sidecar: Sidecar):
    async def body():
        async with sidecar.run(with_concurrency(sidecar, default_route_limit=1)) as rt:
            # 1. normal end: response headers, then the iterator ends
            await finish(await admitted(rt, "public"))
            await drained("public", "released after a normal end")

            # 2. Envoy's reset after the response (a cancel: the other half of normal ends)
            call = await admitted(rt, "public")
            await call.write(response_headers())
            await call.read()
            call.cancel()
            await drained("public", "released after a reset")

            # 3. client abort: Envoy ends the stream before any response headers
            call = await admitted(rt, "public")
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            await drained("public", "released after a half-close before response headers")

            # 4. client abort seen as a reset before response headers
            call = await admitted(rt, "public")
            call.cancel()
            await drained("public", "released after a reset before response headers")

            # 5. a sidecar-side error mid-exchange
            call = await admitted(rt, "public")
            await call.write(pb.ProcessingRequest())            # no kind: INVALID_ARGUMENT
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
            await drained("public", "released after an error")

            # 6. the channel itself goes away (the sidecar's peer disappears)
            async with grpc.aio.insecure_channel(rt.target) as lost:
                call = rt.process(policy="public", channel=lost)
                await call.write(request_headers())
                assert (await call.read()).WhichOneof("response") == "request_headers"
            await drained("public", "released after the connection closed")

            # the permit is free: the cap admits one again, and only one
            call = await admitted(rt, "public")
            assert (await rejected(rt, "public"))[0] == 503
            await finish(call)
            await drained("public")
    run(body)


def test_a_thousand_aborted_streams_leave_nothing_in_flight(sidecar: Sidecar):
    async def body():
        cap = 100
        async with sidecar.run(with_concurrency(sidecar, global_limit=cap, default_route_limit=cap)) as rt:
            admitted_count = 0

            async def abort(i: int) -> None:
                nonlocal admitted_count
                call = rt.process(policy="public")
                await call.write(request_headers())
                if i % 4 == 3:                 # aborted before the request headers were answered
                    call.cancel()
                    return
                reply = await call.read()
                assert reply.WhichOneof("response") == "request_headers", reply
                admitted_count += 1
                if i % 4 == 0:
                    call.cancel()              # reset
                elif i % 4 == 1:
                    await call.done_writing()  # the stream just ends
                    await call.code()
                else:                          # response seen, then reset
                    await call.write(response_headers(503))
                    await call.read()
                    call.cancel()

            for batch in range(10):
                await asyncio.gather(*(abort(batch * cap + i) for i in range(cap)))
                await drained("public", f"batch {batch} released")
            assert admitted_count == 750
            held = [await admitted(rt, "public") for _ in range(cap)]   # the whole cap is free
            assert in_flight("public") == cap
            assert (await rejected(rt, "public"))[1]["x-extproc-concurrency"] == "route"
            for call in held:
                call.cancel()
            await drained("public")
    run(body)


# -------------------------------------------------------------------------------------- queue ---

def test_a_queued_stream_proceeds_when_a_permit_frees(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, default_route_limit=1, queue_timeout_ms=450)
        async with sidecar.run(cfg) as rt:
            first = await admitted(rt, "public")
            before = reached("public")
            waiting = asyncio.create_task(open_stream(rt, "public"))
            await eventually(lambda: reached("public") == before + 1, what="second stream queued")
            # the queue holds one cap's worth (1): a third is answered at once
            status, headers, _ = await rejected(rt, "public")
            assert (status, headers["x-extproc-concurrency"]) == (503, "route")
            assert not waiting.done()
            await finish(first)
            second, reply = await waiting
            assert reply.WhichOneof("response") == "request_headers"
            assert in_flight("public") == 1
            await finish(second)
            await drained("public")
    run(body)


def test_a_queued_stream_times_out_with_the_rejection(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, default_route_limit=1, queue_timeout_ms=50)
        async with sidecar.run(cfg) as rt:
            first = await admitted(rt, "public")
            status, headers, doc = await rejected(rt, "public")       # waited 50 ms, then answered
            assert status == 503 and headers["retry-after"] == "1" and doc["limit"] == "route"
            assert in_flight("public") == 1
            await finish(first)
            await drained("public")
            await finish(await admitted(rt, "public"))
            await drained("public")
    run(body)


def test_a_waiter_that_leaves_takes_no_permit(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, default_route_limit=1, queue_timeout_ms=450)
        async with sidecar.run(cfg) as rt:
            first = await admitted(rt, "public")
            before, gone_before = reached("public"), streams("public", "empty")
            call = rt.process(policy="public")
            await call.write(request_headers())
            await eventually(lambda: reached("public") == before + 1, what="second stream queued")
            call.cancel()                              # Envoy gave up (message timeout) or the client left
            await eventually(lambda: streams("public", "empty") == gone_before + 1, what="waiter gone")
            await finish(first)
            await drained("public")
            # its place in the queue and the permit are both free
            again = await admitted(rt, "public")
            waiting = asyncio.create_task(open_stream(rt, "public"))
            await eventually(lambda: reached("public") == before + 2, what="queued again")
            await finish(again)
            second, reply = await waiting
            assert reply.WhichOneof("response") == "request_headers"
            await finish(second)
            await drained("public")
    run(body)


# ------------------------------------------------------------------------------------- reload ---

def test_reload_keeps_in_flight_counts(sidecar: Sidecar):
    async def body():
        cfg = with_concurrency(sidecar, default_route_limit=3)
        async with sidecar.run(cfg, config_file=True) as rt:
            held = [await admitted(rt, "public") for _ in range(2)]
            ok = sample("extproc_config_reloads_total", result="ok")
            cfg["concurrency"] = {"default_route_limit": 2}
            write_atomic(rt.config_path, yaml.safe_dump(cfg))
            await eventually(lambda: sample("extproc_config_reloads_total", result="ok") == ok + 1,
                             what="reloaded")
            # the two streams from before the reload still count against the new cap
            assert (await rejected(rt, "public"))[2]["max_in_flight"] == 2
            await finish(held[0])                      # released against the same counts
            await eventually(lambda: in_flight("public") == 1, what="one released")
            third = await admitted(rt, "public")
            assert in_flight("public") == 2
            for call in (held[1], third):
                await finish(call)
            await drained("public")
    run(body)


def test_without_route_metadata_the_policy_comes_from_ext_authz(sidecar: Sidecar):
    """Istio and Envoy Gateway cannot set per-route ext_proc metadata: the policy ext_authz decided
    with (forwarded dynamic metadata) names the route instead of the default policy."""
    from google.protobuf import struct_pb2

    def headers_with_policy(name: str) -> pb.ProcessingRequest:
        msg = request_headers()
        meta = struct_pb2.Struct()
        meta.update({"policy": name, "auth": "jwt", "sub": "alice"})
        msg.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(meta)
        return msg

    async def body():
        async with sidecar.run(with_concurrency(sidecar, global_limit=50, default_route_limit=100,
                                                routes={"sse": 1})) as rt:
            held = rt.process()                                  # no x-extproc-policy
            await held.write(headers_with_policy("sse"))
            assert (await held.read()).WhichOneof("response") == "request_headers"
            assert in_flight("sse") == 1
            second = rt.process()
            await second.write(headers_with_policy("sse"))
            status, headers, doc = immediate(await second.read())
            assert status == 503 and doc["route"] == "sse"
            await second.done_writing()
            await finish(held)
            await drained("sse")
    run(body)


def test_in_flight_work_and_event_loop_lag_are_sampled(sidecar: Sidecar):
    async def body():
        async with sidecar.run(with_concurrency(sidecar, global_limit=50, default_route_limit=50)) as rt:
            lag_before = sample("extproc_event_loop_lag_seconds_count")
            held = [await admitted(rt, "public") for _ in range(3)]
            await eventually(lambda: sample("extproc_in_flight_calls", service="ext_proc") >= 3,
                             what="held streams sampled as in flight")
            for call in held:
                await finish(call)
            await eventually(lambda: sample("extproc_in_flight_calls", service="ext_proc") == 0,
                             what="in flight back to zero")
            assert sample("extproc_event_loop_lag_seconds_count") > lag_before
    run(body)
