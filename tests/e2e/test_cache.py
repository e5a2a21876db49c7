"""Response caching through the real Envoy, the demo upstream's counters as the witness.

The session stack runs the shipped envoy.yaml and extproc.yaml (memory store, one sidecar):
products cached 1 h, users 5 min per user, orders never, /echo/cache answering with whatever
Cache-Control, ETag, Vary, Set-Cookie or Cache-Tag the query asks for and a per-URL counter
(so a served body shows whether the upstream ran), /bytes/N for sizes. The `shared` stack runs
two sidecar workers on one Redis behind envoy-workers.yaml (round robin), for what spans
replicas: invalidation, purges and the store going away.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.demo import idp
from tests.support.http import Response, get, parallel, request
from tests.support.procs import wait_until
from tests.support.stack import ROOT, Stack, get_json, restart_redis, two_workers_on_redis

pytestmark = pytest.mark.e2e


def echo(stack: Stack, **params: str) -> str:
    """A unique /echo/cache URL answering with the given headers (cache-control=..., etag=...)."""
    params.setdefault("u", uuid.uuid4().hex[:12])
    return f"{stack.external}/echo/cache?{urllib.parse.urlencode(params)}"


def counter(r: Response) -> int:
    """How many times the upstream answered this URL (the body's counter)."""
    assert r.status == 200, (r.status, r.body)
    return r.json()["counter"]


def hits(stack: Stack, path: str) -> int:
    return get_json(f"{stack.upstream}/_control/hits")["hits"].get(path, 0)


def metric(stack: Stack, name: str, **labels: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{stack.sidecar_admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def admin(stack: Stack, method: str, path: str, body: dict | None = None) -> Response:
    return request(method, f"{stack.sidecar_admin}{path}",
                   {"Authorization": f"Bearer {stack.admin_token}", "content-type": "application/json"},
                   json.dumps(body).encode() if body is not None else None)


@pytest.fixture(scope="module")
def admin_token(stack: Stack) -> str:
    return idp.load_or_create(stack.dir).mint("catalog-admin", scopes=["read", "write", "admin"])


# -- hit, miss, bypass ----------------------------------------------------------------------------

def test_miss_then_hit_the_upstream_sees_one_request(stack, token):
    before = hits(stack, "/api/products/2")
    first = get(f"{stack.external}/api/products/2", token)
    assert first.status == 200 and first.header("x-cache-status") == "MISS"
    assert first.header("cache-status") == "extproc; fwd=miss; stored"
    second = get(f"{stack.external}/api/products/2", token)
    assert second.status == 200 and second.header("x-cache-status") == "HIT"
    assert second.body == first.body and second.header("etag") == first.header("etag")
    assert second.header("age") is not None and int(second.header("age")) >= 0
    assert second.header("cache-status").startswith("extproc; hit; ttl=")
    assert second.header("content-type") == first.header("content-type")
    assert hits(stack, "/api/products/2") == before + 1


def test_head_is_served_from_the_get_entry_without_a_body(stack, token):
    url = echo(stack, **{"cache-control": "max-age=60"})
    assert counter(get(url)) == 1
    r = request("HEAD", url)
    assert r.status == 200 and r.header("x-cache-status") == "HIT" and r.body == b""
    assert counter(get(url)) == 1


def test_a_head_miss_stores_nothing(stack):
    url = echo(stack, **{"cache-control": "max-age=60"})
    r = request("HEAD", url)
    assert r.status == 200 and r.header("x-cache-status") == "MISS"
    assert counter(get(url)) == 2        # the HEAD reached the upstream; the GET is the second call


def test_conditional_requests_get_304_from_the_cache(stack, token):
    url = echo(stack, **{"cache-control": "max-age=60", "etag": '"v7"',
                         "last-modified": "Tue, 01 Sep 2026 10:00:00 GMT"})
    assert counter(get(url)) == 1
    r = get(url, headers={"If-None-Match": 'W/"v7", "other"'})
    assert r.status == 304 and r.body == b"" and r.header("etag") == '"v7"'
    assert r.header("x-cache-status") == "HIT"
    r = get(url, headers={"If-Modified-Since": "Wed, 02 Sep 2026 10:00:00 GMT"})
    assert r.status == 304
    r = get(url, headers={"If-None-Match": '"stale"'})
    assert r.status == 200 and counter(r) == 1        # no match: the full entry, still from the cache


def test_vary_keys_each_variant(stack):
    url = echo(stack, **{"cache-control": "max-age=60", "vary": "Accept-Language"})
    en = get(url, headers={"Accept-Language": "en"})
    de = get(url, headers={"Accept-Language": "de"})
    assert (counter(en), counter(de)) == (1, 2)
    assert en.json()["vary"] == {"accept-language": "en"} and de.json()["vary"] == {"accept-language": "de"}
    again_en = get(url, headers={"Accept-Language": "en"})
    again_de = get(url, headers={"Accept-Language": "de"})
    assert again_en.header("x-cache-status") == again_de.header("x-cache-status") == "HIT"
    assert (counter(again_en), counter(again_de)) == (1, 2)
    assert again_en.json()["vary"] == {"accept-language": "en"}


def test_vary_star_is_not_stored(stack):
    url = echo(stack, **{"cache-control": "max-age=60", "vary": "*"})
    assert counter(get(url)) == 1
    r = get(url)
    assert counter(r) == 2 and "vary_star" in r.header("cache-status")


@pytest.mark.parametrize(("params", "reason"), [
    ({"cache-control": "no-store"}, "no_store"),
    ({"cache-control": "private, max-age=60"}, "private"),
    ({"cache-control": "max-age=60", "set-cookie": "session=abc"}, "set_cookie"),
    ({}, "no_freshness"),                       # the helpers rule has no default ttl
])
def test_responses_that_must_not_be_stored(stack, params, reason):
    url = echo(stack, **params)
    first = get(url)
    assert counter(first) == 1 and first.header("x-cache-status") == "MISS"
    if reason:
        assert first.header("cache-status") == f"extproc; fwd=miss; detail={reason}"
    assert counter(get(url)) == 2


def test_authenticated_requests_are_stored_only_when_the_response_allows_it(stack, token):
    plain = f"{stack.external}/bytes/{100 + int(uuid.uuid4().int % 1000)}"
    r = get(plain, token)
    assert r.header("cache-status") == "extproc; fwd=miss; detail=authenticated"
    assert get(plain, token).header("x-cache-status") == "MISS"
    public = f"{plain}?cache-control=public"
    assert get(public, token).header("x-cache-status") == "MISS"
    assert get(public, token).header("x-cache-status") == "HIT"


def test_per_user_routes_key_by_the_verified_subject(stack, token):
    bob = idp.load_or_create(stack.dir).mint("bob", scopes=["read"])
    before = hits(stack, "/api/users/1")
    assert get(f"{stack.external}/api/users/1", token).header("x-cache-status") == "MISS"
    assert get(f"{stack.external}/api/users/1", token).header("x-cache-status") == "HIT"
    # bob's request is a different entry, whatever headers he sends
    r = get(f"{stack.external}/api/users/1", bob, headers={"x-jwt-sub": "alice", "x-extproc-sub": "alice"})
    assert r.header("x-cache-status") == "MISS"
    assert hits(stack, "/api/users/1") == before + 2


def test_orders_are_never_stored_and_bypasses_are_marked(stack, token):
    r = get(f"{stack.external}/api/orders", token)
    assert r.status == 200 and r.header("x-cache-status") == "BYPASS"
    assert r.header("cache-status") == "extproc; fwd=bypass; detail=rule"
    r = get(f"{stack.external}/api/products/1", token, headers={"Range": "bytes=0-10"})
    assert r.header("x-cache-status") == "BYPASS" and r.header("cache-status").endswith("detail=range")


@pytest.mark.parametrize("size", [2 * 1024 * 1024, 20 * 1024 * 1024])
def test_large_bodies_arrive_whole_and_fast_and_are_not_stored(stack, token, size):
    url = f"{stack.external}/bytes/{size}?cache-control=public%2C%20max-age%3D60"
    for _ in range(2):
        t0 = time.monotonic()
        r = get(url, token, timeout=20)
        elapsed = time.monotonic() - t0
        assert r.status == 200 and len(r.body) == size
        assert r.header("cache-status") == "extproc; fwd=miss; detail=too_large"
        assert elapsed < 3.0, f"{size} bytes took {elapsed:.1f} s (a BUFFERED override above Envoy's limit hangs)"


def test_a_body_within_the_limit_is_stored_whole(stack, token):
    size = 900_000
    url = f"{stack.external}/bytes/{size}?cache-control=public%2C%20max-age%3D60&u={uuid.uuid4().hex[:8]}"
    first = get(url, token)
    assert first.header("x-cache-status") == "MISS" and len(first.body) == size
    second = get(url, token)
    assert second.header("x-cache-status") == "HIT" and second.body == first.body


def test_a_response_without_content_length_passes_unstored(stack, token):
    url = (f"{stack.external}/bytes/300000?cache-control=public%2C%20max-age%3D60&x-chunked=1"
           f"&u={uuid.uuid4().hex[:8]}")
    for _ in range(2):
        r = get(url, token, timeout=10)
        assert r.status == 200 and len(r.body) == 300000
        assert r.header("cache-status") == "extproc; fwd=miss; detail=no_content_length"


def test_an_unkeyed_header_cannot_poison_the_shared_entry(stack):
    url = echo(stack, **{"cache-control": "max-age=60"})
    attacker = get(url, headers={"X-Forwarded-Host": "evil.example", "X-HTTP-Method-Override": "DELETE"})
    assert attacker.json()["forwarded_host"] is None      # never reached the upstream
    victim = get(url)
    assert victim.header("x-cache-status") == "HIT" and b"evil.example" not in victim.body


def test_query_normalisation_sorts_and_ignores_tracking_parameters(stack):
    base = f"{stack.external}/echo/cache"
    u = uuid.uuid4().hex[:8]
    first = get(f"{base}?cache-control=max-age%3D60&a=1&u={u}")
    again = get(f"{base}?u={u}&utm_source=mail&a=1&cache-control=max-age%3D60")
    assert again.header("x-cache-status") == "HIT" and counter(again) == counter(first) == 1


# -- concurrency, staleness, writes ---------------------------------------------------------------

def test_concurrent_misses_are_collapsed_into_one_upstream_request(stack):
    url = echo(stack, **{"cache-control": "max-age=60"})
    n = 100
    out: list[Response] = parallel(n, lambda: get(url, timeout=10), timeout=15)
    assert len(out) == n
    assert {counter(r) for r in out} == {1}, Counter(counter(r) for r in out)
    assert Counter(r.header("x-cache-status") for r in out)["MISS"] == 1


def test_stale_if_error_answers_with_the_stale_copy(stack):
    prefix = f"/echo/cache?u={uuid.uuid4().hex[:8]}"
    url = f"{stack.external}{prefix}&cache-control=max-age%3D1%2C%20stale-if-error%3D60"
    assert counter(get(url)) == 1
    r = request("POST", f"{stack.upstream}/_control/fail?prefix=/echo/cache&mode=500")
    assert r.status == 200
    try:
        # fresh for 1 s (HITs, no upstream call), then the upstream's 500 is replaced by the stale copy
        r = wait_until(lambda: (x := get(url)).header("x-cache-status") == "STALE" and x, timeout=10,
                       what="the stale copy served in place of the 500")
        assert r.status == 200 and counter(r) == 1
        assert "fwd-status=500" in r.header("cache-status")
    finally:
        request("POST", f"{stack.upstream}/_control/fail?prefix=/echo/cache&mode=off")


def test_an_upstream_error_never_overwrites_a_good_entry(stack):
    url = echo(stack, **{"cache-control": "max-age=1, must-revalidate", "etag": '"e1"'})
    assert counter(get(url)) == 1
    request("POST", f"{stack.upstream}/_control/fail?prefix=/echo/cache&mode=500")
    try:
        wait_until(lambda: get(url).status == 500, timeout=10, what="must-revalidate: the error passes through")
    finally:
        request("POST", f"{stack.upstream}/_control/fail?prefix=/echo/cache&mode=off")
    r = get(url)          # revalidated with the stored validator: 304 keeps the old body
    assert r.status == 200 and r.header("x-cache-status") == "REVALIDATED" and counter(r) == 1


def test_stale_while_revalidate_serves_stale_while_one_request_refreshes(stack):
    url = echo(stack, **{"cache-control": "max-age=1, stale-while-revalidate=30", "etag": '"s1"'})
    assert counter(get(url)) == 1
    r = wait_until(lambda: (x := get(url)).header("x-cache-status") != "HIT" and x, timeout=10,
                   what="the entry going stale")
    assert r.header("x-cache-status") == "REVALIDATED" and counter(r) == 1


def test_a_successful_write_invalidates_the_url_and_its_related_prefixes(stack, token, admin_token):
    item = f"{stack.external}/api/products/3"
    listing = f"{stack.external}/api/products"
    assert get(item, token).status == 200 and get(listing, token).status == 200
    assert get(item, token).header("x-cache-status") == "HIT"
    assert get(listing, token).header("x-cache-status") == "HIT"
    name = f"renamed-{uuid.uuid4().hex[:6]}"
    r = request("PUT", item, {"Authorization": f"Bearer {admin_token}", "content-type": "application/json"},
                json.dumps({"name": name}).encode())
    assert r.status == 200, r.body
    fresh = get(item, token)
    assert fresh.header("x-cache-status") == "MISS" and fresh.json()["product"]["name"] == name
    assert get(listing, token).header("x-cache-status") == "MISS"      # invalidate_prefixes
    # a failed write invalidates nothing
    assert get(item, token).header("x-cache-status") == "HIT"
    r = request("PUT", item, {"Authorization": f"Bearer {admin_token}", "content-type": "application/json"},
                b"not json")
    assert r.status == 400
    assert get(item, token).header("x-cache-status") == "HIT"


def test_a_create_invalidates_its_location(stack, token, admin_token):
    listing = f"{stack.external}/api/products"
    get(listing, token)
    assert get(listing, token).header("x-cache-status") == "HIT"
    r = request("POST", listing, {"Authorization": f"Bearer {admin_token}", "content-type": "application/json"},
                json.dumps({"name": "teapot", "price": 20}).encode())
    assert r.status == 201 and r.header("location")
    assert get(listing, token).header("x-cache-status") == "MISS"


def test_admin_purge_by_tag_prefix_path_and_key(stack):
    tagged = echo(stack, **{"cache-control": "max-age=60", "cache-tag": "catalog, promo"})
    other = echo(stack, **{"cache-control": "max-age=60", "surrogate-key": "unrelated"})
    for url in (tagged, other):
        get(url)
        assert get(url).header("x-cache-status") == "HIT"
    r = admin(stack, "POST", "/cache/purge", {"tag": "promo"})
    assert r.status == 200, r.body
    assert get(tagged).header("x-cache-status") == "MISS"
    assert get(other).header("x-cache-status") == "HIT"
    r = admin(stack, "POST", "/cache/purge", {"prefix": "/echo/"})
    assert r.status == 200
    assert get(other).header("x-cache-status") == "MISS"
    # by path: every query of that path
    assert get(other).header("x-cache-status") == "HIT"
    assert admin(stack, "POST", "/cache/purge", {"path": "/echo/cache"}).status == 200
    assert get(other).header("x-cache-status") == "MISS"
    # bad requests and missing credentials
    assert admin(stack, "POST", "/cache/purge", {"color": "red"}).status == 400
    assert admin(stack, "POST", "/cache/purge", {"prefix": "no-slash"}).status == 400
    assert request("POST", f"{stack.sidecar_admin}/cache/purge", {}, b'{"tag": "promo"}').status in (401, 403)


def test_stats_come_from_the_counters(stack):
    url = echo(stack, **{"cache-control": "max-age=60"})
    before = get_json(f"{stack.sidecar_admin}/cache/stats")
    get(url)
    get(url)
    get(url)
    after = get_json(f"{stack.sidecar_admin}/cache/stats")
    assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 1
    assert 0 < after["hit_ratio"] < 1
    assert after["tiers"]["memory"]["entries"] >= 1 and after["tiers"]["memory"]["bytes"] > 0
    assert after["rules"]["helpers"]["hits"] >= 2


def test_a_read_heavy_load_meets_the_webshop_criteria(stack, token):
    """The webshop plan: hit ratio above 70 %, upstream requests cut by at least 30 %."""
    before_stats = get_json(f"{stack.sidecar_admin}/cache/stats")
    before_hits = get_json(f"{stack.upstream}/_control/hits")["total"]
    paths = [f"/api/products/{i}" for i in (1, 2, 3, 4, 5)] + ["/api/products"]
    sent = 0
    deadline = time.monotonic() + 20
    for _ in range(40):
        for p in paths:
            assert get(f"{stack.external}{p}", token).status in (200, 404)
            sent += 1
        if time.monotonic() > deadline:
            break
    after_stats = get_json(f"{stack.sidecar_admin}/cache/stats")
    upstream = get_json(f"{stack.upstream}/_control/hits")["total"] - before_hits
    looked = (after_stats["hits"] - before_stats["hits"]) + (after_stats["misses"] - before_stats["misses"])
    ratio = (after_stats["hits"] - before_stats["hits"]) / looked
    assert ratio > 0.7, ratio
    assert upstream <= 0.7 * sent, (upstream, sent)


# -- across replicas (two workers, one Redis) -----------------------------------------------------

SHADOW_RULE = {"name": "status-shadow", "policies": ["public"], "path_prefix": ["/status/"], "ttl": 60,
               "mode": "shadow"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    import yaml

    rules = yaml.safe_load((ROOT / "extproc.yaml").read_text())["cache"]["rules"] + [SHADOW_RULE]
    with two_workers_on_redis(tmp_path_factory.mktemp("cache-shared"),
                              {"cache.rules": rules, "cache.store_timeout_ms": 100}, redis_timeout_ms=100) as s:
        yield s


def test_an_entry_stored_by_one_replica_is_served_by_the_other(shared):
    url = echo(shared, **{"cache-control": "max-age=60"})
    statuses = [get(url).header("x-cache-status") for _ in range(6)]
    # round robin over two workers: one MISS, and the other worker's first read hits in Redis
    assert statuses.count("MISS") == 1 and statuses.count("HIT") == 5, statuses
    assert counter(get(url)) == 1


def test_a_write_through_one_replica_invalidates_every_replica_within_100_ms(shared):
    token = idp.load_or_create(shared.dir).mint("reader", scopes=["read"])
    writer = idp.load_or_create(shared.dir).mint("writer", scopes=["read", "write", "admin"])
    item = f"{shared.external}/api/products/4"
    for _ in range(4):                  # both workers hold it in their in-process tier
        assert get(item, token).status == 200
    assert get(item, token).header("x-cache-status") == "HIT"
    assert get(item, token).header("x-cache-status") == "HIT"
    name = f"v-{uuid.uuid4().hex[:6]}"
    r = request("PUT", item, {"Authorization": f"Bearer {writer}", "content-type": "application/json"},
                json.dumps({"name": name}).encode())
    assert r.status == 200
    t_write = time.monotonic()
    reads: list[tuple[float, str]] = []       # (when the read started, the name it saw)
    while time.monotonic() - t_write < 0.5 or len([t for t, _ in reads if t >= 0.1]) < 4:
        started = time.monotonic() - t_write
        reads.append((started, get(item, token).json()["product"]["name"]))
    late = [n for t, n in reads if t >= 0.1]
    assert late == [name] * len(late), reads   # every read from 100 ms on, on either worker, sees the write


def test_admin_purge_reaches_every_worker(shared):
    url = echo(shared, **{"cache-control": "max-age=60", "cache-tag": "fleet"})
    for _ in range(4):
        get(url)
    r = admin(shared, "POST", "/cache/purge", {"tag": "fleet"})
    assert r.status == 200, r.body
    statuses = [get(url).header("x-cache-status") for _ in range(4)]
    assert statuses.count("MISS") >= 1 and counter(get(url)) == 2, statuses


def test_shadow_rules_count_would_be_hits_and_serve_nothing(shared):
    before = hits(shared, "/status/200")
    shadow_before = metric(shared, "gateway_cache_shadow_hits_total", route="status-shadow")
    for _ in range(4):
        r = get(f"{shared.external}/status/200")
        assert r.status == 200 and r.header("x-cache-status") in ("MISS", "BYPASS")
    assert hits(shared, "/status/200") == before + 4
    assert metric(shared, "gateway_cache_shadow_hits_total", route="status-shadow") >= shadow_before + 2


def test_store_down_the_cache_steps_aside_and_requests_succeed(shared):
    url = echo(shared, **{"cache-control": "max-age=60"})
    get(url)
    assert get(url).header("x-cache-status") == "HIT"
    errors_before = metric(shared, "gateway_cache_errors_total")
    shared.redis.proc.kill()
    try:
        r = wait_until(lambda: (x := get(url)).header("x-cache-status") == "BYPASS" and x, timeout=10,
                       what="the cache stepping aside")
        assert r.status == 200 and "store_unavailable" in r.header("cache-status")
        for _ in range(5):
            assert get(url).status == 200
        assert metric(shared, "gateway_cache_errors_total") > errors_before
    finally:
        shared.redis.proc = restart_redis(shared.redis)
    wait_until(lambda: get(url).header("x-cache-status") in ("HIT", "MISS"), timeout=20,
               what="the cache back after Redis returned")


def test_stats_report_the_shared_tier(shared):
    before = get_json(f"{shared.sidecar_admin}/cache/stats")["tiers"]["store"]
    url = echo(shared, **{"cache-control": "max-age=60"})
    first = get(url)
    assert first.header("x-cache-status") == "MISS"

    def grown():
        tier = get_json(f"{shared.sidecar_admin}/cache/stats")["tiers"]["store"]
        return tier if tier["entries"] > before["entries"] else None

    tier = wait_until(grown, timeout=5, what="the entry written to Redis")
    assert tier["bytes"] >= before["bytes"] + len(first.body) and tier["truncated"] is False
    # worker 0 samples the same into gateway_cache_entries{tier="store"} (at start, then each minute)
    import urllib.request

    with urllib.request.urlopen(f"{shared.sidecar_admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'gateway_cache_entries{tier="store"}' in text and 'gateway_cache_stored_bytes{tier="store"}' in text
