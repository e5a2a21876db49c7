"""scripts/bench.py's report arithmetic: `cpu/floor` pairs each round with the floor's same round.

On a shared machine a slow spell raises every process's CPU per request for a while; a ratio of
medians taken from different spells mixes them. The identity target is read from the median of
per-round ratios instead, and the report prints each round's.
"""

from __future__ import annotations

from tests.unit.test_stack_config import load_script

bench = load_script("bench")


def _row(variant: str, rnd: int, cpu: float, conns: int = 32) -> dict:
    return {"variant": variant, "concurrency": conns, "round": rnd, "rps": 2000.0, "p50_ms": 1.0, "p99_ms": 2.0,
            "cpu_us_per_request": cpu, "rss_mb": 40.0, "hwm_mb": 40.0, "envoy_cpu_us_per_request": 200.0,
            "upstream_cpu_us_per_request": 100.0, "redis_cpu_us_per_request": None, "requests": 1000,
            "errors": {"status": 0}, "error_count": 0}


def _summary(rows: list[dict]) -> dict[tuple[str, int], dict]:
    variants = [bench.BY_NAME["floor_authz"], bench.BY_NAME["extproc_authz"]]
    return {(s["variant"], s["concurrency"]): s for s in bench.summarize(rows, variants)}


def test_cpu_of_floor_is_the_median_of_same_round_ratios():
    # round 2 ran in a slow spell for both: 1.5x slower, the same 1.05x between them
    rows = [_row("floor_authz", 1, 300), _row("extproc_authz", 1, 315),
            _row("floor_authz", 2, 450), _row("extproc_authz", 2, 472.5),
            _row("floor_authz", 3, 310), _row("extproc_authz", 3, 341)]
    s = _summary(rows)[("extproc_authz", 32)]
    assert s["cpu_of_floor_runs"] == [1.05, 1.05, 1.1]
    assert s["cpu_of_floor"] == 1.05
    # the ratio of the medians would have paired round 3's extproc with round 1's floor
    assert round(s["cpu_us_per_request"] / _summary(rows)[("floor_authz", 32)]["cpu_us_per_request"], 3) == 1.1
    block = bench.identity_block(list(_summary(rows).values()))
    assert "extproc_authz c=32: per round 1.05 1.05 1.10; median 1.05x" in block and "met" in block


def test_a_round_without_its_floor_is_left_out_and_no_floor_falls_back_to_medians():
    rows = [_row("floor_authz", 1, 300), _row("extproc_authz", 1, 330), _row("extproc_authz", 2, 900)]
    s = _summary(rows)[("extproc_authz", 32)]
    assert s["cpu_of_floor_runs"] == [1.1]
    assert s["cpu_of_floor"] == 1.1
    assert "not met" not in bench.identity_block([s])
    alone = _summary([_row("extproc_authz", 1, 330)])[("extproc_authz", 32)]
    assert alone["cpu_of_floor"] is None and alone["cpu_of_floor_runs"] == []
    assert bench.identity_block([alone]) == ""


def test_side_by_side_runs_the_repeat_extproc_rows_whose_floor_was_chosen():
    chosen = bench.parse_variants("c,d,g,h,k")      # floor, RS256, ES256, fresh RS256, rate-limited (own sidecar)
    assert [v.name for v in bench.side_by_side_variants(chosen)] == ["extproc_authz", "extproc_authz_es256"]
    assert bench.side_by_side_variants(bench.parse_variants("d,g")) == []      # no floor chosen, no pair


def test_side_by_side_block_gives_each_rounds_ratio_and_the_median():
    pairs = [{"variant": "extproc_authz", "floor": "floor_authz", "concurrency": 32, "rps": r, "floor_rps": r,
              "cpu_of_floor": x, "round": i} for i, (x, r) in enumerate([(1.02, 1200), (1.30, 1000), (1.04, 1100)])]
    block = bench.side_by_side_block(pairs)
    assert "extproc_authz c=32 with floor_authz: per round 1.02 1.30 1.04; median 1.04x at 1,100 / 1,100 rps" in block
    assert "identity target <= 1.10x: met" in block
    pairs[0]["cpu_of_floor"] = pairs[2]["cpu_of_floor"] = 1.2
    assert "not met" in bench.side_by_side_block(pairs)
