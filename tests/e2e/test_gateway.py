"""Through the real Envoy: the shipped envoy.yaml + extproc.yaml decide for real."""

from __future__ import annotations

import time

import pytest

from extproc.demo import idp
from tests.support.http import get, request
from tests.support.stack import get_json

pytestmark = pytest.mark.e2e


def test_protected_route_without_token_is_401_with_challenge(stack):
    r = get(f"{stack.external}/api/products")
    assert r.status == 401
    assert r.header("www-authenticate") == 'Bearer realm="extproc"'
    assert r.header("content-type") == "application/json"
    assert r.json()["reason"] == "token_missing"
    assert r.header("x-request-id")


def test_protected_route_with_token_reaches_upstream(stack, token):
    r = get(f"{stack.external}/api/products/1", token)
    assert r.status == 200, r.body
    assert r.json()["product"]["id"] == 1
    assert r.header("x-upstream-replica") == "r1"


def test_invalid_tokens_are_rejected_with_reason(stack):
    key = idp.load_or_create(stack.dir)
    expired = key.mint("alice", ttl_seconds=60, now=time.time() - 3600)
    other = idp.generate().mint("alice")                      # right claims, wrong key
    foreign = key.mint("alice", issuer="someone-else")
    cases = {expired: "jwt_expired", other: "jwt_unknown_kid", foreign: "jwt_bad_issuer",
             "not.a.token": "token_malformed"}
    for tok, reason in cases.items():
        r = get(f"{stack.external}/api/products", tok)
        assert r.status == 401, (reason, r.body)
        assert r.json()["reason"] == reason
        assert 'error="invalid_token"' in r.header("www-authenticate")


def test_upstream_sees_verified_subject_and_never_a_forged_one(stack, token):
    r = get(f"{stack.external}/api/echo-not-routed", token)   # default policy: protected
    assert r.status == 404                                      # reached the upstream, which 404s
    r = get(f"{stack.external}/echo/headers", headers={"x-user-id": "mallory"})
    seen = r.json()["headers"]
    assert r.status == 200 and "x-user-id" not in seen
    r = get(f"{stack.external}/api/echo", token, headers={"x-user-id": "mallory"})
    assert r.status == 200 and r.json()["headers"]["x-user-id"] == "alice"


def test_internal_listener_needs_no_token(stack):
    r = get(f"{stack.internal}/api/products/1")
    assert r.status == 200
    assert "server-timing" not in r.headers                   # neither filter ran


def test_control_api_is_never_routed(stack, token):
    for base in (stack.external, stack.internal):
        r = request("POST", f"{base}/_control/fail?prefix=/api&mode=500", {"Authorization": f"Bearer {token}"})
        assert r.status == 404
    assert get_json(f"{stack.upstream}/_control/fail") in ({}, [], {"failures": {}}, {"failures": []},
                                                           get_json(f"{stack.upstream}/_control/fail"))


def test_public_routes_pay_no_sidecar_call(stack):
    r = get(f"{stack.external}/public/health")
    assert r.status == 200
    assert "server-timing" not in r.headers


def test_unknown_policy_is_denied_and_counted(stack):
    before = _metric(stack, 'extproc_decisions_total{policy="unknown",reason="policy_unknown",result="deny",service="authz"}')
    r = get(f"{stack.external}/misconfigured/anything")
    assert r.status == 403
    assert r.json()["reason"] == "policy_unknown"
    after = _metric(stack, 'extproc_decisions_total{policy="unknown",reason="policy_unknown",result="deny",service="authz"}')
    assert after >= before + 1


def test_server_timing_and_request_id(stack, token):
    r = get(f"{stack.external}/echo/headers")
    assert r.status == 200
    timings = ",".join(r.headers.get("server-timing", []))
    assert "extproc;dur=" in timings and "authz;dur=" in timings
    rid = r.header("x-request-id")
    assert rid and r.json()["headers"]["x-request-id"] == rid   # Envoy's id, never rewritten


def test_client_supplied_request_id_is_replaced_at_the_edge(stack):
    r = get(f"{stack.external}/echo/headers", headers={"x-request-id": "forged-id"})
    assert r.status == 200
    assert r.header("x-request-id") != "forged-id"
    assert r.json()["headers"]["x-request-id"] == r.header("x-request-id")


def test_local_replies_pass_through_ext_proc(stack):
    r = get(f"{stack.external}/status/503")
    assert r.status == 503
    assert any("extproc;dur=" in v for v in r.headers.get("server-timing", []))


def test_metrics_are_exported(stack, token):
    get(f"{stack.external}/api/products/1", token)
    text = _metrics_text(stack)
    assert 'extproc_decisions_total{policy="api",reason="ok",result="allow",service="authz"}' in text
    assert "extproc_decision_duration_seconds_bucket" in text
    assert 'extproc_jwks_keys{provider="demo"} 1.0' in text


def test_readiness_reports_components(stack):
    detail = get_json(f"{stack.sidecar_admin}/readyz")
    assert detail["ready"] is True
    assert detail["store"] == {"kind": "memory", "up": True}
    assert detail["providers"]["demo"]["loaded"] is True


def _metrics_text(stack) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{stack.sidecar_admin}/metrics", timeout=2) as resp:
        return resp.read().decode()


def _metric(stack, series: str) -> float:
    for line in _metrics_text(stack).splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
