"""A real Prometheus scrapes the real stack: every dashboard query and alert evaluates.

Prometheus runs the shipped observability/prometheus/prometheus.yml with only its targets (the
session stack's Envoy admin and sidecar admin ports) and intervals (1 s) rewritten, and loads the
shipped alerts.yml. The compose load generator (observability/compose/loadgen.py) drives a few
hundred requests through Envoy; then each panel's query and each alert expression must evaluate
without error, the queries that traffic exercises must return data, every Envoy and process metric
the dashboards name must exist, and every alert rule must evaluate healthy in Prometheus itself.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from extproc.demo import idp
from tests.support.procs import ROOT, Proc, free_port, http_status, wait_until
from tests.unit.test_observability import (
    ALERTS,
    DASHBOARDS,
    PROMETHEUS_YML,
    alert_rules,
    dashboard,
    metric_names,
    panels,
    substitute,
    variables,
)

pytestmark = pytest.mark.e2e

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
LOADGEN = ROOT / "observability" / "compose" / "loadgen.py"
RATE_WINDOW = "30s"          # $__rate_interval at a 1 s scrape interval: the whole run fits in it
REQUESTS = 400               # the load generator's mix: 10 anonymous (401) and 1 5xx probe per 200


@dataclass
class Prometheus:
    url: str

    def api(self, path: str, **params: str):
        data = urllib.parse.urlencode(params).encode() if params else None
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", data=data, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def scrape_config(stack, self_port: int) -> dict:
    """The shipped prometheus.yml pointed at the session stack, scraping every second."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ALERTS)]
    targets = {
        "envoy": [(f"127.0.0.1:{stack.ports['envoy_admin']}", "envoy")],
        "extproc": [(f"127.0.0.1:{stack.ports['sidecar_admin']}", "extproc-1")],
        "prometheus": [(f"127.0.0.1:{self_port}", None)],
    }
    for job in cfg["scrape_configs"]:
        if job["job_name"] not in targets:
            raise KeyError(f"prometheus.yml has job {job['job_name']!r}, which this test does not map")
        job["static_configs"] = [{"targets": [t], **({"labels": {"instance": i}} if i else {})}
                                 for t, i in targets[job["job_name"]]]
    return cfg


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory) -> Prometheus:
    if not Path(PROMETHEUS_BIN).exists():
        pytest.fail("prometheus not found: scripts/setup installs Debian's prometheus package")
    d = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = d / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(stack, port)))
    proc = Proc("prometheus", [PROMETHEUS_BIN, f"--config.file={config}", f"--storage.tsdb.path={d / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], d / "logs")
    try:
        proc.wait_ready(lambda: http_status(f"http://127.0.0.1:{port}/-/ready") == 200, timeout=20)
        prom = Prometheus(f"http://127.0.0.1:{port}")
        # a scrape of each target before the traffic, so rates have a baseline
        wait_until(lambda: {r["metric"]["job"] for r in prom.query("up == 1")} >= {"envoy", "extproc"},
                   timeout=10, what="Prometheus scraping Envoy and the sidecar")
        yield prom
    finally:
        proc.stop()


def run_loadgen(stack, directory, requests: int) -> dict[str, int]:
    """`requests` requests through Envoy by the compose load generator; its counts by status."""
    token = idp.load_or_create(stack.dir).mint("prometheus-e2e", scopes=["read"])
    proc = Proc("loadgen", [sys.executable, str(LOADGEN), "--target", stack.external, "--token", token,
                            "--requests", str(requests), "--rps", "0", "--concurrency", "8"], directory)
    try:
        wait_until(lambda: not proc.alive(), timeout=20, what="the load generator to finish")
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.log_tail()
    summary = json.loads(proc.log_text().strip().splitlines()[-1])
    assert summary["done"] and summary["sent"] == requests, summary
    return summary


@pytest.fixture(scope="module")
def traffic(stack, prometheus, tmp_path_factory) -> dict[str, int]:
    d = tmp_path_factory.mktemp("loadgen")
    # a warm-up that creates every labelled series the load touches, scraped before the load, so
    # rates over the load have a baseline even on a fresh stack (a series' first sample has none)
    run_loadgen(stack, d / "warm-up", 20)
    wait_until(lambda: prometheus.query('extproc_decisions_total{job="extproc", reason="token_missing"}')
               and prometheus.query('gateway_ratelimit_decisions_total{job="extproc"}'),
               timeout=10, what="Prometheus scraping the warm-up's series")
    return run_loadgen(stack, d / "load", REQUESTS)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr with Grafana's variables substituted) for every target."""
    out = []
    for path in DASHBOARDS:
        board = dashboard(path)
        values = {"__rate_interval": RATE_WINDOW, "__interval": "1s", "__range": "5m",
                  **{name: ".*" for name in variables(board)}}
        for p in panels(board):
            for t in p["targets"]:
                out.append((path.name, p["title"], substitute(t["expr"], values)))
    return out


def panel_exprs(board_file: str, title: str) -> list[str]:
    return [expr for f, t, expr in dashboard_targets() if f == board_file and t == title]


def has_positive_data(prom: Prometheus, expr: str) -> bool:
    return any(math.isfinite(float(r["value"][1])) and float(r["value"][1]) > 0 for r in prom.query(expr))


def test_load_generator_mix(traffic):
    # the session stack is shared: other tests may have deleted a seeded product (404 from the upstream)
    assert traffic.get("200", 0) + traffic.get("404", 0) >= REQUESTS * 0.8, traffic
    assert traffic.get("401") == REQUESTS // 20, traffic            # anonymous reads of a protected route
    assert traffic.get("503") == REQUESTS // 200, traffic           # the 5xx probe
    assert "failed" not in traffic, traffic


@pytest.mark.parametrize(("board_file", "title"), [
    ("gateway-overview.json", "Request rate"),
    ("gateway-overview.json", "Request rate by status class"),
    ("gateway-overview.json", "Request rate by route (policy)"),
    ("gateway-overview.json", "Request latency p50 / p95 / p99"),
    ("gateway-overview.json", "Load across sidecars"),
    ("auth.json", "Decisions by policy and result"),
    ("auth.json", "Deny reasons"),
    ("ratelimits.json", "Decisions by rule and result"),
    ("sidecar.json", "Decision latency"),
    ("sidecar.json", "CPU"),
    ("sidecar.json", "Resident memory"),
])
def test_panels_the_traffic_exercises_show_data(prometheus, traffic, board_file, title):
    exprs = panel_exprs(board_file, title)
    assert exprs, f"no panel {title!r} in {board_file}"
    # Envoy flushes its histograms every 5 s, then the next scrape carries them
    wait_until(lambda: has_positive_data(prometheus, exprs[0]), timeout=20,
               what=f"{board_file} / {title}: {exprs[0]}")


def test_every_dashboard_query_evaluates(prometheus, traffic):
    failures = []
    for board_file, title, expr in dashboard_targets():
        try:
            prometheus.query(expr)
        except Exception as exc:  # noqa: BLE001 - collect every failing query, then report them all
            failures.append(f"{board_file} / {title}: {expr}\n    {exc}")
    assert not failures, "\n".join(failures)


def test_every_alert_expression_evaluates_and_stays_quiet_on_a_healthy_stack(prometheus, traffic):
    for rule in alert_rules():
        prometheus.query(rule["expr"])

    def all_rules_evaluated() -> bool:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return len(rules) == len(alert_rules()) and all(
            not r["lastEvaluation"].startswith("0001") for r in rules)
    wait_until(all_rules_evaluated, timeout=10, what="every alert rule evaluated once")
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"]: r["health"] for r in rules} == {r["alert"]: "ok" for r in alert_rules()}
    # nothing on the healthy stack may be firing (pending is fine: `for` has not elapsed)
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], firing


def test_every_envoy_and_process_metric_the_dashboards_name_exists(prometheus, traffic):
    scraped = set(prometheus.api("label/__name__/values"))
    named = {name for _, _, expr in dashboard_targets() for name in metric_names(expr)}
    named |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    missing = {n for n in named if n.startswith(("envoy_", "process_", "python_")) and n not in scraped}
    assert missing == set()

