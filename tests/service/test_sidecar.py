"""The real Worker in-process: ext_authz, ext_proc, health, reflection, admin, overload, drain,
reload, TLS, unix sockets and a Redis that is down, all over real gRPC and HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tempfile
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from extproc import app as appmod
from extproc.app import SERVICE_NAMES
from tests.service.conftest import (
    ADMIN_TOKEN_ENV,
    Pki,
    Running,
    Sidecar,
    check_request,
    denied_body,
    eventually,
    header_options,
    request_body,
    request_headers,
    response_headers,
    run,
    sample,
    write_atomic,
)
from tests.support.procs import free_port

OK, UNAUTHENTICATED, PERMISSION_DENIED = 0, 16, 7
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def decisions(policy: str, result: str, reason: str) -> float:
    return sample("extproc_decisions_total", service="authz", policy=policy, result=result, reason=reason)


def streams(policy: str, end: str) -> float:
    return sample("extproc_streams_total", policy=policy, end=end)


def streams_of(policy: str) -> float:
    """All ext_proc streams counted for `policy`, whatever their end label."""
    return sum(s.value for fam in REGISTRY.collect() if fam.name == "extproc_streams"
               for s in fam.samples if s.name == "extproc_streams_total" and s.labels["policy"] == policy)


def reloads(result: str) -> float:
    return sample("extproc_config_reloads_total", result=result)


def timing_header(reply: external_processor_pb2.ProcessingResponse) -> str | None:
    for opt in reply.response_headers.response.header_mutation.set_headers:
        if opt.header.key == "server-timing":
            return opt.header.raw_value.decode() or opt.header.value
    return None


async def allowed(rt: Running, policy: str, token: str | None = None) -> bool:
    resp = await rt.check(check_request(policy=policy, token=token))
    return resp.status.code == OK


# ------------------------------------------------------------------------------- ext_authz ---

def test_check_allows_a_valid_token(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = decisions("api", "allow", "ok")
            resp = await rt.check(check_request(policy="api", token=sidecar.token("alice"),
                                                headers={"x-jwt-sub": "mallory"}))
            assert resp.status.code == OK
            assert resp.WhichOneof("http_response") == "ok_response"
            ok = resp.ok_response
            assert header_options(ok.headers) == {"x-jwt-sub": "alice"}
            assert ok.headers[0].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
            timing = header_options(ok.response_headers_to_add)["server-timing"]
            assert timing.startswith("authz;dur=")
            meta = dict(resp.dynamic_metadata)
            assert meta["sub"] == "alice" and meta["provider"] == "demo" and meta["policy"] == "api"
            assert decisions("api", "allow", "ok") == before + 1
    run(body)


def test_check_without_token_is_401_with_challenge_and_reason(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = decisions("api", "deny", "token_missing")
            resp = await rt.check(check_request(policy="api"))
            assert resp.status.code == UNAUTHENTICATED
            denied = resp.denied_response
            assert denied.status.code == 401
            headers = header_options(denied.headers)
            assert headers["www-authenticate"] == 'Bearer realm="extproc"'
            assert headers["content-type"] == "application/json"
            assert denied_body(resp)["reason"] == "token_missing"
            assert decisions("api", "deny", "token_missing") == before + 1

            bad = await rt.check(check_request(policy="api", token=sidecar.token(ttl_seconds=-3600)))
            assert bad.denied_response.status.code == 401
            assert 'error="invalid_token"' in header_options(bad.denied_response.headers)["www-authenticate"]
            assert denied_body(bad)["reason"] == "jwt_expired"
    run(body)


def test_check_names_no_policy_so_the_default_applies(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            resp = await rt.check(check_request())
            assert resp.denied_response.status.code == 401
            assert (await rt.check(check_request(token=sidecar.token()))).status.code == OK
            public = await rt.check(check_request(policy="public", headers={"x-jwt-sub": "mallory"}))
            assert public.status.code == OK
            # a client's copy of the identity header never reaches the upstream
            assert "x-jwt-sub" in public.ok_response.headers_to_remove
    run(body)


def test_check_unknown_policy_is_403(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = decisions("unknown", "deny", "policy_unknown")
            resp = await rt.check(check_request(policy="no-such-policy", token=sidecar.token()))
            assert resp.status.code == PERMISSION_DENIED
            assert resp.denied_response.status.code == 403
            assert denied_body(resp)["reason"] == "policy_unknown"
            # the metric label is bounded: an undefined name is counted as "unknown"
            assert decisions("unknown", "deny", "policy_unknown") == before + 1
    run(body)


def test_check_oversized_headers_is_431(sidecar: Sidecar):
    async def body():
        cfg = sidecar.config()
        cfg["server"]["max_header_bytes"] = 1024
        async with sidecar.run(cfg) as rt:
            resp = await rt.check(check_request(policy="public", headers={"x-big": "a" * 2000}))
            assert resp.status.code == PERMISSION_DENIED
            assert resp.denied_response.status.code == 431
            assert denied_body(resp)["reason"] == "headers_too_large"
            assert (await rt.check(check_request(policy="public"))).status.code == OK
    run(body)


def test_check_a_request_that_does_not_parse_is_invalid_argument(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            # Check takes the serialised bytes itself (services/authz.py add_to_server)
            raw = rt.channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            for garbage in (b"\xff\xff\xff", b"\x0a\x05abc"):       # a bad tag; a length past the end
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw(garbage, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            # an empty message is a valid (empty) CheckRequest: the default policy's answer, a 401
            reply = external_auth_pb2.CheckResponse.FromString(await raw(b"", timeout=5))
            assert reply.denied_response.status.code == 401
            # a valid request cut short or with a flipped byte: a reply or INVALID_ARGUMENT, never
            # an internal error, and the sidecar answers normally afterwards
            rnd = random.Random(7)
            valid = check_request(policy="api", token=sidecar.token("alice")).SerializeToString()
            seen = set()
            for i in range(300):
                data = bytearray(valid[:rnd.randrange(len(valid))] if i % 2 else valid)
                if i % 3:
                    data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
                try:
                    external_auth_pb2.CheckResponse.FromString(await raw(bytes(data), timeout=5))
                    seen.add("reply")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                    seen.add("invalid")
            assert seen == {"reply", "invalid"}
            assert (await rt.check(check_request(policy="public"))).status.code == OK
            assert (await rt.check(check_request(policy="api", token=sidecar.token("alice")))).status.code == OK
    run(body)


def test_check_shadow_policy_allows_a_bad_token(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = decisions("api-shadow", "shadow_deny", "jwt_bad_audience")
            bad = sidecar.token(audience="someone-else")
            resp = await rt.check(check_request(policy="api-shadow", token=bad))
            assert resp.status.code == OK and resp.WhichOneof("http_response") == "ok_response"
            assert "x-jwt-sub" not in header_options(resp.ok_response.headers)
            assert decisions("api-shadow", "shadow_deny", "jwt_bad_audience") == before + 1
            enforced = await rt.check(check_request(policy="api", token=bad))
            assert enforced.denied_response.status.code == 401
    run(body)


# -------------------------------------------------------------------------------- ext_proc ---

def test_process_continues_and_times_the_response(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = streams("api-shadow", "complete")
            call = rt.process(policy="api-shadow")
            await call.write(request_headers())
            first = await call.read()
            assert first.WhichOneof("response") == "request_headers"
            assert not first.request_headers.response.HasField("header_mutation")
            await call.write(response_headers())
            second = await call.read()
            assert second.WhichOneof("response") == "response_headers"
            timing = timing_header(second)
            assert timing is not None and timing.startswith("extproc;dur=")
            (opt,) = second.response_headers.response.header_mutation.set_headers
            assert opt.append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            # the policy named by invocation metadata labels the stream
            await eventually(lambda: streams("api-shadow", "complete") == before + 1, what="stream counted")
    run(body)


def test_process_cancel_after_the_last_message_is_a_normal_end(sidecar: Sidecar, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)

    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = streams("api", "complete")
            call = rt.process(policy="api")
            await call.write(request_headers())
            await call.read()
            await call.write(response_headers(503))   # Envoy's own local reply is seen too
            assert timing_header(await call.read()) is not None
            call.cancel()                              # Envoy resets every finished stream
            await eventually(lambda: streams("api", "complete") == before + 1, what="stream counted")
            assert await call.code() == grpc.StatusCode.CANCELLED
    run(body)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


def test_process_ended_after_request_headers_is_client_gone(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            before = streams("api", "client_gone")
            call = rt.process()                        # no metadata: the default policy's label
            await call.write(request_headers())
            await call.read()
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await eventually(lambda: streams("api", "client_gone") == before + 1, what="stream counted")

            before_unknown = streams("unknown", "empty")
            empty = rt.process(policy="no-such-policy")
            await empty.done_writing()
            assert await empty.code() == grpc.StatusCode.OK
            await eventually(lambda: streams("unknown", "empty") == before_unknown + 1, what="empty stream")
    run(body)


def test_process_answers_unexpected_kinds_with_continue(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            call = rt.process(policy="public")
            await call.write(request_body())            # before any headers: not in the table
            reply = await call.read()
            assert reply.WhichOneof("response") == "request_body"
            assert reply.request_body == external_processor_pb2.BodyResponse()
            await call.write(request_headers(end_of_stream=False))
            assert (await call.read()).WhichOneof("response") == "request_headers"
            await call.write(request_body())
            assert (await call.read()).WhichOneof("response") == "request_body"
            await call.write(external_processor_pb2.ProcessingRequest(
                request_trailers=external_processor_pb2.HttpTrailers()))
            assert (await call.read()).WhichOneof("response") == "request_trailers"
            await call.write(response_headers())
            assert timing_header(await call.read()) is not None
            await call.write(external_processor_pb2.ProcessingRequest(
                response_body=external_processor_pb2.HttpBody(body=b"x", end_of_stream=True)))
            assert (await call.read()).WhichOneof("response") == "response_body"
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    run(body)


def test_process_rejects_a_message_with_no_kind(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            call = rt.process(policy="public")
            await call.write(external_processor_pb2.ProcessingRequest())
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unexpected message" in await call.details()
    run(body)


def test_process_aborted_stream_is_not_counted_complete(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            total, complete = streams_of("public"), streams("public", "complete")
            call = rt.process(policy="public")
            await call.write(request_headers())
            await call.read()
            await call.write(external_processor_pb2.ProcessingRequest())
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
            await eventually(lambda: streams_of("public") == total + 1, what="stream counted")
            assert streams("public", "complete") == complete
    run(body)


# ------------------------------------------------------------------------ health, reflection ---

def test_health_and_reflection(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            assert SERVICE_NAMES == ("envoy.service.auth.v3.Authorization",
                                     "envoy.service.ext_proc.v3.ExternalProcessor",
                                     "envoy.service.ratelimit.v3.RateLimitService",
                                     "envoy.service.accesslog.v3.AccessLogService")
            for name in ("", *SERVICE_NAMES):
                assert await rt.health(name) == SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rt.health("no.such.Service")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            stub = reflection_pb2_grpc.ServerReflectionStub(rt.channel)
            call = stub.ServerReflectionInfo(timeout=5)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            resp = await call.read()
            await call.done_writing()
            names = {s.name for s in resp.list_services_response.service}
            assert set(SERVICE_NAMES) <= names
            assert "grpc.health.v1.Health" in names
            assert await call.code() == grpc.StatusCode.OK
    run(body)


def test_only_the_per_request_methods_are_registered(sidecar: Sidecar):
    """grpc.aio makes every incoming call wait on one pending request per registered method
    (app.GenericOnly): only Check and Process, one call per request, are registered, as in the
    floor servicer; health, reflection (above), rate limits and access logs answer as generic
    methods."""
    def registered() -> int:
        return sum(getattr(t.get_coro(), "__name__", "") == "_request_registered_call" for t in asyncio.all_tasks())

    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            assert await allowed(rt, "public")
            await eventually(lambda: registered() == 2, what="two registered methods pending")
            assert await rt.health("") == SERVING
            assert registered() == 2
    run(body)


def test_reflection_describes_the_services(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            stub = reflection_pb2_grpc.ServerReflectionStub(rt.channel)
            call = stub.ServerReflectionInfo(timeout=5)
            for symbol in SERVICE_NAMES:
                await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
                resp = await call.read()
                assert resp.WhichOneof("message_response") == "file_descriptor_response", symbol
                assert resp.file_descriptor_response.file_descriptor_proto
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    run(body)


# -------------------------------------------------------------------------------- overload ---

def test_overload_sheds_with_resource_exhausted(sidecar: Sidecar):
    async def body():
        cfg = sidecar.config()
        cfg["server"]["max_in_flight"] = 2
        async with sidecar.run(cfg) as rt:
            held = []
            for _ in range(2):
                call = rt.process(policy="api")
                await call.write(request_headers())
                await call.read()                       # the stream is in flight on the server
                held.append(call)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rt.check(check_request(policy="public"))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in held:
                await call.write(response_headers())
                await call.read()
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            await eventually(lambda: allowed(rt, "public"), what="capacity back after the streams ended")
    run(body)


# ----------------------------------------------------------------------------------- drain ---

def test_stop_drains_in_flight_streams_and_refuses_new_calls(sidecar: Sidecar):
    async def body():
        cfg = sidecar.config()
        cfg["server"]["shutdown_grace_seconds"] = 20
        async with sidecar.run(cfg) as rt:
            stream = rt.process(policy="api")
            await stream.write(request_headers())
            await stream.read()
            watch = health_pb2_grpc.HealthStub(rt.channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING

            stopping = asyncio.create_task(rt.worker.stop())
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            status, ready = await rt.admin("GET", "/readyz")
            assert status == 503 and ready["draining"] is True

            async def refused() -> bool:
                async with grpc.aio.insecure_channel(rt.target) as fresh:
                    try:
                        await rt.check(check_request(policy="public"), channel=fresh)
                    except grpc.aio.AioRpcError as exc:
                        return exc.code() == grpc.StatusCode.UNAVAILABLE
                return False
            await eventually(refused, what="new calls refused while draining")
            assert not stopping.done()                 # still waiting for the in-flight stream

            await stream.write(response_headers())
            reply = await stream.read()
            assert timing_header(reply) is not None
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
            await asyncio.wait_for(stopping, timeout=15)
    run(body)


# ---------------------------------------------------------------------------------- reload ---

def _with_policy(cfg: dict, name: str) -> dict:
    """`cfg` plus one public policy called `name` (the original is left as it was)."""
    return {**cfg, "policies": {**cfg["policies"], name: {"auth": "none"}}}


def test_reload_on_file_change_and_rejected_file_keeps_serving(sidecar: Sidecar, caplog: pytest.LogCaptureFixture):
    async def body():
        cfg = sidecar.config()
        async with sidecar.run(cfg, config_file=True) as rt:
            path = rt.config_path
            assert path is not None
            assert not await allowed(rt, "partners")
            ok_before, rejected_before = reloads("ok"), reloads("rejected")

            write_atomic(path, yaml.safe_dump(_with_policy(cfg, "partners")))
            await eventually(lambda: allowed(rt, "partners"), what="new policy in force")
            await eventually(lambda: reloads("ok") == ok_before + 1, what="reload counted")

            write_atomic(path, yaml.safe_dump(_with_policy(cfg, "partners")) + "policys: {}\n")
            await eventually(lambda: reloads("rejected") == rejected_before + 1, what="reload rejected")
            assert await allowed(rt, "partners")       # the old config keeps serving

            ok, msg = await rt.worker.reload("SIGHUP")
            assert ok is False
            assert f"{path}:" in msg and "policys: unknown key" in msg
            assert reloads("rejected") == rejected_before + 2
            assert await allowed(rt, "partners")

            write_atomic(path, yaml.safe_dump(cfg))
            await eventually(lambda: reloads("ok") == ok_before + 2, what="fixed file reloaded")
            assert not await allowed(rt, "partners")
    run(body)
    rejected = [r for r in caplog.records if r.getMessage().startswith("config reload rejected")]
    assert len(rejected) == 2


def test_reload_follows_a_kubernetes_configmap_swap(sidecar: Sidecar, tmp_path: Path):
    async def body():
        cfg = sidecar.config()
        mount = tmp_path / "configmap"
        mount.mkdir()
        first = mount / "..2026_01_01_00_00_00.000000001"
        first.mkdir()
        (first / "extproc.yaml").write_text(yaml.safe_dump(cfg))
        os.symlink(first.name, mount / "..data")
        os.symlink("..data/extproc.yaml", mount / "extproc.yaml")
        async with sidecar.run(cfg, config_path=mount / "extproc.yaml") as rt:
            assert not await allowed(rt, "partners")
            ok_before = reloads("ok")
            second = mount / "..2026_01_01_00_05_00.000000002"
            second.mkdir()
            (second / "extproc.yaml").write_text(yaml.safe_dump(_with_policy(cfg, "partners")))
            tmp_link = mount / "..data_tmp"
            os.symlink(second.name, tmp_link)
            os.replace(tmp_link, mount / "..data")     # the kubelet's atomic swap
            await eventually(lambda: allowed(rt, "partners"), what="swapped config in force")
            await eventually(lambda: reloads("ok") == ok_before + 1, what="reload counted")
    run(body)


def test_reload_without_a_config_file(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            assert await rt.worker.reload("SIGHUP") == (False, "no config file to reload")
    run(body)


# ----------------------------------------------------------------------------------- admin ---

def test_admin_health_readiness_metrics_and_config(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "t0p-s3cret-admin-token")

    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            assert await rt.admin("GET", "/healthz") == (200, {"status": "alive"})

            async def store_up():
                status, ready = await rt.admin("GET", "/readyz")
                return status == 200 and ready["store"]["up"] is True and ready
            ready = await eventually(store_up, what="store probed")
            assert ready["ready"] is True and ready["draining"] is False
            assert ready["store"] == {"kind": "memory", "up": True}
            assert ready["providers"] == {"demo": {"keys": 1, "loaded": True}}

            def allow_ok(text: str) -> float:
                for fam in text_string_to_metric_families(text):
                    for s in fam.samples:
                        if s.name == "extproc_decisions_total" and s.labels == {
                                "service": "authz", "policy": "api", "result": "allow", "reason": "ok"}:
                            return s.value
                return 0.0
            status, before = await rt.admin("GET", "/metrics")
            assert status == 200
            await rt.check(check_request(policy="api", token=sidecar.token()))
            _, after = await rt.admin("GET", "/metrics")
            assert allow_ok(after) == allow_ok(before) + 1
            assert "extproc_streams_total" in after and "extproc_ready 1.0" in after

            status, conf = await rt.admin("GET", "/config")
            assert status == 200
            text = str(conf)
            assert "t0p-s3cret-admin-token" not in text and ADMIN_TOKEN_ENV not in text
            assert conf["admin"]["token_env"] == "<redacted>"
            assert set(conf["policies"]) == {"public", "api", "api-shadow"}
    run(body)


def test_admin_reload_needs_the_bearer_token(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "t0p-s3cret-admin-token")

    async def body():
        async with sidecar.run(sidecar.config(), config_file=True) as rt:
            ok_before = reloads("ok")
            status, resp = await rt.admin("POST", "/reload")
            assert status == 401 and "error" in resp
            status, _ = await rt.admin("POST", "/reload", headers={"Authorization": "Bearer wrong-token"})
            assert status == 401
            status, _ = await rt.admin("POST", "/reload", headers={"Authorization": "Basic t0p-s3cret-admin-token"})
            assert status == 401
            assert reloads("ok") == ok_before
            status, resp = await rt.admin("POST", "/reload",
                                          headers={"Authorization": "Bearer t0p-s3cret-admin-token"})
            assert (status, resp) == (200, {"reloaded": True, "message": "reloaded"})
            assert reloads("ok") == ok_before + 1
    run(body)


def test_admin_reload_is_403_without_a_configured_token(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config(), config_file=True) as rt:
            ok_before = reloads("ok")
            status, resp = await rt.admin("POST", "/reload", headers={"Authorization": "Bearer anything"})
            assert status == 403 and "not configured" in resp["error"]
            assert reloads("ok") == ok_before
    run(body)


# --------------------------------------------------------------------------- TLS, mTLS, unix ---

def _tls_config(sidecar: Sidecar, pki: Pki, mtls: bool) -> dict:
    cfg = sidecar.config()
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if mtls:
        tls["client_ca_file"] = str(pki.ca)
    cfg["server"]["tls"] = tls
    return cfg


async def _check_fails(rt: Running, channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rt.check(check_request(policy="public"), channel=channel)
    return info.value.code()


def test_tls(sidecar: Sidecar, pki: Pki):
    async def body():
        cfg = _tls_config(sidecar, pki, mtls=False)
        async with sidecar.run(cfg, credentials=pki.client_credentials(with_cert=False)) as rt:
            assert (await rt.check(check_request(policy="public"))).status.code == OK
            async with grpc.aio.insecure_channel(rt.target) as plain:
                assert await _check_fails(rt, plain) == grpc.StatusCode.UNAVAILABLE
    run(body)


def test_mtls_requires_a_client_certificate(sidecar: Sidecar, pki: Pki):
    async def body():
        cfg = _tls_config(sidecar, pki, mtls=True)
        async with sidecar.run(cfg, credentials=pki.client_credentials(with_cert=True)) as rt:
            assert (await rt.check(check_request(policy="public"))).status.code == OK
            async with grpc.aio.secure_channel(rt.target, pki.client_credentials(with_cert=False)) as anon:
                assert await _check_fails(rt, anon) == grpc.StatusCode.UNAVAILABLE
    run(body)


def test_unix_socket(sidecar: Sidecar):
    async def body():
        with tempfile.TemporaryDirectory(prefix="extproc-", dir="/tmp") as d:
            cfg = sidecar.config()
            cfg["server"]["listen"] = f"unix:{d}/sidecar.sock"
            async with sidecar.run(cfg) as rt:
                assert rt.target == f"unix:{d}/sidecar.sock"
                assert (await rt.check(check_request(policy="api", token=sidecar.token()))).status.code == OK
                assert await rt.health() == SERVING
    run(body)


# ---------------------------------------------------------------------------- redis down ---

def test_redis_unreachable_at_start(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(appmod, "STORE_PROBE_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="extproc")

    async def body():
        cfg = sidecar.config()
        cfg["store"] = {"redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 50,
                                  "connect_timeout_ms": 100}}
        async with sidecar.run(cfg) as rt:
            probes = 0
            real_ping = rt.worker.store.ping

            async def counting_ping() -> None:
                nonlocal probes
                probes += 1
                await real_ping()
            rt.worker.store.ping = counting_ping      # type: ignore[method-assign]

            await eventually(lambda: probes >= 4, what="several store probes")
            status, ready = await rt.admin("GET", "/readyz")
            assert status == 200 and ready["ready"] is True
            assert ready["store"] == {"kind": "redis", "up": False}
            assert sample("extproc_store_up", store="redis") == 0
            assert (await rt.check(check_request(policy="api", token=sidecar.token()))).status.code == OK
            assert await rt.health() == SERVING
    run(body)
    unreachable = [r for r in caplog.records if r.getMessage().startswith("store unreachable")]
    assert len(unreachable) == 1
    assert unreachable[0].levelno == logging.ERROR
