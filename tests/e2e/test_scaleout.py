"""Scale-out, proven natively: 2 Envoys, 3 sidecar processes and a Redis Cluster (3 masters with a
replica each), started once for the module by scripts/stack.py's Python API (every process through
tests.support.procs, so a failing test shows their logs).

What holds across the fleet, each through one Envoy and checked through the other:

(a) a per-user rate limit admits exactly N of N+k concurrent requests sent alternately to both
    Envoys (one counter in the store, whichever sidecar decides);
(b) a breaker tripped by failures seen through Envoy 1 is known to every sidecar within the
    pub/sub lag (each sidecar's own gauge, polled; asserted <= 1 s, printed), and Envoy 2's
    requests are then answered by the breaker without reaching the upstreams;
(c) a token revoked by logout through Envoy 1 is refused through Envoy 2 (polled; then every
    sidecar refuses it);
(d) a write through Envoy 1 voids the cached entry that Envoy 2's requests were served from
    (both upstream replicas are first changed behind the gateway's back: the cache keeps answering
    the old copy until the gateway sees the write);
(e) under a steady load through both Envoys, SIGKILL of one sidecar and then of the Redis master
    holding the load's counter (its replica promoted):
    - requests: only those in flight on the killed sidecar at that instant may fail (README: its
      ext_proc streams get 503; Envoy's retry policy re-sends ext_authz calls that hit a reset or
      refused connection, and health checks take it out of rotation), so non-2xx/429 answers are
      at most the load's connections; the master's failover costs none (fail-open rules decide on
      the local limiter, the cache steps aside, breakers use their local record);
    - counters: the counter in Redis after the failover equals the admitted requests, minus those
      the sidecars admitted on their local fallback while the slot had no master (counted in
      gateway_ratelimit_decisions_total{result="local_fallback"}), minus the charges asynchronous
      replication had not copied at the kill (none expected at this load; 3 allowed).

Timings are scaled through config overrides (payments breaker open 5 s, store timeouts 100 ms so a
busy machine does not fall back by accident, cluster-node-timeout 1 s). Loads are paced and bounded
in time; every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from tests.support.http import Response, get, request
from tests.support.load import BackgroundLoad
from tests.support.procs import Proc, wait_until
from tests.unit.test_stack_config import load_script

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

stackmod = load_script("stack")

HOST = {"Host": "shop.example"}     # one public host behind both Envoys: the cache key includes it
N, EXTRA = 10, 6
OPEN_S = 5
PUBSUB_LAG_BOUND_S = 1.0
REPLICATION_SLACK = 3
RULES = [
    {"name": "exact", "policies": ["api"], "when": {"path_prefix": ["/api/orders"]}, "count_by": ["user"],
     "algorithm": "fixed_window", "limit": N, "period": "month"},
    {"name": "steady", "policies": ["api"], "when": {"path_prefix": ["/api/products"]}, "count_by": ["user"],
     "algorithm": "fixed_window", "limit": 1_000_000, "period": "month"},
]
OVERRIDES = {
    "rate_limits.rules": RULES,
    "rate_limits.store_timeout_ms": 100,
    "store.redis.timeout_ms": 100,
    "cache.store_timeout_ms": 100,
    "circuit_breakers.store_timeout_ms": 100,
    "circuit_breakers.upstreams.payments.open_seconds": OPEN_S,
    "concurrency": {"global_limit": 10_000, "default_route_limit": 10_000},
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    topo = stackmod.Topology(envoys=2, sidecars=3, redis="cluster", base_port=0, prometheus=False,
                             state_dir=tmp_path_factory.mktemp("scaleout"), overrides=OVERRIDES,
                             redis_node_timeout_ms=1000)
    s = stackmod.Stack(topo, proc_factory=Proc)
    s.start()                      # stops what it started if any part fails
    try:
        yield s
    finally:
        s.stop()


# ------------------------------------------------------------------------------------ helpers ---

def sidecar_metric(s, j: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{s.sidecar_admin_url(j)}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def admin(s, path: str) -> Response:
    return request("POST", f"{s.sidecar_admin_url(0)}{path}", {"Authorization": f"Bearer {s.admin_token}"})


def fail_upstreams(s, mode: str) -> None:
    query = "prefix=/api/payments&mode=500" if mode == "500" else "mode=off"
    for k in range(2):
        assert request("POST", f"{s.upstream_url(k)}/_control/fail?{query}").status == 200


def upstream_hits(s, path: str) -> int:
    total = 0
    for k in range(2):
        with urllib.request.urlopen(f"{s.upstream_url(k)}/_control/hits", timeout=2) as resp:
            total += json.loads(resp.read())["hits"].get(path, 0)
    return total


def at_once(calls: list) -> list[Response]:
    """Every call in its own thread, released together; bounded in time."""
    out: list[Response] = []
    lock = threading.Lock()
    gate = threading.Barrier(len(calls))

    def one(fn) -> None:
        gate.wait(timeout=10)
        r = fn()
        with lock:
            out.append(r)
    threads = [threading.Thread(target=one, args=(fn,)) for fn in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out


def bad(statuses) -> list[int]:
    return [st for st in statuses if not (200 <= st < 300 or st == 429)]


# -------------------------------------------------------------------------------------- tests ---

def test_a_per_user_limit_admits_exactly_n_across_both_envoys(fleet):
    token = fleet.token(f"exact-{uuid.uuid4().hex[:8]}")
    calls = [lambda i=i: get(f"{fleet.envoy_url(i % 2)}/api/orders", token) for i in range(N + EXTRA)]
    seen = Counter(r.status for r in at_once(calls))
    assert seen == {200: N, 429: EXTRA}, seen
    # the counter is full for the fleet: the next request is refused through either Envoy
    assert [get(f"{fleet.envoy_url(i)}/api/orders", token).status for i in (0, 1)] == [429, 429]


def test_b_a_breaker_tripped_through_one_envoy_is_enforced_by_the_other(fleet):
    token = fleet.token("payer")
    url = "/api/payments/pay_1"
    assert admin(fleet, "/breakers/payments/reset").status == 200
    wait_until(lambda: all(sidecar_metric(fleet, j, "gateway_circuit_breaker_state", upstream="payments") == 0
                           for j in range(3)), timeout=5, what="payments closed on every sidecar")
    fail_upstreams(fleet, "500")
    try:
        statuses = [get(f"{fleet.envoy_url(0)}{url}", token).status for _ in range(5)]
        tripped_at = time.monotonic()
        assert statuses == [500] * 5, statuses
        seen_at: dict[int, float] = {}

        def state(j: int) -> tuple[int, float, float]:
            value = sidecar_metric(fleet, j, "gateway_circuit_breaker_state", upstream="payments")
            return j, value, time.monotonic() - tripped_at

        def every_sidecar_knows() -> bool:      # the three asked at once: the lag, not the polling, is measured
            for j, value, at in pool.map(state, [j for j in range(3) if j not in seen_at]):
                if value == 1:
                    seen_at[j] = at
            return len(seen_at) == 3
        with ThreadPoolExecutor(3) as pool:
            wait_until(every_sidecar_knows, timeout=10, interval=0.005, what="every sidecar seeing payments open")
        lag = max(seen_at.values())
        print(f"\nscaleout: breaker open on every sidecar {lag * 1000:.0f} ms after the tripping response "
              f"(per sidecar: {', '.join(f'{v * 1000:.0f} ms' for _, v in sorted(seen_at.items()))})")
        assert lag <= PUBSUB_LAG_BOUND_S, seen_at

        before = upstream_hits(fleet, url)
        answers = [get(f"{fleet.envoy_url(1)}{url}", token) for _ in range(6)]     # twice round the sidecars
        assert [(r.status, r.header("x-circuit-breaker")) for r in answers] == [(503, "open")] * 6
        assert all(r.json()["reason"] == "circuit_open" for r in answers)
        assert upstream_hits(fleet, url) == before
    finally:
        fail_upstreams(fleet, "off")
        admin(fleet, "/breakers/payments/reset")


def test_c_a_token_revoked_through_one_envoy_is_refused_through_the_other(fleet):
    token = fleet.token(f"leaver-{uuid.uuid4().hex[:8]}")
    url = f"{fleet.envoy_url(1)}/api/products/1"
    # every sidecar has decided (and cached the decision for) this token
    assert [get(url, token).status for _ in range(6)] == [200] * 6
    r = request("POST", f"{fleet.envoy_url(0)}/api/auth/logout", {"Authorization": f"Bearer {token}"})
    assert r.status == 204, r.body
    revoked_at = time.monotonic()
    wait_until(lambda: get(url, token).status == 401, timeout=5, interval=0.01, what="the revocation through Envoy 2")
    lag = time.monotonic() - revoked_at
    statuses = [get(f"{fleet.envoy_url(i % 2)}/api/products/1", token).status for i in range(12)]
    print(f"\nscaleout: logout through Envoy 1 refused through Envoy 2 after {lag * 1000:.0f} ms")
    assert statuses == [401] * 12, statuses


def test_c2_an_opaque_token_issued_by_either_upstream_replica_passes_either_envoy(fleet):
    """Logins are balanced over both upstream replicas; the sidecars introspect at r1. The
    replicas share their state directory, so r2's opaque tokens are r1's too."""
    issued: dict[str, list[str]] = {}
    for i in range(12):
        body = json.dumps({"username": "bob", "password": "bob-password", "token_type": "opaque"}).encode()
        r = request("POST", f"{fleet.envoy_url(i % 2)}/api/auth/login", {"content-type": "application/json", **HOST},
                    body)
        assert r.status == 200, r.body
        issued.setdefault(r.header("x-upstream-replica") or "?", []).append(json.loads(r.body)["access_token"])
    assert set(issued) == {"r1", "r2"}, sorted(issued)
    for replica, tokens in issued.items():
        for token in tokens:
            statuses = [get(f"{fleet.envoy_url(i)}/api/products/1", token, headers=HOST).status for i in (0, 1)]
            assert statuses == [200, 200], (replica, statuses)


def test_d_a_write_through_one_envoy_invalidates_the_entry_read_through_the_other(fleet):
    reader = fleet.token("catalog-reader")
    writer = fleet.token("catalog-admin", ("read", "write", "admin"))
    path = "/api/products/3"

    def read() -> Response:
        return get(f"{fleet.envoy_url(1)}{path}", reader, headers=HOST)

    wait_until(lambda: read().header("x-cache-status") == "HIT", timeout=5, what="the product cached")
    old = read().json()["product"]["price"]
    new = round(old + 1.25, 2)
    body = json.dumps({"price": new}).encode()
    for k in range(2):      # both replicas change behind the gateway's back: no invalidation
        assert request("PUT", f"{fleet.upstream_url(k)}{path}", {"content-type": "application/json"}, body).status == 200
    stale = [read() for _ in range(6)]
    assert [(r.header("x-cache-status"), r.json()["product"]["price"]) for r in stale] == [("HIT", old)] * 6

    r = request("PUT", f"{fleet.envoy_url(0)}{path}",
                {"Authorization": f"Bearer {writer}", "content-type": "application/json", **HOST}, body)
    assert r.status == 200, r.body
    written_at = time.monotonic()
    wait_until(lambda: read().json()["product"]["price"] == new, timeout=5, interval=0.01,
               what="Envoy 2 serving the written product")
    lag = time.monotonic() - written_at
    after = [read() for _ in range(6)]
    print(f"\nscaleout: write through Envoy 1 seen through Envoy 2 after {lag * 1000:.0f} ms")
    assert [x.json()["product"]["price"] for x in after] == [new] * 6
    assert {x.header("x-cache-status") for x in after} <= {"HIT", "MISS"}


def test_e_a_killed_sidecar_and_a_killed_redis_master_lose_bounded_requests_and_counters(fleet):
    redis_nodes = fleet.redis
    masters = redis_nodes.masters()
    # the sidecars' startup node when it is a master: the harder case for re-discovery
    victim = redis_nodes.ports[0] if redis_nodes.ports[0] in masters else masters[0]
    assert len(redis_nodes.replicas_of(victim)) == 1
    user = next(u for u in (f"steady-{uuid.uuid4().hex[:8]}" for _ in range(10_000))
                if redis_nodes.master_for_slot(key_slot(u.encode())) == victim)
    token = fleet.token(user)

    def fallbacks(j: int) -> float:
        return sidecar_metric(fleet, j, "gateway_ratelimit_decisions_total", rule="steady", result="local_fallback")

    fallback_before = [fallbacks(j) for j in range(3)]
    killed = 1
    connections = 4
    urls = [f"{fleet.envoy_url(i)}/api/products/1" for i in range(2)]     # connection i on Envoy i % 2
    with BackgroundLoad(urls, token, threads=connections, rate=40, keep_alive=True, headers=HOST,
                        max_seconds=45) as load:
        load.wait_for(40)
        fallback_killed = fallbacks(killed) - fallback_before[killed]    # its counters die with it
        sidecar_kill_at = load.count()
        fleet.sidecar(killed).kill()
        wait_until(lambda: not any(fleet.sidecars_healthy_in(i) for i in range(2)), timeout=15,
                   what="both Envoys taking the killed sidecar out of rotation")
        load.wait_for(load.count() + 60)
        redis_kill_at = load.count()
        redis_nodes.kill(victim)
        wait_until(lambda: redis_nodes.failed_over(victim), timeout=30, what="the victim's replica promoted")
        failed_over_at = load.count()
        load.wait_for(failed_over_at + 60)
    statuses = [st for _, st in load.results]
    during_sidecar = statuses[sidecar_kill_at:redis_kill_at]
    during_redis = statuses[redis_kill_at:]
    print(f"\nscaleout: {len(statuses)} requests; sidecar kill: {Counter(during_sidecar)}; "
          f"Redis master kill and failover ({failed_over_at - redis_kill_at} requests until promoted): "
          f"{Counter(during_redis)}")
    assert bad(statuses[:sidecar_kill_at]) == []
    assert len(bad(during_sidecar)) <= connections, Counter(during_sidecar)
    assert bad(during_redis) == [], Counter(during_redis)

    # the counter in Redis (read on the promoted replica) against what the fleet admitted
    live = [j for j in range(3) if j != killed]
    fallback = fallback_killed + sum(fallbacks(j) - fallback_before[j] for j in live)
    new_master = redis_nodes.master_for_slot(key_slot(user.encode()))
    assert new_master != victim
    with stackmod.redis_client(new_master) as r:
        keys = list(r.scan_iter(match=f"*{{{user}}}:steady:*"))
        assert len(keys) == 1, keys
        stored = int(r.hget(keys[0], "c") or 0)
    admitted = sum(1 for st in statuses if 200 <= st < 300)
    failed = len(bad(statuses))
    lost = admitted - stored
    print(f"scaleout: admitted {admitted}, counter in Redis {stored}, decided on the local fallback {fallback:.0f}, "
          f"failed {failed}: {lost} uncounted")
    assert lost <= fallback + REPLICATION_SLACK, (admitted, stored, fallback)
    # and never more charged than sent: a failed request or an Envoy retry after a reset may have charged
    assert stored <= admitted + failed + connections + fallback, (admitted, stored, failed, fallback)
