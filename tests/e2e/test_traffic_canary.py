"""envoy/examples/canary-routing.yaml through the real Envoy, over four demo upstream replicas.

The example runs as shipped, only its ports rewritten; each replica's `x-upstream-replica` names
the service that answered. Proven: the 90/10 weighted split within a stated tolerance over 1000
requests, the header that forces the canary, API versioning by path and by header, host-based
routing, a regex path rewrite, and request/response headers added and removed.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.e2e.test_traffic_lb import Example, call
from tests.support.procs import ROOT

pytestmark = pytest.mark.e2e

BOOTSTRAP = ROOT / "envoy" / "examples" / "canary-routing.yaml"
LISTENER, ADMIN = 8000, 9901
STABLE, CANARY, V2, ADMIN_SVC = 18081, 18082, 18083, 18084
N = 1000


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    e = Example(tmp_path_factory.mktemp("traffic-canary"), BOOTSTRAP, [LISTENER, ADMIN, STABLE, CANARY, V2, ADMIN_SVC])
    try:
        for shipped, rid in ((STABLE, "stable"), (CANARY, "canary"), (V2, "v2"), (ADMIN_SVC, "admin")):
            e.start_replica(shipped, rid)
        e.start_envoy()
        yield e
    finally:
        e.stop()


def served_by(ex: Example, path: str, **kw) -> str:
    r = call(ex.port(LISTENER), path, **kw)
    assert r.status == 200, (r.status, r.body[:200])
    return r.header("x-upstream-replica")


def test_canary_gets_10_percent(ex):
    seen = Counter(served_by(ex, "/echo/headers") for _ in range(N))
    assert set(seen) == {"stable", "canary"}, seen
    # binomial(1000, 0.1): mean 100, sd 9.5; the tolerance +-40 is 4.2 sd (a false alarm in ~1 of 40 000 runs)
    assert 60 <= seen["canary"] <= 140, seen


def test_a_header_forces_the_canary(ex):
    seen = Counter(served_by(ex, "/echo/headers", headers={"x-canary": "always"}) for _ in range(50))
    assert seen == Counter({"canary": 50}), seen


def test_api_version_by_path_and_by_header(ex):
    r = call(ex.port(LISTENER), "/v2/echo/headers")
    assert r.header("x-upstream-replica") == "v2"
    assert r.json()["path"] == "/echo/headers"                     # the version prefix is stripped
    assert served_by(ex, "/echo/headers", headers={"x-api-version": "2"}) == "v2"
    assert served_by(ex, "/echo/headers", headers={"x-api-version": "1", "x-canary": "never"}) in ("stable", "canary")


def test_host_based_routing(ex):
    assert served_by(ex, "/echo/headers", headers={"Host": "admin.shop.test"}) == "admin"
    assert served_by(ex, "/echo/headers", headers={"Host": f"admin.shop.test:{ex.port(LISTENER)}"}) == "admin"
    assert served_by(ex, "/echo/headers", headers={"Host": "shop.test", "x-canary": "always"}) == "canary"


def test_path_rewrite(ex):
    r = call(ex.port(LISTENER), "/shop/products/2")
    assert r.status == 200 and r.header("x-upstream-replica") == "stable"
    assert r.json()["product"]["id"] == 2
    r = call(ex.port(LISTENER), "/shop/products/two")                  # no match: not rewritten, 404 upstream
    assert r.status == 404


def test_request_and_response_headers_added_and_removed(ex):
    r = call(ex.port(LISTENER), "/headers/echo/cache?x-powered-by=aiohttp&x-kept=yes",
             headers={"x-debug-internal": "secret", "x-other": "kept"})
    assert r.status == 200
    assert r.header("x-route") == "headers"
    assert r.header("x-powered-by") is None and r.header("x-kept") == "yes"
    r = call(ex.port(LISTENER), "/headers/echo/headers", headers={"x-debug-internal": "secret", "x-other": "kept"})
    seen = r.json()["headers"]
    assert seen["x-gateway"] == "extproc-envoy"
    assert seen["x-client-address"] == "127.0.0.1"
    assert "x-debug-internal" not in seen and seen["x-other"] == "kept"
