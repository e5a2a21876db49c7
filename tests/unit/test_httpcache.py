"""RFC 9111 rules of core/httpcache.py, and the cache's pure parts (purge records, the LRU)."""

from __future__ import annotations

import asyncio

import pytest

from extproc import config as cfgmod
from extproc.core import httpcache as hc
from extproc.services.cache import CachePlan, MemoryTier, Purge, PurgeLog, ResponseCache

NOW = 1_800_000_000.0

POLICY = hc.StorePolicy(statuses=frozenset(hc.DEFAULT_STATUSES), default_ttl=None, max_ttl=86_400.0,
                        max_body_bytes=1000, per_user=False)


def verdict(status=200, authenticated=False, policy=POLICY, rtt=0.0, **headers):
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    h.setdefault("content-length", "10")
    return hc.storable(status, h, policy, authenticated=authenticated, request_time=NOW - rtt, response_time=NOW)


# -- Cache-Control ---------------------------------------------------------------------------------

def test_cache_control_parsing():
    cc = hc.cache_control('Public, MAX-AGE=60, s-maxage="120", no-cache="set-cookie, x", ,garbage=, private')
    assert cc == {"public": "", "max-age": "60", "s-maxage": "120", "no-cache": "set-cookie, x",
                  "garbage": "", "private": ""}
    assert hc.cache_control(None) == {} and hc.cache_control("") == {}
    assert hc.cache_control("max-age=1, max-age=2") == {"max-age": "1"}     # first wins
    assert hc.seconds({"max-age": "-1"}, "max-age") is None
    assert hc.seconds({"max-age": "99999999999999"}, "max-age") == 2**31 - 1


# -- requests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "headers", "reason"), [
    ("GET", {}, None),
    ("HEAD", {}, None),
    ("POST", {}, "method"),
    ("GET", {"range": "bytes=0-1"}, "range"),
    ("GET", {"upgrade": "websocket", "connection": "Upgrade"}, "upgrade"),
    ("GET", {"accept": "text/event-stream"}, "event_stream"),
    ("GET", {"content-type": "application/grpc+proto"}, "grpc"),
    ("GET", {"cache-control": "no-store"}, "no_store"),
])
def test_request_bypass(method, headers, reason):
    assert hc.request_bypass(method, headers, {"GET", "HEAD"}) == reason


def test_request_revalidation_directives():
    assert hc.request_wants_revalidation({"cache-control": "no-cache"})
    assert hc.request_wants_revalidation({"cache-control": "max-age=0"})
    assert hc.request_wants_revalidation({"pragma": "no-cache"})
    assert not hc.request_wants_revalidation({"pragma": "no-cache", "cache-control": "max-age=5"})
    assert not hc.request_wants_revalidation({})


def test_query_normalisation():
    assert hc.normalise_query("b=2&a=1&a=0", "sorted") == "a=1&a=0&b=2"
    assert hc.normalise_query("b=2&a=1", "as_is") == "b=2&a=1"
    assert hc.normalise_query("b=2&a=1", "ignore") == ""
    assert hc.normalise_query("a=1&utm_source=x&utm_medium=y&fbclid=z", "sorted", ["utm_*", "fbclid"]) == "a=1"
    assert hc.normalise_query("a=1&b=2&c=3", "sorted", only=["c", "a"]) == "a=1&c=3"
    assert hc.normalise_query("q=a%20b&x=%26", "sorted") == "q=a%20b&x=%26"


def test_digest_separates_its_parts():
    assert hc.digest("ab", "c") != hc.digest("a", "bc")
    assert hc.digest("x") == hc.digest("x") and len(hc.digest("x")) == 40


def test_variant_keys_follow_the_vary_values():
    k1 = hc.variant_key("p", ["accept-language"], {"accept-language": "en"})
    assert k1 == hc.variant_key("p", ["accept-language"], {"accept-language": " en "})
    assert k1 != hc.variant_key("p", ["accept-language"], {"accept-language": "de"})
    assert k1 != hc.variant_key("p", ["accept-language"], {})


@pytest.mark.parametrize(("headers", "expected"), [
    ({"if-none-match": '"a"'}, True),
    ({"if-none-match": 'W/"a"'}, True),          # weak comparison
    ({"if-none-match": '"b", "a"'}, True),
    ({"if-none-match": "*"}, True),
    ({"if-none-match": '"b"'}, False),
    ({"if-none-match": '"b"', "if-modified-since": "Wed, 02 Sep 2026 10:00:00 GMT"}, False),   # INM decides
    ({"if-modified-since": "Wed, 02 Sep 2026 10:00:00 GMT"}, True),
    ({"if-modified-since": "Mon, 31 Aug 2026 10:00:00 GMT"}, False),
    ({"if-modified-since": "garbage"}, False),
    ({}, False),
])
def test_not_modified(headers, expected):
    assert hc.not_modified(headers, '"a"', "Tue, 01 Sep 2026 10:00:00 GMT") is expected


# -- storability and freshness ----------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"status": 500, "cache_control": "max-age=60"}, "status"),
    ({"cache_control": "no-store, max-age=60"}, "no_store"),
    ({"cache_control": "private, max-age=60"}, "private"),
    ({"cache_control": "max-age=60", "set_cookie": "a=b"}, "set_cookie"),
    ({"cache_control": "max-age=60", "vary": "Accept, *"}, "vary_star"),
    ({"cache_control": "max-age=60", "content_length": "1001"}, "too_large"),
    ({"cache_control": "max-age=60", "content_length": "abc"}, "no_content_length"),
    ({}, "no_freshness"),
    ({"cache_control": "no-cache"}, "no_cache_without_validator"),
    ({"cache_control": "max-age=60", "authenticated": True}, "authenticated"),
    ({"cache_control": "max-age=0"}, "already_stale"),
    ({"cache_control": "max-age=60", "content_type": "text/event-stream"}, "streaming"),
    ({"cache_control": "max-age=60", "content_type": "application/grpc"}, "streaming"),
])
def test_responses_that_are_not_stored(kwargs, reason):
    assert verdict(**kwargs).reason == reason


def test_no_content_length_is_not_stored():
    v = hc.storable(200, {"cache-control": "max-age=60"}, POLICY, authenticated=False, request_time=NOW,
                    response_time=NOW)
    assert v.reason == "no_content_length"


@pytest.mark.parametrize("cc", ["public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"])
def test_authenticated_responses_the_response_allows(cc):
    assert verdict(cache_control=cc, authenticated=True).ok


def test_per_user_rules_store_private_and_authenticated_responses():
    per_user = hc.StorePolicy(frozenset({200}), None, 3600.0, 1000, per_user=True)
    assert verdict(cache_control="private, max-age=60", authenticated=True, policy=per_user).ok


def test_lifetime_precedence_and_caps():
    assert verdict(cache_control="max-age=60, s-maxage=120").lifetime == 120
    assert verdict(cache_control="max-age=60").lifetime == 60
    v = verdict(expires="Thu, 01 Jan 2026 00:01:00 GMT", date="Thu, 01 Jan 2026 00:00:00 GMT")
    assert v.ok and v.lifetime == 60
    assert verdict(expires="garbage", etag='"x"').lifetime == 0          # invalid Expires: already expired
    with_default = hc.StorePolicy(frozenset({200}), 300.0, 120.0, 1000, per_user=False)
    assert verdict(policy=with_default).lifetime == 120                  # the default, capped by max_ttl
    assert verdict(cache_control="max-age=999999").lifetime == 86_400    # capped


def test_revalidation_and_stale_directives():
    v = verdict(cache_control="max-age=60, stale-while-revalidate=30, stale-if-error=600")
    assert (v.swr, v.sie, v.must_revalidate) == (30, 600, False)
    v = verdict(cache_control="s-maxage=60, stale-if-error=600")
    assert v.must_revalidate and v.sie == 0                              # s-maxage implies proxy-revalidate
    v = verdict(cache_control="no-cache", etag='"v"')
    assert v.ok and v.no_cache
    defaults = hc.StorePolicy(frozenset({200}), 60.0, 3600.0, 1000, False, stale_while_revalidate=5,
                              stale_if_error=50)
    v = verdict(policy=defaults)
    assert (v.swr, v.sie) == (5, 50)


def test_age_is_corrected_by_the_upstream_age_and_the_round_trip():
    v = verdict(cache_control="max-age=60", age="10", rtt=2.0)
    assert v.initial_age == 12
    entry = hc.build_entry(200, [("content-type", b"text/plain")], b"0123456789", v, url="/x", tags=[],
                           request_time=NOW - 2, response_time=NOW, etag="", last_modified="")
    assert hc.age(entry, NOW) == 12 and hc.age(entry, NOW + 30) == 42
    assert hc.state(entry, NOW + 47) == "fresh" and hc.state(entry, NOW + 49) == "stale"


def test_entry_states_over_time():
    v = verdict(cache_control="max-age=10, stale-while-revalidate=5, stale-if-error=20")
    e = hc.build_entry(200, [], b"x" * 10, v, url="/x", tags=[], request_time=NOW, response_time=NOW,
                       etag="", last_modified="")
    assert hc.state(e, NOW + 5) == "fresh"
    assert hc.state(e, NOW + 5, request_revalidates=True) == "stale"
    assert hc.state(e, NOW + 12) == "stale_revalidate" and hc.may_stand_in(e, NOW + 12)
    assert hc.state(e, NOW + 20) == "stale_if_error" and hc.may_stand_in(e, NOW + 20)
    assert hc.state(e, NOW + 40) == "stale" and not hc.may_stand_in(e, NOW + 40)
    strict = hc.build_entry(200, [], b"", verdict(cache_control="max-age=10, must-revalidate, stale-if-error=60"),
                            url="/x", tags=[], request_time=NOW, response_time=NOW, etag="", last_modified="")
    assert hc.state(strict, NOW + 12) == "stale" and not hc.may_stand_in(strict, NOW + 12)


def test_entries_drop_hop_by_hop_fields_and_round_trip():
    v = verdict(cache_control="max-age=60")
    e = hc.build_entry(200, [(":status", b"200"), ("connection", b"close"), ("age", b"5"), ("content-length", b"10"),
                             ("content-type", b"application/json"), ("link", b"<a>"), ("link", b"<b>")],
                       b"0123456789", v, url="/p?q=1", tags=["t"], request_time=NOW, response_time=NOW,
                       etag='"e"', last_modified="")
    assert [(h.name, h.value) for h in e.headers] == [("content-type", b"application/json"), ("link", b"<a>"),
                                                      ("link", b"<b>")]
    back = hc.decode(e.SerializeToString())
    assert back == e
    assert hc.decode(b"\xff\xfe garbage") is None
    e.format_version = 2
    assert hc.decode(e.SerializeToString()) is None                       # unknown format: a miss


def test_a_304_refreshes_the_entry():
    v = verdict(cache_control="max-age=10", etag='"a"')
    e = hc.build_entry(200, [("etag", b'"a"'), ("x-old", b"1")], b"body", v, url="/x", tags=[],
                       request_time=NOW, response_time=NOW, etag='"a"', last_modified="")
    v2 = verdict(cache_control="max-age=100", etag='"a"')
    fresh = hc.refreshed(e, [(":status", b"304"), ("cache-control", b"max-age=100"), ("x-old", b"2")], v2,
                         request_time=NOW + 50, response_time=NOW + 50)
    assert fresh.body == b"body" and hc.state(fresh, NOW + 120) == "fresh"
    assert {h.name: h.value for h in fresh.headers}["x-old"] == b"2"


def test_tags():
    assert hc.tags_of({"cache-tag": "a, b,c", "surrogate-key": "d  e"}) == ["a", "b", "c", "d", "e"]
    assert hc.tags_of({}) == []


# -- the cache's pure parts ---------------------------------------------------------------------------

def _entry(url="/api/x", at=NOW, tags=()):
    e = hc.build_entry(200, [], b"x", verdict(cache_control="max-age=60"), url=url, tags=tags,
                       request_time=at, response_time=at, etag="", last_modified="")
    return e


def test_purge_records_void_older_entries_only():
    log = PurgeLog(None)
    old, new = _entry("/api/products/1?a=1", NOW - 10, ["t1"]), _entry("/api/products/1", NOW + 10)
    log.apply(Purge("path", "/api/products/1", int(NOW * 1000)))
    assert log.void(old, "k") and not log.void(new, "k")
    log2 = PurgeLog(None)
    log2.apply(Purge("prefix", "/api/", int(NOW * 1000)))
    assert log2.void(old, "k") and not log2.void(_entry("/other", NOW - 10), "k")
    log3 = PurgeLog(None)
    log3.apply(Purge("tag", "t1", int(NOW * 1000)))
    assert log3.void(old, "k") and not log3.void(_entry("/api/products/1", NOW - 10, ["t2"]), "k")
    log4 = PurgeLog(None)
    log4.apply(Purge("key", "k", int(NOW * 1000)))
    assert log4.void(old, "k") and not log4.void(old, "other")


def test_bounding_the_purge_records_never_resurrects_an_entry():
    log = PurgeLog(None, max_records=16)
    victim = _entry("/p/0", NOW - 100)
    log.apply(Purge("path", "/p/0", int((NOW - 50) * 1000)))
    for i in range(1, 40):
        log.apply(Purge("path", f"/p/{i}", int((NOW + i) * 1000)))
    assert len(log) <= 16
    assert log.void(victim, "k")            # its record was dropped, the floor still voids it
    assert not log.void(_entry("/p/0", NOW + 100), "k")


def test_purge_messages_round_trip():
    p = Purge("prefix", "/a b/ü", 123)
    assert Purge.from_message(p.message()) == p
    assert Purge.parse(p.member(), 123) == p
    assert Purge.from_message(b"garbage") is None and Purge.parse("nope:x", 1) is None


def test_the_memory_tier_stays_within_its_byte_bound():
    tier = MemoryTier(10_000)
    e = _entry()
    for i in range(1000):
        tier.put(f"k{i}", e, 500)
        assert tier.bytes <= 10_000
    assert len(tier) == 10_000 // (500 + MemoryTier.OVERHEAD)
    assert tier.get("k999") is e and tier.get("k0") is None
    tier.put("huge", e, 20_000)                 # larger than the whole tier: not kept
    assert tier.get("huge") is None


def test_rules_match_by_policy_then_path():
    cfg = cfgmod.Cache.model_validate({"rules": [
        {"name": "a", "policies": ["api"], "path_prefix": ["/api/products"], "ttl": 60},
        {"name": "b", "path_regex": "^/status/2", "ttl": 60},
    ]})
    plan = CachePlan.compile(cfg)
    assert plan.rule_for("api", "/api/products/1").name == "a"
    assert plan.rule_for("api", "/status/200").name == "b"
    assert plan.rule_for("public", "/api/products/1") is None
    assert plan.rule_for("public", "/status/200").name == "b"
    assert plan.applies_to("anything")


def test_a_leader_that_ends_without_an_answer_releases_its_waiters():
    async def run():
        cfg = cfgmod.Cache.model_validate({"rules": [{"name": "r", "ttl": 60}], "collapse_timeout_ms": 400})
        cache = ResponseCache(cfg, None)
        rule = cache.plan.rules[0]
        headers = {":path": "/x", ":authority": "h", ":method": "GET"}
        leader = await cache.lookup(rule, "GET", headers, {})
        assert leader.leader
        waiter = asyncio.ensure_future(cache.lookup(rule, "GET", headers, {}))
        await asyncio.sleep(0)
        cache.finish(leader)                      # e.g. the client aborted
        got = await asyncio.wait_for(waiter, 1)
        assert got.status == "MISS" and not got.leader and not cache._pending
        # a waiter cancelled with its stream leaves nothing behind
        again = await cache.lookup(rule, "GET", headers, {})
        w = asyncio.ensure_future(cache.lookup(rule, "GET", headers, {}))
        await asyncio.sleep(0)
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        assert not cache._pending[again.pending_key].done()
        cache.finish(again)
        assert not cache._pending

    asyncio.run(run())


def test_what_is_derived_from_an_entry_lives_and_dies_with_it():
    tier = MemoryTier(3 * (100 + MemoryTier.OVERHEAD))
    a, b = _entry("/a"), _entry("/b")
    tier.put("a", a, 100)
    tier.set_extra("a", a, "reply-a")
    assert tier.extra("a", a) == "reply-a"
    assert tier.extra("a", b) is None                 # only for the very entry it was built from
    tier.put("a", b, 100)                             # replaced: the old derivation goes
    assert tier.extra("a", b) is None
    tier.set_extra("a", b, "reply-b")
    for i in range(5):                                # evicted: gone too
        tier.put(f"k{i}", _entry(), 100)
    assert tier.get("a") is None and tier.extra("a", b) is None and not tier._extra
