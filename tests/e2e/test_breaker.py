"""Circuit breakers through the real Envoy; the demo upstream's hit counter is the witness.

The shipped envoy.yaml routes /api/payments/ to cluster `payments` (the webshop profile: 5
consecutive failures, 3 half-open probes) and /legacy/ to cluster `legacy` (the dual-port
gateway's: 3 failures within 10.5 s, 1 probe, a static fallback, a 3 s route timeout); ext_proc
learns the cluster from the `xds.cluster_name` attribute. Timings are scaled down through config
(open for 1 s instead of 30 s). The demo upstream's /_control/fail makes a path prefix answer
500, hold the request (Envoy's route timeout answers 504) or reset the connection (Envoy's 503).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import Counter

import pytest

from extproc.demo import idp
from tests.support.http import Response, get, parallel, request
from tests.support.procs import wait_until
from tests.support.stack import Stack, get_json, new_stack, restart_redis, two_workers_on_redis

pytestmark = pytest.mark.e2e

OPEN_S = 1.0
OVERRIDES = {
    "circuit_breakers.upstreams.payments.open_seconds": OPEN_S,
    "circuit_breakers.upstreams.legacy.open_seconds": OPEN_S,
    "circuit_breakers.upstreams.reports.open_seconds": OPEN_S,
    # the cached /echo/cache helper's cluster, for the stale-cache fallback
    "circuit_breakers.upstreams.upstream": {"consecutive_failures": 3, "open_seconds": OPEN_S,
                                            "half_open_probes": 1},
}


def fail(stack: Stack, prefix: str | None, mode: str) -> None:
    """Inject failures on a path prefix; `fail(s, None, "off")` switches every injection off."""
    query = f"mode={mode}" if prefix is None else f"prefix={prefix}&mode={mode}"
    r = request("POST", f"{stack.upstream}/_control/fail?{query}")
    assert r.status == 200, r.body


def hits(stack: Stack, path: str) -> int:
    return get_json(f"{stack.upstream}/_control/hits")["hits"].get(path, 0)


def admin(stack: Stack, path: str) -> Response:
    return request("POST", f"{stack.sidecar_admin}{path}", {"Authorization": f"Bearer {stack.admin_token}"})


def breaker(stack: Stack, name: str) -> dict:
    return next(b for b in get_json(f"{stack.sidecar_admin}/breakers")["breakers"] if b["upstream"] == name)


@pytest.fixture(scope="module")
def tripped(tmp_path_factory):
    s = new_stack(tmp_path_factory.mktemp("breaker"))
    try:
        s.start_upstream()
        s.write_sidecar_config(OVERRIDES)
        s.start_sidecar()
        s.start_envoy()
        yield s
    finally:
        s.stop()


@pytest.fixture
def clean(tripped):
    """Every test starts with the failures off and every breaker closed and automatic."""
    fail(tripped, None, "off")
    for name in ("payments", "legacy", "upstream", "reports"):
        assert admin(tripped, f"/breakers/{name}/reset").status == 200
    yield tripped
    fail(tripped, None, "off")


@pytest.fixture(scope="module")
def payer(tripped) -> str:
    return idp.load_or_create(tripped.dir).mint("payer", scopes=["read", "write"])


def pay(stack: Stack, token: str) -> Response:
    return get(f"{stack.external}/api/payments/p1", token)


def test_opens_after_exactly_the_threshold_and_nothing_reaches_the_upstream_while_open(clean, payer):
    s = clean
    fail(s, "/api/payments", "500")
    before = hits(s, "/api/payments/p1")
    statuses = [pay(s, payer).status for _ in range(12)]
    assert statuses == [500] * 5 + [503] * 7, statuses
    assert hits(s, "/api/payments/p1") == before + 5
    r = pay(s, payer)
    assert r.status == 503 and r.header("retry-after") == "1" and r.header("x-circuit-breaker") == "open"
    assert r.json() == {"error": "upstream_unavailable", "reason": "circuit_open", "upstream": "payments",
                        "retry_after": 1}
    row = breaker(s, "payments")
    assert row["state"] == "open" and row["failures_counted"] >= 5 and row["rejected"] >= 8


def test_half_open_admits_exactly_the_probes_and_a_failure_reopens(clean, payer):
    s = clean
    fail(s, "/api/payments", "500")
    for _ in range(5):
        pay(s, payer)
    assert pay(s, payer).status == 503
    fail(s, "/api/payments", "timeout")          # the probes will be held upstream, all in flight together
    before = hits(s, "/api/payments/p1")
    wait_until(lambda: breaker(s, "payments")["opened_at_ms"] / 1000 + OPEN_S < time.time(), timeout=5,
               what="the open duration over")
    out: list[Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = pay(s, payer)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    wait_until(lambda: len(out) == 7, timeout=10, what="the seven requests beyond the probes rejected")
    assert {r.status for r in out} == {503}
    assert hits(s, "/api/payments/p1") == before + 3          # exactly three probes reached the upstream
    fail(s, "/api/payments", "off")                          # the held probes end in failure (504)
    for t in threads:
        t.join(10)
    assert Counter(r.status for r in out) == {503: 7, 504: 3}
    assert breaker(s, "payments")["state"] == "open"         # a probe failure reopened it


def test_probe_successes_close_it(clean, payer):
    s = clean
    assert admin(s, "/breakers/payments/open").status == 200
    assert pay(s, payer).status == 503
    assert admin(s, "/breakers/payments/reset").status == 200     # automatic again, closed
    fail(s, "/api/payments", "500")
    for _ in range(5):
        pay(s, payer)
    fail(s, "/api/payments", "off")
    r = wait_until(lambda: (x := pay(s, payer)).status != 503 and x, timeout=5, what="a probe admitted")
    assert r.status == 404                                   # the upstream's answer: 4xx is a success
    assert breaker(s, "payments")["state"] == "half_open"
    assert [pay(s, payer).status for _ in range(2)] == [404, 404]
    assert breaker(s, "payments")["state"] == "closed"
    assert [pay(s, payer).status for _ in range(5)] == [404] * 5


def test_client_errors_never_trip_it(clean, payer):
    s = clean
    assert [pay(s, payer).status for _ in range(12)] == [404] * 12
    assert breaker(s, "payments")["state"] == "closed"


def test_connection_resets_trip_it_like_500s(clean, payer):
    s = clean
    fail(s, "/api/payments", "reset")
    statuses = [pay(s, payer).status for _ in range(7)]
    assert statuses[:5] == [503] * 5 and statuses[5:] == [503, 503]
    assert breaker(s, "payments")["state"] == "open"
    assert pay(s, payer).header("x-circuit-breaker") == "open"


def test_timeouts_trip_the_dual_port_profile_and_the_static_fallback_answers(clean):
    s = clean
    fail(s, "/delay", "timeout")
    t0 = time.monotonic()
    statuses = [r.status for r in parallel(3, lambda: get(f"{s.external}/legacy/delay/10", timeout=10))]
    assert statuses == [504] * 3 and time.monotonic() - t0 < 8
    r = get(f"{s.external}/legacy/delay/10")
    assert r.status == 200 and r.header("x-circuit-breaker") == "open"
    assert r.json() == {"status": "degraded", "message": "legacy service unavailable, try later"}


def test_a_probe_whose_client_aborts_frees_its_slot(clean, payer):
    s = clean
    assert admin(s, "/breakers/payments/open").status == 200
    assert admin(s, "/breakers/payments/reset").status == 200
    fail(s, "/api/payments", "500")
    for _ in range(5):
        pay(s, payer)
    fail(s, "/api/payments", "timeout")                      # probes will hang upstream
    wait_until(lambda: breaker(s, "payments")["opened_at_ms"] / 1000 + OPEN_S < time.time(), timeout=5,
               what="the open duration over")
    port = int(s.external.rsplit(":", 1)[1])
    socks = []
    for _ in range(3):                                       # take all three probe slots, then hang up
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(f"GET /api/payments/p1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {payer}\r\n\r\n".encode())
        socks.append(sock)
    wait_until(lambda: breaker(s, "payments")["state"] == "half_open" and pay(s, payer).status == 503,
               timeout=5, what="every probe slot taken")
    for sock in socks:
        sock.close()
    fail(s, "/api/payments", "off")
    r = wait_until(lambda: (x := pay(s, payer)).status == 404 and x, timeout=5,
                   what="a slot freed by the aborted probes")
    assert r.status == 404


def test_while_open_a_cached_copy_answers(clean):
    s = clean
    url = f"{s.external}/echo/cache?u={uuid.uuid4().hex[:8]}&cache-control=max-age%3D1"
    first = get(url)
    assert first.status == 200 and first.header("x-cache-status") == "MISS"
    fail(s, "/echo/cache", "500")
    wait_until(lambda: get(url).status == 500, timeout=5, what="the entry stale, the upstream failing")
    for _ in range(3):
        get(url)
    r = wait_until(lambda: (x := get(url)).header("x-cache-status") == "STALE" and x, timeout=5,
                   what="the cached copy served while open")
    assert r.status == 200 and r.body == first.body and "fwd=stale" in r.header("cache-status")


def test_200_concurrent_clients_while_tripping_all_get_an_answer(clean, payer):
    s = clean
    fail(s, "/api/payments", "500")
    t0 = time.monotonic()
    # each client sends three requests in a row: the first wave is in flight before any failure is
    # counted (a breaker never stops a request already admitted), the later ones meet it open
    out = [r for rs in parallel(200, lambda: [pay(s, payer) for _ in range(3)]) for r in rs]
    assert len(out) == 600 and time.monotonic() - t0 < 30
    statuses = Counter(r.status for r in out)
    assert set(statuses) <= {500, 503} and statuses[503] > 0, statuses
    assert breaker(s, "payments")["state"] == "open"


def test_admin_requires_the_token_and_names_a_breaker(clean):
    s = clean
    assert request("POST", f"{s.sidecar_admin}/breakers/payments/open").status in (401, 403)
    assert admin(s, "/breakers/nope/open").status == 404
    assert admin(s, "/breakers/payments/explode").status == 404


# -- across replicas ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with two_workers_on_redis(tmp_path_factory.mktemp("breaker-fleet"),
                              {**OVERRIDES, "circuit_breakers.store_timeout_ms": 100,
                               "circuit_breakers.upstreams.payments.open_seconds": 30},
                              redis_timeout_ms=100) as s:
        yield s


@pytest.fixture
def fleet_clean(fleet):
    fail(fleet, None, "off")
    assert admin(fleet, "/breakers/payments/reset").status == 200
    yield fleet
    fail(fleet, None, "off")


def test_failures_through_two_replicas_open_it_at_exactly_the_threshold(fleet_clean):
    s = fleet_clean
    token = idp.load_or_create(s.dir).mint("fleet-payer", scopes=["read"])
    fail(s, "/api/payments", "500")
    before = hits(s, "/api/payments/p1")
    statuses = [pay(s, token).status for _ in range(10)]      # round robin: the failures alternate workers
    assert statuses == [500] * 5 + [503] * 5, statuses
    assert hits(s, "/api/payments/p1") == before + 5


def test_a_forced_open_is_enforced_by_every_replica_and_reset_reopens_traffic(fleet_clean):
    s = fleet_clean
    token = idp.load_or_create(s.dir).mint("fleet-payer", scopes=["read"])
    r = admin(s, "/breakers/payments/open")
    assert r.status == 200 and json.loads(r.body)["state"] == "open"
    before = hits(s, "/api/payments/p1")
    assert [pay(s, token).status for _ in range(6)] == [503] * 6   # both workers
    assert hits(s, "/api/payments/p1") == before
    assert admin(s, "/breakers/payments/reset").status == 200
    assert [pay(s, token).status for _ in range(4)] == [404] * 4


def test_store_down_each_replica_breaks_on_its_own(fleet_clean):
    s = fleet_clean
    token = idp.load_or_create(s.dir).mint("fleet-payer", scopes=["read"])
    s.redis.proc.kill()
    try:
        fail(s, "/api/payments", "500")
        before = hits(s, "/api/payments/p1")
        statuses = Counter(pay(s, token).status for _ in range(16))
        # each worker counts its own five (or fewer, if a worker's view already had some)
        assert statuses[503] >= 6 and hits(s, "/api/payments/p1") - before <= 10, statuses
    finally:
        s.redis.proc = restart_redis(s.redis)
        fail(s, None, "off")
    wait_until(lambda: admin(s, "/breakers/payments/reset").status == 200, timeout=20, what="the store back")
    wait_until(lambda: pay(s, token).status == 404, timeout=20, what="closed again on every worker")


# -- the lean wiring (ext_authz check, access-log outcomes) ---------------------------------------

def test_the_lean_wiring_opens_from_logged_outcomes_and_rejects_in_ext_authz(clean, payer):
    s = clean
    before = hits(s, "/status/500")
    for _ in range(5):
        assert get(f"{s.external}/reports/status/500", payer).status == 500
    # outcomes arrive with the access logger's flush (0.5 s in envoy.yaml), then the breaker opens
    wait_until(lambda: breaker(s, "reports")["state"] == "open", timeout=5, what="opened from the access log")
    r = get(f"{s.external}/reports/status/500", payer)
    assert r.status == 503 and r.header("x-circuit-breaker") == "open" and r.header("retry-after")
    assert r.json()["reason"] == "circuit_open"
    assert hits(s, "/status/500") == before + 5              # the rejection never reached the upstream
    # after the open duration probes pass; their logged successes close it
    r = wait_until(lambda: (x := get(f"{s.external}/reports/status/200", payer)).status == 200 and x, timeout=5,
                   what="a probe admitted")
    assert [get(f"{s.external}/reports/status/200", payer).status for _ in range(2)] == [200, 200]
    wait_until(lambda: breaker(s, "reports")["state"] == "closed", timeout=5, what="closed by the logged probes")
    assert get(f"{s.external}/reports/status/200", payer).status == 200


def test_access_log_counts_requests_by_policy_method_and_status(clean, payer):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    s = clean

    def count(**labels: str) -> float:
        with urllib.request.urlopen(f"{s.sidecar_admin}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(x.value for fam in text_string_to_metric_families(text) for x in fam.samples
                   if x.name == "gateway_requests_total" and all(x.labels.get(k) == v for k, v in labels.items()))

    ok_before = count(route="reports", method="GET", status="200")
    denied_before = count(route="reports", method="GET", status="401")
    for _ in range(3):
        assert get(f"{s.external}/reports/status/200", payer).status == 200
    assert get(f"{s.external}/reports/status/200").status == 401          # a denial carries its policy too
    wait_until(lambda: count(route="reports", method="GET", status="200") >= ok_before + 3
               and count(route="reports", method="GET", status="401") >= denied_before + 1,
               timeout=5, what="the access-log entries counted")


def test_the_log_level_changes_at_runtime_on_every_worker(fleet_clean):
    """Not a breaker feature, but this module runs the two-worker stack: POST /logging on the
    supervisor's admin port reaches both workers (the authz decision lines appear at debug)."""
    s = fleet_clean
    token = idp.load_or_create(s.dir).mint("log-reader", scopes=["read"])
    log_path = s.dir / "logs" / "sidecar.log"
    r = request("POST", f"{s.sidecar_admin}/logging", {"Authorization": f"Bearer {s.admin_token}"},
                json.dumps({"level": "debug", "logger": "extproc.authz"}).encode())
    assert r.status == 200 and json.loads(r.body)["levels"]["extproc.authz"] == "debug"
    assert request("POST", f"{s.sidecar_admin}/logging", {"Authorization": f"Bearer {s.admin_token}"},
                   b'{"level": "loud"}').status == 400
    assert request("POST", f"{s.sidecar_admin}/logging", {}, b'{"level": "debug"}').status in (401, 403)
    try:
        def decision_pids() -> set[int]:
            for _ in range(4):
                get(f"{s.external}/api/products/1", token)
            return {json.loads(x).get("pid", 0) for x in log_path.read_text().splitlines()
                    if x.startswith("{") and '"msg": "decision"' in x}
        wait_until(lambda: len(decision_pids()) >= 1 and '"logger": "extproc.authz"' in log_path.read_text(),
                   timeout=10, what="decision lines at debug from the workers")
        lines = [json.loads(x) for x in log_path.read_text().splitlines()
                 if x.startswith("{") and '"msg": "decision"' in x]
        assert lines and lines[-1]["policy"] == "api" and lines[-1]["reason"] == "ok"
    finally:
        request("POST", f"{s.sidecar_admin}/logging", {"Authorization": f"Bearer {s.admin_token}"},
                json.dumps({"level": "info", "logger": "extproc.authz"}).encode())


def test_the_lean_wiring_closes_with_two_workers(fleet_clean):
    """The probe flag travels in ext_authz's dynamic metadata, so the worker that receives the
    access-log entry settles a probe another worker admitted (it stuck half-open before)."""
    s = fleet_clean
    assert admin(s, "/breakers/reports/reset").status == 200
    token = idp.load_or_create(s.dir).mint("lean-fleet", scopes=["read"])
    for _ in range(5):
        assert get(f"{s.external}/reports/status/500", token).status == 500
    wait_until(lambda: breaker(s, "reports")["state"] == "open", timeout=5, what="opened from the access log")
    for _ in range(3):
        wait_until(lambda: get(f"{s.external}/reports/status/200", token).status == 200, timeout=5,
                   what="a probe admitted")
    wait_until(lambda: breaker(s, "reports")["state"] == "closed", timeout=5, what="closed by the logged probes")
    assert [get(f"{s.external}/reports/status/200", token).status for _ in range(4)] == [200] * 4
