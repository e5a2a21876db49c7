"""scripts/bench runs end to end: its own Envoy, upstream and sidecar, wrk load, a JSON report.

A smoke test only: it checks the bench produces numbers, never what the numbers are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 90


@pytest.mark.e2e
def test_bench_quick_reports_both_variants(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: run ./scripts/setup --system (it installs wrk)")
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--variants", "plain,extproc_authz",
            "--duration", "1", "--json", str(out)]
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
    assert {v for v, _ in rows} == {"plain", "extproc_authz"}, text
    for (variant, conns), s in rows.items():
        assert s["rps"] > 0, f"{variant} c={conns}: no requests completed\n{text}"
        if variant == "extproc_authz":
            assert s["cpu_us_per_request"] is not None and s["cpu_us_per_request"] > 0, (
                f"{variant} c={conns}: sidecar CPU not measured\n{text}")
        else:
            assert s["cpu_us_per_request"] is None
    assert doc["meta"]["envoy_version"] and doc["meta"]["pinning"]
