"""The rate-limit admin view on a real Worker: requests charged through ext_authz Check, their
usage read back through GET /ratelimits/usage (memory store, real clock).

Proves that the admin reads the very counter a request is charged on (one count-by value, two
of them with a value that must be hashed into the key, `global`, `missing: ip`, a tier), that
reading charges nothing (the same answer twice, then the next request sees the count the
requests alone made), that a reset empties what usage shows, that the usage read needs the
bearer token while the rule list does not, the 400/404 answers, and 503 when the store does not
answer. Windows are a month and a slow bucket, so nothing a test does turns or refills them.
"""

from __future__ import annotations

import pytest

from tests.service.conftest import ADMIN_TOKEN_ENV, Running, Sidecar, check_request, header_options, run
from tests.support.procs import free_port

TOKEN = "usage-admin-token-91c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ODD_TENANT = "acme:eu/{weird}" + "x" * 80          # not usable as a key part: hashed, as on the charge path

RULES = [
    {"name": "per-user", "policies": ["api"], "count_by": ["user"], "algorithm": "fixed_window",
     "limit": 5, "period": "month", "tiers": {"gold": {"limit": 8}}},
    {"name": "per-user-tenant", "policies": ["api"], "count_by": ["user", "header:x-tenant"],
     "algorithm": "sliding_window", "limit": 10, "period": "month"},
    {"name": "everyone", "policies": ["api"], "count_by": ["global"], "algorithm": "token_bucket",
     "limit": 1000, "period": "day", "burst": 50},
    {"name": "per-team", "policies": ["api"], "count_by": ["header:x-team"], "missing": "ip",
     "algorithm": "fixed_window", "limit": 20, "period": "month", "mode": "shadow"},
]


@pytest.fixture(autouse=True)
def admin_token(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)         # after `sidecar`, which clears it


def config(sidecar: Sidecar, **store) -> dict:
    cfg = sidecar.config()
    cfg["rate_limits"] = {"rules": RULES, "store_timeout_ms": 200}
    if store:
        cfg["store"] = store
    return cfg


async def usage(rt: Running, rule: str, *values: str, auth: dict | None = AUTH, **extra: str) -> tuple[int, dict]:
    params = [("rule", rule), *(("value", v) for v in values), *extra.items()]
    return await rt.admin("GET", "/ratelimits/usage", params=params, headers=auth or {})


async def charge(rt: Running, sidecar: Sidecar, sub: str, n: int, *, headers: dict | None = None,
                 **claims) -> list[int]:
    """n Check calls as `sub`; the HTTP status each would get (200 or the deny status)."""
    token = sidecar.token(sub, extra=claims or None)
    statuses = []
    for _ in range(n):
        resp = await rt.check(check_request(policy="api", token=token, headers=headers))
        statuses.append(200 if resp.WhichOneof("http_response") == "ok_response"
                        else resp.denied_response.status.code)
    return statuses


def test_usage_reads_what_requests_were_charged_and_charges_nothing(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            status, fresh = await usage(rt, "per-user", "alice")
            assert status == 200, fresh
            assert fresh | {"reset_at": None} == {
                "rule": "per-user", "values": ["alice"], "count_by": ["user"], "tier": None, "tiers": ["gold"],
                "algorithm": "fixed_window", "period": "month", "mode": "enforce",
                "limit": 5, "used": 0, "remaining": 5, "reset_after_s": 0, "reset_after_ms": 0, "reset_at": None,
                "cost": 1, "allowed": True, "retry_after_s": 0, "retry_after_ms": 0,
                "window_s": fresh["window_s"], "window_ms": fresh["window_ms"],
                "key": "extproc:rl:{alice}:per-user:fw.1mo"}
            assert fresh["window_s"] in (28 * 86400, 29 * 86400, 30 * 86400, 31 * 86400)

            assert await charge(rt, sidecar, "alice", 3) == [200] * 3
            status, seen = await usage(rt, "per-user", "alice")
            assert status == 200
            assert (seen["used"], seen["remaining"], seen["allowed"]) == (3, 2, True)
            assert 0 < seen["reset_after_s"] <= seen["window_s"] and seen["reset_at"].endswith("Z")
            again = (await usage(rt, "per-user", "alice"))[1]
            assert (again["used"], again["remaining"]) == (3, 2)           # reading charged nothing

            # the next request sees only the three before it: remaining 5 - 4
            token = sidecar.token("alice")
            resp = await rt.check(check_request(policy="api", token=token))
            assert header_options(resp.ok_response.response_headers_to_add)["x-ratelimit-remaining"] == "1"
            assert await charge(rt, sidecar, "alice", 2) == [200, 429]
            status, full = await usage(rt, "per-user", "alice")
            assert (full["used"], full["remaining"], full["allowed"]) == (5, 0, False)
            assert full["retry_after_s"] >= 1 and full["retry_after_s"] == full["reset_after_s"]
            assert (await usage(rt, "per-user", "bob"))[1]["used"] == 0        # other partitions untouched

            # a reset empties what usage shows
            status, reset = await rt.admin("POST", "/ratelimits/reset", headers=AUTH,
                                           json={"rule": "per-user", "values": ["alice"]})
            assert (status, reset) == (200, {"rule": "per-user", "deleted": 1})
            assert (await usage(rt, "per-user", "alice"))[1]["remaining"] == 5
    run(body)


def test_usage_finds_the_key_for_several_values_global_missing_ip_and_tiers(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            tenant = {"x-tenant": ODD_TENANT}
            assert await charge(rt, sidecar, "carol", 2, headers=tenant) == [200, 200]
            assert await charge(rt, sidecar, "dave", 1, headers={"x-team": "blue"}) == [200]
            assert await charge(rt, sidecar, "erin", 6, tier="gold") == [200] * 6   # gold: 8 a month

            status, two = await usage(rt, "per-user-tenant", "carol", ODD_TENANT)
            assert status == 200 and (two["used"], two["remaining"]) == (2, 8)
            assert ODD_TENANT not in two["key"]                            # hashed into the key, as charged
            assert two["reset_after_ms"] > two["window_ms"]                # a sliding window empties a month later

            status, everyone = await usage(rt, "everyone")                 # `global` needs no value
            assert status == 200 and everyone["values"] == ["*"]
            assert (everyone["limit"], everyone["used"], everyone["remaining"]) == (50, 9, 41)
            assert everyone["refill_per_second_exact"] == "5/432"          # 1000 a day
            assert (await usage(rt, "everyone", "*"))[1]["used"] == 9

            # `missing: ip`: requests without x-team count under ip=<client ip>; a shadow rule counts too
            by_ip = (await usage(rt, "per-team", "ip=203.0.113.7"))[1]
            assert (by_ip["used"], by_ip["mode"]) == (8, "shadow")
            assert (await usage(rt, "per-team", "blue"))[1]["used"] == 1

            # tiers share the counter; the tier picks the limit
            gold = (await usage(rt, "per-user", "erin", tier="gold"))[1]
            assert (gold["tier"], gold["limit"], gold["used"], gold["remaining"], gold["allowed"]) == \
                ("gold", 8, 6, 2, True)
            plain = (await usage(rt, "per-user", "erin"))[1]
            assert (plain["limit"], plain["remaining"], plain["allowed"]) == (5, 0, False)
            assert gold["key"] == plain["key"]
            costly = (await usage(rt, "per-user", "erin", tier="gold", cost="3"))[1]
            assert (costly["cost"], costly["remaining"], costly["allowed"]) == (3, 2, False)
    run(body)


def test_rules_are_listed_without_a_token_and_usage_needs_one(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            status, listed = await rt.admin("GET", "/ratelimits")
            assert status == 200 and listed["store"] == "memory"
            assert [r["name"] for r in listed["rules"]] == [r["name"] for r in RULES]
            first = listed["rules"][0]
            assert {k: first[k] for k in ("algorithm", "limit", "period", "count_by", "mode", "fail")} == {
                "algorithm": "fixed_window", "limit": 5, "period": "month", "count_by": ["user"],
                "mode": "enforce", "fail": "open"}
            assert first["tiers"] == {"gold": {"limit": 8}}
            assert listed["rules"][2]["burst"] == 50

            assert (await usage(rt, "per-user", "alice", auth=None))[0] == 401
            assert (await usage(rt, "per-user", "alice", auth={"Authorization": "Bearer nope"}))[0] == 401
    run(body)


def test_usage_is_403_without_a_configured_token(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV)

    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            assert (await usage(rt, "per-user", "alice"))[0] == 403
            assert (await rt.admin("GET", "/ratelimits"))[0] == 200
    run(body)


@pytest.mark.parametrize(("params", "status", "message"), [
    ([("rule", "nope"), ("value", "a")], 404, "no rate-limit rule 'nope'"),
    ([("value", "a")], 400, "give one rule"),
    ([("rule", "per-user"), ("rule", "everyone")], 400, "give one rule"),
    ([("rule", "per-user")], 400, "counts by [user]: give 1 value(s)"),
    ([("rule", "per-user-tenant"), ("value", "a")], 400, "counts by [user, header:x-tenant]: give 2 value(s)"),
    ([("rule", "per-user"), ("value", "a"), ("tier", "platinum")], 400, "has no tier 'platinum' (its tiers: gold)"),
    ([("rule", "per-user"), ("value", "a"), ("cost", "0")], 400, "cost is one integer >= 1"),
    ([("rule", "per-user"), ("value", "a"), ("cost", "x")], 400, "cost is one integer >= 1"),
    ([("rule", "per-user"), ("value", "a"), ("user", "a")], 400, "unknown parameter(s) user"),
])
def test_bad_usage_requests(sidecar: Sidecar, params, status, message):
    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            got, err = await rt.admin("GET", "/ratelimits/usage", params=params, headers=AUTH)
            assert got == status and message in err["error"], err
    run(body)


def test_reset_checks_the_values_like_usage(sidecar: Sidecar):
    async def body():
        async with sidecar.run(config(sidecar)) as rt:
            status, err = await rt.admin("POST", "/ratelimits/reset", headers=AUTH,
                                         json={"rule": "per-user-tenant", "values": ["carol"]})
            assert status == 400 and "give 2 value(s)" in err["error"]
            status, _ = await rt.admin("POST", "/ratelimits/reset", headers=AUTH,
                                       json={"rule": "nope", "values": ["carol"]})
            assert status == 404
    run(body)


def test_store_down_is_503_never_a_guess(sidecar: Sidecar):
    async def body():
        cfg = config(sidecar, redis={"url": f"redis://127.0.0.1:{free_port()}", "timeout_ms": 50,
                                     "connect_timeout_ms": 100})
        async with sidecar.run(cfg) as rt:
            # requests still pass (fail-open rules, the local limiter), the admin view refuses to guess
            assert await charge(rt, sidecar, "alice", 2) == [200, 200]
            status, err = await usage(rt, "per-user", "alice")
            assert status == 503 and err["rule"] == "per-user"
            assert err["error"].startswith("store unavailable: ")
            assert (await rt.admin("GET", "/ratelimits"))[1]["store"] == "redis"
    run(body)
