"""The express lane (services/express.py): a repeat credential of a policy whose answer depends on
nothing else gets the stored reply bytes — and only while the full path would give the same one.

Driven through the real Worker's gRPC Check. Each test first shows the lane answering (its hit
count moves and the reply is the full path's), then changes one thing the full path checks
(revocation, the signing key, expiry, the header, the config) and shows the answer follows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb

from extproc import config as cfgmod
from extproc.app import Runtime
from extproc.demo import idp
from extproc.services import express as expressmod
from extproc.services import jwks as jwksmod
from tests.service.conftest import (
    Running,
    Sidecar,
    check_request,
    denied_body,
    eventually,
    header_options,
    run,
    sample,
    write_atomic,
)
from tests.support.keyserver import KeyServer

OK, UNAUTHENTICATED = 0, 16


def express(rt: Running) -> expressmod.Express:
    authz = rt.worker.authz
    assert authz is not None and authz._express is not None
    return authz._express


def hits(rt: Running) -> int:
    return express(rt).hits


async def allow(rt: Running, token: str, times: int) -> None:
    """`times` Checks of one token on policy api, each allowed."""
    for _ in range(times):
        assert (await rt.check(check_request(policy="api", token=token))).status.code == OK


def without_timing(resp: pb.CheckResponse) -> pb.CheckResponse:
    """The reply with its per-request Server-Timing header taken out."""
    out = pb.CheckResponse()
    out.CopyFrom(resp)
    keep = [o for o in out.ok_response.response_headers_to_add if o.header.key != "server-timing"]
    del out.ok_response.response_headers_to_add[:]
    out.ok_response.response_headers_to_add.extend(keep)
    return out


def decisions(policy: str) -> float:
    return sample("extproc_decisions_total", service="authz", policy=policy, result="allow", reason="ok")


def test_a_repeat_token_gets_the_full_paths_reply_and_is_counted(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            token = sidecar.token("alice")
            first = await rt.check(check_request(policy="api", token=token, headers={"x-jwt-sub": "mallory"}))
            assert first.status.code == OK and len(express(rt)) == 0      # seen once: nothing kept
            assert (await rt.check(check_request(policy="api", token=token))).status.code == OK
            assert hits(rt) == 0 and len(express(rt)) == 1                # allowed twice: kept
            before = (decisions("api"), sample("gateway_auth_decisions_total", policy="api", result="allow"),
                      sample("extproc_auth_cache_total", result="hit"),
                      sample("extproc_decision_duration_seconds_count", service="authz"))
            replies = [await rt.check(check_request(policy="api", token=token)) for _ in range(5)]
            assert hits(rt) == 5
            for r in replies:
                assert without_timing(r) == without_timing(first)
                assert header_options(r.ok_response.headers) == {"x-jwt-sub": "alice"}
                assert list(r.ok_response.headers_to_remove) == list(first.ok_response.headers_to_remove)
                assert dict(r.dynamic_metadata)["sub"] == "alice"
                timing = header_options(r.ok_response.response_headers_to_add)["server-timing"]
                assert timing.startswith("authz;dur=") and float(timing.split("=")[1]) >= 0
            # counted like the full path's cache hits, exactly (added once per event-loop turn)
            await eventually(lambda: decisions("api") == before[0] + 5, what="decisions counted")
            assert sample("gateway_auth_decisions_total", policy="api", result="allow") == before[1] + 5
            assert sample("extproc_auth_cache_total", result="hit") == before[2] + 5
            assert sample("extproc_decision_duration_seconds_count", service="authz") == before[3] + 5
            # the default policy (no policy named by the route) takes the same lane and entry
            assert (await rt.check(check_request(token=token))).status.code == OK
            assert hits(rt) == 6
    run(body)


def test_a_revoked_token_is_refused_at_once(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            token = sidecar.token("alice")
            await allow(rt, token, 4)
            assert hits(rt) == 2
            claims = _claims(token)
            await rt.worker.revocations.revoke_token(claims["jti"], claims["exp"])
            resp = await rt.check(check_request(policy="api", token=token))
            assert resp.status.code == UNAUTHENTICATED
            assert denied_body(resp)["reason"] == "token_revoked"
            assert hits(rt) == 2
            # and every token of a subject ("log out everywhere")
            other = sidecar.token("bob", now=time.time() - 5)
            await allow(rt, other, 3)
            await rt.worker.revocations.revoke_subject("bob", time.time())
            assert denied_body(await rt.check(check_request(policy="api", token=other)))["reason"] == "token_revoked"
    run(body)


def test_a_key_gone_from_the_jwks_stops_its_tokens(sidecar: Sidecar):
    a, b = idp.generate(), idp.generate()
    with KeyServer() as keys:
        keys.publish("/jwks", a.jwks())
        cfg = sidecar.config()
        cfg["providers"]["demo"] = {"issuer": idp.DEMO_ISSUER, "audiences": [idp.DEMO_AUDIENCE],
                                    "algorithms": ["RS256"], "jwks_uri": keys.url("/jwks"),
                                    "claims_to_headers": {"sub": "x-jwt-sub"}, "unknown_kid_refetch_seconds": 0.1}

        async def body():
            async with sidecar.run(cfg) as rt:
                old = a.mint("alice")
                await allow(rt, old, 3)
                assert hits(rt) == 1
                keys.publish("/jwks", b.jwks())        # rotated: key a is no longer published
                # a token of the new key makes the sidecar refetch (unknown kid)
                await eventually(lambda: _ok(rt, b.mint("carol")), what="the new key accepted")
                resp = await rt.check(check_request(policy="api", token=old))
                assert resp.status.code == UNAUTHENTICATED, resp
                assert hits(rt) == 1
        run(body)


async def _ok(rt: Running, token: str) -> bool:
    return (await rt.check(check_request(policy="api", token=token))).status.code == OK


def test_an_expired_token_is_refused(sidecar: Sidecar):
    cfg = sidecar.config()
    cfg["providers"]["demo"]["leeway_seconds"] = 0

    async def body():
        async with sidecar.run(cfg) as rt:
            # exp is whole seconds from a truncated iat: 2 s leaves at least 1 s for three Checks
            token = sidecar.token("alice", ttl_seconds=2)
            await allow(rt, token, 3)
            assert hits(rt) == 1

            async def refused() -> bool:
                resp = await rt.check(check_request(policy="api", token=token))
                return resp.status.code == UNAUTHENTICATED and denied_body(resp)["reason"] == "jwt_expired"
            await eventually(refused, within=6, what="the token expired")
    run(body)


def test_what_the_stored_reply_does_not_cover_goes_down_the_full_path(sidecar: Sidecar):
    async def body():
        async with sidecar.run(sidecar.config()) as rt:
            token = sidecar.token("alice")
            await allow(rt, token, 3)
            assert hits(rt) == 1
            # two Authorization headers (Envoy joins them): ambiguous, whatever was cached
            two = check_request(policy="api", token=token)
            two.attributes.request.http.headers["authorization"] = f"Bearer {token},Bearer {token}"
            resp = await rt.check(two)
            assert resp.status.code == UNAUTHENTICATED and denied_body(resp)["reason"] == "token_ambiguous"
            # headers past the bound: 431 from the full path
            big = check_request(policy="api", token=token, headers={"x-big": "x" * 70_000})
            resp = await rt.check(big)
            assert resp.denied_response.status.code == 431
            # a public policy is never in the lane
            assert (await rt.check(check_request(policy="public", token=token))).status.code == OK
            assert (await rt.check(check_request(policy="public", token=token))).status.code == OK
            assert hits(rt) == 1
    run(body)


def test_a_reload_starts_an_empty_table(sidecar: Sidecar):
    cfg = sidecar.config()

    async def body():
        async with sidecar.run(cfg, config_file=True) as rt:
            token = sidecar.token("alice")
            await allow(rt, token, 3)
            assert hits(rt) == 1
            cfg["policies"]["api"]["auth"]["scopes"] = ["orders:read"]    # alice's token has none
            assert rt.config_path is not None
            write_atomic(rt.config_path, yaml.safe_dump(cfg, sort_keys=False))
            assert await rt.worker.reload("test") == (True, "reloaded")
            resp = await rt.check(check_request(policy="api", token=token))
            assert resp.denied_response.status.code == 403
            assert hits(rt) == 0
    run(body)


def test_a_token_of_the_second_provider_of_an_any_of_policy_takes_the_lane(sidecar: Sidecar, tmp_path, monkeypatch):
    monkeypatch.setattr(jwksmod, "MIN_REFRESH_SECONDS", 0.02)       # the JWKS file is watched that often
    other = idp.generate()
    jwks = tmp_path / "partner.json"
    jwks.write_text(json.dumps(other.jwks()))
    cfg = sidecar.config()
    cfg["providers"]["partner"] = {**cfg["providers"]["demo"], "issuer": "https://partner.example",
                                   "jwks_file": str(jwks)}
    cfg["policies"]["api"]["auth"]["providers"] = ["demo", "partner"]

    async def body():
        async with sidecar.run(cfg) as rt:
            token = other.mint("pat", issuer="https://partner.example")
            await allow(rt, token, 2)
            assert len(express(rt)) == 1
            full = without_timing(await rt.check(check_request(policy="api", token=token)))
            assert hits(rt) == 1
            assert [(o.header.key, o.header.value) for o in full.ok_response.headers] == [("x-jwt-sub", "pat")]
            # the partner's key rotated out: the stored reply is not used, the full path refuses
            jwks.write_text(json.dumps(idp.generate().jwks()))
            await eventually(lambda: _refused(rt, token), within=10, what="the partner key rotated out")
            assert hits(rt) == 1
    run(body)


async def _refused(rt: Running, token: str) -> bool:
    return (await rt.check(check_request(policy="api", token=token))).status.code == UNAUTHENTICATED


def _claims(token: str) -> dict[str, Any]:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


def _lanes(sidecar: Sidecar, change) -> set[str]:
    cfg = sidecar.config()
    change(cfg)
    return set(expressmod.Express(Runtime.build(cfgmod.Config.model_validate(cfg)), None).lanes)


def test_which_policies_take_the_lane(sidecar: Sidecar):
    assert _lanes(sidecar, lambda c: None) == {"api", "", "api-shadow"}     # "": the default policy

    def rules(c):
        c["policies"]["api"]["rules"] = [{"name": "no-delete", "effect": "deny", "when": {"methods": ["DELETE"]}}]
    assert "api" not in _lanes(sidecar, rules)

    def ip(c):
        c["policies"]["api"]["ip"] = {"allow": ["10.0.0.0/8"]}
    assert "api" not in _lanes(sidecar, ip)

    def limited(c):
        c["rate_limits"] = {"rules": [{"name": "per-user", "policies": ["api"], "count_by": ["user"], "limit": 10}]}
    assert _lanes(sidecar, limited) == {"api-shadow"}      # and not the default, which is api

    def limited_everywhere(c):
        c["rate_limits"] = {"rules": [{"name": "per-ip", "count_by": ["ip"], "limit": 10}]}
    assert _lanes(sidecar, limited_everywhere) == set()

    def tier_only(c):
        c["rate_limits"] = {"rules": [{"name": "free", "api_key_tiers": ["free"], "count_by": ["api_key"],
                                       "limit": 10}]}
    assert "api" in _lanes(sidecar, tier_only)

    def cookie(c):
        c["providers"]["demo"]["token_sources"] = [{"header": "authorization", "prefix": "Bearer "},
                                                    {"cookie": "session"}]
    assert _lanes(sidecar, cookie) == set()

    def two_places(c):
        c["providers"]["partner"] = {**c["providers"]["demo"], "issuer": "https://partner.example",
                                     "token_sources": [{"header": "x-partner-token"}]}
        c["policies"]["api"]["auth"]["providers"] = ["demo", "partner"]
    assert "api" not in _lanes(sidecar, two_places)

    def logs(c):
        c["telemetry"] = {"decision_logs": True}
    assert _lanes(sidecar, logs) == set()


def test_the_tally_adds_what_observe_and_inc_would_have():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    a = Histogram("a_seconds", "a", ["s"], buckets=(0.001, 0.01, 0.1), registry=reg).labels("x")
    b = Histogram("b_seconds", "b", ["s"], buckets=(0.001, 0.01, 0.1), registry=reg).labels("x")
    values = [0.0005, 0.001, 0.002, 0.05, 0.5, 2.0, 0.01]
    hits = Counter("hits", "h", ["s"], registry=reg)
    one, other = hits.labels("one"), hits.labels("other")
    tally = expressmod.Tally(b)
    for i, v in enumerate(values):
        a.observe(v)
        tally.counters.append((one, other) if i % 2 else (one,))     # what Tally.add appends
        tally.durations.append(v)
    tally.flush()
    assert (one._value.get(), other._value.get()) == (len(values), len(values) // 2)
    assert tally.counters == [] and tally.durations == []
    tally.flush()                                                       # nothing pending: nothing added
    assert one._value.get() == len(values)

    def samples(name: str) -> list[tuple[str, float]]:
        return [(s.labels.get("le", s.name[len(name):]), s.value)
                for m in reg.collect() if m.name == name for s in m.samples if not s.name.endswith("_created")]
    assert samples("a_seconds") == samples("b_seconds")


def test_the_identity_caches_are_bounded_by_token_cache_entries(sidecar: Sidecar):
    """`server.token_cache_entries` bounds the verified-token cache, the decision cache and the
    express table (LRU); a reload applies a new bound."""
    cfg = sidecar.config()
    cfg["server"]["token_cache_entries"] = 2

    def sizes(rt: Running) -> tuple[int, int, int]:
        identity = rt.worker.runtime.identity
        return len(identity.token_cache), len(identity.decisions), len(express(rt))

    async def body():
        async with sidecar.run(cfg, config_file=True) as rt:
            tokens = [sidecar.token(f"user{i}") for i in range(4)]
            for token in tokens:
                await allow(rt, token, 3)
            assert sizes(rt) == (2, 2, 2)
            seen = hits(rt)
            await allow(rt, tokens[-1], 1)           # among the most recent: kept
            assert hits(rt) == seen + 1
            await allow(rt, tokens[0], 1)            # evicted: decided again by the full path, still allowed
            assert hits(rt) == seen + 1
            cfg["server"]["token_cache_entries"] = 3
            assert rt.config_path is not None
            write_atomic(rt.config_path, yaml.safe_dump(cfg, sort_keys=False))
            assert await rt.worker.reload("test") == (True, "reloaded")
            assert rt.worker.cfg.server.token_cache_entries == 3
            for token in tokens:
                await allow(rt, token, 3)
            assert sizes(rt) == (3, 3, 3)
    run(body)
