"""Sidecar failures as Envoy's clients see them: restarts, drains, a dead worker, a dead Redis.

Each test here kills or drains a sidecar, so each gets its own stack (the shared session stack
is never disturbed).
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.request
from collections import Counter

import pytest

from extproc.demo import idp
from tests.support.http import get, request
from tests.support.load import BackgroundLoad
from tests.support.procs import free_consecutive, http_status, wait_until
from tests.support.redis_servers import RedisServer
from tests.support.stack import ROOT, SIDECAR, get_json, new_stack

pytestmark = pytest.mark.e2e

# these tests load one user far past the demo's per-user quota: rate limits are not under test here
NO_LIMITS = {"rate_limits.rules": []}


@pytest.fixture
def own_stack(tmp_path):
    s = new_stack(tmp_path / "stack")
    try:
        s.start_upstream()
        s.write_sidecar_config(NO_LIMITS)
        yield s
    finally:
        s.stop()


def test_sidecar_restart_under_load_never_lets_traffic_through_unchecked(own_stack):
    s = own_stack
    s.start_sidecar()
    s.start_envoy()
    token = idp.load_or_create(s.dir).mint("alice")
    with BackgroundLoad(f"{s.external}/api/products/1") as anon, BackgroundLoad(f"{s.external}/api/products/1", token) as authed:
        anon.wait_for_more(20)
        authed.wait_for_more(20)
        s.procs["sidecar"].kill()                         # crash, not a drain
        wait_until(lambda: http_status(f"{s.external}/api/products/1") == 503, what="envoy answering 503")
        anon.wait_for_more(20)
        authed.wait_for_more(20)
        s.start_sidecar(name="sidecar-restarted")         # same ports; Envoy is not restarted
        wait_until(lambda: get(f"{s.external}/api/products/1", token).status == 200, timeout=20,
                   what="traffic resuming through the same Envoy")
        authed.wait_for_more(20)
    anon_seen = Counter(anon.statuses)
    authed_seen = Counter(authed.statuses)
    # without a token: only 401 (decided) or 503 (sidecar down) — never the upstream's 200
    assert set(anon_seen) <= {401, 503}, anon_seen
    assert anon_seen[503] > 0 and anon_seen[401] > 0
    # with a token: 200 before and after, the honest 503 in between, nothing else
    assert set(authed_seen) <= {200, 503}, authed_seen
    assert authed_seen[200] > 0 and authed_seen[503] > 0


def test_sigterm_drains_in_flight_streams_and_exits_zero(own_stack):
    s = own_stack
    side = s.start_sidecar()
    s.start_envoy()
    result: dict[str, object] = {}

    def slow() -> None:
        # /delay keeps the ext_proc stream open until the upstream answers
        try:
            result["status"] = get(f"{s.external}/delay/1500", timeout=10).status
        except OSError as exc:
            result["status"] = exc

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: get_json(f"{s.upstream}/_control/hits")["hits"].get("/delay/1500", 0) >= 1,
               what="the slow request reaching the upstream")
    side.signal(signal.SIGTERM)
    wait_until(lambda: http_status(f"{s.sidecar_admin}/readyz") == 503, timeout=5, what="readyz saying draining")
    assert t.is_alive()                       # the in-flight request is still being served
    t.join(timeout=15)
    assert result.get("status") == 200, result
    side.popen.wait(timeout=15)
    assert side.popen.returncode == 0
    log = side.log_text()
    assert '"msg": "draining"' in log and '"msg": "stopped"' in log
    assert "Traceback" not in log


def test_two_workers_one_killed_loses_no_request(tmp_path):
    """SIGTERM of a worker under load loses nothing (it drains); SIGKILL loses at most the
    ext_proc streams that worker held at that instant (one per client connection), answered
    503, and nothing after: Envoy retries calls on the other worker."""
    redis = RedisServer(tmp_path / "redis")
    base = free_consecutive(2)
    s = new_stack(tmp_path / "stack")
    s.ports["sidecar"] = base
    threads = 4

    def workers() -> dict:
        return get_json(f"{s.sidecar_admin}/readyz")

    def both_up() -> bool:
        w = workers()["workers"]
        return len(w) == 2 and all(v == "up" for v in w.values())

    try:
        s.start_upstream()
        s.write_sidecar_config({"server.workers": 2, "store": {"redis": {"url": redis.url}}, **NO_LIMITS})
        own_tmp = tmp_path / "tmp"            # where the supervisor makes its metrics directory
        own_tmp.mkdir()
        sup = s.start_sidecar(env={"TMPDIR": str(own_tmp)})
        assert [p.name[:16] for p in own_tmp.iterdir()] == ["extproc-metrics-"]
        wait_until(both_up, what="both workers up")
        s.start_envoy(ROOT / "envoy" / "envoy-workers.yaml", extra_map={SIDECAR + 1: base + 1})
        token = idp.load_or_create(s.dir).mint("alice")

        pids = workers()["worker_pids"]
        with BackgroundLoad(f"{s.external}/api/products/1", token, threads=threads) as load:
            load.wait_for_more(50)
            os.kill(int(pids["1"]), signal.SIGTERM)
            wait_until(lambda: workers()["worker_pids"]["1"] != pids["1"] and both_up(), what="worker 1 back")
            load.wait_for_more(100)
            # Envoy's view: both workers healthy and not ejected before the next failure
            try:
                wait_until(s.sidecar_hosts_healthy, timeout=20, what="envoy seeing both workers healthy")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {s.last_health_flags}") from None
        assert set(Counter(load.statuses)) == {200}, Counter(load.statuses)
        # one /metrics on the supervisor's admin port aggregates every worker's decisions (each
        # worker adds its decision counts every 100 ms: the last ones may show a moment later)
        def allowed() -> float:
            with urllib.request.urlopen(f"{s.sidecar_admin}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("extproc_decisions_total{") and 'result="allow"' in line)
        wait_until(lambda: allowed() >= len(load.statuses), timeout=10, what="every allowed request counted")

        pids = workers()["worker_pids"]
        with BackgroundLoad(f"{s.external}/api/products/1", token, threads=threads) as load:
            load.wait_for_more(50)
            os.kill(int(pids["0"]), signal.SIGKILL)
            load.wait_for_more(50)
            killed_at = load.count()
            load.wait_for_more(200)
        seen = Counter(load.statuses)
        assert set(seen) <= {200, 503}, seen
        assert seen[503] <= threads, seen
        assert set(load.statuses[killed_at:]) == {200}
        wait_until(lambda: workers()["worker_pids"]["0"] != pids["0"] and both_up(), what="worker 0 restarted")
        assert sup.alive()

        # a logout on one worker is honoured by every worker (Redis pub/sub): Envoy spreads the
        # next requests over both, and none of them may accept the revoked token
        wait_until(s.sidecar_hosts_healthy, timeout=20, what="envoy seeing both workers healthy")
        victim = idp.load_or_create(s.dir).mint("bob")
        assert get(f"{s.external}/api/products/1", victim).status == 200
        assert request("POST", f"{s.external}/api/auth/logout", {"Authorization": f"Bearer {victim}"}).status == 204
        # the bound is the pub/sub latency (milliseconds): poll briefly, then it must hold everywhere
        wait_until(lambda: all(get(f"{s.external}/api/products/1", victim).status == 401 for _ in range(4)),
                   timeout=5, what="the logout seen by both workers")
        statuses = [get(f"{s.external}/api/products/1", victim).status for _ in range(20)]
        assert set(statuses) == {401}, statuses
        # and an admin revocation through the supervisor's admin API reaches the workers too
        other = idp.load_or_create(s.dir).mint("carol")
        assert get(f"{s.external}/api/products/1", other).status == 200
        req = urllib.request.Request(f"{s.sidecar_admin}/revoke", data=b'{"sub": "carol"}', method="POST",
                                     headers={"Authorization": f"Bearer {s.admin_token}",
                                              "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        wait_until(lambda: all(get(f"{s.external}/api/products/1", other).status == 401 for _ in range(6)),
                   timeout=10, what="the subject revocation on both workers")
        assert sup.stop() == 0
        assert list(own_tmp.iterdir()) == [], "the supervisor left its metrics directory behind"
    finally:
        s.stop()
        redis.stop()


def test_redis_unreachable_at_start_is_one_clear_error(own_stack):
    s = own_stack
    from tests.support.procs import free_port

    dead = free_port()
    s.write_sidecar_config({"store": {"redis": {"url": f"redis://127.0.0.1:{dead}/0", "timeout_ms": 50}},
                            **NO_LIMITS})
    side = s.start_sidecar()
    detail = get_json(f"{s.sidecar_admin}/readyz")
    wait_until(lambda: get_json(f"{s.sidecar_admin}/readyz")["store"]["up"] is False, what="store down reported")
    assert detail["ready"] is True          # a store outage never takes the sidecar out of rotation
    s.start_envoy()
    token = idp.load_or_create(s.dir).mint("alice")
    assert get(f"{s.external}/api/products/1", token).status == 200
    log = side.log_text()
    # each component that depends on the store says so once, not per request or per probe
    assert log.count('"msg": "store unreachable') == 1
    assert log.count('"msg": "revocation store unreachable') <= 1
    assert "Traceback" not in log


def test_workers_with_memory_store_are_refused(own_stack):
    s = own_stack
    import subprocess

    from tests.support.procs import VENV_BIN

    out = subprocess.run([str(VENV_BIN / "extproc"), "serve", "--config", str(s.config_path), "--workers", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "store.redis" in out.stderr and "Traceback" not in out.stderr
