"""scripts/bench runs end to end: its own Envoy, upstream and sidecar, wrk load, a JSON report.

A smoke test only: it checks the bench produces numbers, never what the numbers are, and that
the fresh-token variant really sends a new token per request (extproc's decision cache misses)
while the repeat-token variant is served from that cache, that the Redis rate-limit variant
charges both its rules in Redis on every request (never the local fallback) and measures Redis' CPU,
and the batched one decides both on every request without the fallback,
and that the response-cache rows are what they claim: the hit row never reaches the upstream, the
miss row stores a new key on every request, the bypass row never stores, Envoy's cache filter
answers its row, and the LRU row evicts within its byte bound; and that the circuit-breaker rows
are what they claim: a closed breaker lets every request through and counts nothing, a breaker
forced open answers every request itself (its 503, not counted as an error) with nothing reaching
the upstream, the access logger delivers an entry per request, and the trip test opens each
wiring's breaker (the ext_proc wiring after exactly its threshold at c=1).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


@pytest.mark.e2e
def test_bench_quick_reports_the_variants(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: run ./scripts/setup --system (it installs wrk)")
    out = tmp_path / "bench.json"
    variants = {"plain", "extproc_authz", "extproc_authz_fresh", "extproc_ratelimit_redis", "extproc_ratelimit_batched",
                "extproc_cache_hit", "extproc_cache_miss", "extproc_cache_bypass", "extproc_cache_lru", "native_cache",
                # the circuit-breaker rows and the rows they are compared with (not the floor's x nor the
                # attribute-only z: the smoke test stays within a minute)
                "extproc_ext_proc_delay", "extproc_breaker_ext_proc", "extproc_breaker_ext_proc_open",
                "extproc_authz_delay", "extproc_authz_accesslog", "extproc_breaker_lean", "extproc_breaker_lean_open"}
    argv = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--variants", ",".join(sorted(variants)),
            "--duration", "1", "--fresh-tokens", "5000", "--json", str(out),
            # the smoke test proves the wiring (Redis decides every request), not the timing: on two shared
            # cores at c=32 a queued call can outwait the demo's 20 ms and fall back (seen in CI)
            "--store-timeout-ms", "1000"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the bench stop the Envoy, upstream and sidecar it started
        os.kill(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"scripts/bench.py did not finish within {TIMEOUT_S} s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"scripts/bench.py exited {proc.returncode}:\n{text}"

    doc = json.loads(out.read_text())
    rows = {(s["variant"], s["concurrency"]): s for s in doc["summary"]}
    assert {v for v, _ in rows} == variants, text
    for (variant, conns), s in rows.items():
        assert s["rps"] > 0, f"{variant} c={conns}: no requests completed\n{text}"
        if variant.startswith(("extproc_", "floor_")):
            assert s["cpu_us_per_request"] is not None and s["cpu_us_per_request"] > 0, (
                f"{variant} c={conns}: sidecar CPU not measured\n{text}")
            if "authz" in doc["variants"][variant]["filters"] and variant.startswith("extproc_"):
                assert s["auth_cache"] is not None, f"{variant} c={conns}: decision cache not read\n{text}"
        else:
            assert s["cpu_us_per_request"] is None
    for conns in (1, 32):
        repeat, fresh = rows[("extproc_authz", conns)], rows[("extproc_authz_fresh", conns)]
        assert repeat["auth_cache"]["hit"] >= 0.9 * repeat["requests"], f"repeat token not cached\n{text}"
        toks = fresh["tokens"]
        assert toks is not None and toks["used"] >= fresh["requests"], f"fresh tokens not counted\n{text}"
        # every request a new token: extproc verifies each one (a token reused from the pool may hit)
        assert fresh["auth_cache"]["miss"] >= 0.9 * (fresh["requests"] - toks["reused"]), (
            f"c={conns}: wrk's Lua did not rotate the token\n{text}")
    assert doc["meta"]["store_timeout_ms"] == 1000, text
    rules = len(doc["meta"]["ratelimit_rules"])
    redis_cpu = 0.0
    # per request and batched (docs/ratelimit-batched.md: decided locally against what Redis last
    # said): one ok decision per rule and request either way, never by the fallback
    for variant, conns in itertools.product(("extproc_ratelimit_redis", "extproc_ratelimit_batched"), (1, 32)):
        limited = rows[(variant, conns)]
        rl = limited["ratelimit"]
        # every Check (a retry too) is charged once per rule
        assert rl is not None and rl.get("ok", 0) >= 0.9 * rules * limited["requests"], (
            f"{variant} c={conns}: rate-limit rules not applied on every request: {rl}\n{text}")
        assert not any(rl.get(k) for k in ("local_fallback", "fail_open", "store_unavailable", "over_limit")), (
            f"{variant} c={conns}: Redis did not decide every request: {rl}\n{text}")
        assert limited["vs_baseline"]["variant"] == "extproc_authz"
        if variant == "extproc_ratelimit_redis":
            assert limited["redis_cpu_us_per_request"] is not None, f"c={conns}: Redis CPU not measured\n{text}"
            redis_cpu += limited["redis_cpu_us_per_request"]
            assert rows[("extproc_authz", conns)]["ratelimit"] is None

    written = 0
    for conns in (1, 32):
        hit, miss, bypass, lru = (rows[(f"extproc_cache_{k}", conns)] for k in ("hit", "miss", "bypass", "lru"))
        native = rows[("native_cache", conns)]
        rc = hit["response_cache"]
        # every request answered from the LRU; a hit never reaches the upstream
        assert rc["hit"] >= 0.9 * hit["requests"] and not rc["miss"], f"c={conns}: hit row not hits: {rc}\n{text}"
        assert hit["upstream_requests"] <= 0.01 * hit["requests"], f"c={conns}: hits reached the upstream\n{text}"
        # a new key per request: each one a miss that goes upstream and is stored (Envoy lets the body through)
        rc = miss["response_cache"]
        assert rc["miss"] >= 0.9 * miss["requests"] and rc["stored"] >= 0.9 * miss["requests"] and not rc["hit"], (
            f"c={conns}: miss row did not miss and store a new key per request: {rc}\n{text}")
        assert miss["upstream_requests"] >= miss["requests"], text
        rc = bypass["response_cache"]
        assert rc["bypass"] >= 0.9 * bypass["requests"] and not rc["stored"] and not rc["hit"], (
            f"c={conns}: bypass row: {rc}\n{text}")
        assert bypass["upstream_requests"] >= bypass["requests"], text
        assert native["upstream_requests"] <= 0.01 * native["requests"], f"c={conns}: Envoy's cache missed\n{text}"
        assert native["response_cache"] is None and native["cpu_us_per_request"] is None
        mem = lru["cache_memory"]
        assert mem is not None and 0 < mem["stored_bytes_max"] <= mem["bound"], f"c={conns}: LRU {mem}\n{text}"
        written += mem["written_bytes"]
    # the LRU rows wrote more than the bound into it: it had to evict, and held its bound meanwhile
    assert written > doc["cache"]["lru"][0]["bound"], f"the LRU load never reached the bound\n{text}"
    assert doc["cache"]["lru_within_bound"] is True
    for entry in doc["cache"]["routes"]:
        # read, not asserted: the verdicts exist for every concurrency of the 0 ms route
        assert entry["upstream_ms"] == 0 and entry["hit_cheaper_than_miss"] is not None, text
    assert doc["meta"]["envoy_version"] and doc["meta"]["pinning"] and doc["meta"]["redis_version"]

    breakers = doc["breaker"]
    for conns in (1, 32):
        for wiring in ("ext_proc", "lean"):
            closed, opened = rows[(f"extproc_breaker_{wiring}", conns)], rows[(f"extproc_breaker_{wiring}_open", conns)]
            # closed: every request went through, nothing counted against the upstream
            assert closed["breaker"] == {"rejected": 0, "failures": 0, "transitions": 0}, f"{wiring}: {closed}\n{text}"
            assert closed["upstream_requests"] >= closed["requests"] and not closed["flagged"], (
                f"c={conns} {wiring}: closed row: {closed['upstream_requests']} upstream requests for "
                f"{closed['requests']} requests, errors {closed['errors']}, events {closed.get('envoy_events')}\n{text}")
            # open: every request answered by the breaker (a 503 the bench expects), none reached the upstream
            assert opened["breaker"]["rejected"] >= opened["requests"] and opened["upstream_requests"] == 0, (
                f"c={conns} {wiring}: open row {opened['breaker']}, {opened['upstream_requests']} upstream\n{text}")
            assert opened["errors"]["status"] == opened["requests"] and opened["error_count"] == 0, (
                f"c={conns} {wiring}: open row errors {opened['errors']} for {opened['requests']} requests\n{text}")
        for variant in ("extproc_authz_accesslog", "extproc_breaker_lean", "extproc_breaker_lean_open"):
            s = rows[(variant, conns)]
            assert s["access_log"] is not None and s["access_log"] >= s["requests"], (
                f"c={conns} {variant}: {s['access_log']} access-log entries for {s['requests']} requests\n{text}")
        assert rows[("extproc_authz_delay", conns)]["access_log"] is None
    # read, not asserted: each wiring's whole cost is read against the seed's 1 ms at both concurrencies
    assert {(d["variant"], d["concurrency"]) for d in breakers["closed"] if d["target"]} == {
        (f"extproc_breaker_{w}", c) for w in ("ext_proc", "lean") for c in (1, 32)}, text
    assert all(d["under_target"] is not None for d in breakers["closed"] if d["target"]), text
    assert len(breakers["open"]) == 4 and all(d["all_rejected"] for d in breakers["open"]), text
    trips = {(t["wiring"], t["concurrency"]): t for t in breakers["trip"]}
    assert set(trips) == {(w, c) for w in ("ext_proc", "lean") for c in (1, 32)}, text
    for t in trips.values():
        assert t["open_after_ms"] is not None and t["state_after"] == "open" and t["transitions"] >= 1, f"{t}\n{text}"
        assert t["upstream_requests"] >= t["threshold"], f"{t}\n{text}"
    # the ext_proc wiring counts each failure in its stream before the client gets the answer: exact at c=1
    assert trips[("ext_proc", 1)]["upstream_requests"] == trips[("ext_proc", 1)]["threshold"], text
