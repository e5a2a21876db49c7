"""What ships is what works: every Envoy bootstrap validates, the configs agree, the demo runs."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.support.procs import ROOT, VENV_BIN, port_open
from tests.support.stack import ENVOY_BIN

pytestmark = pytest.mark.e2e

BOOTSTRAPS = sorted(p for p in (ROOT / "envoy").rglob("*.yaml")
                    if "static_resources" in p.read_text() or "dynamic_resources" in p.read_text())


def test_there_are_bootstraps():
    assert ROOT / "envoy" / "envoy.yaml" in BOOTSTRAPS


def test_the_examples_are_validated_too():
    examples = {p.name for p in BOOTSTRAPS if p.parent == ROOT / "envoy" / "examples"}
    assert {"ratelimit-service.yaml", "load-balancing.yaml", "canary-routing.yaml", "tls.yaml",
            "discovery.yaml"} <= examples


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_validates(path, tmp_path):
    # certificates are never committed: a bootstrap naming /etc/envoy/tls/ (envoy/examples/tls.yaml)
    # is validated against freshly generated ones, with only those paths changed
    # and one naming the EDS file /etc/envoy/eds/webshop.yaml (envoy/examples/discovery.yaml) against
    # a copy of the example's starting file, envoy/examples/discovery.eds.yaml
    text = path.read_text()
    if "/etc/envoy/tls/" in text:
        from tests.e2e.test_traffic_tls import write_certs

        text = text.replace("/etc/envoy/tls/", f"{write_certs(tmp_path / 'certs')}/")
    if "/etc/envoy/eds/webshop.yaml" in text:
        eds = tmp_path / "webshop.yaml"
        eds.write_text((ROOT / "envoy" / "examples" / "discovery.eds.yaml").read_text())
        text = text.replace("/etc/envoy/eds/webshop.yaml", str(eds))
    if text != path.read_text():
        path = tmp_path / path.name
        path.write_text(text)
    out = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr


def _without_sidecar_endpoints(doc: dict) -> dict:
    for c in doc["static_resources"]["clusters"]:
        if c["name"] == "extproc":
            c["load_assignment"]["endpoints"] = []
    return doc


def test_multi_worker_bootstrap_differs_only_in_sidecar_endpoints():
    one = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    two = yaml.safe_load((ROOT / "envoy" / "envoy-workers.yaml").read_text())
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for c in two["static_resources"]["clusters"] if c["name"] == "extproc"
             for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [50051, 50052]                      # base port + i, as `serve --workers 2` binds
    assert _without_sidecar_endpoints(one) == _without_sidecar_endpoints(two)


def test_shipped_sidecar_config_checks():
    out = subprocess.run([str(VENV_BIN / "extproc"), "check-config", str(ROOT / "extproc.yaml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_every_policy_named_in_envoy_yaml_is_defined_except_the_deliberate_one():
    cfg = yaml.safe_load((ROOT / "extproc.yaml").read_text())
    text = (ROOT / "envoy" / "envoy.yaml").read_text()
    named = set()
    for doc_line in text.splitlines():
        if "context_extensions: {policy:" in doc_line:
            named.add(doc_line.split("policy:")[1].strip(" }"))
    assert named - set(cfg["policies"]) == {"no-such-policy"}   # the /misconfigured/ demo route


def test_demo_script_smoke(tmp_path):
    """./scripts/demo on its real ports: the curls it prints answer as it says."""
    busy = [p for p in (8000, 8001, 9901, 9902, 18080, 50051) if port_open(p)]
    assert not busy, f"demo ports busy on this machine: {busy}"
    out = subprocess.run([str(ROOT / "scripts" / "demo"), "--smoke"], capture_output=True, text=True,
                         timeout=180, env={"PATH": "/usr/bin:/bin", "EXTPROC_STATE_DIR": str(tmp_path),
                                           "HOME": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("smoke: ok") == 11
    assert "export TOKEN=ey" in out.stdout
    assert not [p for p in (8000, 8001, 9901, 9902, 18080, 50051) if port_open(p)]
