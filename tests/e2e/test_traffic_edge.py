"""The shipped envoy.yaml's own traffic features, through the real Envoy (docs/traffic.md).

A module stack runs the shipped envoy.yaml + extproc.yaml on free ports (only ports rewritten) so
failure injection never disturbs the session stack. Proven here: the timeouts (504 + JSON at the
route timeout and not before, per-try timeouts, the mapper leaving the sidecar's own bodies and an
upstream's own 504 alone), retries (counted on the upstream's hit counter; idempotent methods
only), CORS (a preflight answered without authentication), security headers, request ids, and
compression (gzip / br / zstd by Accept-Encoding, cache hits compressed like any response).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest

from extproc.demo import idp
from tests.support.http import Response, burst, get, request
from tests.support.stack import Stack, get_json, shipped_stack

pytestmark = pytest.mark.e2e

ORIGIN = "https://simone-webshop.com"          # the webshop plan's CORS origin


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    with shipped_stack(tmp_path_factory.mktemp("traffic-edge")) as s:
        yield s


@pytest.fixture(scope="module")
def tok(edge: Stack) -> str:
    return idp.load_or_create(edge.dir).mint("alice", scopes=["read", "write"])


def hits(s: Stack, path: str) -> int:
    return get_json(f"{s.upstream}/_control/hits")["hits"].get(path, 0)


def fail(s: Stack, prefix: str | None, mode: str) -> None:
    query = f"prefix={prefix}&mode={mode}" if prefix else f"mode={mode}"
    assert request("POST", f"{s.upstream}/_control/fail?{query}").status == 200


def envoy_counter(s: Stack, name: str) -> int:
    with urllib.request.urlopen(f"{s.envoy_admin}/stats?filter=^{re.escape(name)}$", timeout=2) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def timed(fn) -> tuple[Response, float]:
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0


# -- timeouts ----------------------------------------------------------------------------------

def test_legacy_request_timeout_is_3s_with_a_json_504_and_not_before(edge):
    r, took = timed(lambda: get(f"{edge.external}/legacy/delay/2000", timeout=10))
    assert r.status == 200 and took >= 2.0, (r.status, took)          # slower than 2 s, still answered
    r, took = timed(lambda: get(f"{edge.external}/legacy/delay/5000", timeout=10))
    assert r.status == 504, (r.status, r.body)
    assert 2.95 <= took < 4.5, took                                   # timer granularity: a few ms early
    assert r.header("content-type") == "application/json"
    body = r.json()
    assert body["error"] == "gateway_timeout"
    assert body["request_id"] == r.header("x-request-id")


def test_upstream_timeout_10s_and_per_try_timeouts_with_retries(edge, tok):
    """In parallel (one ~10 s wait): /delay/8500 answers (it is within the 10 s), /delay/12000 gets the
    JSON 504 at 10 s, and a held /api/ read is tried 3 times, 3 s each, then the JSON 504."""
    fail(edge, "/api/orders/5", "timeout")
    results: dict[str, tuple[Response, float]] = {}
    jobs = {
        "slow-ok": lambda: get(f"{edge.external}/delay/8500", timeout=20),
        "too-slow": lambda: get(f"{edge.external}/delay/12000", timeout=20),
        "held": lambda: get(f"{edge.external}/api/orders/5", tok, timeout=20),
        "internal": lambda: get(f"{edge.internal}/delay/12000", timeout=20),    # the internal port too
    }
    try:
        threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, timed(f))) for k, f in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        fail(edge, None, "off")
    summary = {k: (r.status, round(took, 2)) for k, (r, took) in results.items()}
    r, took = results["slow-ok"]
    assert r.status == 200 and took >= 8.5, summary
    r, took = results["too-slow"]
    assert r.status == 504 and 9.9 <= took < 11.5, summary
    assert r.json()["error"] == "gateway_timeout"
    r, took = results["held"]
    assert r.status == 504 and 9.0 <= took < 11.0, summary            # 3 tries x 3 s, within the 10 s
    assert r.json()["error"] == "gateway_timeout"
    assert hits(edge, "/api/orders/5") == 3, summary
    r, took = results["internal"]
    assert r.status == 504 and 9.9 <= took < 11.5, summary
    assert r.json()["error"] == "gateway_timeout"


def test_the_timeout_mapper_leaves_other_bodies_alone(edge):
    r = get(f"{edge.external}/status/504")                     # an upstream's own 504
    assert r.status == 504 and r.json()["status"] == 504
    r = get(f"{edge.external}/api/products")                   # the sidecar's own 401
    assert r.status == 401
    assert "gateway_timeout" not in r.body.decode()
    assert "json" in (r.header("content-type") or "")


# -- retries -----------------------------------------------------------------------------------

def test_retries_a_failing_read_3_times_in_all(edge, tok):
    path = f"/api/orders/{uuid.uuid4().int % 10_000 + 1000}"
    retries_before = envoy_counter(edge, "cluster.upstream.upstream_rq_retry")
    fail(edge, path, "500")
    try:
        r = get(f"{edge.external}{path}", tok)
    finally:
        fail(edge, None, "off")
    assert r.status == 500
    assert hits(edge, path) == 3                                       # 1 try + 2 retries
    assert envoy_counter(edge, "cluster.upstream.upstream_rq_retry") - retries_before == 2


def test_retries_a_reset_connection(edge, tok):
    path = f"/api/orders/{uuid.uuid4().int % 10_000 + 20_000}"
    fail(edge, path, "reset")
    try:
        r = get(f"{edge.external}{path}", tok)
    finally:
        fail(edge, None, "off")
    assert r.status == 503
    assert hits(edge, path) == 3


def test_the_retry_budget_caps_retries_under_a_burst(edge, tok):
    """30 concurrent reads of a failing path would make 60 retries; the cluster's retry budget
    (20 % of active requests, 3 at least) refuses most of them (retry overflow)."""
    path = f"/api/orders/{uuid.uuid4().int % 10_000 + 40_000}"
    overflow_before = envoy_counter(edge, "cluster.upstream.upstream_rq_retry_overflow")
    fail(edge, path, "500")
    try:
        out = burst(f"{edge.external}{path}", tok, 30)
    finally:
        fail(edge, None, "off")
    assert len(out) == 30 and all(r.status == 500 for r in out), [r.status for r in out]
    assert envoy_counter(edge, "cluster.upstream.upstream_rq_retry_overflow") > overflow_before
    assert 30 <= hits(edge, path) < 90


def test_a_post_is_never_retried(edge, tok):
    fail(edge, "/api/orders", "500")
    try:
        before = hits(edge, "/api/orders")
        r = request("POST", f"{edge.external}/api/orders", {"Authorization": f"Bearer {tok}",
                                                            "Content-Type": "application/json"},
                    body=json.dumps({"product_id": 1, "quantity": 1}).encode())
        assert r.status == 500
        assert hits(edge, "/api/orders") == before + 1
        r = get(f"{edge.external}/api/orders", tok)                       # the same path, idempotent
        assert r.status == 500
        assert hits(edge, "/api/orders") == before + 4
    finally:
        fail(edge, None, "off")


# -- edge hygiene ------------------------------------------------------------------------------

def test_cors_preflight_is_answered_without_authentication(edge):
    before = hits(edge, "/api/products")
    r = request("OPTIONS", f"{edge.external}/api/products",
                {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status == 200, (r.status, r.body)
    assert r.header("access-control-allow-origin") == ORIGIN
    assert r.header("access-control-allow-credentials") == "true"
    assert r.header("access-control-max-age") == "3600"
    assert "POST" in r.header("access-control-allow-methods")
    assert "authorization" in r.header("access-control-allow-headers")
    assert hits(edge, "/api/products") == before                        # answered by Envoy


def test_cors_headers_on_answers_and_foreign_origins_get_none(edge, tok):
    r = get(f"{edge.external}/api/products", tok, headers={"Origin": ORIGIN})
    assert r.status == 200
    assert r.header("access-control-allow-origin") == ORIGIN
    assert r.header("access-control-allow-credentials") == "true"
    r = get(f"{edge.external}/api/products", headers={"Origin": ORIGIN})   # the sidecar's 401 too
    assert r.status == 401 and r.header("access-control-allow-origin") == ORIGIN
    r = request("OPTIONS", f"{edge.external}/api/products",
                {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert r.header("access-control-allow-origin") is None
    assert r.status == 401                                                # not a preflight for us: authenticated


SECURITY = {"strict-transport-security": "max-age=31536000; includeSubDomains",
            "x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "strict-origin-when-cross-origin",
            "content-security-policy": "default-src 'none'; frame-ancestors 'none'"}


@pytest.mark.parametrize("path, status", [("/public/health", 200), ("/api/products", 401), ("/status/500", 500)])
def test_security_headers(edge, path, status):
    r = get(f"{edge.external}{path}")
    assert r.status == status
    for name, value in SECURITY.items():
        assert r.headers.get(name) == [value], (name, r.headers.get(name))


def test_request_id_is_generated_replaced_and_propagated(edge):
    r = get(f"{edge.external}/echo/headers", headers={"x-request-id": "client-chosen"})
    assert r.status == 200
    rid = r.header("x-request-id")
    assert rid and rid != "client-chosen"
    uuid.UUID(rid)
    assert r.json()["headers"]["x-request-id"] == rid                   # the upstream saw the same id
    assert get(f"{edge.external}/echo/headers").header("x-request-id") != rid


def _zstd_decode(data: bytes) -> bytes | None:
    exe = shutil.which("zstd")
    if exe is None:
        return None
    return subprocess.run([exe, "-d", "-c", "-q"], input=data, capture_output=True, check=True, timeout=10).stdout


def _curl_decoded(url: str, token: str, encoding: str) -> tuple[str, bytes] | None:
    """The body as curl decodes it (its libcurl has brotli and zstd), with the Content-Encoding
    Envoy used; None when curl or its decoder for `encoding` is missing here."""
    exe = shutil.which("curl")
    feature = {"br": "brotli", "zstd": "zstd", "gzip": "libz"}[encoding]
    if exe is None or feature not in subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10).stdout:
        return None
    out = subprocess.run([exe, "-sS", "--compressed", "-D", "-", "-H", f"Accept-Encoding: {encoding}",
                          "-H", f"Authorization: Bearer {token}", "-o", "-", "--max-time", "5", url],
                         capture_output=True, check=True, timeout=10).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    used = [ln.split(b":", 1)[1].strip().decode() for ln in head.split(b"\r\n")
            if ln.lower().startswith(b"content-encoding:")]
    return (used[0] if used else ""), body


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compression_by_accept_encoding_and_cache_hits_compressed(edge, tok, encoding):
    url = f"{edge.external}/api/products?enc={encoding}"
    plain = get(url, tok)                                 # MISS: stored identity-encoded
    assert plain.status == 200 and plain.header("content-encoding") is None
    assert len(plain.body) >= 256, len(plain.body)
    r = get(url, tok, headers={"Accept-Encoding": encoding})
    assert r.status == 200
    assert r.header("x-cache-status") == "HIT"                           # served by ext_proc's cache ...
    assert r.header("content-encoding") == encoding, r.headers             # ... and compressed by Envoy
    assert "accept-encoding" in (r.header("vary") or "").lower()
    assert r.body != plain.body and len(r.body) < len(plain.body)
    if encoding == "gzip":
        assert gzip.decompress(r.body) == plain.body
    elif encoding == "zstd":
        assert r.body[:4] == b"\x28\xb5\x2f\xfd"                          # a zstd frame
        decoded = _zstd_decode(r.body)
        assert decoded is None or decoded == plain.body
    decoded = _curl_decoded(url, tok, encoding)                          # brotli too: curl decodes it
    if decoded is not None:
        assert decoded == (encoding, plain.body), decoded[0]
    again = get(url, tok)                                                # identity again for who asks nothing
    assert again.header("content-encoding") is None and again.body == plain.body


def test_upstream_never_sees_accept_encoding(edge):
    r = get(f"{edge.external}/echo/headers", headers={"Accept-Encoding": "gzip", "x-pad": "p" * 300})
    assert r.header("content-encoding") == "gzip"
    seen = json.loads(gzip.decompress(r.body))
    assert "accept-encoding" not in seen["headers"]
