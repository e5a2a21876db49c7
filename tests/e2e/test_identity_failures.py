"""Identity when something is missing or down, through the real Envoy: each test its own stack."""

from __future__ import annotations

import pytest

from extproc.demo import idp
from tests.support.http import get
from tests.support.procs import free_port, http_status, wait_until
from tests.support.stack import get_json, new_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def fresh(tmp_path):
    s = new_stack(tmp_path / "stack")
    try:
        yield s
    finally:
        s.stop()


def _metric(s, series: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{s.sidecar_admin}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_identity_provider_down_at_start_is_401_keys_unavailable_then_recovers(fresh):
    s = fresh
    s.write_sidecar_config()
    # the sidecar starts before the identity provider (the demo upstream) is up
    s.start_sidecar(wait_keys=False)
    detail = get_json(f"{s.sidecar_admin}/readyz")
    assert detail["ready"] is True and detail["providers"]["demo"]["loaded"] is False
    s.start_upstream()
    s.start_envoy()
    token = idp.load_or_create(s.dir).mint("alice")
    first = get(f"{s.external}/api/products/1", token)
    assert first.status in (200, 401)
    if first.status == 401:
        assert first.json()["reason"] == "keys_unavailable"
    wait_until(lambda: get(f"{s.external}/api/products/1", token).status == 200, timeout=15,
               what="keys fetched in the background once the IdP is up")


def test_ip_allow_list_denies_other_addresses(fresh):
    s = fresh
    s.start_upstream()
    s.write_sidecar_config({"policies.admin-area.ip": {"allow": ["10.0.0.0/8"]}})
    s.start_sidecar()
    s.start_envoy()
    admin = idp.load_or_create(s.dir).mint("root", scopes=["read", "admin"])
    r = get(f"{s.external}/api/admin/whoami", admin)
    assert r.status == 403 and r.json()["reason"] == "ip_denied"


def test_shadow_policy_lets_through_and_counts_the_would_be_deny(fresh):
    s = fresh
    s.start_upstream()
    s.write_sidecar_config({"default_policy": "api-shadow"})
    s.start_sidecar()
    s.start_envoy()
    series = ('extproc_decisions_total{policy="api-shadow",reason="token_missing",result="shadow_deny",'
              'service="authz"}')
    before = _metric(s, series)
    r = get(f"{s.external}/no-such-page")                 # the catch-all route: default_policy
    assert r.status == 404 and r.header("x-upstream-replica") == "r1"   # reached the upstream
    assert _metric(s, series) == before + 1
    log = s.procs["sidecar"].log_text()
    assert '"shadow": true' in log and "token_missing" in log          # audited as it would have been


def test_revocation_unknown_with_fail_closed_is_an_honest_503(fresh):
    s = fresh
    s.start_upstream()
    dead = free_port()
    s.write_sidecar_config({"store": {"redis": {"url": f"redis://127.0.0.1:{dead}/0", "timeout_ms": 50}},
                            "providers.demo.revocation_fail": "closed", "rate_limits.rules": []})
    s.start_sidecar()
    s.start_envoy()
    token = idp.load_or_create(s.dir).mint("alice")
    # the revocation list was never read (store down since start): closed providers refuse
    r = get(f"{s.external}/api/products/1", token)
    assert r.status == 503
    assert http_status(f"{s.external}/public/health") == 200
