"""Envoy's NATIVE ratelimit filter pointed at extproc's RateLimitService, end to end.

The shipped example pair runs as shipped — envoy/examples/ratelimit-service.yaml (only its
ports rewritten; for two sidecar replicas, the sidecar endpoint listed once per replica) and
envoy/examples/ratelimit-service.extproc.yaml (its listen ports rewritten, the drain delay cut
for fast stops, and for the replicas test its store pointed at a real Redis) — with the demo
upstream behind Envoy. Proven through the real Envoy: 429 after exactly N with the headers
extproc computes, exactly N across two sidecar processes sharing Redis, per-IP limits, the
unlimited node, the monthly quota's headers, and Envoy's failure_mode_deny with the sidecar
down. Processes are started through Proc and stopped by PID; nothing sleeps.
"""

from __future__ import annotations

import copy
import datetime as dt
import http.client
import json
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.core.ratelimit import Period
from tests.support.procs import ROOT, VENV_BIN, Proc, free_ports, http_status, port_open, wait_until
from tests.support.redis_servers import RedisServer
from tests.support.stack import rewrite_ports

pytestmark = pytest.mark.e2e

BOOTSTRAP = ROOT / "envoy" / "examples" / "ratelimit-service.yaml"
SIDECAR_CONFIG = ROOT / "envoy" / "examples" / "ratelimit-service.extproc.yaml"
ENVOY_BIN = VENV_BIN / "envoy"
# the example's ports, by role
LISTENER, ENVOY_ADMIN, UPSTREAM, SIDECAR = 8000, 9901, 18080, 50051
PER_USER, PER_IP, MONTHLY = 20, 5, 1000



@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None


def get(port: int, path: str, headers: dict[str, str] | None = None, source_ip: str = "127.0.0.1") -> Reply:
    """One GET through Envoy from `source_ip` (any 127/8 address: a distinct client address)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source_ip, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        out: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            out.setdefault(k.lower(), []).append(v)
        return Reply(resp.status, out)
    finally:
        conn.close()


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.read().decode()


def envoy_stats(admin: int) -> dict[str, str]:
    """Envoy's non-zero ratelimit filter counters (ok, over_limit, error, failure_mode_allowed)
    and extproc cluster request counters (retries, timeouts, resets), for failure messages."""
    lines = fetch_text(f"http://127.0.0.1:{admin}/stats?filter=ratelimit|cluster.extproc.upstream_rq").splitlines()
    pairs = (line.split(": ", 1) for line in lines if ": " in line)
    return {k: v for k, v in pairs if v.isdigit() and v != "0"}


@dataclass
class Sidecar:
    proc: Proc
    port: int
    admin_port: int

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = fetch_text(f"http://127.0.0.1:{self.admin_port}/metrics")
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


@dataclass
class RlsStack:
    dir: Path
    upstream_port: int
    procs: list[Proc] = field(default_factory=list)
    admin_of: dict[int, int] = field(default_factory=dict)     # Envoy listener port -> its admin port

    def start_upstream(self) -> None:
        p = Proc("rls-upstream", [sys.executable, "-m", "extproc.demo.upstream", "--port", str(self.upstream_port),
                                  "--replica-id", "r1", "--state-dir", str(self.dir)], self.dir / "logs")
        self.procs.append(p)
        p.wait_ready(lambda: http_status(f"http://127.0.0.1:{self.upstream_port}/public/health") == 200)

    def start_sidecar(self, name: str, redis_url: str | None = None) -> Sidecar:
        port, admin_port = free_ports(2)
        cfg = yaml.safe_load(SIDECAR_CONFIG.read_text())
        cfg["server"]["listen"] = f"127.0.0.1:{port}"
        cfg["server"]["drain_delay_seconds"] = 0          # scaled down from 2.5 s: stops are immediate
        cfg["admin"]["listen"] = f"127.0.0.1:{admin_port}"
        if redis_url is not None:
            cfg["store"] = {"redis": {"url": redis_url, "timeout_ms": 500}}
            cfg["ratelimit_service"]["store_timeout_ms"] = 500   # a busy test machine: never fail open here
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        p = Proc(name, [str(VENV_BIN / "extproc"), "serve", "--config", str(path)], self.dir / "logs")
        self.procs.append(p)
        p.wait_ready(lambda: http_status(f"http://127.0.0.1:{admin_port}/readyz") == 200 and port_open(port))
        return Sidecar(p, port, admin_port)

    def start_envoy(self, name: str, sidecar_ports: list[int], *, failure_mode_deny: bool | None = None,
                    wait_healthy: bool = True) -> tuple[int, Proc]:
        listener, admin = free_ports(2)
        doc = rewrite_ports(yaml.safe_load(BOOTSTRAP.read_text()), {
            LISTENER: listener, ENVOY_ADMIN: admin, UPSTREAM: self.upstream_port, SIDECAR: sidecar_ports[0]})
        cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "extproc")
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        for port in sidecar_ports[1:]:             # one endpoint per sidecar replica
            extra = copy.deepcopy(endpoints[0])
            extra["endpoint"]["address"]["socket_address"]["port_value"] = port
            endpoints.append(extra)
        if failure_mode_deny is not None:
            hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            rl = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit")
            rl["typed_config"]["failure_mode_deny"] = failure_mode_deny
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(doc))
        p = Proc(name, [str(ENVOY_BIN), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                        "--log-level", "warn", "--drain-time-s", "1"], self.dir / "logs")
        self.procs.append(p)
        self.admin_of[listener] = admin
        p.wait_ready(lambda: http_status(f"http://127.0.0.1:{admin}/ready") == 200)
        if wait_healthy:
            wait_until(lambda: self._healthy(admin, len(sidecar_ports)), timeout=20,
                       what=f"{name}: every sidecar endpoint healthy")
        return listener, p

    @staticmethod
    def _healthy(admin: int, expected: int) -> bool:
        lines = fetch_text(f"http://127.0.0.1:{admin}/clusters").splitlines()
        flags = [ln.rsplit("::", 1)[1] for ln in lines if ln.startswith("extproc::") and "::health_flags::" in ln]
        return len(flags) == expected and all(f == "healthy" for f in flags)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RlsStack]:
    s = RlsStack(tmp_path_factory.mktemp("rls-stack"), free_ports(1)[0])
    try:
        s.start_upstream()
        yield s
    finally:
        s.stop()


@dataclass
class Replicas:
    envoy: int
    admin: int
    sidecars: list[Sidecar]


@pytest.fixture(scope="module")
def replicas(stack: RlsStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two sidecar processes sharing one real Redis, both endpoints of Envoy's extproc cluster."""
    redis = RedisServer(tmp_path_factory.mktemp("rls-redis"), name="rls-e2e-redis")
    started = len(stack.procs)
    try:
        sidecars = [stack.start_sidecar(f"rls-sidecar-{i}", redis.url) for i in (1, 2)]
        port, _ = stack.start_envoy("rls-envoy", [s.port for s in sidecars])
        yield Replicas(port, stack.admin_of[port], sidecars)
    finally:
        for p in reversed(stack.procs[started:]):
            p.stop()
        redis.stop()


def user() -> dict[str, str]:
    return {"x-user-id": f"user-{uuid.uuid4().hex[:10]}"}


def test_429_after_exactly_n_with_the_sidecars_headers(replicas: Replicas):
    headers = user()
    replies = [get(replicas.envoy, "/api/products", headers) for _ in range(PER_USER + 3)]
    assert [r.status for r in replies] == [200] * PER_USER + [429] * 3, envoy_stats(replicas.admin)
    ok, first_429 = replies[0], replies[PER_USER]
    assert ok.header("x-ratelimit-limit") == str(PER_USER)
    assert ok.header("x-ratelimit-remaining") == str(PER_USER - 1)
    assert ok.header("ratelimit-policy") == f'"per-user";q={PER_USER};w=60'
    assert ok.header("retry-after") is None
    assert [r.header("x-ratelimit-remaining") for r in replies[PER_USER - 2:PER_USER]] == ["1", "0"]
    assert first_429.header("x-ratelimit-remaining") == "0"
    assert first_429.header("ratelimit").startswith('"per-user";r=0;t=')
    assert int(first_429.header("retry-after")) >= 1
    assert first_429.header("x-envoy-ratelimited") == "true"
    # each header once: Envoy's own X-RateLimit headers stay off (see the bootstrap)
    assert all(len(first_429.headers[h]) == 1 for h in ("x-ratelimit-limit", "x-ratelimit-remaining"))
    # another user has its own counter
    assert get(replicas.envoy, "/api/products", user()).status == 200


def test_two_sidecars_sharing_redis_admit_exactly_n_of_a_concurrent_burst(replicas: Replicas):
    headers = user()
    before = [s.metric("extproc_rls_decisions_total", domain="webshop", descriptor="per-user")
              for s in replicas.sidecars]
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(lambda _: get(replicas.envoy, "/api/products", headers).status,
                                 range(PER_USER + 16)))
    assert statuses.count(200) == PER_USER and statuses.count(429) == 16, (statuses, envoy_stats(replicas.admin))
    served = [s.metric("extproc_rls_decisions_total", domain="webshop", descriptor="per-user") - b
              for s, b in zip(replicas.sidecars, before, strict=True)]
    assert sum(served) == PER_USER + 16 and all(n > 0 for n in served), (served, envoy_stats(replicas.admin))


def test_the_most_specific_node_wins_the_monitoring_user_is_unlimited(replicas: Replicas):
    replies = [get(replicas.envoy, "/api/products", {"x-user-id": "monitoring"}) for _ in range(PER_USER + 5)]
    assert {r.status for r in replies} == {200}
    # only the endpoint-wide limit is left to describe
    assert replies[-1].header("ratelimit-policy") == '"api-endpoint";q=10000;w=1'


def test_per_client_address_limit(replicas: Replicas):
    """5 per second per client address: 8 requests from one fresh loopback address, all in one
    second (a burst that straddled a second boundary is repeated from another address)."""
    for attempt in range(2, 12):
        source = f"127.0.0.{attempt}"
        started = dt.datetime.now(dt.UTC).timestamp()
        replies = [get(replicas.envoy, "/public/health", source_ip=source) for _ in range(PER_IP + 3)]
        if int(dt.datetime.now(dt.UTC).timestamp()) == int(started):
            break
    else:
        pytest.fail("every burst straddled a second boundary")
    assert [r.status for r in replies] == [200] * PER_IP + [429] * 3
    assert replies[-1].header("ratelimit-policy") == f'"per-ip";q={PER_IP};w=1'
    assert get(replicas.envoy, "/public/health", source_ip="127.0.0.99").status == 200


def test_the_monthly_quota_is_described_by_its_calendar_month(replicas: Replicas):
    first = get(replicas.envoy, "/reports/monthly")
    second = get(replicas.envoy, "/reports/monthly")
    assert (first.status, second.status) == (200, 200)
    assert int(first.header("x-ratelimit-remaining")) - int(second.header("x-ratelimit-remaining")) == 1
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    _, start, end = Period.MONTH.window(now)
    assert second.header("ratelimit-policy") == f'"reports-monthly";q={MONTHLY};w={(end - start) // 1000}'
    reset = int(second.header("x-ratelimit-reset"))
    assert abs(reset - (end - now) / 1000) < 60


def test_envoy_follows_failure_mode_deny_when_the_sidecar_is_down(stack: RlsStack):
    """One sidecar (memory store) behind two Envoys: the shipped `failure_mode_deny: false` and
    the same bootstrap with true. Both enforce while it runs; once it is stopped the first lets
    requests through without rate-limit headers and the second refuses them."""
    sidecar = stack.start_sidecar("rls-sidecar-solo")
    open_port, _ = stack.start_envoy("rls-envoy-open", [sidecar.port])
    deny_port, _ = stack.start_envoy("rls-envoy-deny", [sidecar.port], failure_mode_deny=True)
    headers = user()
    statuses = [get(port, "/api/products", headers).status for port in (open_port, deny_port)
                for _ in range(PER_USER // 2 + 1)]
    assert statuses.count(200) == PER_USER and statuses.count(429) == 2
    sidecar.proc.stop()
    for _ in range(5):
        passed = get(open_port, "/api/products", headers)
        assert passed.status == 200 and passed.header("x-ratelimit-limit") is None
        assert get(deny_port, "/api/products", headers).status == 500


def _entries(actions: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The descriptor Envoy builds from a route's actions, with sample values."""
    out = []
    for action in actions:
        (kind, spec), = action.items()
        if kind == "remote_address":
            out.append(("remote_address", "203.0.113.7"))
        elif kind == "generic_key":
            out.append((spec.get("descriptor_key", "generic_key"), spec["descriptor_value"]))
        elif kind == "request_headers":
            out.append((spec["descriptor_key"], "alice"))
        else:
            raise AssertionError(f"no sample for action {kind}")
    return out


def test_every_descriptor_the_bootstrap_builds_has_a_limit_in_the_sidecar_config():
    from extproc import config as cfgmod
    from extproc.core.descriptors import Descriptors

    doc = yaml.safe_load(BOOTSTRAP.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    domain_name = next(f for f in hcm["http_filters"]
                       if f["name"] == "envoy.filters.http.ratelimit")["typed_config"]["domain"]
    tree = Descriptors.compile(cfgmod.load(SIDECAR_CONFIG).ratelimit_service)
    assert tree.problems == ()
    domain = tree.domain(domain_name)
    assert domain is not None
    built = [_entries(rl["actions"]) for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]
             for rl in r.get("route", {}).get("rate_limits", [])]
    assert len(built) == 4
    for entries in built:
        rule = domain.match(entries)
        assert rule is not None and rule.limit is not None, entries
    assert {domain.match(e).name for e in built} == {"per-ip", "api-endpoint", "per-user", "reports-monthly"}
