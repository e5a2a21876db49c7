#!/usr/bin/env python3
"""Load through Envoy, in one run: plain, Envoy's native filters, the Python floor, and extproc.

One Envoy (`--concurrency 1`) gets one listener per variant, all routing to one demo upstream:

  plain                (a) Envoy straight to the upstream
  native               (b) Envoy's jwt_authn (RS256, inline JWKS) + local_ratelimit (bucket never empty)
  native_es256         (i) the same, ES256 key and token
  native_fresh         (j) the same as native, a different RS256 token on every request
  native_local_ratelimit (m) Envoy's local_ratelimit alone (no JWT): Envoy's own limiter, for scale
  floor_authz          (c) ext_authz to bench_floor.py (Check always OK)
  floor_ext_proc           ext_proc to bench_floor.py (CONTINUE on request and response headers)
  floor_both               ext_authz then ext_proc, both to bench_floor.py
  extproc_authz        (d) ext_authz to extproc, policy `api` (JWT RS256, keys from a jwks_file)
  extproc_authz_es256  (g) ext_authz to extproc, policy `api-es256` (JWT ES256), repeat token
  extproc_authz_fresh  (h) ext_authz to extproc, policy `api`, a different RS256 token per request
  extproc_ratelimit_memory (k) extproc_authz + two rate-limit rules on every request, in-memory store
  extproc_ratelimit_redis  (l) the same two rules on a Redis store (a redis-server started for the run)
  extproc_ext_proc     (e) ext_proc to extproc (request + response headers SEND, as envoy/envoy.yaml)
  extproc_both         (f) ext_authz then ext_proc to extproc, as envoy/envoy.yaml

The response-cache rows (no token, no ext_authz: ext_proc only, policy `public`, on the demo
upstream's /delay/{ms}, which answers JSON without Cache-Control: the cache rule's `ttl` makes it
fresh; a sidecar of their own, `extproc_cache`, whose config adds a `cache:` section):

  extproc_cache_hit         (n) the same URL on every request: served from the in-process LRU (HIT)
  extproc_cache_miss        (o) a new query key on every request (wrk Lua counter): MISS, body buffered and stored
  extproc_cache_bypass      (p) the same URL with `Cache-Control: no-store` on the request: BYPASS
  extproc_cache_hit_20ms    (q) the same three against /delay/20, an upstream answering in 20 ms
  extproc_cache_miss_20ms   (r)
  extproc_cache_bypass_20ms (s)
  extproc_cache_lru         (t) a new key per request on /bytes/4096 to a sidecar whose LRU holds 2 MiB:
                                its stored-bytes gauge is sampled during the load and must stay within it
  native_cache              (u) Envoy's own cache filter (envoy.filters.http.cache, SimpleHttpCache), a hit on
                                every request (its misses go through a hop listener adding Cache-Control)
  floor_ext_proc_delay      (v) floor ext_proc on /delay/0 (CONTINUE on request and response headers)
  plain_delay               (w) Envoy -> /delay/0, no filter

The circuit-breaker rows (GET /delay/0 without a token, auth none, so that the breaker is what
differs; `v` and `w` are their floor ext_proc and plain rows). The breakers live on a sidecar of
their own, `extproc_breaker` (the `extproc` config plus `circuit_breakers:` for four Envoy clusters
to the same upstream, and an admin token for the run); the rows without a breaker run on `extproc`,
on the same route and cluster:

  floor_authz_delay             (x) floor ext_authz on /delay/0
  extproc_ext_proc_delay        (y) ext_proc, no breaker, no request attribute
  extproc_ext_proc_attr         (z) the same + request_attributes [xds.cluster_name] (the ext_proc breaker's input)
  extproc_breaker_ext_proc      (A) ext_proc + a closed breaker on the route's cluster (ext_proc wiring)
  extproc_breaker_ext_proc_open (B) the same, forced open through the admin API: a 503 ImmediateResponse
  extproc_authz_delay           (C) ext_authz (policy bench-lean, auth none), no breaker
  extproc_authz_accesslog       (D) the same + Envoy's gRPC access logger streaming to the sidecar
  extproc_breaker_lean          (E) ext_authz + access logger + a closed lean breaker (checked in Check,
                                    outcomes from the access log)
  extproc_breaker_lean_open     (F) the same, forced open: a 503 ext_authz denial

Before measuring, an open row must answer the breaker's 503 (`x-circuit-breaker: open`) with no
upstream request, a closed row must reach the upstream, and the access logger must deliver its
entries. A block under the table gives the closed breaker's Δp50 / Δ CPU against the same route
without it (the seed promises < 1 ms) for both wirings and their parts, the open rows against the
proxied request, and a trip test (after the loads: GET /status/500, which the upstream answers
500, until the breaker opens): how many failures reach the upstream before it opens per wiring,
the lean wiring's cost being its access-log lag.

Every request outside the cache rows carries an `Authorization: Bearer` token (Envoy's cache
filter serves no request with one): the same RS256 token on every variant except the ES256 ones
(one ES256 token) and the fresh ones, whose wrk Lua script takes the next token of a pre-minted
pool (`--fresh-tokens`, RS256, same claims shape) for every request, each variant its own
sequence continued across loads, so no token repeats until the pool runs out (the report says
how many were reused). wrk drives each variant at c=1 and c=32 for `--duration` seconds; the
sidecar's (or floor's) CPU per request comes from /proc/<pid>/stat around each load, and
`cpu/floor` divides it by the floor's of the same filter shape in the same round (the median of
those per-round ratios; the identity target's rounds are listed under the table). The rate-limited variants run on
sidecars of their own (the same config as `extproc`, plus the rules and their store), so
`extproc_authz` keeps measuring a sidecar without limits; a block under the table gives what the
limiter adds to `extproc_authz` (p50, sidecar CPU, Redis' own CPU). The filter and cluster
settings follow envoy/envoy.yaml (status_on_error 503, timeouts, retry policy, HTTP/2 sidecar
clusters); active health checks and outlier detection are left out, as they do nothing on a
healthy single endpoint. The bootstrap is generated into a temp dir (`--keep` keeps it). Every
process started here is stopped by its PID on exit, also on Ctrl-C or an error.

A second block gives the cache rows side by side (the cache's own counts, the requests the
upstream served, RSS) and reads the issue's claims from the medians: a hit is cheaper than a miss
on the same route, faster than a 20 ms upstream, against the floor and Envoy's cache filter; the
LRU row's stored-bytes gauge (sampled during the load) within its bound, or the bench exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:        # imported by path (tests), not run
    sys.path.insert(0, str(ROOT / "scripts"))
import proclib  # noqa: E402
from proclib import port_open  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
TARGET_PATH = "/api/products/1"
ISSUER = "extproc-bench"
AUDIENCE = "extproc-bench-api"
CONCURRENCY = ((1, 1), (32, 2))          # (connections, wrk threads)
STORE_TIMEOUT_MS = 20                   # the demo's rate_limits.store_timeout_ms
FRESH_TOKENS = 20_000                    # default pool for the fresh-token variants
MINT_ESTIMATE_S = 0.0004                 # RS256 signature per pooled token (2048-bit key)
ERROR_FLAG_RATIO = 0.01
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTUP_ESTIMATE_S = 8
CACHE_POLICY = "public"                  # the cache listeners' ext_proc policy (auth none: only ext_proc matters)
CACHE_TTL = "10m"                        # the bench rules' ttl (the /delay answers say nothing) and max_ttl
CACHE_MEMORY_BYTES = 64 * 1024 * 1024    # extproc_cache's LRU: the demo's memory_max_bytes
LRU_MEMORY_BYTES = 2 * 1024 * 1024       # extproc_cache_lru's LRU: small, so a load of new keys must evict
LRU_BODY_BYTES = 4096                    # the LRU variant's body size (/bytes/N)
LRU_SAMPLE_S = 0.5                       # the LRU variant's stored-bytes gauge and RSS are sampled this often
NATIVE_CACHE_CONTROL = "public, max-age=600"    # what the hop adds for Envoy's cache filter
UPSTREAM_20MS = 20.0
# circuit breakers: the breaker rows' route (the cache rows' /delay/0: plain_delay and floor_ext_proc_delay
# are its plain and floor), four Envoy clusters to the same upstream, each with a breaker of its own
BREAKER_PATH = "/delay/0"
BREAKER_SIDECAR = "extproc_breaker"
GUARDED = "guarded"                      # ext_proc wiring, closed
GUARDED_OPEN = "guarded_open"            # ext_proc wiring, forced open through the admin API
GUARDED_LEAN = "guarded_lean"            # lean wiring (policy LEAN_POLICY), closed
GUARDED_LEAN_OPEN = "guarded_lean_open"  # lean wiring (policy LEAN_OPEN_POLICY), forced open
BREAKER_CLUSTERS = (GUARDED, GUARDED_OPEN, GUARDED_LEAN, GUARDED_LEAN_OPEN)
LEAN_POLICY = "bench-lean"               # auth none: the ext_authz policies of the lean rows
LEAN_OPEN_POLICY = "bench-lean-open"
ADMIN_TOKEN_ENV = "EXTPROC_BENCH_ADMIN_TOKEN"   # the breaker sidecar's admin token (generated per run)
ACCESS_LOG_FLUSH_S = 0.5                 # the http_grpc access logger's buffer_flush_interval (as envoy/envoy.yaml)
ACCESS_LOG_DRAIN_S = ACCESS_LOG_FLUSH_S + 0.3   # waited after a load with the logger, inside its CPU window
BREAKER_TARGET_MS = 1.0                  # the service-mesh seed: the breaker adds < 1 ms (p50; read, not asserted)
TRIP_PATH = "/status/500"                # the trip test: an upstream answer that counts as a failure
TRIP_LIMIT_S = 3.0                       # each trip burst stops after this even if the breaker never opened


class BenchError(Exception):
    """The bench cannot give honest numbers; the message says why."""


# -- variants ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    letter: str
    title: str
    filters: tuple[str, ...]      # "native", "authz", "ext_proc" in chain order
    sidecar: str | None           # which gRPC process serves the filters: a SIDECARS key, "floor", None
    floor: str | None = None      # the floor variant of the same shape
    denies_without_token: bool = False
    key: str = "rs256"            # which signing key's token the requests carry: "rs256", "es256"
    fresh: bool = False           # a different token on every request (the pool), not one repeat token
    policy: str = "api"           # the route's policy: ext_authz context_extensions, ext_proc x-extproc-policy
    native: str | None = "native"   # Envoy's jwt_authn variant on the same tokens (for %native)
    baseline: str | None = None   # the same listener without its rate limiter (the limiter block's Δ columns)
    path: str = TARGET_PATH       # what every request asks for
    token: bool = True            # send `Authorization: Bearer <token>` (Envoy's cache filter never serves those)
    unique: bool = False          # a new cache key per request: `?k=<load>.<thread>.<n>` from wrk's Lua request()
    headers: tuple[tuple[str, str], ...] = ()   # extra request headers
    cache: str | None = None      # the response-cache row it is: hit, miss, bypass, lru, native
    cluster: str = "upstream"     # the route's cluster (`upstream_cacheable`: the hop adding Cache-Control)
    plain: str | None = "plain"   # Envoy alone on the same route (for %plain)
    upstream_ms: float = 0.0      # the upstream's own delay on this route
    attributes: bool = False      # ext_proc gets request_attributes [xds.cluster_name] (the ext_proc breaker's input)
    access_log: bool = False      # the listener streams Envoy's gRPC access log to the variant's sidecar
    breaker: str | None = None    # the route's circuit breaker: "closed", "open" (forced open before measuring)
    wiring: str | None = None     # that breaker's wiring: "ext_proc", "lean"
    expect_status: int = 200      # what every request must get (503: the open breaker's answer)

    @property
    def rate_limited(self) -> bool:
        return self.sidecar in RATELIMIT_SIDECARS


# the extproc sidecars: name -> rate-limit store (None: no rate_limits section, in-memory store).
# Each is its own `extproc serve` process with its own gRPC cluster in Envoy.
SIDECARS: dict[str, str | None] = {"extproc": None, "extproc_rl_memory": "memory", "extproc_rl_redis": "redis",
                                   "extproc_rl_batched": "redis",
                                   "extproc_cache": None, "extproc_cache_lru": None, BREAKER_SIDECAR: None}
# the rate-limited sidecars whose rules are batched (decided locally, charged to Redis every 5 ms)
BATCHED_SIDECARS = frozenset({"extproc_rl_batched"})
BATCH_SYNC = {"mode": "batched", "interval_ms": 5}
RATELIMIT_SIDECARS = frozenset(k for k, store in SIDECARS.items() if store)
# the response-cache sidecars: name -> cache.memory_max_bytes; the same `cache:` rules, in-memory store
CACHE_SIDECARS: dict[str, int] = {"extproc_cache": CACHE_MEMORY_BYTES, "extproc_cache_lru": LRU_MEMORY_BYTES}
LIMITER_TARGET_MS = 0.5                  # the service-mesh seed: the limiter adds < 0.5 ms (p50; read, not asserted)
IDENTITY_TARGET = 1.10                   # the identity issue: a repeat RS256 token within 10 % of the floor's CPU (read, not asserted)

# the breaker sidecar's breakers: Envoy cluster -> config (the webshop plan's 5 consecutive failures,
# 30 s open, 3 probes; the lean ones name the ext_authz policy of their route). Forcing one open
# through the admin API holds it open whatever its settings.
BREAKERS: dict[str, dict[str, Any]] = {
    GUARDED: {"consecutive_failures": 5, "open_seconds": 30, "half_open_probes": 3},
    GUARDED_OPEN: {"consecutive_failures": 5, "open_seconds": 30, "half_open_probes": 3},
    GUARDED_LEAN: {"wiring": "lean", "policies": [LEAN_POLICY], "consecutive_failures": 5, "open_seconds": 30,
                   "half_open_probes": 3},
    GUARDED_LEAN_OPEN: {"wiring": "lean", "policies": [LEAN_OPEN_POLICY], "consecutive_failures": 5,
                        "open_seconds": 30, "half_open_probes": 3},
}

# two rules that match every request of policy `api`, as extproc.yaml's per-user and per-endpoint
# rules, with limits the bench can never reach: the check and the charge are paid, nothing is rejected
RATELIMIT_RULES = [
    {"name": "bench-per-user", "policies": ["api"], "count_by": ["user"], "algorithm": "sliding_window",
     "limit": 100_000_000, "period": "minute"},
    {"name": "bench-per-route", "policies": ["api"], "count_by": ["route"], "algorithm": "token_bucket",
     "limit": 10_000_000, "period": "second"},
]

# the cache sidecars' rules: /delay/ (the hit, miss and bypass rows) and /bytes/ (the LRU row); neither
# upstream answer carries Cache-Control, so the rule's ttl is their freshness (an unauthenticated request)
CACHE_RULES = [
    {"name": "bench-delay", "policies": [CACHE_POLICY], "path_prefix": ["/delay/"], "ttl": CACHE_TTL,
     "max_ttl": CACHE_TTL},
    {"name": "bench-bytes", "policies": [CACHE_POLICY], "path_prefix": ["/bytes/"], "ttl": CACHE_TTL,
     "max_ttl": CACHE_TTL},
]


VARIANTS = (
    Variant("plain", "a", "Envoy -> upstream", (), None),
    Variant("native", "b", "Envoy jwt_authn + local_ratelimit", ("native",), None, denies_without_token=True),
    Variant("native_es256", "i", "Envoy jwt_authn ES256 + local_ratelimit", ("native",), None,
            denies_without_token=True, key="es256", native="native_es256"),
    Variant("native_fresh", "j", "Envoy jwt_authn, fresh RS256 token per request", ("native",), None,
            denies_without_token=True, fresh=True, native="native_fresh"),
    Variant("native_local_ratelimit", "m", "Envoy local_ratelimit alone (no JWT)", ("local_rl",), None,
            baseline="plain"),
    Variant("floor_authz", "c", "floor ext_authz (always OK)", ("authz",), "floor"),
    Variant("floor_ext_proc", "", "floor ext_proc (CONTINUE)", ("ext_proc",), "floor"),
    Variant("floor_both", "", "floor ext_authz + ext_proc", ("authz", "ext_proc"), "floor"),
    Variant("extproc_authz", "d", "extproc ext_authz (policy api)", ("authz",), "extproc", "floor_authz",
            denies_without_token=True),
    Variant("extproc_authz_es256", "g", "extproc ext_authz ES256 (policy api-es256)", ("authz",), "extproc",
            "floor_authz", denies_without_token=True, key="es256", policy="api-es256", native="native_es256"),
    Variant("extproc_authz_fresh", "h", "extproc ext_authz, fresh RS256 token per request", ("authz",), "extproc",
            "floor_authz", denies_without_token=True, fresh=True, native="native_fresh"),
    Variant("extproc_ratelimit_memory", "k", "extproc ext_authz (policy api) + 2 rate-limit rules, memory store",
            ("authz",), "extproc_rl_memory", "floor_authz", denies_without_token=True, baseline="extproc_authz"),
    Variant("extproc_ratelimit_redis", "l", "extproc ext_authz (policy api) + 2 rate-limit rules, Redis store",
            ("authz",), "extproc_rl_redis", "floor_authz", denies_without_token=True, baseline="extproc_authz"),
    Variant("extproc_ratelimit_batched", "G", "extproc ext_authz (policy api) + 2 batched rate-limit rules (5 ms "
            "syncs), Redis store", ("authz",), "extproc_rl_batched", "floor_authz", denies_without_token=True,
            baseline="extproc_authz"),
    Variant("extproc_ext_proc", "e", "extproc ext_proc", ("ext_proc",), "extproc", "floor_ext_proc"),
    Variant("extproc_both", "f", "extproc ext_authz + ext_proc", ("authz", "ext_proc"), "extproc", "floor_both",
            denies_without_token=True),
    # the response cache: ext_proc alone, policy public, no token, on the demo upstream's /delay/{ms}
    Variant("extproc_cache_hit", "n", "extproc response cache: HIT (same URL), upstream 0 ms", ("ext_proc",),
            "extproc_cache", "floor_ext_proc_delay", policy=CACHE_POLICY, native="native_cache",
            path="/delay/0", token=False, cache="hit", plain="plain_delay"),
    Variant("extproc_cache_miss", "o", "extproc response cache: MISS + store (new key per request), upstream 0 ms",
            ("ext_proc",), "extproc_cache", "floor_ext_proc_delay", policy=CACHE_POLICY, native="native_cache",
            path="/delay/0", token=False, unique=True, cache="miss", plain="plain_delay"),
    Variant("extproc_cache_bypass", "p", "extproc response cache: BYPASS (request no-store), upstream 0 ms",
            ("ext_proc",), "extproc_cache", "floor_ext_proc_delay", policy=CACHE_POLICY, native="native_cache",
            path="/delay/0", token=False, headers=(("Cache-Control", "no-store"),), cache="bypass",
            plain="plain_delay"),
    Variant("extproc_cache_hit_20ms", "q", "extproc response cache: HIT (same URL), upstream 20 ms", ("ext_proc",),
            "extproc_cache", "floor_ext_proc_delay", policy=CACHE_POLICY, native="native_cache",
            path="/delay/20", token=False, cache="hit", plain=None, upstream_ms=UPSTREAM_20MS),
    Variant("extproc_cache_miss_20ms", "r", "extproc response cache: MISS + store (new key per request), "
            "upstream 20 ms", ("ext_proc",), "extproc_cache", "floor_ext_proc_delay", policy=CACHE_POLICY,
            native="native_cache", path="/delay/20", token=False, unique=True, cache="miss", plain=None,
            upstream_ms=UPSTREAM_20MS),
    Variant("extproc_cache_bypass_20ms", "s", "extproc response cache: BYPASS (request no-store), upstream 20 ms",
            ("ext_proc",), "extproc_cache", "floor_ext_proc_delay", policy=CACHE_POLICY, native="native_cache",
            path="/delay/20", token=False, headers=(("Cache-Control", "no-store"),), cache="bypass", plain=None,
            upstream_ms=UPSTREAM_20MS),
    Variant("extproc_cache_lru", "t", f"extproc response cache: new key per request, {LRU_BODY_BYTES} B bodies, "
            f"LRU of {LRU_MEMORY_BYTES // 1024 // 1024} MiB", ("ext_proc",), "extproc_cache_lru", None,
            policy=CACHE_POLICY, native="native_cache", path=f"/bytes/{LRU_BODY_BYTES}", token=False, unique=True,
            cache="lru", plain=None),
    Variant("native_cache", "u", "Envoy cache filter (SimpleHttpCache): HIT (same URL)", ("cache",), None,
            native="native_cache", path="/delay/0", token=False, cache="native", cluster="upstream_cacheable",
            plain="plain_delay"),
    Variant("floor_ext_proc_delay", "v", "floor ext_proc (CONTINUE) on /delay/0", ("ext_proc",), "floor",
            policy=CACHE_POLICY, native="native_cache", path="/delay/0", token=False, plain="plain_delay"),
    Variant("plain_delay", "w", "Envoy -> /delay/0", (), None, native="native_cache", path="/delay/0", token=False,
            plain="plain_delay"),
    # circuit breakers: GET /delay/0 without a token (auth none), so that the breaker is what differs; the
    # rows without a breaker route to the same cluster as the breaker rows they are compared with
    Variant("floor_authz_delay", "x", "floor ext_authz (always OK) on /delay/0", ("authz",), "floor",
            policy=LEAN_POLICY, native=None, path=BREAKER_PATH, token=False, plain="plain_delay",
            cluster=GUARDED_LEAN),
    Variant("extproc_ext_proc_delay", "y", "extproc ext_proc on /delay/0 (policy public), no breaker", ("ext_proc",),
            "extproc", "floor_ext_proc_delay", policy=CACHE_POLICY, native=None, path=BREAKER_PATH, token=False,
            plain="plain_delay", cluster=GUARDED),
    Variant("extproc_ext_proc_attr", "z", "extproc ext_proc on /delay/0 + request_attributes [xds.cluster_name], "
            "no breaker", ("ext_proc",), "extproc", "floor_ext_proc_delay", policy=CACHE_POLICY, native=None,
            path=BREAKER_PATH, token=False, plain="plain_delay", cluster=GUARDED, attributes=True),
    Variant("extproc_breaker_ext_proc", "A", "extproc ext_proc + circuit breaker (ext_proc wiring), closed",
            ("ext_proc",), BREAKER_SIDECAR, "floor_ext_proc_delay", policy=CACHE_POLICY, native=None,
            path=BREAKER_PATH, token=False, plain="plain_delay", cluster=GUARDED, attributes=True, breaker="closed",
            wiring="ext_proc"),
    Variant("extproc_breaker_ext_proc_open", "B", "extproc ext_proc + circuit breaker (ext_proc wiring), forced open: "
            "503 ImmediateResponse", ("ext_proc",), BREAKER_SIDECAR, "floor_ext_proc_delay", policy=CACHE_POLICY,
            native=None, path=BREAKER_PATH, token=False, plain="plain_delay", cluster=GUARDED_OPEN, attributes=True,
            breaker="open", wiring="ext_proc", expect_status=503),
    Variant("extproc_authz_delay", "C", f"extproc ext_authz on /delay/0 (policy {LEAN_POLICY}, auth none), no breaker",
            ("authz",), "extproc", "floor_authz_delay", policy=LEAN_POLICY, native=None, path=BREAKER_PATH,
            token=False, plain="plain_delay", cluster=GUARDED_LEAN),
    Variant("extproc_authz_accesslog", "D", "extproc ext_authz on /delay/0 + Envoy's gRPC access logger to it, "
            "no breaker", ("authz",), "extproc", "floor_authz_delay", policy=LEAN_POLICY, native=None,
            path=BREAKER_PATH, token=False, plain="plain_delay", cluster=GUARDED_LEAN, access_log=True),
    Variant("extproc_breaker_lean", "E", "extproc ext_authz + circuit breaker (lean wiring: checked in Check, "
            "outcomes from the access log), closed", ("authz",), BREAKER_SIDECAR, "floor_authz_delay",
            policy=LEAN_POLICY, native=None, path=BREAKER_PATH, token=False, plain="plain_delay",
            cluster=GUARDED_LEAN, access_log=True, breaker="closed", wiring="lean"),
    Variant("extproc_breaker_lean_open", "F", "extproc ext_authz + circuit breaker (lean wiring), forced open: "
            "503 denial", ("authz",), BREAKER_SIDECAR, "floor_authz_delay", policy=LEAN_OPEN_POLICY, native=None,
            path=BREAKER_PATH, token=False, plain="plain_delay", cluster=GUARDED_LEAN_OPEN, access_log=True,
            breaker="open", wiring="lean", expect_status=503),
)
# the circuit-breaker block: (row, against, what the difference is, read against BREAKER_TARGET_MS)
BREAKER_COMPARISONS = (
    ("extproc_breaker_ext_proc", "extproc_ext_proc_delay", "ext_proc wiring, closed: the whole cost (attribute + "
     "breaker)", True),
    ("extproc_breaker_ext_proc", "extproc_ext_proc_attr", "ext_proc wiring: the breaker alone (both with the "
     "attribute)", False),
    ("extproc_ext_proc_attr", "extproc_ext_proc_delay", "the xds.cluster_name attribute alone", False),
    ("extproc_breaker_lean", "extproc_authz_delay", "lean wiring, closed: the whole cost (access logger + check)",
     True),
    ("extproc_breaker_lean", "extproc_authz_accesslog", "lean wiring: the check and the outcomes alone (both with "
     "the logger)", False),
    ("extproc_authz_accesslog", "extproc_authz_delay", "Envoy's gRPC access logger alone", False),
)
# fail-fast: the open row against the proxied request on the same route (the closed row)
FAIL_FAST = (("extproc_breaker_ext_proc_open", "extproc_breaker_ext_proc"),
             ("extproc_breaker_lean_open", "extproc_breaker_lean"))
BY_NAME = {v.name: v for v in VARIANTS} | {v.letter: v for v in VARIANTS if v.letter}


def parse_variants(text: str) -> list[Variant]:
    chosen: list[Variant] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        v = BY_NAME.get(part)
        if v is None:
            names = ", ".join(f"{x.name}" + (f" ({x.letter})" if x.letter else "") for x in VARIANTS)
            raise argparse.ArgumentTypeError(f"unknown variant {part!r}; choose from {names}")
        if v not in chosen:
            chosen.append(v)
    if not chosen:
        raise argparse.ArgumentTypeError("no variant chosen")
    return [v for v in VARIANTS if v in chosen]     # canonical order


# -- processes -----------------------------------------------------------------------------------

class Proc(proclib.Proc):
    """One child process with its output in a log file, stopped by its PID, ended with the bench
    (scripts/proclib.py); a process that dies or is not ready in time is a BenchError."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None):
        super().__init__(name, argv, log_dir, env={"PYTHONUNBUFFERED": "1", **(env or {})}, die_with_parent=True)

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> Proc:
        try:
            return super().wait_ready(check, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(str(exc)) from None


def free_ports(n: int) -> list[int]:
    """n distinct free ports below the kernel's ephemeral range (32768+): a port picked by binding
    to 0 is an ephemeral one that an outgoing connection (wrk, Envoy to the upstream) can take
    before the process meant to listen there binds it. Picked by scripts/proclib.py."""
    try:
        return proclib.free_ports(n)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def http_request(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0,
                 method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, response headers with lower-case names, body)."""
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    status, _, body = http_request(url, headers, timeout)
    return status, body


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes | int:
    """One command to the bench's redis-server (RESP, no client library): an integer or a simple
    / bulk string reply."""
    msg = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(msg)
        buf = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            buf += chunk
            if buf[:1] in (b"+", b":", b"-") and buf.endswith(b"\r\n"):
                break
            if buf[:1] == b"$" and b"\r\n" in buf:
                n = int(buf[1:buf.index(b"\r\n")])
                if n < 0 or len(buf) >= buf.index(b"\r\n") + 2 + n + 2:
                    break
    kind, rest = buf[:1], buf[1:]
    if kind == b"-":
        raise OSError(f"redis: {rest.strip().decode(errors='replace')}")
    if kind == b":":
        return int(rest.strip())
    if kind == b"+":
        return rest.strip()
    n = int(rest[:rest.index(b"\r\n")])
    return b"" if n < 0 else rest[rest.index(b"\r\n") + 2:][:n]


# -- /proc ---------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK     # fields 14 and 15 of proc(5)


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- generated configs ---------------------------------------------------------------------------

@dataclass
class Ports:
    envoy_admin: int
    upstream: int
    floor: int
    redis: int
    hop: int                      # the listener that adds Cache-Control for Envoy's cache filter
    sidecars: dict[str, tuple[int, int]] = field(default_factory=dict)    # name -> (gRPC, admin)
    listeners: dict[str, int] = field(default_factory=dict)


def _grpc_cluster(name: str, port: int) -> dict:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "0.25s", "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "connection_keepalive": {"interval": "10s", "timeout": "5s"}}}}},
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": 64,
                                             "max_pending_requests": 1024, "max_requests": 1024,
                                             "max_retries": 64}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


# as envoy/envoy.yaml: Envoy also takes the backoff's max_interval as the per-try timeout of a gRPC
# service (measured), so it equals the call timeout; at 0.05 s every Check slower than 50 ms under load
# was re-sent (`upstream_rq_per_try_timeout`), paid twice by the sidecar
_SIDECAR_RETRY = {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2,
                  "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.5s"},
                  "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                      "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
                               ".PreviousHostsPredicate"}}],
                  "host_selection_retry_max_attempts": 3}


def _rl_prefix(v: Variant) -> str:
    return f"bench_local_rl_{v.name}"


def _local_ratelimit(v: Variant) -> dict:
    return {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": _rl_prefix(v),
        # a bucket that never empties during the run: the check is paid, nothing is rejected
        "token_bucket": {"max_tokens": 100_000_000, "tokens_per_fill": 100_000_000,
                         "fill_interval": "1s"},
        "filter_enabled": {"runtime_key": "bench_rl_enabled",
                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "bench_rl_enforced",
                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}}}}


def _uses_local_rl(v: Variant) -> bool:
    return "native" in v.filters or "local_rl" in v.filters


def _http_filters(v: Variant, jwks: dict[str, dict]) -> list[dict]:
    grpc_service = {"envoy_grpc": {"cluster_name": v.sidecar}, "timeout": "0.5s", "retry_policy": _SIDECAR_RETRY}
    out: list[dict] = []
    for f in v.filters:
        if f == "native":
            out.append({"name": "envoy.filters.http.jwt_authn", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"bench": {
                    "issuer": ISSUER, "audiences": [AUDIENCE],
                    "local_jwks": {"inline_string": json.dumps(jwks[v.key])},
                    "clock_skew_seconds": 30,
                    # the same work as extproc's claims_to_headers
                    "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}]}},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}]}})
            out.append(_local_ratelimit(v))
        elif f == "local_rl":
            out.append(_local_ratelimit(v))
        elif f == "cache":
            # Envoy's own cache (1.40 also has cache_v2, marked work-in-progress); it fetches misses
            # itself, past the rest of the chain (route response_headers_to_add are not applied)
            out.append({"name": "envoy.filters.http.cache", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cache.v3.CacheConfig",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.http.cache.simple_http_cache.v3"
                                          ".SimpleHttpCacheConfig"}}})
        elif f == "authz":
            out.append({"name": "envoy.filters.http.ext_authz", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3", "failure_mode_allow": False,
                "status_on_error": {"code": "ServiceUnavailable"}, "metadata_context_namespaces": [],
                "grpc_service": grpc_service}})
        elif f == "ext_proc":
            out.append({"name": "envoy.filters.http.ext_proc", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "failure_mode_allow": False, "status_on_error": {"code": "ServiceUnavailable"},
                "message_timeout": "0.5s",
                # as envoy/envoy.yaml: the cache asks for a body it will store (mode_override to BUFFERED)
                "allow_mode_override": True,
                "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                                    "request_body_mode": "NONE", "response_body_mode": "NONE",
                                    "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
                "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.filters.http.ext_authz"]}},
                # as envoy/envoy.yaml: the circuit breaker learns the route's cluster from this attribute
                **({"request_attributes": ["xds.cluster_name"]} if v.attributes else {}),
                "grpc_service": grpc_service}})
    out.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    return out


def _grpc_access_log(v: Variant) -> dict:
    """envoy/envoy.yaml's gRPC access logger: every finished request, batched to the variant's sidecar
    (its AccessLogService: gateway_requests_total and the lean breakers' outcomes)."""
    return {"name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {"log_name": "extproc", "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": v.sidecar}},
                          "buffer_flush_interval": f"{ACCESS_LOG_FLUSH_S}s", "buffer_size_bytes": 16384}}}


def _route(v: Variant) -> dict:
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": v.cluster}}
    per_filter = {}
    # the policy is named per route, as envoy/envoy.yaml does for /api/
    if "authz" in v.filters:
        per_filter["envoy.filters.http.ext_authz"] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"context_extensions": {"policy": v.policy}}}
    if "ext_proc" in v.filters:
        per_filter["envoy.filters.http.ext_proc"] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": {"grpc_initial_metadata": [{"key": "x-extproc-policy", "value": v.policy}]}}
    if per_filter:
        route["typed_per_filter_config"] = per_filter
    return route


def envoy_bootstrap(variants: list[Variant], ports: Ports, jwks: dict[str, dict]) -> dict:
    listeners = []
    for v in variants:
        listeners.append({
            "name": v.name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.listeners[v.name]}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                # the external listener's settings of envoy/envoy.yaml, the same for every variant
                "stat_prefix": v.name, "codec_type": "AUTO", "use_remote_address": True,
                "generate_request_id": True, "preserve_external_request_id": False,
                "always_set_request_id_in_response": True, "max_request_headers_kb": 60,
                "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
                **({"access_log": [_grpc_access_log(v)]} if v.access_log else {}),
                "route_config": {"name": v.name, "virtual_hosts": [
                    {"name": v.name, "domains": ["*"], "routes": [_route(v)]}]},
                "http_filters": _http_filters(v, jwks)}}]}],
        })
    def static_cluster(name: str, port: int) -> dict:
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}

    clusters = [static_cluster("upstream", ports.upstream)]
    if any(v.cluster == "upstream_cacheable" for v in variants):
        # Envoy's cache filter stores only what the response says is fresh, and the demo's /delay says
        # nothing: a hop listener (the same Envoy) adds Cache-Control on the way. Only its misses pass it.
        listeners.append({
            "name": "cacheable_hop",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.hop}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "cacheable_hop", "codec_type": "AUTO",
                "route_config": {"name": "cacheable_hop", "response_headers_to_add": [
                    {"header": {"key": "cache-control", "value": NATIVE_CACHE_CONTROL},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                    "virtual_hosts": [{"name": "cacheable_hop", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}],
        })
        clusters.append(static_cluster("upstream_cacheable", ports.hop))
    # the breaker rows' clusters: the same upstream under the names the breakers are configured for
    for name in BREAKER_CLUSTERS:
        if any(v.cluster == name for v in variants):
            clusters.append(static_cluster(name, ports.upstream))
    for name in SIDECARS:
        if any(v.sidecar == name for v in variants):
            clusters.append(_grpc_cluster(name, ports.sidecars[name][0]))
    if any(v.sidecar == "floor" for v in variants):
        clusters.append(_grpc_cluster("floor", ports.floor))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.envoy_admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def sidecar_config(ports: Ports, jwks_paths: dict[str, Path], name: str = "extproc",
                   store_timeout_ms: int = STORE_TIMEOUT_MS) -> dict:
    """The `extproc` sidecar's config; the rate-limited sidecars add RATELIMIT_RULES on their store
    (the demo's store_timeout_ms and local_fallback defaults unless --store-timeout-ms says otherwise;
    in `sync: {mode: batched}` on BATCHED_SIDECARS),
    the cache sidecars a `cache:` section (CACHE_RULES, their own memory_max_bytes), the breaker
    sidecar a `circuit_breakers:` section (BREAKERS) and an admin token (from ADMIN_TOKEN_ENV, so
    that the bench can force breakers open), and they differ in nothing else."""
    grpc_port, admin_port = ports.sidecars[name]
    store = SIDECARS[name]
    cfg = {
        "server": {"listen": f"127.0.0.1:{grpc_port}", "workers": 1, "max_in_flight": 512,
                   "shutdown_grace_seconds": 1, "drain_delay_seconds": 0},
        # the breaker sidecar has a token (forcing a breaker open needs it), generated per run
        "admin": {"listen": f"127.0.0.1:{admin_port}",
                  "token_env": ADMIN_TOKEN_ENV if name == BREAKER_SIDECAR else None},
        "store": ({"redis": {"url": f"redis://127.0.0.1:{ports.redis}/0"}} if store == "redis"
                  else {"memory": {"max_keys": 100000}}),
        "providers": {
            "bench": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256"],
                      "jwks_file": str(jwks_paths["rs256"]), "leeway_seconds": 30,
                      "claims_to_headers": {"sub": "x-jwt-sub"}},
            "bench-es256": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
                            "jwks_file": str(jwks_paths["es256"]), "leeway_seconds": 30,
                            "claims_to_headers": {"sub": "x-jwt-sub"}}},
        "policies": {"api": {"mode": "enforce", "auth": {"providers": ["bench"]}},
                     "api-es256": {"mode": "enforce", "auth": {"providers": ["bench-es256"]}},
                     "public": {"auth": "none"},
                     # the lean breaker rows' routes (auth none): each lean breaker names its policies
                     LEAN_POLICY: {"auth": "none"}, LEAN_OPEN_POLICY: {"auth": "none"}},
        "default_policy": "api",
        "unknown_policy": "deny",
    }
    if store:
        rules = [{**r, "sync": BATCH_SYNC} for r in RATELIMIT_RULES] if name in BATCHED_SIDECARS else RATELIMIT_RULES
        cfg["rate_limits"] = {"store_timeout_ms": store_timeout_ms, "local_fallback": True, "headers": True,
                              "rules": rules}
    if name in CACHE_SIDECARS:
        # the in-process tier only (the store is in-memory: there is no shared tier to go to)
        cfg["cache"] = {"memory_max_bytes": CACHE_SIDECARS[name], "shared": False, "rules": CACHE_RULES}
    if name == BREAKER_SIDECAR:
        cfg["circuit_breakers"] = {"upstreams": BREAKERS}
    return cfg


_REPORT_LUA = r"""
function report(summary, latency)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"mean_us":%.1f,"max_us":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end

-- --pace: each connection waits BENCH_PACE_MS after a response before its next request, so that
-- two variants are compared at (about) the same request rate rather than each at its own saturation
local pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "")
if pace_ms and pace_ms > 0 then
  delay = function() return pace_ms end
end
"""

# one repeat token: wrk sends the -H header, a static request (no request() hook)
WRK_LUA = _REPORT_LUA + r"""
done = function(summary, latency, requests)
  report(summary, latency)
end
"""

# a fresh token per request. Arguments after `--`: pool file, offset, stride (= wrk threads).
# Thread t sends pool[offset + t], pool[offset + t + stride], ... (wrapping at the pool's end),
# so the threads never share a token and the bench can continue the sequence on the next load
# from the per-thread counts printed by done(). wrk calls request() once more on thread 0 to
# check the request it builds: that token is counted as used but never sent.
WRK_FRESH_LUA = _REPORT_LUA + r"""
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  offset, stride = tonumber(args[2]), tonumber(args[3])
  pool = {}
  for line in io.lines(path) do
    if #line > 0 then pool[#pool + 1] = line end
  end
  if #pool == 0 or not offset or not stride then
    error("usage: wrk ... -s fresh.lua URL -- POOL_FILE OFFSET STRIDE")
  end
  nexti = offset + tid
  used = 0
  hdrs = {}
  for k, v in pairs(wrk.headers) do hdrs[k] = v end
end

function request()
  hdrs["Authorization"] = "Bearer " .. pool[(nexti % #pool) + 1]
  nexti = nexti + stride
  used = used + 1
  return wrk.format(nil, nil, hdrs)
end

done = function(summary, latency, requests)
  report(summary, latency)
  local used = {}
  for i, t in ipairs(threads) do used[i] = string.format("%d", t:get("used")) end
  io.write('BENCHTOKENS {"used":[' .. table.concat(used, ",") .. ']}\n')
end
"""

# a new cache key per request (the response-cache miss and LRU rows). Argument after `--`: a prefix
# unique to the load. Thread t sends <path>?k=<prefix>.<t>.1, .2, ... (the -H headers kept), so no
# key repeats within the run; done() prints how many each thread built (wrk's check call included).
WRK_UNIQUE_LUA = _REPORT_LUA + r"""
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1]
  if not prefix then
    error("usage: wrk ... -s unique.lua URL -- PREFIX")
  end
  base = wrk.path .. (string.find(wrk.path, "?", 1, true) and "&" or "?") .. "k=" .. prefix .. "." .. tid .. "."
  used = 0
end

function request()
  used = used + 1
  return wrk.format(nil, base .. used)
end

done = function(summary, latency, requests)
  report(summary, latency)
  local used = {}
  for i, t in ipairs(threads) do used[i] = string.format("%d", t:get("used")) end
  io.write('BENCHKEYS {"used":[' .. table.concat(used, ",") .. ']}\n')
end
"""


# -- keys and tokens -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchKey:
    """A signing key of the run: RS256 (the demo IdP's kind) or ES256 (EC P-256)."""
    name: str            # "rs256" or "es256"
    alg: str
    private: Any         # a cryptography private key object (loaded once: reloading a PEM per token is slow)
    kid: str
    jwk: dict

    def jwks(self) -> dict:
        return {"keys": [self.jwk]}

    def mint(self, ttl_seconds: int, now: float | None = None) -> str:
        """The claims shape of extproc.demo.idp.SigningKey.mint: every token has the same length."""
        import uuid

        import jwt

        iat = int(time.time() if now is None else now)
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench-user", "iat": iat, "nbf": iat,
                  "exp": iat + ttl_seconds, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})


def _thumbprint(members: dict[str, str]) -> str:
    # RFC 7638: SHA-256 over the required members, sorted, no whitespace
    import base64
    import hashlib

    canon = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canon).digest()).rstrip(b"=").decode()[:16]


def generate_keys() -> dict[str, BenchKey]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from extproc.demo import idp

    rsa_key = idp.generate()
    rs = BenchKey("rs256", "RS256", serialization.load_pem_private_key(rsa_key.private_pem, password=None),
                  rsa_key.kid, rsa_key.jwk)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ec_jwk: dict[str, Any] = ECAlgorithm.to_jwk(ec_private.public_key(), as_dict=True)
    kid = _thumbprint({k: ec_jwk[k] for k in ("crv", "kty", "x", "y")})
    ec_jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
    return {"rs256": rs, "es256": BenchKey("es256", "ES256", ec_private, kid, ec_jwk)}


@dataclass
class FreshSequence:
    """Where one fresh-token variant is in the pool, and which pool tokens it has already sent.

    Each variant has its own sequence (its own verifier: extproc's caches or Envoy's), continued
    across warm-ups, concurrencies and rounds; a token is reused only after the pool ran out."""
    pool: int
    offset: int = 0
    seen: set[int] = field(default_factory=set)

    def advance(self, used_per_thread: list[int]) -> dict[str, int]:
        stride = len(used_per_thread)
        idx = [(self.offset + t + k * stride) % self.pool for t, n in enumerate(used_per_thread) for k in range(n)]
        new = set(idx) - self.seen
        top = max((self.offset + t + (n - 1) * stride for t, n in enumerate(used_per_thread) if n), default=None)
        if top is not None:
            self.offset = top + 1
        self.seen |= new
        return {"used": len(idx), "distinct": len(set(idx)), "reused": len(idx) - len(new),
                "pool": self.pool, "cycled": self.offset > self.pool}


# -- the run -------------------------------------------------------------------------------------

@dataclass
class Stack:
    tmp: Path
    ports: Ports
    tokens: dict[str, str]        # key name -> the repeat token
    envoy: Proc
    upstream: Proc
    sidecars: dict[str, Proc]     # SIDECARS name -> its `extproc serve`, those the variants need
    floor: Proc | None
    redis: Proc | None
    lua: Path
    envoy_version: str
    redis_version: str | None = None
    fresh_lua: Path | None = None
    fresh_pool: Path | None = None
    fresh_check_token: str = ""   # minted like the pool, kept out of it: verify() sends it
    fresh_pool_size: int = 0
    fresh: dict[str, FreshSequence] = field(default_factory=dict)
    unique_lua: Path | None = None
    loads: int = 0                # wrk runs so far: the unique-key prefix of the next one
    admin_token: str = ""         # the breaker sidecar's admin token (its environment's ADMIN_TOKEN_ENV)
    pace_rps: int = 0             # --pace: the c=32 loads' target rate (0: as fast as each variant goes)

    def next_prefix(self, v: Variant) -> str:
        self.loads += 1
        return f"{v.letter or v.name}{self.loads}"

    def server_of(self, v: Variant) -> Proc | None:
        if v.sidecar == "floor":
            return self.floor
        return self.sidecars.get(v.sidecar or "")

    def admin_port(self, v: Variant) -> int | None:
        """The admin port of the extproc sidecar behind the variant (None: the floor or no sidecar)."""
        return self.ports.sidecars[v.sidecar][1] if v.sidecar in self.sidecars else None

    def check_token(self, v: Variant) -> str:
        return self.fresh_check_token if v.fresh else self.tokens[v.key]

    def url(self, v: Variant, key: str | None = None) -> str:
        """The variant's URL; `key` adds a cache key of its own (`?k=`), as the unique-key Lua does."""
        query = "" if key is None else ("&" if "?" in v.path else "?") + f"k={key}"
        return f"http://127.0.0.1:{self.ports.listeners[v.name]}{v.path}{query}"

    def headers(self, v: Variant, token: str | None = None) -> dict[str, str]:
        """The request headers of the variant's load (the token: the repeat one unless given)."""
        out = dict(v.headers)
        if v.token:
            out["Authorization"] = f"Bearer {token or self.tokens[v.key]}"
        return out

    def upstream_requests(self) -> int:
        """Requests the demo upstream has served so far (its /_control/hits, which it never counts)."""
        status, body = http_get(f"http://127.0.0.1:{self.ports.upstream}/_control/hits")
        if status != 200:
            raise BenchError(f"upstream /_control/hits answered {status}")
        return int(json.loads(body)["total"])

    def upstream_settled(self, limit_s: float = 2.0) -> int:
        """The upstream's count once it stopped moving (two reads 50 ms apart agree): requests of the
        previous load still in flight when its wrk stopped must not land in the next load's count."""
        last = self.upstream_requests()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.upstream_requests()
            if now == last:
                break
            last = now
        return last

    def breaker_admin(self, action: str, upstream: str | None = None) -> dict:
        """The breaker sidecar's admin API: GET /breakers (action "list"), or POST
        /breakers/{upstream}/{open|close|reset} with the run's bearer token."""
        base = f"http://127.0.0.1:{self.ports.sidecars[BREAKER_SIDECAR][1]}/breakers"
        if action == "list":
            status, _, body = http_request(base)
        else:
            status, _, body = http_request(f"{base}/{upstream}/{action}", method="POST",
                                           headers={"Authorization": f"Bearer {self.admin_token}"})
        if status != 200:
            raise BenchError(f"{BREAKER_SIDECAR} admin {action} {upstream or ''} answered {status}: {body[:300]!r}")
        return json.loads(body)


def envoy_stats(port: int, regex: str | None = None) -> dict[str, int]:
    query = "format=json" + (f"&filter={urllib.parse.quote(regex)}" if regex else "")
    status, body = http_get(f"http://127.0.0.1:{port}/stats?{query}")
    if status != 200:
        raise BenchError(f"Envoy admin /stats answered {status}")
    return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "value" in s}


# Envoy counters that explain errors: which filter failed, and how (the listener's own and the
# sidecar cluster's). Recorded per load; printed with a run that had errors.
_EVENT_WORDS = ("4xx", "5xx", "error", "denied", "timeout", "failed", "failure", "rate_limited", "overflow",
                "retry", "connect_fail", "ejections_enforced")


def event_stats(stack: Stack, v: Variant) -> dict[str, int]:
    regex = rf"^(http\.{v.name}\.|{_rl_prefix(v)}\.)" if _uses_local_rl(v) else rf"^http\.{v.name}\."
    if v.sidecar:
        regex = rf"({regex}|^cluster\.{v.sidecar}\.)"
    stats = envoy_stats(stack.ports.envoy_admin, regex)
    return {k: n for k, n in stats.items() if any(w in k for w in _EVENT_WORDS) and "_ms" not in k}


# extproc metrics the bench reads: metric name -> (group, key). A key naming a label
# ("label:result") sums by that label's value; a plain key sums the metric over all its labels.
_SIDECAR_METRICS = {
    "extproc_auth_cache_total": ("auth_cache", "label:result"),
    "gateway_ratelimit_decisions_total": ("ratelimit", "label:result"),
    # the response cache, summed over its rules (one variant loads at a time)
    "gateway_cache_hits_total": ("response_cache", "hit"),
    "gateway_cache_misses_total": ("response_cache", "miss"),
    "gateway_cache_bypass_total": ("response_cache", "bypass"),
    "gateway_cache_stores_total": ("response_cache", "stored"),
    "gateway_cache_collapsed_total": ("response_cache", "collapsed"),
    "gateway_cache_errors_total": ("response_cache", "errors"),
    # the circuit breakers, summed over upstreams (one variant loads at a time)
    "gateway_circuit_breaker_rejected_total": ("breaker", "rejected"),
    "gateway_circuit_breaker_failures_total": ("breaker", "failures"),
    "gateway_circuit_breaker_transitions_total": ("breaker", "transitions"),
    # entries the AccessLogService counted (Envoy's gRPC access-log stream), summed over its labels
    "gateway_requests_total": ("access_log", "entries"),
}
# the in-process tier's gauges and written bytes (label tier="memory")
_CACHE_MEMORY_METRICS = {"gateway_cache_stored_bytes": "stored_bytes", "gateway_cache_entries": "entries",
                         "gateway_cache_written_bytes_total": "written_bytes"}


def _labels(text: str) -> dict[str, str]:
    out = {}
    for part in text.split('",'):
        k, sep, val = part.partition('="')
        if sep:
            out[k.strip(", ")] = val.rstrip('"')
    return out


def sidecar_counters(port: int) -> dict[str, dict[str, float]]:
    """From extproc's admin API: its decision-cache lookups so far (`auth_cache`:
    `extproc_auth_cache_total` by result), its rate-limit decisions (`ratelimit`:
    `gateway_ratelimit_decisions_total` summed over rules, by result: ok, local_fallback, ...), its
    response cache's hits, misses, bypasses, stores, collapsed misses and errors (`response_cache`,
    summed over rules and reasons), its in-process tier (`cache_memory`: the stored-bytes and
    entries gauges, the bytes written into it so far), its circuit breakers' rejections, counted
    failures and transitions (`breaker`, summed over upstreams) and the access-log entries it
    received (`access_log`: `gateway_requests_total` summed)."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        raise BenchError(f"extproc admin /metrics answered {status}")
    out: dict[str, dict[str, float]] = {"auth_cache": {}, "ratelimit": {}, "response_cache": {}, "cache_memory": {},
                                        "breaker": {}, "access_log": {}}
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name in _SIDECAR_METRICS:
            group, key = _SIDECAR_METRICS[name]
            if key.startswith("label:"):
                key = _labels(labels.rstrip("}")).get(key[6:], "")
            out[group][key] = out[group].get(key, 0.0) + float(value)
        elif name in _CACHE_MEMORY_METRICS and _labels(labels.rstrip("}")).get("tier") == "memory":
            key = _CACHE_MEMORY_METRICS[name]
            out["cache_memory"][key] = out["cache_memory"].get(key, 0.0) + float(value)
    return out


# rate-limit results that mean the store did not decide (the Redis row would not measure Redis)
_STORE_BYPASS = ("local_fallback", "fail_open", "store_unavailable")


def start_stack(variants: list[Variant], tmp: Path, token_ttl: int,
                fresh_tokens: int, store_timeout_ms: int = STORE_TIMEOUT_MS) -> tuple[Stack, list[Proc]]:
    """Start upstream, Redis, the sidecars, floor and Envoy; returns the stack and every Proc started."""
    from extproc import config as cfgmod

    started: list[Proc] = []
    need_sidecars = [name for name in SIDECARS if any(v.sidecar == name for v in variants)]
    need_floor = any(v.sidecar == "floor" for v in variants)
    need_redis = any(SIDECARS.get(v.sidecar or "") == "redis" for v in variants)
    redis_bin = shutil.which("redis-server")
    if need_redis and redis_bin is None:
        raise BenchError("redis-server not found on PATH: the Redis variant needs it (apt-get install redis-server)")
    p = free_ports(5 + 2 * len(SIDECARS) + len(variants))
    ports = Ports(envoy_admin=p[0], upstream=p[1], floor=p[2], redis=p[3], hop=p[4],
                  sidecars={name: (p[5 + 2 * i], p[6 + 2 * i]) for i, name in enumerate(SIDECARS)},
                  listeners={v.name: p[5 + 2 * len(SIDECARS) + i] for i, v in enumerate(variants)})
    keys = generate_keys()
    jwks = {name: k.jwks() for name, k in keys.items()}
    tokens = {name: k.mint(token_ttl) for name, k in keys.items()}
    jwks_paths = {name: tmp / f"jwks-{name}.json" for name in keys}
    for name, path in jwks_paths.items():
        path.write_text(json.dumps(jwks[name]))
    admin_token = secrets.token_urlsafe(24)
    lua = tmp / "report.lua"
    lua.write_text(WRK_LUA)
    unique_lua = None
    if any(v.unique for v in variants):
        unique_lua = tmp / "unique.lua"
        unique_lua.write_text(WRK_UNIQUE_LUA)
    fresh_variants = [v for v in variants if v.fresh]
    fresh_lua = fresh_pool = None
    check_token = ""
    if fresh_variants:
        t0 = time.monotonic()
        print(f"minting {fresh_tokens:,} RS256 tokens for {', '.join(v.name for v in fresh_variants)} ...",
              end="", flush=True)
        now = time.time()
        pool = [keys["rs256"].mint(token_ttl, now) for _ in range(fresh_tokens + 1)]
        check_token = pool.pop()
        fresh_pool = tmp / "fresh-tokens.txt"
        fresh_pool.write_text("\n".join(pool) + "\n")
        print(f" {time.monotonic() - t0:.1f} s", flush=True)
        fresh_lua = tmp / "fresh.lua"
        fresh_lua.write_text(WRK_FRESH_LUA)

    envoy_bin = VENV_BIN / "envoy"
    version = subprocess.run([str(envoy_bin), "--version"], capture_output=True, text=True, check=True).stdout
    # "<sha>/1.40.0/Clean/RELEASE/BoringSSL" -> "1.40.0 (<sha7>, RELEASE, BoringSSL)"
    parts = version.strip().split("version:")[-1].strip().split("/")
    version = f"{parts[1]} ({parts[0][:7]}, {', '.join(parts[3:])})" if len(parts) >= 4 else "/".join(parts)

    try:
        upstream = Proc("upstream", [str(VENV_BIN / "python"), "-m", "extproc.demo.upstream", "--port",
                                     str(ports.upstream), "--replica-id", "bench", "--state-dir", str(tmp / "idp")],
                        tmp)
        started.append(upstream)
        floor = redis = None
        redis_version = None
        if need_redis:
            assert redis_bin is not None
            # no persistence, loopback only, its log in the temp dir; the PID is redis-server itself
            redis = Proc("redis", [redis_bin, "--port", str(ports.redis), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--daemonize", "no",
                                   "--dir", str(tmp), "--logfile", ""], tmp)
            started.append(redis)
            redis.wait_ready(lambda: port_open(ports.redis) and redis_command(ports.redis, "PING") == b"PONG")
            info = redis_command(ports.redis, "INFO", "server")
            redis_version = next((line.split(":", 1)[1].strip() for line in bytes(info).decode().splitlines()
                                  if line.startswith("redis_version:")), None) if isinstance(info, bytes) else None
        sidecars: dict[str, Proc] = {}
        for name in need_sidecars:
            cfg_path = tmp / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(sidecar_config(ports, jwks_paths, name, store_timeout_ms),
                                          sort_keys=False))
            try:
                cfgmod.load(cfg_path)
            except cfgmod.ConfigError as exc:
                raise BenchError("the generated sidecar config no longer matches extproc/config.py; "
                                 f"update sidecar_config() in scripts/bench.py:\n{exc}") from None
            sidecars[name] = Proc(name, [str(VENV_BIN / "extproc"), "serve", "--config", str(cfg_path),
                                         "--log-level", "warning"], tmp,
                                  env={ADMIN_TOKEN_ENV: admin_token} if name == BREAKER_SIDECAR else None)
            started.append(sidecars[name])
        if need_floor:
            floor = Proc("floor", [str(VENV_BIN / "python"), str(ROOT / "scripts" / "bench_floor.py"),
                                   "--port", str(ports.floor)], tmp)
            started.append(floor)
        boot = tmp / "envoy.yaml"
        boot.write_text(yaml.safe_dump(envoy_bootstrap(variants, ports, jwks), sort_keys=False))
        envoy = Proc("envoy", [str(envoy_bin), "-c", str(boot), "--concurrency", "1", "-l", "warn",
                               "--disable-hot-restart"], tmp)
        started.append(envoy)

        upstream.wait_ready(lambda: http_get(f"http://127.0.0.1:{ports.upstream}/public/health")[0] == 200)
        for name, proc in sidecars.items():
            grpc_port, admin_port = ports.sidecars[name]
            proc.wait_ready(lambda g=grpc_port, a=admin_port: port_open(g) and http_get(
                f"http://127.0.0.1:{a}/readyz")[0] == 200)
        if floor is not None:
            floor.wait_ready(lambda: port_open(ports.floor))
        envoy.wait_ready(lambda: http_get(f"http://127.0.0.1:{ports.envoy_admin}/ready")[0] == 200)
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        raise
    stack = Stack(tmp, ports, tokens, envoy, upstream, sidecars, floor, redis, lua, version, redis_version,
                  fresh_lua=fresh_lua, fresh_pool=fresh_pool, fresh_check_token=check_token,
                  fresh_pool_size=fresh_tokens if fresh_variants else 0,
                  fresh={v.name: FreshSequence(fresh_tokens) for v in fresh_variants}, unique_lua=unique_lua,
                  admin_token=admin_token)
    return stack, started


def open_breakers(stack: Stack, variants: list[Variant]) -> None:
    """Force open, through the admin API, the breaker of every open row's cluster (held open until reset)."""
    for v in variants:
        if v.breaker == "open":
            got = stack.breaker_admin("open", v.cluster)
            if got.get("state") != "open" or got.get("forced") != "open":
                raise BenchError(f"{v.name}: forcing breaker {v.cluster} open answered {got}")


def verify_cache(stack: Stack, v: Variant) -> list[str]:
    """A cache row is what it claims, seen from the client and from the upstream's request count:
    a hit row's URL is answered `X-Cache-Status: HIT` without reaching the upstream; a new key (miss,
    LRU) is a MISS that is stored (`Cache-Status: ...; stored`) and then a HIT; a bypass row's
    request is a BYPASS every time, upstream each time; Envoy's cache answers its second request
    with an `age` header, upstream not reached."""
    problems = []
    hdrs = stack.headers(v)

    def get(url: str) -> tuple[int, dict[str, str], int]:
        before = stack.upstream_requests()
        status, headers, _ = http_request(url, hdrs)
        return status, headers, stack.upstream_requests() - before

    if v.cache == "hit":
        http_request(stack.url(v), hdrs)        # stored now, if it was not yet
        status, headers, upstream = get(stack.url(v))
        if status != 200 or headers.get("x-cache-status") != "HIT" or upstream:
            problems.append(f"{v.name}: a repeat GET {v.path} answered {status}, X-Cache-Status "
                            f"{headers.get('x-cache-status')!r}, {upstream} upstream request(s); expected 200 HIT, 0")
    elif v.cache in ("miss", "lru"):
        url = stack.url(v, f"verify-{v.name}")
        status, headers, upstream = get(url)
        if status != 200 or headers.get("x-cache-status") != "MISS" or "stored" not in headers.get("cache-status", ""):
            problems.append(f"{v.name}: a new key answered {status}, X-Cache-Status {headers.get('x-cache-status')!r}, "
                            f"Cache-Status {headers.get('cache-status')!r}; expected 200 MISS, stored")
        status, headers, upstream = get(url)
        if headers.get("x-cache-status") != "HIT" or upstream:
            problems.append(f"{v.name}: the same key again answered X-Cache-Status {headers.get('x-cache-status')!r} "
                            f"with {upstream} upstream request(s): the miss was not stored (Envoy's ext_proc "
                            "needs allow_mode_override for the body)")
    elif v.cache == "bypass":
        for _ in range(2):
            status, headers, upstream = get(stack.url(v))
            if status != 200 or headers.get("x-cache-status") != "BYPASS" or upstream != 1:
                problems.append(f"{v.name}: answered {status}, X-Cache-Status {headers.get('x-cache-status')!r}, "
                                f"{upstream} upstream request(s); expected 200 BYPASS, 1")
                break
    elif v.cache == "native":
        http_request(stack.url(v), hdrs)
        status, headers, upstream = get(stack.url(v))
        if status != 200 or "age" not in headers or upstream:
            problems.append(f"{v.name}: Envoy's cache filter did not serve a repeat GET {v.path}: {status}, "
                            f"age {headers.get('age')!r}, {upstream} upstream request(s)")
    return problems


def verify_breaker(stack: Stack, v: Variant) -> list[str]:
    """A breaker row is what it claims, seen from the client and from the upstream's count: a closed
    row's request reaches the upstream and carries no breaker mark; an open row is answered 503 with
    `x-circuit-breaker: open`, `Retry-After` and the breaker's JSON naming the row's cluster, and the
    upstream receives nothing (so the attribute or the lean policy did reach the breaker). Rows without
    a breaker on that route carry no mark either."""
    if v.cluster not in BREAKER_CLUSTERS:
        return []
    problems = []
    before = stack.upstream_settled()
    status, headers, body = http_request(stack.url(v), stack.headers(v))
    upstream = stack.upstream_requests() - before
    if v.breaker == "open":
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        # the ext_proc wiring's body names the upstream in `upstream`, the lean wiring's (an ext_authz denial)
        # in its `message`
        names = doc.get("upstream") == v.cluster or f"upstream {v.cluster} " in str(doc.get("message", ""))
        if (status != 503 or headers.get("x-circuit-breaker") != "open" or "retry-after" not in headers
                or doc.get("reason") != "circuit_open" or not names or upstream):
            problems.append(f"{v.name}: expected the open breaker's 503 (x-circuit-breaker: open, Retry-After, reason "
                            f"circuit_open, upstream {v.cluster}) and no upstream request; got {status}, "
                            f"x-circuit-breaker {headers.get('x-circuit-breaker')!r}, retry-after "
                            f"{headers.get('retry-after')!r}, {body[:200]!r}, {upstream} upstream request(s)")
    elif v.cluster in BREAKER_CLUSTERS and v.sidecar is not None:
        if status != 200 or "x-circuit-breaker" in headers or upstream != 1:
            problems.append(f"{v.name}: expected 200 from the upstream without a breaker mark; got {status}, "
                            f"x-circuit-breaker {headers.get('x-circuit-breaker')!r}, {upstream} upstream request(s)")
    return problems


def verify(stack: Stack, variants: list[Variant]) -> None:
    """Each variant answers 200 with its token (an open breaker row: its 503) and goes through the
    filters it claims; a rate-limited variant answers with `x-ratelimit-limit` (its rules applied,
    charged in its store: Redis holds their keys), every other extproc variant without it; a cache
    row is a hit, a miss that stores, a bypass, as it claims (verify_cache), and no other row carries
    X-Cache-Status; a breaker row is closed or open as it claims (verify_breaker, and the breakers'
    states from the admin API), and the access logger of a row that has one delivers its entries."""
    before = envoy_stats(stack.ports.envoy_admin)
    limited = {v.name: stack.admin_port(v) for v in variants if v.rate_limited}
    rl_before = {name: sidecar_counters(port)["ratelimit"] for name, port in limited.items() if port}
    logged = {v.sidecar: stack.admin_port(v) for v in variants if v.access_log}
    log_before = {name: sidecar_counters(port)["access_log"].get("entries", 0) for name, port in logged.items()
                  if port}
    problems = []
    for v in variants:
        url = stack.url(v, f"check-{v.name}") if v.unique else stack.url(v)
        status, headers, body = http_request(url, stack.headers(v, stack.check_token(v)))
        if status != v.expect_status:
            problems.append(f"{v.name}: GET {v.path}{' with the token' if v.token else ''} answered {status}: "
                            f"{body[:200]!r}")
        if v.rate_limited and "x-ratelimit-limit" not in headers:
            problems.append(f"{v.name}: the 200 carries no x-ratelimit-limit header: the rate-limit rules did "
                            f"not apply (headers: {sorted(headers)})")
        elif v.sidecar in SIDECARS and not v.rate_limited and "x-ratelimit-limit" in headers:
            problems.append(f"{v.name}: x-ratelimit-limit on a variant without limits")
        if v.cache is None and "x-cache-status" in headers:
            problems.append(f"{v.name}: X-Cache-Status {headers['x-cache-status']!r} on a row without a cache")
        problems += verify_cache(stack, v)
        problems += verify_breaker(stack, v)
        if v.denies_without_token:
            status, body = http_get(stack.url(v))
            if status != 401:
                problems.append(f"{v.name}: GET {TARGET_PATH} without a token answered {status}, expected 401")
        if v.key == "es256" and v.denies_without_token:
            # the listener must reach the ES256-only provider: an RS256 token is refused there
            status, body = http_get(stack.url(v), {"Authorization": f"Bearer {stack.tokens['rs256']}"})
            if status != 401:
                problems.append(f"{v.name}: an RS256 token answered {status}, expected 401 (ES256 only)")
    if BREAKER_SIDECAR in stack.sidecars and any(v.breaker for v in variants):
        states = {b["upstream"]: b for b in stack.breaker_admin("list")["breakers"]}
        for v in variants:
            b = states.get(v.cluster) if v.breaker else None
            if v.breaker and (b is None or b["state"] != v.breaker
                              or (b["forced"] == "open") != (v.breaker == "open")):
                problems.append(f"{v.name}: breaker {v.cluster} is {b and (b['state'], b['forced'])}, expected "
                                f"{v.breaker}")
    if logged:
        time.sleep(ACCESS_LOG_DRAIN_S)      # the logger flushes every ACCESS_LOG_FLUSH_S
        for name, port in logged.items():
            if port is None:
                continue
            got = sidecar_counters(port)["access_log"].get("entries", 0) - log_before[name]
            want = 2 * sum(1 for v in variants if v.access_log and v.sidecar == name)    # 2 requests each above
            if got < want:
                problems.append(f"{name}: {got:.0f} access-log entries arrived for {want} requests through its "
                                "listeners with the gRPC access logger (gateway_requests_total)")
    after = envoy_stats(stack.ports.envoy_admin)

    def grew(name: str) -> bool:
        return after.get(name, 0) > before.get(name, 0)

    for v in variants:
        expect = []
        if "native" in v.filters:
            expect.append(f"http.{v.name}.jwt_authn.allowed")
        if _uses_local_rl(v):
            expect.append(f"{_rl_prefix(v)}.http_local_rate_limit.ok")
        if "authz" in v.filters:
            # the lean open row's Check denies (the breaker's 503)
            expect.append(f"http.{v.name}.ext_authz.{'denied' if v.expect_status != 200 else 'ok'}")
        if "ext_proc" in v.filters:
            expect.append(f"http.{v.name}.ext_proc.streams_started")
        for stat in expect:
            if not grew(stat):
                problems.append(f"{v.name}: Envoy stat {stat} did not move: the filter was not exercised")
    for name, port in limited.items():
        if not port:
            continue
        rl = sidecar_counters(port)["ratelimit"]
        delta = {k: rl.get(k, 0) - rl_before[name].get(k, 0) for k in rl}
        # one admitted request with a token: each of the rules counted it as ok, in the store
        if delta.get("ok", 0) < len(RATELIMIT_RULES):
            problems.append(f"{name}: {delta.get('ok', 0):.0f} rate-limit ok decisions for one request, expected "
                            f"{len(RATELIMIT_RULES)} (one per rule): {delta}")
        bypass = {k: n for k, n in delta.items() if k in _STORE_BYPASS and n}
        if bypass:
            problems.append(f"{name}: the store did not decide: {bypass}")
    if stack.redis is not None:
        keys = redis_command(stack.ports.redis, "DBSIZE")
        # at least the sliding window's counter: a token bucket that refills millions per second
        # is full again (and its key expired) within milliseconds, so it may be gone already;
        # the per-rule "ok" decisions above already prove every rule was decided by the store
        if not isinstance(keys, int) or keys < 1:
            problems.append(f"Redis holds {keys} keys after the check: the store kept no counter")
    if problems:
        raise BenchError("variant check failed:\n  " + "\n  ".join(problems))


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: dict[str, int]
    tokens_used: list[int] | None = None      # fresh variants: pool tokens taken, per wrk thread
    keys_used: list[int] | None = None        # unique-key variants: keys built, per wrk thread

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def pace_ms(conns: int, rps: int) -> int:
    """wrk's delay() between a connection's response and its next request for `rps` over `conns`
    connections (whole milliseconds: wrk's resolution); the rate reached is a little lower, by the
    latency, and is reported as measured."""
    return max(1, round(conns * 1000 / rps))


def run_wrk(stack: Stack, v: Variant, conns: int, threads: int, seconds: int, pin: list[str],
            log: Path) -> WrkResult:
    argv = [*pin, "wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "5s"]
    if v.fresh:
        assert stack.fresh_lua is not None and stack.fresh_pool is not None
        seq = stack.fresh[v.name]
        argv += ["-s", str(stack.fresh_lua), stack.url(v), "--", str(stack.fresh_pool), str(seq.offset),
                 str(threads)]
    else:
        extra = [a for k, val in stack.headers(v).items() for a in ("-H", f"{k}: {val}")]
        if v.unique:
            assert stack.unique_lua is not None
            argv += ["-s", str(stack.unique_lua), *extra, stack.url(v), "--", stack.next_prefix(v)]
        else:
            argv += ["-s", str(stack.lua), *extra, stack.url(v)]
    env = None
    if stack.pace_rps and conns > 1:
        env = {**os.environ, "BENCH_PACE_MS": str(pace_ms(conns, stack.pace_rps))}
    with open(log, "ab") as out:
        out.write(f"\n== {v.name} c={conns} {seconds}s\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=out, start_new_session=True,
                                preexec_fn=proclib.exit_with_parent, env=env)
        try:
            stdout, _ = proc.communicate(timeout=seconds + 30)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        out.write(stdout)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed on {v.name} (exit {proc.returncode}); see {log}")
    result = None
    used = keys = None
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON "):])
            result = WrkResult(requests=int(d["requests"]), seconds=d["duration_us"] / 1e6,
                               p50_ms=d["p50_us"] / 1000, p90_ms=d["p90_us"] / 1000, p99_ms=d["p99_us"] / 1000,
                               errors={k: int(d[k]) for k in ("connect", "read", "write", "status", "timeout")})
        elif line.startswith("BENCHTOKENS "):
            used = [int(n) for n in json.loads(line[len("BENCHTOKENS "):])["used"]]
        elif line.startswith("BENCHKEYS "):
            keys = [int(n) for n in json.loads(line[len("BENCHKEYS "):])["used"]]
    if result is None:
        raise BenchError(f"wrk printed no report for {v.name}; see {log}")
    if v.fresh:
        if used is None or len(used) != threads:
            raise BenchError(f"wrk's fresh-token script reported no token counts for {v.name}; see {log}")
        if sum(used) < result.requests:
            raise BenchError(f"{v.name}: wrk completed {result.requests} requests but took only {sum(used)} "
                             "tokens: the Lua request() hook did not rotate the token")
        result.tokens_used = used
    if v.unique:
        if keys is None or sum(keys) < result.requests:
            raise BenchError(f"{v.name}: wrk completed {result.requests} requests but built "
                             f"{sum(keys or [])} keys: the Lua request() hook did not make a new key per request")
        result.keys_used = keys
    return result


class CacheSampler:
    """Samples a cache sidecar during a load, every LRU_SAMPLE_S: its in-process tier's stored
    bytes and entries (the gauges on its admin /metrics) and its RSS. The scrapes cost the sidecar
    a little CPU inside the measured window (the LRU row only)."""

    def __init__(self, pid: int, admin_port: int):
        self.pid, self.port = pid, admin_port
        self.stored_max = self.entries_max = self.rss_max_mb = 0.0
        self.samples = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-sampler", daemon=True)

    def sample(self) -> None:
        try:
            mem = sidecar_counters(self.port)["cache_memory"]
            rss, _ = memory_mb(self.pid)
        except (OSError, BenchError, ValueError):
            self.failed += 1
            return
        self.samples += 1
        self.stored_max = max(self.stored_max, mem.get("stored_bytes", 0.0))
        self.entries_max = max(self.entries_max, mem.get("entries", 0.0))
        self.rss_max_mb = max(self.rss_max_mb, rss)

    def _run(self) -> None:
        while not self._stop.wait(LRU_SAMPLE_S):
            self.sample()

    def __enter__(self) -> CacheSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def measure(stack: Stack, v: Variant, conns: int, threads: int, seconds: int, pin: list[str]) -> dict:
    server = stack.server_of(v)
    uses_redis = SIDECARS.get(v.sidecar or "") == "redis"
    watched = {"sidecar": server, "envoy": stack.envoy, "upstream": stack.upstream,
               "redis": stack.redis if uses_redis else None}
    for name, proc in watched.items():
        if proc is not None and not proc.alive():
            raise BenchError(f"{name} ({proc.name}) died:\n{proc.log_tail()}")
    # the sidecar's counters are read outside the CPU window (the scrape costs it CPU)
    admin = stack.admin_port(v)
    cached = admin is not None and "authz" in v.filters
    rcached = admin is not None and v.cache is not None         # the response cache's counters
    bcounted = admin is not None and (v.breaker is not None or v.access_log)   # breakers', access log's
    scraped = cached or rcached or bcounted
    sc0 = sidecar_counters(admin) if scraped else {}
    # settled: a previous load's requests still in flight must not count here (a hit row, an open breaker: 0)
    counted = bool(v.cache) or v.cluster in BREAKER_CLUSTERS
    up0 = stack.upstream_settled() if counted else None
    jc_regex = rf"^http\.{v.name}\.jwt_authn\.jwt_cache_(hit|miss)$"
    jc0 = envoy_stats(stack.ports.envoy_admin, jc_regex) if "native" in v.filters else {}
    ev0 = event_stats(stack, v)
    sampler = CacheSampler(server.pid, admin) if v.cache == "lru" and server is not None and admin else None
    cpu0 = {name: cpu_seconds(proc.pid) for name, proc in watched.items() if proc is not None}
    with sampler or contextlib.nullcontext():
        res = run_wrk(stack, v, conns, threads, seconds, pin, stack.tmp / "wrk.log")
    if v.access_log:
        # the logger's last batch (and its processing in the sidecar) belongs to this load: wait for the
        # flush inside the CPU window (warm() waited too, so the warm-up's entries fell before it)
        time.sleep(ACCESS_LOG_DRAIN_S)
    cpu1 = {name: cpu_seconds(proc.pid) for name, proc in watched.items() if proc is not None}
    ev1 = event_stats(stack, v)
    sc1 = sidecar_counters(admin) if scraped else {}
    up1 = stack.upstream_settled() if counted else None
    jc1 = envoy_stats(stack.ports.envoy_admin, jc_regex) if "native" in v.filters else {}
    events = {k: n - ev0.get(k, 0) for k, n in sorted(ev1.items()) if n - ev0.get(k, 0)}
    per_req = {name: ((cpu1[name] - cpu0[name]) * 1e6 / res.requests if res.requests else None) for name in cpu0}

    def delta(kind: str, keys: tuple[str, ...] = ()) -> dict[str, int]:
        new, old = sc1.get(kind, {}), sc0.get(kind, {})
        return {k: int(new.get(k, 0) - old.get(k, 0)) for k in (keys or sorted(new))
                if keys or new.get(k, 0) - old.get(k, 0)}
    errors = res.error_count
    if v.expect_status >= 400:
        # wrk counts every status >= 400 as an error: here those are the expected answers (the open
        # breaker's 503, checked by verify_breaker and the breaker's rejection count); an error is a
        # socket error or a response that was not one of them
        errors = errors - res.errors["status"] + max(0, res.requests - res.errors["status"])
    row: dict[str, Any] = {
        "variant": v.name, "concurrency": conns, "threads": threads,
        "requests": res.requests, "seconds": round(res.seconds, 3), "rps": round(res.rps, 1),
        "p50_ms": round(res.p50_ms, 3), "p90_ms": round(res.p90_ms, 3), "p99_ms": round(res.p99_ms, 3),
        "errors": res.errors, "error_count": errors,
        "error_ratio": round(errors / res.requests, 5) if res.requests else 1.0,
        "expect_status": v.expect_status,
        "cpu_us_per_request": _r(per_req.get("sidecar")),
        "envoy_cpu_us_per_request": _r(per_req.get("envoy")),
        "upstream_cpu_us_per_request": _r(per_req.get("upstream")),
        # redis-server's own CPU (utime + stime, all its threads) per request, Redis variants only
        "redis_cpu_us_per_request": _r(per_req.get("redis")),
        "sidecar_process": server.name if server else None,
        "rss_mb": None, "hwm_mb": None,
        "envoy_events": events,
        "auth_cache": delta("auth_cache", ("hit", "miss")) if cached else None,
        # rate-limit decisions summed over the rules, by result (ok: one per rule and request)
        "ratelimit": delta("ratelimit") if cached and v.rate_limited else None,
        # Envoy's own JWT cache (only with jwt_cache_config; 0 / 0 means every token was verified)
        "jwt_cache": ({k: jc1.get(f"http.{v.name}.jwt_authn.jwt_cache_{k}", 0)
                       - jc0.get(f"http.{v.name}.jwt_authn.jwt_cache_{k}", 0) for k in ("hit", "miss")}
                      if "native" in v.filters else None),
        # a retried Check repeats its token: extproc's cache may answer the retry
        "sidecar_retries": events.get(f"cluster.{v.sidecar}.upstream_rq_retry", 0) if v.sidecar else None,
        "tokens": stack.fresh[v.name].advance(res.tokens_used) if res.tokens_used is not None else None,
        # the response-cache rows: what the cache counted over the load (summed over its rules), the
        # requests the upstream served meanwhile (a hit row: none), the keys wrk's Lua built
        "response_cache": (delta("response_cache", ("hit", "miss", "bypass", "stored", "collapsed", "errors"))
                           if rcached else None),
        "upstream_requests": None if up0 is None or up1 is None else up1 - up0,
        "keys": sum(res.keys_used) if res.keys_used is not None else None,
        "cache_memory": None,
        # the breaker rows: rejections (an open row: one per request), failures counted, transitions
        "breaker": delta("breaker", ("rejected", "failures", "transitions")) if bcounted and v.breaker else None,
        # the rows with the gRPC access logger: entries the sidecar received for this load (>= requests)
        "access_log": (delta("access_log", ("entries",))["entries"] if bcounted and v.access_log else None),
    }
    if rcached:
        mem1, mem0 = sc1.get("cache_memory", {}), sc0.get("cache_memory", {})
        stored = mem1.get("stored_bytes", 0.0)
        row["cache_memory"] = {
            "bound": CACHE_SIDECARS[v.sidecar or ""], "stored_bytes": int(stored),
            "entries": int(mem1.get("entries", 0.0)),
            "written_bytes": int(mem1.get("written_bytes", 0.0) - mem0.get("written_bytes", 0.0)),
            # the highest stored-bytes gauge seen: during the load (LRU row, sampled) and after it
            "stored_bytes_max": int(max(stored, sampler.stored_max if sampler else 0.0)),
            "samples": sampler.samples if sampler else 0, "sample_failures": sampler.failed if sampler else 0,
            "rss_max_mb": round(sampler.rss_max_mb, 1) if sampler and sampler.samples else None}
    if server is not None:
        rss, hwm = memory_mb(server.pid)
        row["rss_mb"], row["hwm_mb"] = round(rss, 1), round(hwm, 1)
    return row


def side_by_side_variants(variants: list[Variant]) -> list[Variant]:
    """The extproc rows that `--side-by-side` runs at the same time as their floor: a repeat
    request (no fresh token, no new key per request) and the floor among the chosen variants."""
    names = {v.name for v in variants}
    return [v for v in variants if v.sidecar == "extproc" and v.floor in names and not v.fresh and not v.unique]


def measure_side_by_side(stack: Stack, v: Variant, conns: int, threads: int, seconds: int,
                         pin: list[str]) -> dict:
    """The variant and its floor loaded at once, each by its own wrk with `conns` connections,
    over the same seconds: whatever slows the machine meanwhile slows both, so their CPU per
    request compares without a slow spell falling on one of them only."""
    floor = BY_NAME[v.floor or ""]
    servers = (stack.server_of(v), stack.server_of(floor))
    for proc in servers:
        if proc is None or not proc.alive():
            raise BenchError(f"{v.name} / {floor.name}: a gRPC server is not running")
    cpu0 = [cpu_seconds(p.pid) for p in servers if p is not None]
    results: list[WrkResult | None] = [None, None]
    failures: list[BaseException] = []

    def load(i: int, which: Variant) -> None:
        try:
            results[i] = run_wrk(stack, which, conns, threads, seconds, pin, stack.tmp / f"wrk-side-{i}.log")
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            failures.append(exc)

    workers = [threading.Thread(target=load, args=(i, w)) for i, w in enumerate((v, floor))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu1 = [cpu_seconds(p.pid) for p in servers if p is not None]
    if failures:
        raise failures[0]
    mine, base = results
    assert mine is not None and base is not None
    us = [(c1 - c0) * 1e6 / r.requests if r.requests else None
          for c0, c1, r in zip(cpu0, cpu1, (mine, base), strict=True)]
    return {"variant": v.name, "floor": floor.name, "concurrency": conns,
            "rps": round(mine.rps, 1), "floor_rps": round(base.rps, 1),
            "cpu_us_per_request": _r(us[0]), "floor_cpu_us_per_request": _r(us[1]),
            "cpu_of_floor": round(us[0] / us[1], 3) if us[0] is not None and us[1] else None,
            "error_count": mine.error_count + base.error_count}


def side_by_side_block(pairs: list[dict]) -> str:
    """Per variant: each round's side-by-side CPU ratio and their median."""
    lines = []
    for name in dict.fromkeys(p["variant"] for p in pairs):
        mine = [p for p in pairs if p["variant"] == name]
        ratios = [p["cpu_of_floor"] for p in mine if p["cpu_of_floor"] is not None]
        if not ratios:
            continue
        med = statistics.median(ratios)
        rps = statistics.median(p["rps"] for p in mine)
        frps = statistics.median(p["floor_rps"] for p in mine)
        text = (f"  {name} c={mine[0]['concurrency']} with {mine[0]['floor']}: per round "
                + " ".join(f"{x:.2f}" for x in ratios) + f"; median {med:.2f}x at {rps:,.0f} / {frps:,.0f} rps")
        if BY_NAME[name].floor == "floor_authz" and BY_NAME[name].token:
            text += f" (identity target {_identity_verdict(med)})"
        lines.append(text)
    return "\n".join(lines)


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def warm(stack: Stack, v: Variant, conns: int, threads: int, seconds: int, pin: list[str]) -> None:
    if seconds > 0:
        res = run_wrk(stack, v, conns, threads, seconds, pin, stack.tmp / "wrk-warmup.log")
        if res.tokens_used is not None:
            stack.fresh[v.name].advance(res.tokens_used)      # warm-up tokens count as seen
        if v.access_log:
            time.sleep(ACCESS_LOG_DRAIN_S)      # the warm-up's last access-log batch, before the measured window


# -- report --------------------------------------------------------------------------------------

def summarize(rows: list[dict], variants: list[Variant]) -> list[dict]:
    """Median over rounds per (variant, concurrency), with the ratios against plain, native, floor."""
    out = []
    med: dict[tuple[str, int], dict] = {}
    for v in variants:
        for conns, _ in CONCURRENCY:
            mine = [r for r in rows if r["variant"] == v.name and r["concurrency"] == conns]
            if not mine:
                continue

            def m(key: str, mine: list[dict] = mine) -> float | None:
                vals = [r[key] for r in mine if r[key] is not None]
                return round(statistics.median(vals), 3) if vals else None

            s = {"variant": v.name, "letter": v.letter or None, "title": v.title, "concurrency": conns,
                 "rounds": len(mine), "rps": m("rps"), "rps_runs": [r["rps"] for r in mine],
                 "p50_ms": m("p50_ms"), "p99_ms": m("p99_ms"),
                 "cpu_us_per_request": m("cpu_us_per_request"), "rss_mb": m("rss_mb"), "hwm_mb": m("hwm_mb"),
                 "envoy_cpu_us_per_request": m("envoy_cpu_us_per_request"),
                 "upstream_cpu_us_per_request": m("upstream_cpu_us_per_request"),
                 "redis_cpu_us_per_request": m("redis_cpu_us_per_request"),
                 "requests": sum(r["requests"] for r in mine),
                 "errors": {k: sum(r["errors"][k] for r in mine) for k in mine[0]["errors"]},
                 "error_count": sum(r["error_count"] for r in mine)}
            for key in ("auth_cache", "jwt_cache"):
                caches = [r[key] for r in mine if r.get(key) is not None]
                s[key] = {k: sum(c[k] for c in caches) for k in ("hit", "miss")} if caches else None
            rls = [r["ratelimit"] for r in mine if r.get("ratelimit") is not None]
            s["ratelimit"] = ({k: sum(x.get(k, 0) for x in rls) for k in sorted({k for x in rls for k in x})}
                              if rls else None)
            retries = [r["sidecar_retries"] for r in mine if r.get("sidecar_retries") is not None]
            s["sidecar_retries"] = sum(retries) if retries else None
            toks = [r["tokens"] for r in mine if r.get("tokens") is not None]
            s["tokens"] = ({"used": sum(t["used"] for t in toks), "distinct_per_load": [t["distinct"] for t in toks],
                            "reused": sum(t["reused"] for t in toks), "pool": toks[0]["pool"],
                            "cycled": any(t["cycled"] for t in toks)} if toks else None)
            rcs = [r["response_cache"] for r in mine if r.get("response_cache") is not None]
            s["response_cache"] = {k: sum(c[k] for c in rcs) for k in rcs[0]} if rcs else None
            ups = [r["upstream_requests"] for r in mine if r.get("upstream_requests") is not None]
            s["upstream_requests"] = sum(ups) if ups else None
            brs = [r["breaker"] for r in mine if r.get("breaker") is not None]
            s["breaker"] = {k: sum(b[k] for b in brs) for k in brs[0]} if brs else None
            logs = [r["access_log"] for r in mine if r.get("access_log") is not None]
            s["access_log"] = sum(logs) if logs else None
            s["expect_status"] = v.expect_status
            mems = [r["cache_memory"] for r in mine if r.get("cache_memory") is not None]
            s["cache_memory"] = ({"bound": mems[0]["bound"],
                                  "stored_bytes_max": max(m["stored_bytes_max"] for m in mems),
                                  "entries_max": max(m["entries"] for m in mems),
                                  "written_bytes": sum(m["written_bytes"] for m in mems),
                                  "samples": sum(m["samples"] for m in mems),
                                  "sample_failures": sum(m["sample_failures"] for m in mems),
                                  "rss_max_mb": max((m["rss_max_mb"] for m in mems if m["rss_max_mb"] is not None),
                                                    default=None)}
                                 if mems else None)
            if s["cache_memory"] is not None:
                s["cache_memory"]["within_bound"] = s["cache_memory"]["stored_bytes_max"] <= s["cache_memory"]["bound"]
            s["hwm_mb_max"] = max((r["hwm_mb"] for r in mine if r["hwm_mb"] is not None), default=None)
            s["error_ratio"] = round(s["error_count"] / s["requests"], 5) if s["requests"] else 1.0
            s["flagged"] = s["error_ratio"] > ERROR_FLAG_RATIO
            med[(v.name, conns)] = s
            out.append(s)

    def pct(s: dict, other: str | None) -> float | None:
        ref = med.get((other, s["concurrency"])) if other else None
        if ref is None or not ref["rps"] or s["rps"] is None:
            return None
        return round(100.0 * s["rps"] / ref["rps"], 1)

    def paired(s: dict, other: str | None) -> list[float]:
        """Per round, the variant's CPU per request over `other`'s in the same round: the two loads
        ran minutes apart at most, so a slower spell of this shared machine weighs on both."""
        if not other:
            return []
        mine = {r["round"]: r for r in rows if r["variant"] == s["variant"] and r["concurrency"] == s["concurrency"]}
        out = []
        for r in rows:
            if r["variant"] == other and r["concurrency"] == s["concurrency"] and r["round"] in mine:
                a, b = mine[r["round"]]["cpu_us_per_request"], r["cpu_us_per_request"]
                if a is not None and b:
                    out.append(round(a / b, 3))
        return out

    def cpu_ratio(s: dict, other: str | None, runs: list[float]) -> float | None:
        """The median of the same-round ratios `runs`; without any, the ratio of the medians."""
        if runs:
            return round(statistics.median(runs), 3)
        ref = med.get((other, s["concurrency"])) if other else None
        if ref is None or not ref["cpu_us_per_request"] or s["cpu_us_per_request"] is None:
            return None
        return round(s["cpu_us_per_request"] / ref["cpu_us_per_request"], 3)

    for s in out:
        v = BY_NAME[s["variant"]]
        s["plain_variant"] = v.plain
        s["pct_of_plain"] = pct(s, v.plain)
        s["native_variant"] = v.native
        s["pct_of_native"] = pct(s, v.native)
        s["floor_variant"] = v.floor
        s["pct_of_floor"] = pct(s, v.floor)
        # the identity target: a repeat RS256 token within 10 % of the floor's CPU per request
        s["cpu_of_floor_runs"] = paired(s, v.floor)
        s["cpu_of_floor"] = cpu_ratio(s, v.floor, s["cpu_of_floor_runs"])
        # what the rate limiter adds: the same listener without it (extproc_authz: same route and token)
        base = med.get((v.baseline, s["concurrency"])) if v.baseline else None
        s["vs_baseline"] = None if base is None else {
            "variant": v.baseline,
            "p50_ms": _diff(s["p50_ms"], base["p50_ms"], 3), "p99_ms": _diff(s["p99_ms"], base["p99_ms"], 3),
            "cpu_us_per_request": _diff(s["cpu_us_per_request"], base["cpu_us_per_request"], 1),
            "envoy_cpu_us_per_request": _diff(s["envoy_cpu_us_per_request"], base["envoy_cpu_us_per_request"], 1),
            "pct_rps": pct(s, v.baseline)}
    return out


def _diff(a: float | None, b: float | None, nd: int) -> float | None:
    return None if a is None or b is None else round(a - b, nd)


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def table(summary: list[dict]) -> str:
    head = ("variant", "c", "RPS", "p50 ms", "p99 ms", "side µs/req", "cpu/floor", "side RSS MB", "envoy µs/req",
            "%plain", "%native", "%floor", "errors")
    lines = []
    for s in summary:
        name = s["variant"] + (f" ({s['letter']})" if s["letter"] else "")
        err = "0" if not s["error_count"] else f"{s['error_count']} ({100 * s['error_ratio']:.2f}%)"
        if s["flagged"]:
            err += " !!"
        lines.append((name, str(s["concurrency"]), _fmt(s["rps"], ",.0f"), _fmt(s["p50_ms"], ".2f"),
                      _fmt(s["p99_ms"], ".2f"), _fmt(s["cpu_us_per_request"], ",.0f"),
                      _fmt(s["cpu_of_floor"], ".2f", "x"), _fmt(s["rss_mb"], ".1f"),
                      _fmt(s["envoy_cpu_us_per_request"], ",.0f"), _fmt(s["pct_of_plain"], ".1f", "%"),
                      _fmt(s["pct_of_native"], ".1f", "%"), _fmt(s["pct_of_floor"], ".1f", "%"), err))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    out = [fmt(head), fmt(tuple("-" * w for w in widths))]
    last_c = None
    for s, row in zip(summary, lines, strict=True):
        if last_c is not None and s["concurrency"] != last_c:
            out.append("")
        last_c = s["concurrency"]
        out.append(fmt(row))
    return "\n".join(out)


def identity_block(summary: list[dict]) -> str:
    """The identity target (a repeat token within 10 % of the floor's CPU per request): per
    repeat-token extproc_authz row, its CPU per request over floor_authz's of the same round."""
    lines = []
    for s in summary:
        v = BY_NAME[s["variant"]]
        runs = s.get("cpu_of_floor_runs") or []
        if v.floor != "floor_authz" or v.fresh or v.rate_limited or not v.token or not runs:
            continue
        lines.append(f"  {s['variant']} c={s['concurrency']}: per round " + " ".join(f"{x:.2f}" for x in runs)
                     + f"; median {s['cpu_of_floor']:.2f}x (target {_identity_verdict(s['cpu_of_floor'])})")
    return "\n".join(lines)


def _identity_verdict(ratio: float) -> str:
    return f"<= {IDENTITY_TARGET:.2f}x: {'met' if ratio <= IDENTITY_TARGET else 'not met'}"


def token_notes(summary: list[dict]) -> str:
    """Per fresh-token variant, how many tokens were distinct; per JWT variant, what its cache saw
    (extproc's decision cache: a hit costs no signature check; Envoy's jwt_authn cache)."""
    lines = []
    for s in summary:
        t, ac, jc = s.get("tokens"), s.get("auth_cache"), s.get("jwt_cache")
        if ac is not None and not BY_NAME[s["variant"]].token and not (ac["hit"] or ac["miss"]):
            ac = None       # no token, no credential: the decision cache is not involved
        if t is None and ac is None and jc is None:
            continue
        text = f"  {s['variant']} c={s['concurrency']}: {s['requests']:,} requests"
        if t is not None:
            distinct = "+".join(f"{d:,}" for d in t["distinct_per_load"])
            text += (f", {t['used']:,} tokens taken from the pool of {t['pool']:,}, {distinct} distinct per load, "
                     f"{t['reused']:,} already sent before" + (" (pool cycled)" if t["cycled"] else ""))
        if ac is not None:
            text += f"; extproc decision cache {ac['hit']:,} hit / {ac['miss']:,} miss"
            if s.get("sidecar_retries"):
                text += f" (Envoy retried {s['sidecar_retries']:,} calls; a retry repeats its token)"
        if jc is not None:
            text += f"; Envoy jwt_authn cache {jc['hit']:,} hit / {jc['miss']:,} miss"
        lines.append(text)
    return "\n".join(lines)


def limiter_block(summary: list[dict]) -> str:
    """What a rate limiter adds to the same listener without it: the extproc rows against
    extproc_authz, Envoy's local_ratelimit against plain. Empty when no baseline ran."""
    rows = [s for s in summary if s.get("vs_baseline")]
    if not rows:
        return ""
    head = ("variant", "c", "against", "Δp50 ms", "Δp99 ms", "Δside µs/req", "redis µs/req", "Δenvoy µs/req",
            "RPS vs", f"p50 +<{LIMITER_TARGET_MS} ms", "rate-limit decisions")
    lines = []
    for s in rows:
        d = s["vs_baseline"]
        rl = s.get("ratelimit")
        decisions = "—" if rl is None else ", ".join(f"{k} {n:,}" for k, n in rl.items()) or "none"
        target = "—"
        if BY_NAME[s["variant"]].rate_limited and d["p50_ms"] is not None:
            target = "yes" if d["p50_ms"] < LIMITER_TARGET_MS else "NO"
        lines.append((s["variant"] + (f" ({s['letter']})" if s["letter"] else ""), str(s["concurrency"]),
                      d["variant"], _fmt(d["p50_ms"], "+.2f"), _fmt(d["p99_ms"], "+.2f"),
                      _fmt(d["cpu_us_per_request"], "+,.0f"), _fmt(s["redis_cpu_us_per_request"], ",.0f"),
                      _fmt(d["envoy_cpu_us_per_request"], "+,.0f"), _fmt(d["pct_rps"], ".1f", "%"), target,
                      decisions))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 2, 10) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    rules = "; ".join(f"{r['name']}: {r['algorithm']} {r['limit']:,}/{r['period']} by {'+'.join(r['count_by'])}"
                      for r in RATELIMIT_RULES)
    out = [f"rate limiter cost (medians over rounds; extproc rows: {len(RATELIMIT_RULES)} rules on every request — "
           f"{rules} — against extproc_authz, the same route and token on a sidecar without limits; Envoy's "
           "local_ratelimit against plain):", fmt(head), fmt(tuple("-" * w for w in widths))]
    out += [fmt(row) for row in lines]
    bypass = [f"{s['variant']} c={s['concurrency']}: " + ", ".join(f"{k} {s['ratelimit'][k]:,}" for k in _STORE_BYPASS
                                                                    if s["ratelimit"].get(k))
              for s in rows if s.get("ratelimit") and any(s["ratelimit"].get(k) for k in _STORE_BYPASS)]
    if bypass:
        out.append("!! the store did not decide every request (store_timeout_ms exceeded or store down): "
                   + "; ".join(bypass))
    rejected = [f"{s['variant']} c={s['concurrency']}" for s in rows
                if s.get("ratelimit") and (s["ratelimit"].get("over_limit") or s["ratelimit"].get("over_limit_cached"))]
    if rejected:
        out.append("!! requests rejected by the limiter (limits too low for this load): " + ", ".join(rejected))
    return "\n".join(out)


def _grid(head: tuple[str, ...], lines: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    return [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines]


_CACHE_ROWS = ("hit", "miss", "bypass")


def _total(s: dict) -> float | None:
    a, b = s.get("cpu_us_per_request"), s.get("envoy_cpu_us_per_request")
    return None if a is None or b is None else round(a + b, 1)


def _lt(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a < b


def cache_verdicts(summary: list[dict]) -> dict:
    """The issue's claims, read from the medians: per concurrency and upstream delay, a hit is
    cheaper than a miss on the same route (sidecar CPU per request; also with Envoy's added) and
    faster than a 20 ms upstream (p50); how a hit compares with the floor and with Envoy's cache
    filter; whether the LRU stayed within its bound. None where a row did not run."""
    med = {(s["variant"], s["concurrency"]): s for s in summary}
    out: dict[str, Any] = {"routes": [], "lru": []}
    for conns, _ in CONCURRENCY:
        for ms, suffix in ((0.0, ""), (UPSTREAM_20MS, "_20ms")):
            rows = {k: med.get((f"extproc_cache_{k}{suffix}", conns)) for k in _CACHE_ROWS}
            if not any(rows.values()):
                continue
            hit, miss = rows["hit"], rows["miss"]
            slow = [r["p50_ms"] for r in (miss, rows["bypass"]) if r is not None]
            entry = {"concurrency": conns, "upstream_ms": ms,
                     **{k: None if r is None else {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "rps": r["rps"],
                                                  "side_us": r["cpu_us_per_request"],
                                                  "envoy_us": r["envoy_cpu_us_per_request"], "total_us": _total(r)}
                        for k, r in rows.items()},
                     "hit_cheaper_than_miss": _lt(hit and hit["cpu_us_per_request"], miss and miss["cpu_us_per_request"]),
                     "hit_cheaper_than_miss_with_envoy": _lt(hit and _total(hit), miss and _total(miss)),
                     "hit_p50_below_miss": _lt(hit and hit["p50_ms"], miss and miss["p50_ms"]),
                     "hit_faster_than_upstream": (_lt(hit and hit["p50_ms"], ms) if ms else None),
                     "hit_p50_below_upstream_rows": (None if hit is None or not slow
                                                     else hit["p50_ms"] < min(slow))}
            if hit is not None:
                floor = med.get((hit["floor_variant"], conns)) if hit.get("floor_variant") else None
                native = med.get(("native_cache", conns))
                entry["vs_floor"] = None if floor is None else {
                    "variant": floor["variant"], "cpu_of_floor": hit["cpu_of_floor"], "pct_rps": hit["pct_of_floor"],
                    "p50_ms": floor["p50_ms"]}
                entry["vs_native_cache"] = None if native is None else {
                    "pct_rps": hit["pct_of_native"], "p50_ms": native["p50_ms"],
                    "envoy_us": native["envoy_cpu_us_per_request"], "hit_total_us": _total(hit)}
            out["routes"].append(entry)
        lru = med.get(("extproc_cache_lru", conns))
        if lru is not None and lru.get("cache_memory"):
            mem = lru["cache_memory"]
            out["lru"].append({"concurrency": conns, **mem, "rss_mb": lru["rss_mb"], "hwm_mb": lru["hwm_mb_max"],
                               "requests": lru["requests"], "stored": (lru["response_cache"] or {}).get("stored")})
    out["lru_within_bound"] = all(x["within_bound"] for x in out["lru"]) if out["lru"] else None
    return out


def _yes(b: bool | None) -> str:
    return "—" if b is None else ("yes" if b else "NO")


def cache_block(summary: list[dict], verdicts: dict) -> str:
    """The response-cache rows side by side, then the readings the issue asks for. Empty when no
    cache row ran."""
    names = [v.name for v in VARIANTS if v.cache or v.name in ("floor_ext_proc_delay", "plain_delay")]
    rows = [s for s in summary if s["variant"] in names]
    if not rows:
        return ""
    head = ("variant", "c", "upstream", "RPS", "p50 ms", "p99 ms", "side µs/req", "envoy µs/req", "side+envoy",
            "upstream req/req", "cache hit/miss/bypass/stored", "side RSS MB")
    lines = []
    for s in rows:
        v = BY_NAME[s["variant"]]
        rc = s.get("response_cache")
        counts = "—" if rc is None else "/".join(f"{rc[k]:,}" for k in ("hit", "miss", "bypass", "stored"))
        if rc and rc.get("errors"):
            counts += f" !! {rc['errors']:,} errors"
        up = s.get("upstream_requests")
        lines.append((s["variant"] + (f" ({s['letter']})" if s["letter"] else ""), str(s["concurrency"]),
                      f"{v.upstream_ms:.0f} ms" if v.path.startswith("/delay/") else "0 ms",
                      _fmt(s["rps"], ",.0f"), _fmt(s["p50_ms"], ".2f"), _fmt(s["p99_ms"], ".2f"),
                      _fmt(s["cpu_us_per_request"], ",.0f"), _fmt(s["envoy_cpu_us_per_request"], ",.0f"),
                      _fmt(_total(s), ",.0f"),
                      "—" if up is None or not s["requests"] else f"{up / s['requests']:.2f}",
                      counts, _fmt(s["rss_mb"], ".1f")))
    out = [f"response cache (medians over rounds; ext_proc alone, policy {CACHE_POLICY}, no token, rules "
           f"{', '.join(r['name'] + ' ' + r['path_prefix'][0] for r in CACHE_RULES)} with ttl {CACHE_TTL}, "
           "in-process tier only; counts summed over rounds):"]
    out += _grid(head, lines, left=(0, 10))
    out.append("")
    for e in verdicts["routes"]:
        parts = []
        for k in _CACHE_ROWS:
            r = e[k]
            if r is not None:
                parts.append(f"{k} {_fmt(r['side_us'], ',.0f')} µs/req side + {_fmt(r['envoy_us'], ',.0f')} Envoy, "
                             f"p50 {_fmt(r['p50_ms'], '.2f')} ms")
        text = f"c={e['concurrency']}, upstream {e['upstream_ms']:.0f} ms: " + "; ".join(parts)
        text += (f"\n    hit cheaper than miss: {_yes(e['hit_cheaper_than_miss'])} (sidecar CPU), "
                 f"{_yes(e['hit_cheaper_than_miss_with_envoy'])} (sidecar + Envoy CPU), "
                 f"{_yes(e['hit_p50_below_miss'])} (p50)")
        if e["upstream_ms"]:
            text += f"; hit faster than the {e['upstream_ms']:.0f} ms upstream: {_yes(e['hit_faster_than_upstream'])}"
            if e["concurrency"] > 1:
                text += (f" (p50 at c={e['concurrency']} is about {e['concurrency']} / RPS: the sidecar's throughput "
                         f"sets it; below the miss and bypass rows: {_yes(e['hit_p50_below_upstream_rows'])})")
        f, n = e.get("vs_floor"), e.get("vs_native_cache")
        if f:
            text += (f"\n    hit against {f['variant']}: sidecar CPU {_fmt(f['cpu_of_floor'], '.2f', 'x')}, "
                     f"RPS {_fmt(f['pct_rps'], '.0f', '%')}")
        if n:
            text += (f"; against Envoy's cache filter (native_cache): RPS {_fmt(n['pct_rps'], '.0f', '%')}, p50 "
                     f"{_fmt(e['hit']['p50_ms'], '.2f')} vs {_fmt(n['p50_ms'], '.2f')} ms, CPU per request "
                     f"{_fmt(n['hit_total_us'], ',.0f')} (sidecar + Envoy) vs {_fmt(n['envoy_us'], ',.0f')} (Envoy)")
        out.append(text)
    for x in verdicts["lru"]:
        out.append(f"LRU c={x['concurrency']} (extproc_cache_lru, memory_max_bytes {x['bound']:,}, a new key per "
                   f"request of {LRU_BODY_BYTES:,} B): stored bytes at most {x['stored_bytes_max']:,} "
                   f"({x['samples']} samples during the loads + one after each), within the bound: "
                   f"{_yes(x['within_bound'])}; up to {x['entries_max']:,} entries; {x['written_bytes'] / 1e6:,.1f} MB "
                   f"written into it ({x['written_bytes'] / x['bound']:.0f}x the bound); sidecar RSS "
                   f"{_fmt(x['rss_mb'], '.1f')} MB after, {_fmt(x['rss_max_mb'], '.1f')} MB sampled max, "
                   f"peak {_fmt(x['hwm_mb'], '.1f')} MB")
    if verdicts["lru_within_bound"] is False:
        out.append("!! the LRU held more than cache.memory_max_bytes")
    flagged = [f"{s['variant']} c={s['concurrency']}" for s in rows
               if s.get("response_cache") and BY_NAME[s["variant"]].cache == "hit"
               and s["response_cache"]["hit"] < 0.9 * s["requests"]]
    if flagged:
        out.append("!! hit rows with fewer than 90 % hits: " + ", ".join(flagged))
    return "\n".join(out)


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(100.0 * a / b, 1)


def breaker_verdicts(summary: list[dict], trips: list[dict] | None = None) -> dict:
    """What a closed breaker adds to the same route without it (BREAKER_COMPARISONS: the whole cost
    per wiring, read against the seed's < 1 ms, and its parts), and what a rejection while open costs
    against the proxied request on the same route (FAIL_FAST), per concurrency, from the medians."""
    med = {(s["variant"], s["concurrency"]): s for s in summary}
    out: dict[str, Any] = {"target_ms": BREAKER_TARGET_MS, "closed": [], "open": [], "trip": trips or []}
    for conns, _ in CONCURRENCY:
        for row, base, what, target in BREAKER_COMPARISONS:
            a, b = med.get((row, conns)), med.get((base, conns))
            if a is None or b is None:
                continue
            d = {"variant": row, "against": base, "what": what, "concurrency": conns,
                 "p50_ms": _diff(a["p50_ms"], b["p50_ms"], 3), "p99_ms": _diff(a["p99_ms"], b["p99_ms"], 3),
                 "side_us": _diff(a["cpu_us_per_request"], b["cpu_us_per_request"], 1),
                 "envoy_us": _diff(a["envoy_cpu_us_per_request"], b["envoy_cpu_us_per_request"], 1),
                 "total_us": _diff(_total(a), _total(b), 1), "pct_rps": _pct(a["rps"], b["rps"]),
                 "cpu_of_floor": a["cpu_of_floor"], "pct_of_floor": a["pct_of_floor"], "floor": a["floor_variant"],
                 "target": target}
            d["under_target"] = (None if not target or d["p50_ms"] is None else d["p50_ms"] < BREAKER_TARGET_MS)
            out["closed"].append(d)
        for row, base in FAIL_FAST:
            o, c = med.get((row, conns)), med.get((base, conns))
            if o is None or c is None:
                continue
            br = o.get("breaker") or {}
            d = {"variant": row, "against": base, "concurrency": conns,
                 "rps": o["rps"], "rps_proxied": c["rps"], "pct_rps": _pct(o["rps"], c["rps"]),
                 "p50_ms": o["p50_ms"], "p50_proxied_ms": c["p50_ms"],
                 "side_us": o["cpu_us_per_request"], "side_proxied_us": c["cpu_us_per_request"],
                 "envoy_us": o["envoy_cpu_us_per_request"], "envoy_proxied_us": c["envoy_cpu_us_per_request"],
                 "total_us": _total(o), "total_proxied_us": _total(c),
                 "requests": o["requests"], "rejected": br.get("rejected"), "failures_counted": br.get("failures"),
                 "upstream_requests": o.get("upstream_requests")}
            d["cheaper_cpu"] = _lt(d["total_us"], d["total_proxied_us"])
            d["faster_p50"] = _lt(d["p50_ms"], d["p50_proxied_ms"])
            d["more_rps"] = _lt(d["rps_proxied"], d["rps"])
            # every request answered by the breaker, none reached the upstream
            d["all_rejected"] = (d["rejected"] is not None and d["rejected"] >= d["requests"]
                                 and d["upstream_requests"] == 0)
            out["open"].append(d)
    return out


def breaker_block(verdicts: dict) -> str:
    """The circuit-breaker rows against the same route without a breaker, the open rows against the
    proxied request, and the trip test. Empty when neither ran."""
    if not verdicts["closed"] and not verdicts["open"] and not verdicts["trip"]:
        return ""
    out = [f"circuit breaker (medians over rounds; GET {BREAKER_PATH}, no token, auth none; the breakers on "
           f"{BREAKER_SIDECAR}, in-memory store; the rows without one on extproc, the same route and cluster):"]
    if verdicts["closed"]:
        head = ("row", "c", "against", "Δp50 ms", "Δp99 ms", "Δside µs/req", "Δenvoy µs/req", "Δside+envoy",
                "RPS vs", "cpu/floor", f"p50 +<{BREAKER_TARGET_MS:g} ms", "what")
        lines = []
        for d in verdicts["closed"]:
            v = BY_NAME[d["variant"]]
            lines.append((f"{d['variant']} ({v.letter})", str(d["concurrency"]),
                          f"{d['against']} ({BY_NAME[d['against']].letter})", _fmt(d["p50_ms"], "+.2f"),
                          _fmt(d["p99_ms"], "+.2f"), _fmt(d["side_us"], "+,.0f"), _fmt(d["envoy_us"], "+,.0f"),
                          _fmt(d["total_us"], "+,.0f"), _fmt(d["pct_rps"], ".1f", "%"),
                          _fmt(d["cpu_of_floor"], ".2f", "x") if d["target"] else "",
                          _yes(d["under_target"]) if d["target"] else "", d["what"]))
        out += _grid(head, lines, left=(0, 2, 11))
    if verdicts["open"]:
        out.append("")
        out.append("fail-fast while open (forced open through the admin API) against the proxied request on the "
                   "same route (the closed row):")
        head = ("open row", "c", "RPS open/proxied", "p50 ms open/proxied", "side µs open/proxied",
                "envoy µs open/proxied", "side+envoy", "cheaper", "upstream req", "rejected", "failures counted")
        lines = []
        for d in verdicts["open"]:
            v = BY_NAME[d["variant"]]
            verdict = "/".join(_yes(d[k]) for k in ("cheaper_cpu", "faster_p50", "more_rps"))
            lines.append((f"{d['variant']} ({v.letter})", str(d["concurrency"]),
                          f"{_fmt(d['rps'], ',.0f')} / {_fmt(d['rps_proxied'], ',.0f')}",
                          f"{_fmt(d['p50_ms'], '.2f')} / {_fmt(d['p50_proxied_ms'], '.2f')}",
                          f"{_fmt(d['side_us'], ',.0f')} / {_fmt(d['side_proxied_us'], ',.0f')}",
                          f"{_fmt(d['envoy_us'], ',.0f')} / {_fmt(d['envoy_proxied_us'], ',.0f')}",
                          f"{_fmt(d['total_us'], ',.0f')} / {_fmt(d['total_proxied_us'], ',.0f')}", verdict,
                          _fmt(d["upstream_requests"], ",.0f"), _fmt(d["rejected"], ",.0f"),
                          _fmt(d["failures_counted"], ",.0f")))
        out += _grid(head, lines)
        out.append("  cheaper: yes/no for CPU (side+envoy) / p50 / RPS against the proxied row")
        bad = [f"{d['variant']} c={d['concurrency']}" for d in verdicts["open"] if not d["all_rejected"]]
        if bad:
            out.append("!! open rows where a request reached the upstream or was not rejected by the breaker: "
                       + ", ".join(bad))
        counted = [f"{d['variant']} c={d['concurrency']}: {d['failures_counted']:,}" for d in verdicts["open"]
                   if d["failures_counted"]]
        if counted:
            out.append("!! failures counted while open (the breaker's own 503s, from the access log): "
                       + ", ".join(counted))
    if verdicts["trip"]:
        out.append("")
        out.append(f"trip test (after the loads: GET {TRIP_PATH} through the closed rows' listeners, the upstream "
                   "answering 500, until the breaker answers; threshold: consecutive failures; then reset):")
        head = ("wiring", "c", "threshold", "failures that reached the upstream", "breaker opened after",
                "failures counted", "transitions", "state after")
        lines = [(d["wiring"], str(d["concurrency"]), str(d["threshold"]), f"{d['upstream_requests']:,}",
                  "never" if d["open_after_ms"] is None else f"{d['open_after_ms']:.0f} ms",
                  _fmt(d["failures_counted"], ",.0f"), _fmt(d["transitions"], ",.0f"), d["state_after"])
                 for d in verdicts["trip"]]
        out += _grid(head, lines, left=(0, 7))
    return "\n".join(out)


def trip_test(stack: Stack, v: Variant, conns: int) -> dict:
    """How many failing requests reach the upstream before the breaker of a closed row opens: `conns`
    threads send GET TRIP_PATH (the upstream answers 500) on keep-alive connections until one sees the
    breaker's 503, or TRIP_LIMIT_S; the upstream's count says how many got through. The breaker is reset
    before and after. The ext_proc wiring counts each failure in its stream; the lean wiring when Envoy's
    access logger flushes (ACCESS_LOG_FLUSH_S, or a full buffer)."""
    import http.client

    port = stack.ports.listeners[v.name]
    admin = stack.admin_port(v)
    assert admin is not None
    stack.breaker_admin("reset", v.cluster)
    time.sleep(ACCESS_LOG_DRAIN_S if v.access_log else 0.0)    # earlier entries out of the way
    sc0 = sidecar_counters(admin)["breaker"]
    up0 = stack.upstream_settled()
    opened = threading.Event()
    first_open: list[float] = []
    start = time.monotonic()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            while not opened.is_set() and time.monotonic() - start < TRIP_LIMIT_S:
                conn.request("GET", TRIP_PATH)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 503 and resp.getheader("x-circuit-breaker") == "open":
                    first_open.append(time.monotonic() - start)
                    opened.set()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"trip-{i}", daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TRIP_LIMIT_S + 5)
    up = stack.upstream_settled() - up0
    if v.access_log:
        time.sleep(ACCESS_LOG_DRAIN_S)      # the burst's entries: what the lean breaker counted of it
    sc1 = sidecar_counters(admin)["breaker"]
    state = next((b for b in stack.breaker_admin("list")["breakers"] if b["upstream"] == v.cluster), {})
    stack.breaker_admin("reset", v.cluster)
    return {"variant": v.name, "wiring": v.wiring, "concurrency": conns,
            "threshold": BREAKERS[v.cluster]["consecutive_failures"], "upstream_requests": up,
            "open_after_ms": round(min(first_open) * 1000, 1) if first_open else None,
            "failures_counted": int(sc1.get("failures", 0) - sc0.get("failures", 0)),
            "transitions": int(sc1.get("transitions", 0) - sc0.get("transitions", 0)),
            "state_after": f"{state.get('state')}" + (f" (forced {state['forced']})" if state.get("forced") else "")}


def by_concurrency(summary: list[dict]) -> list[dict]:
    return sorted(summary, key=lambda s: s["concurrency"])   # stable: variant order kept within c


# -- main ----------------------------------------------------------------------------------------

def pinning(choice: str) -> tuple[list[str], str]:
    if choice == "none":
        return [], "nothing pinned (--pin none)"
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if taskset is None:
        return [], "nothing pinned (taskset not found)"
    if len(cpus) < 2:
        return [], f"nothing pinned (only CPU {cpus[0]} available)"
    cpu = cpus[-1] if choice == "auto" else int(choice)
    if cpu not in cpus:
        raise BenchError(f"--pin {choice}: CPU {cpu} is not available (allowed: {cpus})")
    rest = ",".join(map(str, cpus))
    return [taskset, "-c", str(cpu)], (f"wrk pinned to CPU {cpu} with taskset; Envoy, sidecar, floor and "
                                       f"upstream unpinned (CPUs {rest}, shared with wrk)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join(v.name + (f" ({v.letter})" if v.letter else "") for v in VARIANTS)
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"variants: {names}")
    p.add_argument("--duration", type=int, default=None, help="seconds of measured load per variant and "
                   "concurrency (default 5; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of unmeasured load before each "
                   "measurement (default 1; 0 with --quick)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole set, order rotated (default 1)")
    p.add_argument("--variants", type=parse_variants, default=list(VARIANTS),
                   help="comma-separated names or letters, e.g. a,d or plain,extproc_authz (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 s loads, no warm-up")
    p.add_argument("--side-by-side", action="store_true",
                   help="also load each extproc variant and its floor at the same time, once per round at c=32, "
                        "and compare their CPU per request over that same window")
    p.add_argument("--pace", type=int, default=0, metavar="RPS",
                   help="pace the c=32 loads at about RPS requests per second (wrk's delay() per connection), "
                        "so every variant's CPU per request is measured at the same rate; default: unpaced")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--pin", default="auto", help="CPU for wrk (taskset): auto (the last CPU), a number, or none")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs and logs) and print it")
    p.add_argument("--fresh-tokens", type=int, default=FRESH_TOKENS,
                   help=f"RS256 tokens minted for the fresh-token variants (default {FRESH_TOKENS:,}); when a "
                   "run needs more, each variant cycles through them and the report says how many were reused")
    p.add_argument("--store-timeout-ms", type=int, default=STORE_TIMEOUT_MS,
                   help=f"rate_limits.store_timeout_ms of the rate-limited sidecars (default {STORE_TIMEOUT_MS}, the "
                   "demo's); past it a decision falls back to the local limiter and the report flags it")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 1 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if not 1 <= args.duration <= 600:
        p.error("--duration must be between 1 and 600 seconds")
    if not 0 <= args.warmup <= 60:
        p.error("--warmup must be between 0 and 60 seconds")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be between 1 and 20")
    if not 100 <= args.fresh_tokens <= 1_000_000:
        p.error("--fresh-tokens must be between 100 and 1000000")
    return args


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    if shutil.which("wrk") is None:
        print("bench: wrk not found on PATH; run ./scripts/setup --system (installs it)", file=sys.stderr)
        return 2
    if not (VENV_BIN / "envoy").exists():
        print(f"bench: {VENV_BIN / 'envoy'} missing; run ./scripts/setup", file=sys.stderr)
        return 2
    variants: list[Variant] = args.variants
    per_load = args.warmup + args.duration
    loads = args.rounds * (len(CONCURRENCY) * len(variants)
                           + (len(side_by_side_variants(variants)) if args.side_by_side else 0))
    expected = loads * (per_load + 0.5) + STARTUP_ESTIMATE_S
    if any(v.fresh for v in variants):
        expected += args.fresh_tokens * MINT_ESTIMATE_S
    try:
        pin, pin_text = pinning(args.pin)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    started: list[Proc] = []
    failed = False     # a failed run keeps its configs and logs for diagnosis
    load_before = os.getloadavg()      # before our own processes start
    try:
        stack, started = start_stack(variants, tmp, token_ttl=int(expected * 3) + 3600,
                                     fresh_tokens=args.fresh_tokens, store_timeout_ms=args.store_timeout_ms)
        stack.pace_rps = args.pace
        meta = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "envoy_version": stack.envoy_version, "envoy_concurrency": 1,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "loadavg_before": load_before, "pinning": pin_text,
            "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
            "concurrency": [{"connections": c, "threads": t} for c, t in CONCURRENCY],
            "pace_rps": args.pace or None,
            "pace_ms": pace_ms(max(c for c, _ in CONCURRENCY), args.pace) if args.pace else None,
            "target": f"GET {TARGET_PATH} (demo upstream) with Authorization: Bearer <token>: one RS256 token, "
                      "one ES256 token (*_es256), or the next of a pool of RS256 tokens per request (*_fresh)",
            "fresh_tokens": stack.fresh_pool_size or None,
            "redis_version": stack.redis_version,
            "ratelimit_rules": RATELIMIT_RULES if any(v.rate_limited for v in variants) else None,
            "store_timeout_ms": args.store_timeout_ms if any(v.rate_limited for v in variants) else None,
            "cache": ({"target": "GET /delay/0 or /delay/20 (the demo upstream sleeps that long; JSON without "
                                 "Cache-Control), no Authorization; the miss rows add ?k=<new key> per request, the "
                                 f"bypass rows Cache-Control: no-store; the LRU row GET /bytes/{LRU_BODY_BYTES}?k=<new "
                                 "key>; native_cache's misses through a hop listener adding "
                                 f"Cache-Control: {NATIVE_CACHE_CONTROL}",
                       "policy": CACHE_POLICY, "rules": CACHE_RULES,
                       "memory_max_bytes": {k: n for k, n in CACHE_SIDECARS.items()
                                            if any(v.sidecar == k for v in variants)}}
                      if any(v.cache for v in variants) else None),
            "breakers": ({"target": f"GET {BREAKER_PATH} without a token (auth none), the rows with and without a "
                                    "breaker on the same route and cluster", "sidecar": BREAKER_SIDECAR,
                          "upstreams": BREAKERS, "access_log_flush_s": ACCESS_LOG_FLUSH_S,
                          "access_log_drain_s": ACCESS_LOG_DRAIN_S, "target_ms": BREAKER_TARGET_MS,
                          "forced_open": sorted({v.cluster for v in variants if v.breaker == "open"})}
                         if any(v.cluster in BREAKER_CLUSTERS for v in variants) else None),
            "python": platform.python_version(), "clk_tck": CLK_TCK,
        }
        print(f"extproc bench  {meta['date']}")
        print(f"Envoy {stack.envoy_version}, --concurrency 1, one listener per variant")
        print(f"CPU: {meta['cpu_model']} x {meta['cpu_count']}; load average before: "
              + " ".join(f"{x:.2f}" for x in meta["loadavg_before"]))
        print(f"pinning: {pin_text}")
        print(f"load: wrk HTTP/1.1, c=1 (1 thread) and c=32 (2 threads), {args.duration} s each after "
              f"{args.warmup} s warm-up, {args.rounds} round(s), order rotated per round")
        if args.pace:
            print(f"paced: each c=32 connection waits {meta['pace_ms']} ms after a response (about "
                  f"{args.pace:,} rps in all, a little less by the latency)")
        print(f"target: {meta['target']}")
        if meta["cache"]:
            print(f"cache rows: {meta['cache']['target']}")
        if meta["breakers"]:
            print(f"breaker rows: {meta['breakers']['target']}; forced open: "
                  f"{', '.join(meta['breakers']['forced_open']) or 'none'}")
        print(f"variants: {', '.join(v.name for v in variants)}")
        if stack.redis is not None:
            print(f"redis: redis-server {stack.redis_version} on 127.0.0.1:{stack.ports.redis} (PID {stack.redis.pid}), "
                  f"no persistence, for extproc_ratelimit_redis; store_timeout_ms {args.store_timeout_ms}")
        print(f"expected total: about {expected:.0f} s ({loads} loads of {per_load} s + start-up)", flush=True)

        open_breakers(stack, variants)
        verify(stack, variants)
        rows: list[dict] = []
        pairs: list[dict] = []
        paired = side_by_side_variants(variants) if args.side_by_side else []
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for conns, threads in CONCURRENCY:
                for v in order:
                    warm(stack, v, conns, threads, args.warmup, pin)
                    row = measure(stack, v, conns, threads, args.duration, pin)
                    row["round"] = rnd + 1
                    rows.append(row)
                    flag = "  !! >1% errors" if row["error_ratio"] > ERROR_FLAG_RATIO else ""
                    errs = ", ".join(f"{k} {n}" for k, n in row["errors"].items() if n) or "none"
                    if v.expect_status != 200:
                        errs = (f"{row['error_count']} (expected: {row['errors']['status']:,} x "
                                f"{v.expect_status}, the open breaker's answer)")
                    print(f"  round {rnd + 1} c={conns:<2} {v.name:<25} {row['rps']:>9,.0f} rps  "
                          f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  errors: {errs}{flag}",
                          flush=True)
                    if row["error_count"] and row["envoy_events"]:
                        print("      Envoy: " + ", ".join(f"{k} +{n}" for k, n in row["envoy_events"].items()),
                              flush=True)
            conns, threads = CONCURRENCY[-1]
            for v in paired:
                warm(stack, v, conns, threads, args.warmup, pin)
                pair = measure_side_by_side(stack, v, conns, threads, args.duration, pin)
                pair["round"] = rnd + 1
                pairs.append(pair)
                print(f"  round {rnd + 1} c={conns:<2} {v.name} and {pair['floor']} at once: "
                      f"{pair['rps']:,.0f} / {pair['floor_rps']:,.0f} rps, sidecar CPU "
                      f"{_fmt(pair['cpu_us_per_request'], ',.0f')} / {_fmt(pair['floor_cpu_us_per_request'], ',.0f')} "
                      f"µs/req, errors {pair['error_count']}", flush=True)
        natives = [v for v in variants if _uses_local_rl(v)]
        if natives:
            stats = envoy_stats(stack.ports.envoy_admin)
            limited = sum(stats.get(f"{_rl_prefix(v)}.http_local_rate_limit.rate_limited", 0) for v in natives)
            if limited:
                print(f"warning: local_ratelimit rejected {limited} requests (bucket too small?)")
        trips = []
        for v in variants:
            if v.breaker == "closed":
                for conns, _ in CONCURRENCY:
                    trips.append(trip_test(stack, v, conns))
                    t = trips[-1]
                    print(f"  trip test {v.wiring:<8} c={conns:<2} {t['upstream_requests']:>5} failures reached the "
                          f"upstream, breaker open after "
                          + ("never" if t["open_after_ms"] is None else f"{t['open_after_ms']:.0f} ms"), flush=True)
        meta["loadavg_after"] = os.getloadavg()
        summary = by_concurrency(summarize(rows, variants))
        print()
        print(table(summary))
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in meta['loadavg_after'])}"
              + ("  (above 0.5 before the run: something else was using the CPUs; numbers are noisier)"
                 if meta["loadavg_before"][0] > 0.5 else ""))
        block = limiter_block(summary)
        if block:
            print("\n" + block)
        verdicts = cache_verdicts(summary)
        block = cache_block(summary, verdicts)
        if block:
            print("\n" + block)
        bverdicts = breaker_verdicts(summary, trips)
        block = breaker_block(bverdicts)
        if block:
            print("\n" + block)
        block = side_by_side_block(pairs)
        if block:
            print("\nside by side, the variant and its floor loaded at once (sidecar CPU per request, variant over "
                  "floor):\n" + block)
        block = identity_block(summary)
        if block:
            print("\nidentity target, sidecar CPU per request over floor_authz's in the same round:\n" + block)
        notes = token_notes(summary)
        if notes:
            print("\ntokens and caches (summed over rounds):\n" + notes)
        flagged = [f"{s['variant']} c={s['concurrency']}" for s in summary if s["flagged"]]
        if flagged:
            print(f"\n!! more than 1% errors: {', '.join(flagged)} (their numbers are not comparable)")
        print("\nside µs/req and RSS: CPU (utime+stime) of the gRPC server behind the variant (extproc or "
              "the floor) per completed request; cpu/floor divides it by the floor's of the same filter shape "
              "(floor_authz for every extproc_authz*), %floor compares RPS with that floor, %native with Envoy's "
              "jwt_authn on the same tokens; the cache rows compare with floor_ext_proc_delay, Envoy's cache filter "
              "(native_cache) and plain_delay, on the same route.")
        if args.json is not None:
            doc = {"meta": meta, "variants": {v.name: {"letter": v.letter or None, "title": v.title,
                                                        "filters": list(v.filters), "sidecar": v.sidecar,
                                                        "floor": v.floor, "native": v.native, "key": v.key,
                                                        "fresh": v.fresh, "policy": v.policy,
                                                        "baseline": v.baseline,
                                                        "ratelimit_store": SIDECARS.get(v.sidecar or ""),
                                                        "path": v.path, "token": v.token, "unique_keys": v.unique,
                                                        "headers": dict(v.headers), "cache": v.cache,
                                                        "plain": v.plain, "upstream_ms": v.upstream_ms,
                                                        "cluster": v.cluster, "attributes": v.attributes,
                                                        "access_log": v.access_log, "breaker": v.breaker,
                                                        "wiring": v.wiring, "expect_status": v.expect_status}
                                              for v in variants},
                   "summary": summary, "cache": verdicts if any(v.cache for v in variants) else None,
                   "breaker": bverdicts if any(v.breaker for v in variants) else None,
                   "runs": rows, "side_by_side": pairs if args.side_by_side else None}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"JSON written to {args.json}")
        if verdicts["lru_within_bound"] is False:
            print("\nbench: the response cache's LRU held more than its memory_max_bytes (see above)", file=sys.stderr)
            return 1
        return 0
    except BenchError as exc:
        failed = True
        print(f"\nbench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping the processes it started", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # finish the cleanup even if signalled again
        for proc in reversed(started):
            proc.stop()
        if args.keep or failed:
            print(f"configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
