"""The rate-limit usage view through the real Envoy: two sidecar workers sharing a real Redis,
requests balanced over both by Envoy, usage read back on the supervisor's admin API."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from extproc.demo import idp
from tests.support.http import burst, get, request
from tests.support.procs import wait_until
from tests.support.stack import get_json, restart_redis, two_workers_on_redis

pytestmark = pytest.mark.e2e

LIMIT = 20
RULES = [
    {"name": "usage-fw", "policies": ["api"], "when": {"path_prefix": ["/api/products"]}, "count_by": ["user"],
     "algorithm": "fixed_window", "limit": LIMIT, "period": "month"},
    {"name": "usage-tb", "policies": ["api"], "when": {"path_prefix": ["/api/products"]},
     "count_by": ["user", "route"], "algorithm": "token_bucket", "limit": 100, "period": "day", "burst": 50},
]


@pytest.fixture(scope="module")
def usage_stack(tmp_path_factory):
    """The shipped configs, two workers, one Redis, two usage rules."""
    with two_workers_on_redis(tmp_path_factory.mktemp("ratelimit-usage"),
                              {"rate_limits": {"store_timeout_ms": 100, "rules": RULES}}) as s:
        yield s


def usage(s, rule: str, *values: str) -> dict:
    query = urlencode([("rule", rule), *(("value", v) for v in values)])
    r = request("GET", f"{s.sidecar_admin}/ratelimits/usage?{query}", {"Authorization": f"Bearer {s.admin_token}"})
    assert r.status == 200, r.body
    return r.json()


def test_usage_after_n_requests_over_two_workers(usage_stack):
    s = usage_stack
    token = idp.load_or_create(s.dir).mint("usage-e2e")
    n = 7
    responses = burst(f"{s.external}/api/products/1", token, n)
    assert [r.status for r in responses] == [200] * n

    fw = usage(s, "usage-fw", "usage-e2e")
    assert (fw["limit"], fw["used"], fw["remaining"], fw["allowed"]) == (LIMIT, n, LIMIT - n, True)
    assert fw["algorithm"] == "fixed_window" and 0 < fw["reset_after_s"] <= 31 * 86400
    tb = usage(s, "usage-tb", "usage-e2e", "api")       # the route is the policy name without a route name
    assert (tb["limit"], tb["used"], tb["remaining"]) == (50, n, 50 - n)
    assert usage(s, "usage-fw", "usage-e2e")["used"] == n       # reading charged nothing

    # the next request through Envoy is the (n+1)th: its headers agree with the usage view
    r = get(f"{s.external}/api/products/1", token)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == str(LIMIT - n - 1)
    assert usage(s, "usage-fw", "usage-e2e")["remaining"] == LIMIT - n - 1

    # the rules in force, without the token; usage itself needs it
    listed = get_json(f"{s.sidecar_admin}/ratelimits")
    assert [r["name"] for r in listed["rules"]] == ["usage-fw", "usage-tb"] and listed["store"] == "redis"
    denied = request("GET", f"{s.sidecar_admin}/ratelimits/usage?rule=usage-fw&value=usage-e2e")
    assert denied.status == 401

    # a reset through the admin API shows up in usage at once
    r = request("POST", f"{s.sidecar_admin}/ratelimits/reset",
                {"Authorization": f"Bearer {s.admin_token}", "content-type": "application/json"},
                json.dumps({"rule": "usage-fw", "values": ["usage-e2e"]}).encode())
    assert r.status == 200, r.body
    assert usage(s, "usage-fw", "usage-e2e")["remaining"] == LIMIT


def test_usage_is_503_while_redis_is_down(usage_stack):
    s = usage_stack
    s.redis.proc.kill()
    try:
        r = request("GET", f"{s.sidecar_admin}/ratelimits/usage?rule=usage-fw&value=anyone",
                    {"Authorization": f"Bearer {s.admin_token}"})
        assert r.status == 503 and r.json()["error"].startswith("store unavailable")
    finally:
        s.redis.proc = restart_redis(s.redis)
    wait_until(lambda: request("GET", f"{s.sidecar_admin}/ratelimits/usage?rule=usage-fw&value=anyone",
                               {"Authorization": f"Bearer {s.admin_token}"}).status == 200,
               timeout=20, what="usage answering again")


def test_the_supervisors_admin_api_follows_a_reload(usage_stack):
    """Under --workers N the admin API lives in the supervisor: a reload that adds a rule makes it
    readable there (and the workers enforce it)."""
    s = usage_stack
    added = {"name": "usage-added", "policies": ["api"], "when": {"path_prefix": ["/api/users"]},
             "count_by": ["user"], "algorithm": "fixed_window", "limit": 5, "period": "hour"}
    s.write_sidecar_config({"server.workers": 2, "store": {"redis": {"url": s.redis.url, "timeout_ms": 50}},
                            "rate_limits": {"store_timeout_ms": 100, "rules": [*RULES, added]}})
    r = request("POST", f"{s.sidecar_admin}/reload", {"Authorization": f"Bearer {s.admin_token}"})
    assert r.status == 200, r.body
    names = [rule["name"] for rule in get_json(f"{s.sidecar_admin}/ratelimits")["rules"]]
    assert "usage-added" in names
    assert usage(s, "usage-added", "nobody-yet")["remaining"] == 5
