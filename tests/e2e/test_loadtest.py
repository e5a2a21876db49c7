"""scripts/loadtest end to end: ~5 s of the mix against a small native stack the test starts
(1 Envoy, 2 sidecars, one Redis, Prometheus; scripts/stack.py's Python API, processes tracked by
tests.support.procs), then the JSON and HTML reports are checked for consistency: status counts sum
to the requests (overall, per second, per kind), the hit ratios are ratios and agree with the
sidecars' own counters, the payments breaker tripped, the noisy client (an API key of tier free,
100/min) got its 100 (plus any its sidecars admitted on their local limiter) and then the 429s,
CPU and RSS were measured for the sidecars and the load generator, and the
HTML is self-contained (inline SVG charts, well-formed, nothing fetched). The stack's Prometheus
scrapes every target meanwhile.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

import pytest

from tests.support.procs import ROOT, Proc, wait_until
from tests.unit.test_stack_config import load_script

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

stackmod = load_script("stack")

DURATION_S, RPS = 5, 120
MIX = "noisy=40,payment=12"        # enough of both in 5 s: > 100 noisy requests, > 5 payments in the failure window


def prometheus_targets_up(url: str) -> dict[str, int]:
    query = urllib.parse.urlencode({"query": "up == 1"})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=3) as resp:
        result = json.loads(resp.read())["data"]["result"]
    jobs: dict[str, int] = {}
    for r in result:
        jobs[r["metric"]["job"]] = jobs.get(r["metric"]["job"], 0) + 1
    return jobs


def test_loadtest_reports_a_consistent_run(tmp_path):
    topo = stackmod.Topology(envoys=1, sidecars=2, redis="single", base_port=0, prometheus=True,
                             state_dir=tmp_path / "stack")
    s = stackmod.Stack(topo, proc_factory=Proc)
    s.start()
    out_json, out_html, out_svg = tmp_path / "report.json", tmp_path / "report.html", tmp_path / "report.svg"
    try:
        info = s.info()
        stack_file = tmp_path / "stack.json"
        stack_file.write_text(json.dumps(info))
        run = Proc("loadtest", [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--stack", str(stack_file),
                                "--duration", str(DURATION_S), "--rps", str(RPS), "--mix", MIX, "--fail-window", "0.1,0.8",
                                "--json", str(out_json), "--html", str(out_html), "--svg", str(out_svg)],
                   tmp_path / "logs")
        try:
            wait_until(lambda: not run.alive(), timeout=40, interval=0.1, what="the load test to finish")
        finally:
            run.stop()
        assert run.popen.returncode == 0, run.log_tail(80)
        wait_until(lambda: prometheus_targets_up(info["prometheus"]["url"]) == {"envoy": 1, "extproc": 2, "prometheus": 1},
                   timeout=20, interval=0.2, what="Prometheus scraping the Envoy, both sidecars and itself")
    finally:
        s.stop()

    log = run.log_text()
    assert re.search(r"^\[\s*1/5 s\]", log, re.M), log            # plain progress lines when not on a TTY
    assert "not the bottleneck" in log or "may be the bottleneck" in log

    r = json.loads(out_json.read_text())
    total = r["requests"]
    assert total == DURATION_S * RPS                               # paced: every slot of the schedule is sent
    assert sum(r["status"].values()) == total
    assert sum(k["requests"] for k in r["kinds"].values()) == total
    assert sum(sum(k["status"].values()) for k in r["kinds"].values()) == total
    series = r["series"]
    assert sum(series["requests"]) == total and len(series["requests"]) == DURATION_S
    for i, n in enumerate(series["requests"]):
        assert sum(series["status_classes"][c][i] for c in series["status_classes"]) == n, i
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["status"].get("error", 0) == 0, r["errors"]

    # cache: ratios in [0, 1], and the client's view agrees with the sidecars' counters
    client, side = r["cache"]["client"], r["cache"]["sidecars"]
    assert 0 <= client["hit_ratio"] <= 1 and 0 <= side["hit_ratio"] <= 1
    assert client["lookups"] == side["hits"] + side["misses"], (client, side)
    assert abs(client["hit_ratio"] - side["hit_ratio"]) < 0.01
    assert all(x is None or 0 <= x <= 1 for x in series["hit_ratio"] + series["sidecar_hit_ratio"])

    # the breaker tripped: exactly the failures before it, then the breaker's own answers
    b = r["breakers"]
    assert b["trips"] >= 1 and b["transitions"].get("payments:closed->open", 0) >= 1, b
    assert r["status"].get("500", 0) >= 5 and r["details"].get("circuit_open", 0) > 0, (r["status"], r["details"])
    assert r["kinds"]["payment"]["details"].get("circuit_open") == r["details"]["circuit_open"]   # only payments
    assert [e["control_status"] for e in r["events"]] == [[200, 200], [200, 200]]

    # rate limits: the 429s are the noisy client's, which got its 100 and then refusals
    noisy = r["rate_limits"]["noisy_client"]
    assert "API key" in noisy["how"]
    assert r["status"].get("429", 0) == noisy["rejected_429"] > 0
    # exactly its limit, plus what replicas admitted on their local limiter when Redis answered slower
    # than the shipped 20 ms store timeout (a busy 2-core machine does that; the report counts them)
    fallback = r["rate_limits"]["sidecar_decisions"].get("local_fallback", 0)
    assert 100 <= r["kinds"]["noisy"]["status"].get("200", 0) <= 100 + fallback, (r["kinds"]["noisy"], fallback)

    # CPU and RSS per sidecar process, and the load generator's own
    procs = {p["name"]: p for p in r["processes"]}
    for name in ("sidecar-1", "sidecar-2", "envoy-1"):
        assert procs[name]["cpu_percent"] > 0 and procs[name]["rss_mb_max"] > 10, procs[name]
        assert procs[name]["pid"] == next(x["pid"] for x in info["sidecars"] + info["envoys"] if x["name"] == name)
    assert 0 < r["loadgen"]["cpu_percent"] < 100 and r["loadgen"]["rss_mb"] > 0
    assert len(series["cpu_percent"]["sidecar-1"]) == DURATION_S

    # the HTML: self-contained, five inline SVG charts, each well-formed, with the run's numbers
    page = out_html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for forbidden in ("<script", 'src="http', "href=", "@import", "url("):
        assert forbidden not in page, forbidden
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) == 5
    for svg in svgs:
        ET.fromstring(svg)
    for title in ("Requests per second, by status class", "Latency per second (ms)", "Status mix (whole run)",
                  "Cache hit ratio per second", "CPU per process (% of one core)"):
        assert title in page, title
    assert "<polygon" in page and "<polyline" in page                 # the stacked area and the lines are drawn
    assert f">{r['rps']:.0f}<" in page and f">{r['rate_limits']['rejected_429']}<" in page
    dashboard = ET.fromstring(out_svg.read_text())
    assert dashboard.tag.endswith("svg") and len(dashboard.findall("{http://www.w3.org/2000/svg}svg")) == 5
