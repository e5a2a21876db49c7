"""The native stack for end-to-end tests: demo upstream, extproc sidecar, real Envoy.

Envoy runs the SHIPPED bootstrap (envoy/envoy.yaml or envoy-workers.yaml) with only its ports
rewritten to free ones, so what ships is what is tested. The sidecar runs the shipped
extproc.yaml with its listen ports, the JWKS URI's port and timings scaled for tests.
"""

from __future__ import annotations

import contextlib
import json
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .procs import ROOT, VENV_BIN, Proc, free_consecutive, free_ports, http_status, port_open, wait_until

SHIPPED_ENVOY = ROOT / "envoy" / "envoy.yaml"
SHIPPED_CONFIG = ROOT / "extproc.yaml"
ENVOY_BIN = VENV_BIN / "envoy"

# the shipped ports, by role
EXTERNAL, INTERNAL, ENVOY_ADMIN, UPSTREAM, SIDECAR, SIDECAR_ADMIN = 8000, 8001, 9901, 18080, 50051, 9902
OTLP = 4317          # the trace collector Envoy exports to (nothing listens unless a test starts one)
EXTERNAL_TLS = 8443  # the external listener over TLS (the certificate: .extproc/tls, made by scripts/setup)


def rewrite_ports(doc: Any, mapping: dict[int, int]) -> Any:
    """Replace every `port_value` found in `mapping`; nothing else changes."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "port_value" and isinstance(v, int):
                if v not in mapping:
                    raise KeyError(f"shipped envoy config uses port {v}, which the test stack does not map")
                doc[k] = mapping[v]
            else:
                rewrite_ports(v, mapping)
    elif isinstance(doc, list):
        for v in doc:
            rewrite_ports(v, mapping)
    return doc


def envoy_config(path: Path, mapping: dict[int, int]) -> dict:
    return rewrite_ports(yaml.safe_load(path.read_text()), mapping)


def sidecar_config(*, listen_port: int, admin_port: int, upstream_port: int, state_dir: Path | None = None,
                   overrides: dict | None = None) -> dict:
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    cfg["server"]["listen"] = f"127.0.0.1:{listen_port}"
    cfg["server"]["shutdown_grace_seconds"] = 5
    cfg["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    demo = cfg["providers"]["demo"]
    demo["jwks_uri"] = demo["jwks_uri"].replace(f":{UPSTREAM}/", f":{upstream_port}/")
    demo["retry_interval_seconds"] = 0.2
    demo["unknown_kid_refetch_seconds"] = 0.5          # scaled down from 30 s
    demo["refresh_interval_seconds"] = 1               # scaled down from 300 s
    intro = cfg["providers"]["opaque"]["introspection"]
    intro["endpoint"] = intro["endpoint"].replace(f":{UPSTREAM}/", f":{upstream_port}/")
    intro["cache_ttl_seconds"] = 1                      # scaled down from 60 s
    if state_dir is not None:
        intro["client_secret_file"] = str(state_dir / "introspection-secret")
    cfg["api_keys"]["cache_seconds"] = 0.5              # scaled down from 5 s
    # tests burst far past the demo's 10 in-flight per route; the caps have their own tests
    cfg["concurrency"] = {"global_limit": 10_000, "default_route_limit": 10_000}
    for key, value in (overrides or {}).items():
        target = cfg
        *parents, last = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    return cfg


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Stack:
    dir: Path
    ports: dict[str, int]
    procs: dict[str, Proc] = field(default_factory=dict)
    config_path: Path | None = None
    last_health_flags: list[str] = field(default_factory=list)
    admin_token: str = field(default_factory=lambda: __import__("secrets").token_urlsafe(24))

    @property
    def external(self) -> str:
        return f"http://127.0.0.1:{self.ports['external']}"

    @property
    def internal(self) -> str:
        return f"http://127.0.0.1:{self.ports['internal']}"

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.ports['upstream']}"

    @property
    def sidecar_admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['sidecar_admin']}"

    @property
    def envoy_admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['envoy_admin']}"

    # -- processes ----------------------------------------------------------------------------
    def start_upstream(self) -> Proc:
        p = Proc("upstream", [sys.executable, "-m", "extproc.demo.upstream", "--port", str(self.ports["upstream"]),
                              "--replica-id", "r1", "--state-dir", str(self.dir)], self.dir / "logs")
        self.procs["upstream"] = p
        return p.wait_ready(lambda: http_status(f"{self.upstream}/public/health") == 200)

    def write_sidecar_config(self, overrides: dict | None = None) -> Path:
        cfg = sidecar_config(listen_port=self.ports["sidecar"], admin_port=self.ports["sidecar_admin"],
                             upstream_port=self.ports["upstream"], state_dir=self.dir, overrides=overrides)
        path = self.dir / "extproc.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.config_path = path
        return path

    def start_sidecar(self, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                      name: str = "sidecar", wait_keys: bool = True) -> Proc:
        assert self.config_path is not None
        argv = [str(VENV_BIN / "extproc"), "serve", "--config", str(self.config_path), *(extra_args or [])]
        p = Proc(name, argv, self.dir / "logs", env={"EXTPROC_STATE_DIR": str(self.dir),
                                                     "EXTPROC_ADMIN_TOKEN": self.admin_token, **(env or {})})
        self.procs["sidecar"] = p

        def ready() -> bool:
            if http_status(f"{self.sidecar_admin}/readyz") != 200:
                return False
            if not wait_keys:
                return True
            detail = get_json(f"{self.sidecar_admin}/readyz")
            providers = detail.get("providers")
            if providers is None:      # supervisor: workers report through their own health
                return all(port_open(self.ports["sidecar"] + i) for i in range(len(detail.get("workers", {}))))
            return all(p["loaded"] for p in providers.values())
        return p.wait_ready(ready)

    def start_envoy(self, bootstrap: Path = SHIPPED_ENVOY, extra_map: dict[int, int] | None = None) -> Proc:
        mapping = {EXTERNAL: self.ports["external"], INTERNAL: self.ports["internal"],
                   ENVOY_ADMIN: self.ports["envoy_admin"], UPSTREAM: self.ports["upstream"],
                   SIDECAR: self.ports["sidecar"], OTLP: self.ports["otlp"],
                   EXTERNAL_TLS: self.ports["external_tls"], **(extra_map or {})}
        from extproc.demo import tls

        tls.ensure(ROOT / ".extproc" / "tls")        # :8443's certificate, relative to Envoy's cwd (ROOT)
        path = self.dir / f"envoy-{bootstrap.stem}.json"
        path.write_text(json.dumps(envoy_config(bootstrap, mapping)))
        p = Proc("envoy", [str(ENVOY_BIN), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                           "--log-level", "warn", "--drain-time-s", "1"], self.dir / "logs")
        self.procs["envoy"] = p
        p.wait_ready(lambda: http_status(f"{self.envoy_admin}/ready") == 200)
        # the sidecar cluster is health-checked: wait until a decision round trip works
        wait_until(lambda: http_status(f"{self.external}/misconfigured/x") == 403, timeout=20,
                   what="envoy reaching the sidecar")
        return p

    def sidecar_hosts_healthy(self) -> bool:
        """Envoy sees every endpoint of the sidecar cluster healthy and not ejected."""
        with urllib.request.urlopen(f"{self.envoy_admin}/clusters", timeout=2) as resp:
            lines = resp.read().decode().splitlines()
        flags = [ln.rsplit("::", 1)[1] for ln in lines if ln.startswith("extproc::") and "::health_flags::" in ln]
        self.last_health_flags = flags
        return bool(flags) and all(f == "healthy" for f in flags)

    def stop(self) -> None:
        for name in ("envoy", "sidecar", "upstream"):
            p = self.procs.pop(name, None)
            if p is not None:
                p.stop()


def new_stack(directory: Path, extra_ports: int = 0) -> Stack:
    names = ["external", "internal", "envoy_admin", "upstream", "sidecar", "sidecar_admin", "otlp", "external_tls"]
    ports = free_ports(len(names) + extra_ports)
    mapping = dict(zip(names, ports, strict=False))
    for i in range(extra_ports):
        mapping[f"extra{i}"] = ports[len(names) + i]
    directory.mkdir(parents=True, exist_ok=True)
    return Stack(directory, mapping)


@contextlib.contextmanager
def shipped_stack(directory: Path) -> Iterator[Stack]:
    """The shipped envoy.yaml + extproc.yaml on free ports, started; stopped on exit."""
    s = new_stack(directory)
    try:
        s.start_upstream()
        s.write_sidecar_config()
        s.start_sidecar()
        s.start_envoy()
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def two_workers_on_redis(directory: Path, overrides: dict | None = None,
                         redis_timeout_ms: int = 50) -> Iterator[Stack]:
    """The shipped configs with `extproc serve --workers 2` on one real Redis, behind
    envoy-workers.yaml (round robin over both workers); `overrides` as write_sidecar_config takes
    them. Everything started is stopped on exit."""
    from .redis_servers import RedisServer

    redis = RedisServer(directory / "redis")
    base = free_consecutive(2)
    s = new_stack(directory / "stack")
    s.ports["sidecar"] = base
    s.redis = redis
    try:
        s.start_upstream()
        s.write_sidecar_config({"server.workers": 2,
                                "store": {"redis": {"url": redis.url, "timeout_ms": redis_timeout_ms}},
                                **(overrides or {})})
        s.start_sidecar()
        wait_until(lambda: len(get_json(f"{s.sidecar_admin}/readyz")["workers"]) == 2, what="two workers")
        s.start_envoy(ROOT / "envoy" / "envoy-workers.yaml", extra_map={SIDECAR + 1: base + 1})
        wait_until(s.sidecar_hosts_healthy, timeout=20, what="both workers healthy in Envoy")
        yield s
    finally:
        s.stop()
        redis.stop()


def restart_redis(server) -> Proc:
    """Stop a test RedisServer and start it again on the same port (its data is gone)."""
    old = server.proc
    old.stop()
    p = Proc("redis-restarted", old.argv, old.log_path.parent)
    wait_until(lambda: server.command("PING").startswith("+PONG"), timeout=15, what="redis back")
    return p
