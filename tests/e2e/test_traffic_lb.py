"""envoy/examples/load-balancing.yaml through the real Envoy, over three demo upstream replicas.

The example runs as shipped, only its ports rewritten (and, for the outlier test, its 30 s
ejection scaled down to 2 s). Each replica names itself in `x-upstream-replica`; its
/_control/hits and /_control/fail are the witnesses. Proven: round robin spreads evenly, least
request avoids a replica holding a request, ip-hash (ring hash and Maglev) keeps a client IP on
one replica and spreads IPs, a sticky cookie keeps a client on one replica, weights 3:1 split
3:1, an active health check takes a replica out and back, outlier detection ejects a failing
replica and lets it back after the ejection time, and the per-cluster circuit breaker answers
503 + x-envoy-overloaded above its limits. This module's `Example` harness is reused by the
other test_traffic_* modules for their examples.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.http import Response, request
from tests.support.procs import ROOT, VENV_BIN, Proc, free_ports, http_status, wait_until
from tests.support.stack import rewrite_ports

pytestmark = pytest.mark.e2e

BOOTSTRAP = ROOT / "envoy" / "examples" / "load-balancing.yaml"
LISTENER, ADMIN = 8000, 9901
R1, R2, R3 = 18081, 18082, 18083


class Example:
    """One example bootstrap on free ports (every shipped port mapped) with demo upstream replicas."""

    def __init__(self, directory: Path, bootstrap: Path, shipped_ports: list[int]):
        self.dir = directory
        self.bootstrap = bootstrap
        self.map = dict(zip(shipped_ports, free_ports(len(shipped_ports)), strict=True))
        self.procs: list[Proc] = []
        self.replicas: dict[int, Proc] = {}

    def port(self, shipped: int) -> int:
        return self.map[shipped]

    def url(self, shipped: int = LISTENER) -> str:
        return f"http://127.0.0.1:{self.map[shipped]}"

    def start_replica(self, shipped: int, replica_id: str) -> Proc:
        port = self.map[shipped]
        p = Proc(f"upstream-{replica_id}", [sys.executable, "-m", "extproc.demo.upstream", "--port", str(port),
                                            "--replica-id", replica_id, "--state-dir", str(self.dir)],
                 self.dir / "logs")
        self.procs.append(p)
        self.replicas[shipped] = p
        return p.wait_ready(lambda: http_status(f"http://127.0.0.1:{port}/public/health") == 200)

    def config(self, edit: Callable[[dict], None] | None = None) -> dict:
        # through JSON: YAML aliases (&replicas) become copies, so each port is rewritten once
        doc = rewrite_ports(json.loads(json.dumps(yaml.safe_load(self.bootstrap.read_text()))), self.map)
        if edit is not None:
            edit(doc)
        return doc

    def start_envoy(self, edit: Callable[[dict], None] | None = None, name: str = "envoy") -> Proc:
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(self.config(edit)))
        p = Proc(name, [str(VENV_BIN / "envoy"), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                        "--log-level", "warn", "--drain-time-s", "1"], self.dir / "logs")
        self.procs.append(p)
        return p.wait_ready(lambda: http_status(f"{self.url(ADMIN)}/ready") == 200)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    # -- observation ---------------------------------------------------------------------------
    def hits(self, shipped: int, path: str | None = None) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.map[shipped]}/_control/hits", timeout=2) as resp:
            data = json.loads(resp.read())
        return data["total"] if path is None else data["hits"].get(path, 0)

    def fail(self, shipped: int, prefix: str | None, mode: str) -> None:
        query = f"prefix={prefix}&mode={mode}" if prefix else f"mode={mode}"
        r = request("POST", f"http://127.0.0.1:{self.map[shipped]}/_control/fail?{query}")
        assert r.status == 200, r.body

    def host_flags(self, cluster: str) -> dict[int, str]:
        """Envoy's health flags per endpoint port of `cluster` (admin /clusters)."""
        with urllib.request.urlopen(f"{self.url(ADMIN)}/clusters", timeout=2) as resp:
            lines = resp.read().decode().splitlines()
        out: dict[int, str] = {}
        for ln in lines:
            parts = ln.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
                out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
        return out

    def stat(self, name: str) -> int:
        with urllib.request.urlopen(f"{self.url(ADMIN)}/stats?filter=^{name}$", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                key, _, value = line.partition(": ")
                if key == name:
                    return int(value)
        return 0


def call(port: int, path: str, headers: dict[str, str] | None = None, source_ip: str = "127.0.0.1",
         timeout: float = 5.0, method: str = "GET", host: str = "127.0.0.1") -> Response:
    """One request from `source_ip` (any 127/8 address is a distinct client IP)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source_ip, 0))
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        hdrs: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            hdrs.setdefault(k.lower(), []).append(v)
        return Response(resp.status, hdrs, body)
    finally:
        conn.close()


def replicas_of(port: int, path: str, n: int, **kw: Any) -> Counter:
    out: Counter = Counter()
    for _ in range(n):
        r = call(port, path, **kw)
        assert r.status == 200, (r.status, r.body[:200])
        out[r.header("x-upstream-replica")] += 1
    return out


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    ex = Example(tmp_path_factory.mktemp("traffic-lb"), BOOTSTRAP, [LISTENER, ADMIN, R1, R2, R3])
    try:
        for shipped, rid in ((R1, "r1"), (R2, "r2"), (R3, "r3")):
            ex.start_replica(shipped, rid)

        def scaled(doc: dict) -> None:       # the outlier ejection (30 s) and health interval (5 s), scaled
            for c in doc["static_resources"]["clusters"]:
                if c["name"] == "outlier":
                    c["outlier_detection"].update(interval="0.2s", base_ejection_time="2s")
                if c["name"] == "pool":
                    c["health_checks"][0].update(interval="0.2s", no_traffic_interval="0.2s", timeout="0.5s")
        ex.start_envoy(scaled)
        wait_until(lambda: set(ex.host_flags("pool").values()) == {"healthy"}, timeout=10, what="pool healthy")
        yield ex
    finally:
        ex.stop()


def test_round_robin_spreads_evenly(lb):
    seen = replicas_of(lb.port(LISTENER), "/rr/echo/headers", 30)
    assert seen == Counter({"r1": 10, "r2": 10, "r3": 10}), seen


def test_least_request_avoids_a_replica_holding_a_request(lb):
    """r1 holds every /delay/ request it gets; the others answer at once. Least request sends r1
    one request (then it has the most active), round robin would send it a third."""
    lb.fail(R1, "/delay/", "timeout")
    port = lb.port(LISTENER)
    threads = []
    try:
        for i in range(30):
            before = lb.hits(R1, "/delay/1")
            done = threading.Event()
            t = threading.Thread(target=lambda d=done: (call(port, "/least/delay/1", timeout=20), d.set()))
            t.start()
            threads.append(t)
            wait_until(lambda d=done, b=before: d.is_set() or lb.hits(R1, "/delay/1") > b, timeout=5,
                       what=f"request {i} answered or held")
        assert lb.hits(R1, "/delay/1") == 1
        assert lb.hits(R2, "/delay/1") + lb.hits(R3, "/delay/1") == 29
    finally:
        lb.fail(R1, None, "off")
        for t in threads:
            t.join(timeout=10)


@pytest.mark.parametrize("prefix", ["/iphash/", "/maglev/"])
def test_ip_hash_keeps_a_client_ip_on_one_replica(lb, prefix):
    port = lb.port(LISTENER)
    chosen = {}
    for i in range(1, 25):
        ip = f"127.0.{i}.{i + 7}"
        seen = replicas_of(port, f"{prefix}echo/headers", 5, source_ip=ip)
        assert len(seen) == 1, (ip, seen)                     # the same replica every time
        chosen[ip] = next(iter(seen))
    assert len(set(chosen.values())) >= 2, chosen              # and the IPs spread over replicas


def test_sticky_cookie_keeps_a_client_on_one_replica(lb):
    port = lb.port(LISTENER)
    pinned = set()
    for _ in range(12):
        first = call(port, "/sticky/echo/headers")
        cookie = first.header("set-cookie")
        assert cookie and cookie.startswith("gw-affinity="), first.headers
        value = cookie.split(";", 1)[0]
        seen = replicas_of(port, "/sticky/echo/headers", 8, headers={"Cookie": value})
        assert len(seen) == 1, (value, seen)
        pinned |= set(seen)
    assert len(pinned) >= 2, pinned                             # different clients, different replicas


def test_weighted_endpoints_split_3_to_1(lb):
    seen = replicas_of(lb.port(LISTENER), "/weighted/echo/headers", 200)
    assert set(seen) == {"r1", "r2"}
    assert 140 <= seen["r1"] <= 160, seen                       # 150 expected (weighted round robin)


def test_active_health_check_takes_a_replica_out_and_back(lb):
    lb.fail(R3, "/public/health", "500")
    try:
        wait_until(lambda: "failed_active_hc" in lb.host_flags("pool").get(lb.port(R3), ""), timeout=10,
                   what="r3 failing its health check")
        seen = replicas_of(lb.port(LISTENER), "/pool/echo/headers", 20)
        assert "r3" not in seen and set(seen) == {"r1", "r2"}, seen
    finally:
        lb.fail(R3, None, "off")
    wait_until(lambda: lb.host_flags("pool").get(lb.port(R3)) == "healthy", timeout=10, what="r3 healthy again")
    # the workers' host sets follow the admin's flags within moments
    wait_until(lambda: "r3" in replicas_of(lb.port(LISTENER), "/pool/echo/headers", 3), timeout=5,
               what="r3 back in rotation")


def test_outlier_detection_ejects_a_failing_replica_which_returns(lb):
    port = lb.port(LISTENER)
    lb.fail(R2, "/status/", "500")          # the API fails on r2; its health check still passes
    try:
        failures = 0
        for _ in range(30):                 # round robin: r2 gets every third; 3 in a row eject it
            if call(port, "/outlier/status/200").status == 500:
                failures += 1
            if "failed_outlier_check" in lb.host_flags("outlier").get(lb.port(R2), ""):
                break
        assert failures == 3, failures
        assert "failed_outlier_check" in lb.host_flags("outlier").get(lb.port(R2), "")
        # the workers' host sets follow the main thread's ejection within moments
        wait_until(lambda: "r2" not in replicas_of(port, "/outlier/echo/headers", 2), timeout=1, what="r2 out")
        seen = replicas_of(port, "/outlier/echo/headers", 10)
        assert "r2" not in seen, seen   # ejected: r1 and r3 only
        assert set(seen) == {"r1", "r3"}, seen
    finally:
        lb.fail(R2, None, "off")
    # back after the ejection time (scaled to 2 s), without any help
    wait_until(lambda: lb.host_flags("outlier").get(lb.port(R2)) == "healthy", timeout=10, what="r2 un-ejected")
    wait_until(lambda: "r2" in replicas_of(port, "/outlier/echo/headers", 3), timeout=5, what="r2 back in rotation")


def test_envoy_circuit_breaker_sheds_above_its_limits(lb):
    port = lb.port(LISTENER)
    before = lb.hits(R1, "/delay/1000")
    out: list[Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = call(port, "/limited/delay/1000", timeout=10)
        with lock:
            out.append(r)
    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    ok = [r for r in out if r.status == 200]
    shed = [r for r in out if r.status == 503 and r.header("x-envoy-overloaded") == "true"]
    assert len(out) == 10
    assert 2 <= len(ok) <= 3 and len(ok) + len(shed) == 10, [r.status for r in out]
    assert lb.hits(R1, "/delay/1000") - before == len(ok)         # the shed ones never reached it
    assert lb.stat("cluster.limited.upstream_rq_pending_overflow") >= len(shed)


def test_a_route_that_opts_in_retries_a_post_on_other_replicas(lb):
    """/writes/ drops envoy.yaml's idempotent-methods-only match: a failing POST is tried 3 times,
    once on each replica (previous_hosts), and one healthy replica answers it."""
    port = lb.port(LISTENER)
    before = {p: lb.hits(p, "/echo/headers") for p in (R1, R2, R3)}
    for p in (R1, R2, R3):
        lb.fail(p, "/echo/headers", "500")
    try:
        r = call(port, "/writes/echo/headers", method="POST")
        assert r.status == 500
        assert {p: lb.hits(p, "/echo/headers") - before[p] for p in (R1, R2, R3)} == {R1: 1, R2: 1, R3: 1}
        lb.fail(R3, None, "off")                          # one replica healthy: the POST gets through
        for _ in range(3):
            r = call(port, "/writes/echo/headers", method="POST")
            assert r.status == 200 and r.header("x-upstream-replica") == "r3"
    finally:
        for p in (R1, R2, R3):
            lb.fail(p, None, "off")
