"""Rate limits through the real Envoy: two sidecar workers sharing a real Redis."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from extproc.demo import idp
from tests.support.http import burst, get, request
from tests.support.procs import wait_until
from tests.support.stack import restart_redis, two_workers_on_redis

pytestmark = pytest.mark.e2e

N = 12          # the limit every exactness rule uses
EXTRA = 8       # requests beyond it in the burst

RULES = [
    {"name": "tb", "policies": ["api"], "when": {"path_prefix": ["/api/products"]}, "count_by": ["user"],
     "algorithm": "token_bucket", "limit": N, "period": "hour", "burst": N},
    {"name": "sw", "policies": ["api"], "when": {"path_prefix": ["/api/orders"]}, "count_by": ["user"],
     "algorithm": "sliding_window", "limit": N, "period": "hour"},
    {"name": "fw", "policies": ["api"], "when": {"path_prefix": ["/api/users"]}, "count_by": ["user"],
     "algorithm": "fixed_window", "limit": N, "period": "month"},
    {"name": "strict-closed", "policies": ["payments"], "count_by": ["user"], "algorithm": "fixed_window",
     "limit": 1000, "period": "minute", "fail": "closed"},
    {"name": "by-header", "policies": ["api"], "when": {"path_prefix": ["/api/echo"]},
     "count_by": ["header:x-tenant"], "limit": 3, "period": "hour"},
    {"name": "shadowed", "policies": ["api"], "when": {"path_prefix": ["/api/echo"]}, "count_by": ["user"],
     "limit": 1, "period": "hour", "mode": "shadow"},
]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """The shipped configs, two workers, one Redis; the rate-limit rules scaled down for tests."""
    with two_workers_on_redis(tmp_path_factory.mktemp("ratelimit"),
                              {"rate_limits": {"store_timeout_ms": 100, "rules": RULES}}) as s:
        yield s




@pytest.mark.parametrize(("rule", "path"), [("tb", "/api/products/1"), ("sw", "/api/orders"), ("fw", "/api/users/1")])
def test_exactly_n_admitted_across_two_replicas(limited, rule, path):
    token = idp.load_or_create(limited.dir).mint(f"burst-{rule}")
    responses = burst(f"{limited.external}{path}", token, N + EXTRA)
    seen = Counter(r.status for r in responses)
    assert seen[429] == EXTRA and sum(v for k, v in seen.items() if k != 429) == N, seen
    assert f'gateway_ratelimit_decisions_total{{result="near_limit",rule="{rule}"}}' in _metrics(limited)
    rejected = [r for r in responses if r.status == 429]
    for r in rejected:
        body = r.json()
        assert body["reason"] == "rate_limited" and rule in body["message"]
        assert int(r.header("retry-after")) >= 1
        assert r.header("x-ratelimit-limit") == str(N) and r.header("x-ratelimit-remaining") == "0"
        assert r.header("ratelimit-policy") and r.header("ratelimit")


def test_allowed_responses_carry_the_headers(limited):
    token = idp.load_or_create(limited.dir).mint("headers-user")
    r = get(f"{limited.external}/api/products/2", token)
    assert r.status == 200
    assert r.header("x-ratelimit-limit") == str(N)
    assert int(r.header("x-ratelimit-remaining")) == N - 1
    assert f'"tb";q={N}' in r.header("ratelimit-policy")


def test_other_users_are_not_affected(limited):
    a = idp.load_or_create(limited.dir).mint("noisy")
    b = idp.load_or_create(limited.dir).mint("quiet")
    burst(f"{limited.external}/api/products/1", a, N + 2)
    assert get(f"{limited.external}/api/products/1", a).status == 429
    assert get(f"{limited.external}/api/products/1", b).status == 200


def test_missing_count_by_value_skips_the_rule_and_shadow_never_rejects(limited):
    token = idp.load_or_create(limited.dir).mint("tenantless")
    # no x-tenant header: "by-header" does not apply (never one shared bucket); "shadowed" (limit 1)
    # only counts
    statuses = [get(f"{limited.external}/api/echo", token).status for _ in range(6)]
    assert statuses == [200] * 6
    tenant = [get(f"{limited.external}/api/echo", token, headers={"x-tenant": "acme"}).status for _ in range(5)]
    assert tenant == [200, 200, 200, 429, 429]
    text = _metrics(limited)
    assert 'gateway_ratelimit_decisions_total{result="shadow_over_limit",rule="shadowed"}' in text


def test_redis_down_fail_open_uses_the_local_limiter_and_fail_closed_answers_503(limited):
    token = idp.load_or_create(limited.dir).mint("during-outage")
    pay = idp.load_or_create(limited.dir).mint("payer", scopes=["read", "write"])
    assert get(f"{limited.external}/api/payments/p1", pay).status in (200, 404)
    limited.redis.proc.kill()
    try:
        r = get(f"{limited.external}/api/products/3", token)
        assert r.status == 200                              # fail-open rule: local limiter
        r = get(f"{limited.external}/api/payments/p1", pay)
        assert r.status == 503 and r.header("retry-after") == "1"   # fail-closed rule
        # the local limiter still limits: a burst on one user is cut near N per replica
        statuses = Counter(x.status for x in burst(f"{limited.external}/api/products/4", token, 3 * N))
        assert statuses[429] > 0 and statuses[200] <= 2 * N, statuses
    finally:
        limited.redis.proc = restart_redis(limited.redis)
    wait_until(lambda: get(f"{limited.external}/api/payments/p1", pay).status in (200, 404), timeout=20,
               what="Redis' return picked up")


def test_admin_can_reset_a_partition(limited):
    token = idp.load_or_create(limited.dir).mint("reset-me")
    burst(f"{limited.external}/api/orders", token, N + 1)
    assert get(f"{limited.external}/api/orders", token).status == 429
    r = request("POST", f"{limited.sidecar_admin}/ratelimits/reset",
                {"Authorization": f"Bearer {limited.admin_token}", "content-type": "application/json"},
                json.dumps({"rule": "sw", "values": ["reset-me"]}).encode())
    assert r.status == 200, r.body
    wait_until(lambda: get(f"{limited.external}/api/orders", token).status == 200, timeout=10,
               what="the partition usable again on every worker")


def _metrics(s) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{s.sidecar_admin}/metrics", timeout=5) as resp:
        return resp.read().decode()
