#!/usr/bin/env python3
"""A realistic request mix through Envoy for a bounded time, reported as text, JSON and HTML.

    scripts/loadtest [--stack FILE] [--duration S] [--rps R | --concurrency C] [--mix KIND=W,...]
                     [--fail-window A,B] [--json FILE] [--html FILE] [--svg FILE]

Without `--stack` (the JSON that `scripts/stack --json FILE` writes) it starts its own stack
(`--envoys`, `--sidecars`, `--redis`; the payments breaker open 5 s instead of 30 s so a run shows
it recover) and stops it afterwards.

The mix (weights, `--mix` changes any of them):

  product    GET /api/products/{1..4}      a user's cacheable read (the cache's hit ratio)
  list       GET /api/products             the catalogue, cacheable
  orders     GET /api/orders               never cached (BYPASS)
  payment    GET /api/payments/pay_1       cluster `payments`: the breaker's upstream
  noisy      GET /api/products/{1..4}      one API-key client of tier `free` (100/min): over its limit
  anonymous  GET /api/products             no credentials: 401
  write      PUT /api/products/{1..4}      an admin's write: invalidates /api/products* on every sidecar

Readers are a pool of users (`--users`, by default enough that none nears the per-user limit).
Between `--fail-window` A and B (fractions of the run) both upstream replicas answer 500 on
/api/payments (`POST /_control/fail`), so the payments breaker trips. Every request sends
`Host: shop.example`, as clients behind one load balancer do: the cache key includes the host.

The client is asyncio with raw HTTP/1.1 keep-alive connections (one per worker, spread over the
Envoys): `--rps` paces requests on a fixed schedule (open loop; a request whose slot came while
every connection was busy starts late and is counted), `--concurrency` runs that many workers
flat out (closed loop). Every second it samples the sidecars' /cache/stats and /metrics (breaker
states, transitions) and the CPU and RSS of every process of the stack from /proc, and its own
CPU (it must not be the bottleneck: the report says when it might be).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import html
import json
import math
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPORT_DIR = ROOT / ".extproc" / "loadtest"       # .extproc/ is gitignored
HOST = "shop.example"
REQUEST_TIMEOUT_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = 1024

DEFAULT_MIX: dict[str, float] = {"product": 62, "list": 12, "orders": 6, "payment": 6, "noisy": 10,
                                 "anonymous": 2, "write": 0.5}
CACHE_HIT = {"HIT", "STALE"}
CACHE_LOOKUP = {"HIT", "STALE", "MISS", "REVALIDATED"}
STATE_NAMES = {0: "closed", 1: "open", 2: "half_open"}


# ------------------------------------------------------------------------------------- HTTP ---

class HttpError(Exception):
    pass


_WANTED = {b"content-length", b"transfer-encoding", b"connection", b"x-cache-status", b"x-circuit-breaker",
           b"x-extproc-concurrency"}


class Conn:
    """One HTTP/1.1 keep-alive connection on asyncio streams: a request is pre-built bytes, the
    answer is the status and the few headers the report reads. Reconnects after any error."""

    __slots__ = ("host", "port", "reader", "writer")

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, raw: bytes, head: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.reader, self.writer
        assert reader is not None
        writer.write(raw)
        block = await reader.readuntil(b"\r\n\r\n")
        lines = block.split(b"\r\n")
        try:
            status = int(lines[0][9:12])
        except ValueError:
            raise HttpError(f"bad status line {lines[0][:40]!r}") from None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name in _WANTED:
                headers[name] = value.strip()
        body = b""
        if head or status in (204, 304) or status < 200:
            pass
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append((await reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        else:
            body = await reader.read()
            self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body


def build_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def call(url: str, method: str = "GET", body: Any = None, token: str | None = None,
               limit_s: float = 2.0) -> tuple[int, Any]:
    """One request on its own connection (admin and control APIs): status and JSON (or text)."""
    u = urlsplit(url)
    headers = {"Connection": "close"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    raw = json.dumps(body).encode() if body is not None else b""
    path = u.path + (f"?{u.query}" if u.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.hostname}:{u.port}", *(f"{k}: {v}" for k, v in headers.items())]
    if raw or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(raw)}"]
    conn = Conn(u.hostname or "127.0.0.1", u.port or 80)
    try:
        async with asyncio.timeout(limit_s):
            status, _, data = await conn.exchange(("\r\n".join(lines) + "\r\n\r\n").encode() + raw)
    finally:
        conn.close()
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data.decode(errors="replace")


# --------------------------------------------------------------------------------- the mix ---

@dataclass(frozen=True)
class Kind:
    name: str
    method: str
    paths: tuple[str, ...]
    auth: str | None               # user | admin | noisy | None


KINDS = {
    "product": Kind("product", "GET", tuple(f"/api/products/{n}" for n in range(1, 5)), "user"),
    "list": Kind("list", "GET", ("/api/products",), "user"),
    "orders": Kind("orders", "GET", ("/api/orders",), "user"),
    "payment": Kind("payment", "GET", ("/api/payments/pay_1",), "user"),
    "noisy": Kind("noisy", "GET", tuple(f"/api/products/{n}" for n in range(1, 5)), "noisy"),
    "anonymous": Kind("anonymous", "GET", ("/api/products",), None),
    "write": Kind("write", "PUT", tuple(f"/api/products/{n}" for n in range(1, 5)), "admin"),
}


def parse_mix(text: str | None) -> dict[str, float]:
    mix = dict(DEFAULT_MIX)
    for item in filter(None, (text or "").split(",")):
        name, sep, weight = item.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise ValueError(f"--mix wants KIND=WEIGHT with KIND one of {', '.join(KINDS)}, got {item!r}")
        mix[name] = float(weight)
        if mix[name] < 0:
            raise ValueError(f"--mix {name}: a weight is >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError("--mix: every weight is 0")
    return mix


@dataclass
class Credentials:
    users: list[str]
    admin: str
    noisy_header: tuple[str, str]      # ("x-api-key", KEY) or ("Authorization", "Bearer ...") fallback
    noisy_how: str


class Requests:
    """Pre-built request bytes per (kind, path, user): building costs nothing per request."""

    def __init__(self, creds: Credentials):
        self.creds = creds
        self._cache: dict[tuple[str, int, int], bytes] = {}

    def get(self, kind: Kind, path_i: int, user_i: int, price: float) -> bytes:
        if kind.name == "write":          # a fresh body each time
            return build_request("PUT", kind.paths[path_i], {"Authorization": f"Bearer {self.creds.admin}"},
                                 json.dumps({"price": price}).encode())
        key = (kind.name, path_i, user_i if kind.auth == "user" else 0)
        raw = self._cache.get(key)
        if raw is None:
            headers: dict[str, str] = {}
            if kind.auth == "user":
                headers["Authorization"] = f"Bearer {self.creds.users[user_i]}"
            elif kind.auth == "noisy":
                headers[self.creds.noisy_header[0]] = self.creds.noisy_header[1]
            raw = self._cache[key] = build_request(kind.method, kind.paths[path_i], headers)
        return raw


# ------------------------------------------------------------------------- /proc sampling ---

def proc_sample(pid: int) -> tuple[float, float] | None:
    """(CPU seconds so far, RSS MB) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, rss_kb / PAGE_KB


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def metric_lines(text: str, *names: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of the samples named, from Prometheus text (no full parse)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(names):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        if name not in names:
            continue
        labels = {}
        for part in rest.rstrip("}").split('",'):
            k, _, v = part.partition('="')
            if k:
                labels[k.strip(",")] = v.rstrip('"')
        try:
            out.append((name, labels, float(value)))
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------------------------- run ---

@dataclass
class Second:
    n: int = 0
    status: Counter = field(default_factory=Counter)
    cache: Counter = field(default_factory=Counter)
    lat: list[float] = field(default_factory=list)


@dataclass
class Settings:
    duration: float
    rps: float | None
    concurrency: int
    mix: dict[str, float]
    users: int
    fail_window: tuple[float, float] | None
    seed: int
    progress: bool = True


class LoadRun:
    def __init__(self, info: dict[str, Any], settings: Settings):
        self.info, self.s = info, settings
        self.envoys = [(urlsplit(e["external"]).hostname or "127.0.0.1", urlsplit(e["external"]).port or 80)
                       for e in info["envoys"]]
        self.sidecars = info["sidecars"]
        self.admin_token: str | None = info.get("admin_token")
        names = [k for k, w in settings.mix.items() if w > 0]
        total = sum(settings.mix[k] for k in names)
        self.kinds = [KINDS[k] for k in names]
        acc = 0.0
        self.cum: list[float] = []
        for k in names:
            acc += settings.mix[k] / total
            self.cum.append(acc)
        self.n_buckets = int(math.ceil(settings.duration))
        self.seconds = [Second() for _ in range(self.n_buckets)]
        self.status: Counter = Counter()
        self.details: Counter = Counter()
        self.cache: Counter = Counter()
        self.by_kind: dict[str, Counter] = {k.name: Counter() for k in self.kinds}
        self.kind_details: dict[str, Counter] = {k.name: Counter() for k in self.kinds}
        self.kind_lat: dict[str, list[float]] = {k.name: [] for k in self.kinds}
        self.latencies: list[float] = []
        self.late = 0
        self.slot = 0
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.errors: Counter = Counter()
        self.t0 = 0.0
        self.end = 0.0
        self.tty = sys.stdout.isatty()

    # -- processes of the stack -----------------------------------------------------------------
    def processes(self) -> list[tuple[str, str, int]]:
        """(name, role, pid) of every process of the stack that runs on this machine."""
        out = [(s["name"], "sidecar", s["pid"]) for s in self.info["sidecars"]]
        out += [(e["name"], "envoy", e["pid"]) for e in self.info["envoys"]]
        out += [(u["name"], "upstream", u["pid"]) for u in self.info["upstreams"]]
        for node in (self.info.get("redis") or {}).get("nodes", []):
            out.append((f"redis-{node['port']}", "redis", node["pid"]))
        if self.info.get("prometheus"):
            out.append(("prometheus", "prometheus", self.info["prometheus"]["pid"]))
        return out

    # -- set-up -------------------------------------------------------------------------------
    async def credentials(self) -> Credentials:
        from extproc.demo import idp

        key = idp.load_or_create(Path(self.info["state_dir"]))
        run = secrets.token_hex(3)
        users = [key.mint(f"load-{run}-{i:03d}", scopes=["read"], ttl_seconds=3600) for i in range(self.s.users)]
        admin = key.mint(f"load-{run}-admin", scopes=["read", "write", "admin"], ttl_seconds=3600)
        noisy_header, how = None, ""
        if self.admin_token:
            try:
                status, body = await call(f"{self.sidecars[0]['admin']}/apikeys", "POST",
                                          {"owner": f"load-{run}-noisy", "scopes": ["read"], "tier": "free"},
                                          token=self.admin_token)
            except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError):
                status, body = 0, None
            if status == 201 and isinstance(body, dict) and "key" in body:
                noisy_header, how = ("x-api-key", body["key"]), "an API key of tier free (created through the admin API)"
        if noisy_header is None:      # no admin API: the same tier through the JWT's `tier` claim
            noisy_header = ("Authorization", "Bearer " + key.mint(f"load-{run}-noisy", scopes=["read"],
                                                                  extra={"tier": "free"}))
            how = "a JWT with tier=free (the admin API refused an API key)"
        return Credentials(users, admin, noisy_header, how)

    async def control_fail(self, mode: str) -> list[int]:
        query = "prefix=/api/payments&mode=500" if mode == "500" else "mode=off"
        results = await asyncio.gather(*(call(f"{u['url']}/_control/fail?{query}", "POST")
                                         for u in self.info["upstreams"]), return_exceptions=True)
        return [r[0] if isinstance(r, tuple) else 0 for r in results]

    async def admin_post(self, path: str) -> int:
        if not self.admin_token:
            return 0
        try:
            status, _ = await call(f"{self.sidecars[0]['admin']}{path}", "POST", token=self.admin_token)
        except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError):
            return 0
        return status

    # -- sampling -----------------------------------------------------------------------------
    async def sidecar_state(self, admin: str) -> dict[str, Any] | None:
        try:
            (s1, stats), (s2, text) = await asyncio.gather(call(f"{admin}/cache/stats", limit_s=1.5),
                                                           call(f"{admin}/metrics", limit_s=1.5))
        except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError):
            return None
        if s1 != 200 or s2 != 200 or not isinstance(text, str):
            return None
        out: dict[str, Any] = {"hits": stats.get("hits", 0), "misses": stats.get("misses", 0),
                               "breakers": {}, "transitions": Counter(), "ratelimit": Counter()}
        for name, labels, value in metric_lines(text, "gateway_circuit_breaker_state",
                                                "gateway_circuit_breaker_transitions_total",
                                                "gateway_ratelimit_decisions_total"):
            if name == "gateway_circuit_breaker_state":
                out["breakers"][labels.get("upstream", "?")] = int(value)
            elif name == "gateway_circuit_breaker_transitions_total":
                out["transitions"][f"{labels.get('upstream')}:{labels.get('from')}->{labels.get('to')}"] += value
            else:
                out["ratelimit"][labels.get("result", "?")] += value
        return out

    async def sample(self) -> dict[str, Any]:
        states = await asyncio.gather(*(self.sidecar_state(s["admin"]) for s in self.sidecars))
        procs = {name: proc_sample(pid) for name, _, pid in self.processes()}
        return {"t": time.monotonic() - self.t0, "self_cpu": self_cpu(), "procs": procs,
                "sidecars": dict(zip([s["name"] for s in self.sidecars], states, strict=True))}

    async def sampler(self) -> None:
        k = 1
        while True:
            at = self.t0 + k
            if at > self.end + 0.5:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            sample = await self.sample()
            self.samples.append(sample)
            if self.s.progress:
                self.progress(k)
            k += 1

    def progress(self, k: int) -> None:
        prev = self.samples[-2] if len(self.samples) > 1 else self.samples[-1]
        cur = self.samples[-1]
        sec = self.seconds[k - 1] if k - 1 < self.n_buckets else Second()
        lat = sorted(sec.lat)
        look = sum(sec.cache[c] for c in CACHE_LOOKUP)
        hit = sum(sec.cache[c] for c in CACHE_HIT) / look if look else None
        five = sum(v for s, v in sec.status.items() if s.startswith("5"))
        dt_s = max(1e-6, cur["t"] - prev["t"])
        side = []
        for name, _, _ in self.processes():
            if name.startswith("sidecar"):
                a, b = prev["procs"].get(name), cur["procs"].get(name)
                side.append(f"{100 * (b[0] - a[0]) / dt_s:3.0f}%" if a and b else "  -")
        states = {s["breakers"].get("payments") for s in cur["sidecars"].values() if s}
        breaker = "/".join(sorted(STATE_NAMES.get(x, "?") for x in states if x is not None)) or "?"
        line = (f"[{k:>3}/{self.n_buckets} s] {sec.n:5d} req/s  p50 {_ms(percentile(lat, 50))}  "
                f"p99 {_ms(percentile(lat, 99))} | 2xx {sum(v for s, v in sec.status.items() if s.startswith('2')):4d} "
                f"429 {sec.status['429']:3d} 5xx {five:3d} | hit {('%3.0f%%' % (100 * hit)) if hit is not None else '  -'}"
                f" | payments {breaker} | sidecars {' '.join(side)} | loadgen "
                f"{100 * (cur['self_cpu'] - prev['self_cpu']) / dt_s:3.0f}%")
        if self.tty:
            sys.stdout.write("\r" + line + "\x1b[K")
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    # -- scenario ------------------------------------------------------------------------------
    async def scenario(self) -> None:
        if self.s.fail_window is None:
            return
        start, stop = self.s.fail_window
        for frac, mode, what in ((start, "500", "payments failing: both upstreams answer 500 on /api/payments"),
                                 (stop, "off", "payments restored")):
            at = self.t0 + frac * self.s.duration
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            codes = await self.control_fail(mode)
            self.events.append({"t": round(time.monotonic() - self.t0, 3), "what": what, "control_status": codes})

    # -- load -----------------------------------------------------------------------------------
    def record(self, at: float, kind: str, status: int, detail: str | None, cache: str | None, lat_ms: float) -> None:
        """One answered request: `at` (monotonic) picks its second in the series."""
        label = str(status) if status else "error"
        b = int(at - self.t0)
        if 0 <= b < self.n_buckets:
            sec = self.seconds[b]
            sec.n += 1
            sec.status[label] += 1
            sec.lat.append(lat_ms)
            if cache:
                sec.cache[cache] += 1
        self.status[label] += 1
        if detail:
            self.details[detail] += 1
            self.kind_details[kind][detail] += 1
        if cache:
            self.cache[cache] += 1
        self.by_kind[kind][label] += 1
        self.kind_lat[kind].append(lat_ms)
        self.latencies.append(lat_ms)

    async def worker(self, i: int, reqs: Requests) -> None:
        host, port = self.envoys[i % len(self.envoys)]
        conn = Conn(host, port)
        rng = random.Random(self.s.seed * 1000 + i)
        n_users = len(reqs.creds.users)
        rps = self.s.rps
        try:
            while True:
                if rps:
                    k = self.slot
                    self.slot += 1
                    at = self.t0 + k / rps
                    if at >= self.end:
                        return
                    delay = at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif delay < -0.05:
                        self.late += 1
                elif time.monotonic() >= self.end:
                    return
                kind = self.kinds[bisect.bisect_left(self.cum, rng.random() * self.cum[-1])]
                raw = reqs.get(kind, rng.randrange(len(kind.paths)), rng.randrange(n_users),
                               round(rng.uniform(5, 150), 2))
                started = time.monotonic()
                detail = cache = None
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        status, headers, _ = await conn.exchange(raw)
                    if status == 503:
                        detail = ("circuit_open" if b"x-circuit-breaker" in headers else
                                  "concurrency_cap" if b"x-extproc-concurrency" in headers else "503_other")
                    c = headers.get(b"x-cache-status")
                    cache = c.decode() if c else None
                except TimeoutError:
                    status, detail = 0, "timeout"
                    conn.close()
                except (OSError, HttpError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    status, detail = 0, f"error:{type(exc).__name__}"
                    self.errors[type(exc).__name__] += 1
                    conn.close()
                # a paced request counts in the second of its slot: the last slot, sent a moment
                # late, still belongs to the run's last second
                self.record(at if rps else started, kind.name, status, detail, cache,
                            (time.monotonic() - started) * 1000)
        finally:
            conn.close()

    async def run(self) -> dict[str, Any]:
        creds = await self.credentials()
        reqs = Requests(creds)
        await self.control_fail("off")
        reset = await self.admin_post("/breakers/payments/reset")
        if self.s.progress:
            print(f"loadtest: {self.s.duration:g} s, "
                  + (f"{self.s.rps:g} rps paced over {self.s.concurrency} connections" if self.s.rps
                     else f"{self.s.concurrency} connections flat out")
                  + f", {len(self.envoys)} Envoy(s), {len(self.sidecars)} sidecar(s), {self.s.users} users; "
                  f"noisy client: {creds.noisy_how}", flush=True)
        cpu0 = self_cpu()
        self.t0 = time.monotonic()
        self.end = self.t0 + self.s.duration
        first = await self.sample()
        self.samples.append(first)
        wall0 = time.time()
        try:
            await asyncio.gather(self.sampler(), self.scenario(),
                                 *(self.worker(i, reqs) for i in range(self.s.concurrency)))
        finally:
            await self.control_fail("off")
        elapsed = time.monotonic() - self.t0
        cpu = self_cpu() - cpu0
        if self.s.progress and self.tty:
            sys.stdout.write("\n")
        # after the last response: the sidecars' counters now include every request of the run
        last = await self.sample()
        self.samples.append(last)
        return self.report(first, last, elapsed, cpu, wall0, creds, reset)

    # -- the report ------------------------------------------------------------------------------
    def report(self, first: dict, last: dict, elapsed: float, cpu: float, wall0: float, creds: Credentials,
               reset_status: int) -> dict[str, Any]:
        lat = sorted(self.latencies)
        total = len(lat)
        pct = {f"p{q}": _r(percentile(lat, q)) for q in (50, 90, 95, 99)}
        pct["max"] = _r(lat[-1]) if lat else None
        pct["mean"] = _r(sum(lat) / total) if total else None
        looked = sum(self.cache[c] for c in CACHE_LOOKUP)
        hits = sum(self.cache[c] for c in CACHE_HIT)

        def side_delta(key: str) -> int:
            out = 0
            for name, s in last["sidecars"].items():
                if s is not None:
                    before = first["sidecars"].get(name) or {}
                    out += int(s[key] - before.get(key, 0))
            return out

        def counter_delta(key: str) -> Counter:
            out: Counter = Counter()
            for name, s in last["sidecars"].items():
                if s is not None:
                    before = (first["sidecars"].get(name) or {}).get(key, Counter())
                    for k, v in s[key].items():
                        if v - before.get(k, 0):
                            out[k] += int(v - before.get(k, 0))
            return out

        s_hits, s_misses = side_delta("hits"), side_delta("misses")
        transitions = counter_delta("transitions")
        trips = sum(v for k, v in transitions.items() if k.endswith("->open"))
        # per second series
        t_axis = list(range(self.n_buckets))
        classes = ("2xx", "3xx", "4xx", "429", "5xx", "error")
        series: dict[str, Any] = {"t": t_axis, "requests": [s.n for s in self.seconds],
                                  "status_classes": {c: [_class_count(s.status, c) for s in self.seconds] for c in classes}}
        for q in (50, 95, 99):
            series[f"p{q}_ms"] = [_r(percentile(sorted(s.lat), q)) for s in self.seconds]
        series["hit_ratio"] = [_ratio(sum(s.cache[c] for c in CACHE_HIT), sum(s.cache[c] for c in CACHE_LOOKUP))
                               for s in self.seconds]
        # from the samples (one per second): sidecar-side hit ratio, breaker states, CPU
        side_hit, breaker_state, cpu_series = [], [], {}
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            dh = dm = 0
            for name, s in b["sidecars"].items():
                prev = a["sidecars"].get(name)
                if s and prev:
                    dh += s["hits"] - prev["hits"]
                    dm += s["misses"] - prev["misses"]
            side_hit.append(_ratio(dh, dh + dm))
            states = [s["breakers"].get("payments", 0) for s in b["sidecars"].values() if s]
            breaker_state.append(max(states) if states else None)
            dt_s = max(1e-6, b["t"] - a["t"])
            for name, pa in a["procs"].items():
                pb = b["procs"].get(name)
                cpu_series.setdefault(name, []).append(_r(100 * (pb[0] - pa[0]) / dt_s, 1) if pa and pb else None)
            cpu_series.setdefault("loadgen", []).append(_r(100 * (b["self_cpu"] - a["self_cpu"]) / dt_s, 1))
        series["sidecar_hit_ratio"] = side_hit[: self.n_buckets]
        series["payments_breaker"] = breaker_state[: self.n_buckets]
        series["cpu_percent"] = {k: v[: self.n_buckets] for k, v in cpu_series.items()}
        # processes: CPU over the run, RSS max
        procs = []
        span = max(1e-6, last["t"] - first["t"])
        for name, role, pid in self.processes():
            a, b = first["procs"].get(name), last["procs"].get(name)
            rss = [s["procs"][name][1] for s in self.samples if s["procs"].get(name)]
            procs.append({"name": name, "role": role, "pid": pid,
                          "cpu_seconds": _r(b[0] - a[0], 2) if a and b else None,
                          "cpu_percent": _r(100 * (b[0] - a[0]) / span, 1) if a and b else None,
                          "rss_mb_max": _r(max(rss), 1) if rss else None,
                          "rss_mb_end": _r(b[1], 1) if b else None, "alive_at_end": b is not None})
        lg_pct = 100 * cpu / max(1e-6, elapsed)
        own = proc_sample(os.getpid())
        noisy = self.by_kind.get("noisy", Counter())
        kinds = {}
        for k in self.kinds:
            kl = sorted(self.kind_lat[k.name])
            kinds[k.name] = {"method": k.method, "paths": list(k.paths), "weight": self.s.mix[k.name],
                             "requests": sum(self.by_kind[k.name].values()), "status": dict(self.by_kind[k.name]),
                             "details": dict(self.kind_details[k.name]),
                             "p50_ms": _r(percentile(kl, 50)), "p99_ms": _r(percentile(kl, 99))}
        topo = self.info.get("topology", {})
        return {
            "version": 1,
            "started_at": dt.datetime.fromtimestamp(wall0, dt.UTC).isoformat(timespec="seconds"),
            "settings": {"duration_s": self.s.duration, "rps_target": self.s.rps, "connections": self.s.concurrency,
                         "mode": "open loop (paced)" if self.s.rps else "closed loop", "mix": self.s.mix,
                         "users": self.s.users, "fail_window": list(self.s.fail_window) if self.s.fail_window else None,
                         "host_header": HOST, "seed": self.s.seed},
            "stack": {"envoys": len(self.envoys), "sidecars": len(self.sidecars), "redis": topo.get("redis"),
                      "envoy_urls": [e["external"] for e in self.info["envoys"]]},
            "elapsed_s": _r(elapsed, 3),
            "requests": total,
            "rps": _r(total / elapsed if elapsed else 0, 1),
            "late_starts": self.late,
            "latency_ms": pct,
            "status": dict(sorted(self.status.items())),
            "details": dict(self.details),
            "kinds": kinds,
            "cache": {"client": {**{k: v for k, v in sorted(self.cache.items())}, "hit_ratio": _ratio(hits, looked),
                                 "lookups": looked},
                      "sidecars": {"hits": s_hits, "misses": s_misses, "hit_ratio": _ratio(s_hits, s_hits + s_misses)}},
            "rate_limits": {"rejected_429": self.status.get("429", 0),
                            "noisy_client": {"how": creds.noisy_how, "requests": sum(noisy.values()),
                                             "rejected_429": noisy.get("429", 0)},
                            "sidecar_decisions": dict(counter_delta("ratelimit"))},
            "breakers": {"trips": trips, "transitions": dict(transitions), "reset_before_run": reset_status == 200,
                         "payments_open_samples": sum(1 for x in breaker_state if x == 1),
                         "circuit_open_answers": self.details.get("circuit_open", 0)},
            "processes": procs,
            "loadgen": {"pid": os.getpid(), "cpu_seconds": _r(cpu, 2), "cpu_percent": _r(lg_pct, 1),
                        "rss_mb": _r(own[1], 1) if own else None,
                        # one asyncio thread: near one core it would be the limit
                        "bottleneck_risk": lg_pct > 70},
            "events": self.events,
            "errors": dict(self.errors),
            "series": series,
        }


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _ms(x: float | None) -> str:
    return "   -   " if x is None else f"{x:5.1f} ms"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _class_count(status: Counter, cls: str) -> int:
    if cls == "429":
        return status.get("429", 0)
    if cls == "error":
        return status.get("error", 0)
    if cls == "4xx":
        return sum(v for s, v in status.items() if s.startswith("4") and s != "429")
    return sum(v for s, v in status.items() if s.startswith(cls[0]))


# ------------------------------------------------------------------------------ text report ---

def text_report(r: dict[str, Any]) -> str:
    s, lat = r["settings"], r["latency_ms"]
    total = r["requests"] or 1
    lines = [
        f"extproc load test, {r['started_at']}: {r['elapsed_s']:.1f} s, {s['mode']}"
        + (f", target {s['rps_target']:g} rps" if s["rps_target"] else "")
        + f", {s['connections']} connections; stack: {r['stack']['envoys']} Envoy(s), {r['stack']['sidecars']} "
          f"sidecar(s), Redis {r['stack']['redis']}",
        f"  requests     {r['requests']} = {r['rps']:.1f} rps"
        + (f" (late starts > 50 ms: {r['late_starts']}"
           + (": every connection was waiting for an answer, the stack fell behind the schedule" if r["late_starts"]
              and not r["loadgen"]["bottleneck_risk"] else "") + ")" if s["rps_target"] else ""),
        f"  latency      p50 {_f1(lat['p50'])} ms   p90 {_f1(lat['p90'])} ms   p95 {_f1(lat['p95'])} ms   "
        f"p99 {_f1(lat['p99'])} ms   max {_f1(lat['max'])} ms",
        "  status       " + "   ".join(f"{k}: {v} ({100 * v / total:.1f} %)" for k, v in r["status"].items()),
    ]
    if r["details"]:
        lines.append("  details      " + "   ".join(f"{k}: {v}" for k, v in sorted(r["details"].items())))
    c = r["cache"]
    lines.append(f"  cache        hit ratio {_pct(c['client']['hit_ratio'])} of {c['client']['lookups']} lookups seen by "
                 f"the client ({', '.join(f'{k} {v}' for k, v in c['client'].items() if k.isupper())}); "
                 f"sidecars' /cache/stats: {c['sidecars']['hits']} hits, {c['sidecars']['misses']} misses = "
                 f"{_pct(c['sidecars']['hit_ratio'])}")
    rl = r["rate_limits"]
    lines.append(f"  rate limits  429s: {rl['rejected_429']} ({100 * rl['rejected_429'] / total:.1f} %); the noisy client "
                 f"({rl['noisy_client']['how']}): {rl['noisy_client']['rejected_429']} of "
                 f"{rl['noisy_client']['requests']} refused")
    dec = rl["sidecar_decisions"]
    if dec:
        lines.append("               sidecars' decisions (rule x request): " + ", ".join(f"{k} {v}" for k, v in sorted(dec.items()))
                     + ("; local_fallback: the store answered slower than rate_limits.store_timeout_ms, the replica "
                        "decided alone" if dec.get("local_fallback") else ""))
    b = r["breakers"]
    trans = ", ".join(f"{k} x{v}" for k, v in sorted(b["transitions"].items())) or "none"
    lines.append(f"  breakers     trips: {b['trips']} ({trans}); answered 503 circuit_open: {b['circuit_open_answers']}")
    for e in r["events"]:
        lines.append(f"  event        t={e['t']:.1f} s  {e['what']}")
    lines.append("  processes    CPU % of one core (mean over the run), RSS max:")
    for p in r["processes"]:
        cpu = f"{p['cpu_percent']:5.1f} %" if p["cpu_percent"] is not None else "   -   "
        rss = f"{p['rss_mb_max']:6.1f} MB" if p["rss_mb_max"] is not None else "   -"
        lines.append(f"    {p['name']:<18} pid {p['pid']:<8} CPU {cpu}  RSS {rss}"
                     + ("" if p["alive_at_end"] else "  (gone at the end)"))
    lg = r["loadgen"]
    verdict = ("may be the bottleneck (one asyncio thread near a full core): lower --rps" if lg["bottleneck_risk"]
               else "not the bottleneck")
    lines.append(f"    {'loadgen (this)':<18} pid {lg['pid']:<8} CPU {lg['cpu_percent']:5.1f} %  RSS {lg['rss_mb']:6.1f} MB"
                 f"  -> {verdict}")
    lines.append("  per kind     " + "   ".join(
        f"{k}: {v['requests']} ({', '.join(f'{s} {n}' for s, n in sorted(v['status'].items()))})"
        for k, v in r["kinds"].items()))
    return "\n".join(lines)


def _f1(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


# ------------------------------------------------------------------------------ SVG charts ---

COLORS = {"2xx": "#2e7d32", "3xx": "#00838f", "4xx": "#ef6c00", "429": "#8e24aa", "5xx": "#c62828",
          "error": "#212121", "p50": "#1565c0", "p95": "#ef6c00", "p99": "#c62828", "client": "#1565c0",
          "sidecars": "#8e24aa", "band": "#c62828"}
PALETTE = ["#1565c0", "#2e7d32", "#8e24aa", "#ef6c00", "#00838f", "#6d4c41", "#c62828", "#546e7a", "#f9a825"]
W, H = 940, 250
ML, MR, MT, MB = 60, 170, 34, 34


def _nice(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v (a tick step)."""
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e * (1 + 1e-9):
            return m * e
    return 10 * e


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt_tick(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.2g}"


def line_chart(title: str, xs: list[float], series: list[tuple[str, list[float | None], str]], *, unit: str = "",
               y_max: float | None = None, stacked: bool = False, bands: list[tuple[float, float, str]] = (),
               markers: list[tuple[float, str]] = (), x_max: float | None = None, percent: bool = False) -> str:
    """An SVG line (or stacked area) chart over seconds; `bands` shade x ranges, `markers` are
    dashed vertical lines with a label."""
    pw, ph = W - ML - MR, H - MT - MB
    x_max = x_max or (max(xs) + 1 if xs else 1)
    if stacked:
        tops = [sum((s[1][i] or 0) for s in series) for i in range(len(xs))]
        top = max(tops, default=0)
    else:
        top = max((v for _, ys, _ in series for v in ys if v is not None), default=0)
    if y_max is not None:
        y_top, y_step = y_max, y_max / 4
    else:
        y_step = _nice((top or 1) / 4)
        y_top = y_step * max(1, math.ceil((top or 1) / y_step))

    def X(x: float) -> float:
        return ML + pw * x / x_max

    def Y(y: float) -> float:
        return MT + ph * (1 - min(y, y_top) / y_top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
           f'<text x="{ML}" y="20" font-size="14" font-weight="bold" fill="#222">{_esc(title)}</text>']
    band_rects = [f'<rect x="{X(x0):.1f}" y="{MT}" width="{max(1.0, X(x1) - X(x0)):.1f}" height="{ph}" '
                  f'fill="{COLORS["band"]}" fill-opacity="{0.18 if stacked else 0.10}"><title>{_esc(label)}</title></rect>'
                  for x0, x1, label in bands]
    if not stacked:
        out += band_rects            # behind the lines; over a stacked area (it would be hidden)
    for k in range(int(round(y_top / y_step)) + 1):
        v = y_step * k
        y = Y(v)
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{ML + pw}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        label = f"{100 * v:.0f}%" if percent else _fmt_tick(v)
        out.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{label}</text>')
    step = _nice(x_max / 8)
    x = 0.0
    while x <= x_max + 1e-9:
        out.append(f'<line x1="{X(x):.1f}" y1="{MT + ph}" x2="{X(x):.1f}" y2="{MT + ph + 4}" stroke="#777"/>')
        out.append(f'<text x="{X(x):.1f}" y="{MT + ph + 16}" text-anchor="middle" fill="#555">{_fmt_tick(x)}</text>')
        x += step
    out.append(f'<text x="{ML + pw}" y="{H - 4}" text-anchor="end" fill="#777">seconds</text>')
    if unit:
        out.append(f'<text x="{ML - 6}" y="{MT - 8}" text-anchor="end" fill="#777">{_esc(unit)}</text>')
    out.append(f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    if stacked:
        base = [0.0] * len(xs)
        for name, ys, color in series:
            upper = [base[i] + (ys[i] or 0) for i in range(len(xs))]
            pts = []
            for i, xv in enumerate(xs):       # a step per second bucket: [t, t+1)
                pts += [(X(xv), Y(upper[i])), (X(xv + 1), Y(upper[i]))]
            back = []
            for i in range(len(xs) - 1, -1, -1):
                back += [(X(xs[i] + 1), Y(base[i])), (X(xs[i]), Y(base[i]))]
            if any(ys):
                out.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts + back)}" fill="{color}" '
                           f'fill-opacity="0.85" stroke="none"><title>{_esc(name)}</title></polygon>')
            base = upper
    else:
        for n, (name, ys, color) in enumerate(series):
            dash = ' stroke-dasharray="6 4"' if n % 2 else ""
            run: list[str] = []
            runs = []
            for xv, yv in zip(xs, ys, strict=True):
                if yv is None:
                    if run:
                        runs.append(run)
                    run = []
                else:
                    run.append(f"{X(xv + 0.5):.1f},{Y(yv):.1f}")
            if run:
                runs.append(run)
            for r in runs:
                if len(r) == 1:
                    cx, cy = r[0].split(",")
                    out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
                else:
                    out.append(f'<polyline points="{" ".join(r)}" fill="none" stroke="{color}" stroke-width="2"{dash}>'
                               f'<title>{_esc(name)}</title></polyline>')
    if stacked:
        out += band_rects
    for xv, label in markers:
        out.append(f'<line x1="{X(xv):.1f}" y1="{MT}" x2="{X(xv):.1f}" y2="{MT + ph}" stroke="#333" '
                   f'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{X(xv) + 3:.1f}" y="{MT + 11}" fill="#333" font-size="10">{_esc(label)}</text>')
    ly = MT + 4
    for name, _, color in series:
        out.append(f'<rect x="{ML + pw + 14}" y="{ly}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{ML + pw + 31}" y="{ly + 10}" fill="#222">{_esc(name)}</text>')
        ly += 18
    if bands:
        out.append(f'<rect x="{ML + pw + 14}" y="{ly}" width="12" height="12" fill="{COLORS["band"]}" fill-opacity="0.25"/>')
        out.append(f'<text x="{ML + pw + 31}" y="{ly + 10}" fill="#222">{_esc(bands[0][2])}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(title: str, items: list[tuple[str, int, str]], total: int) -> str:
    row = 24
    h = MT + row * max(1, len(items)) + 16
    label_w, pw = 170, W - 170 - MR - 20
    top = max((n for _, n, _ in items), default=1) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" '
           f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{W}" height="{h}" fill="#ffffff"/>',
           f'<text x="{ML}" y="20" font-size="14" font-weight="bold" fill="#222">{_esc(title)}</text>']
    for i, (name, n, color) in enumerate(items):
        y = MT + i * row
        w = pw * n / top
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" fill="#222">{_esc(name)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{max(1.0, w):.1f}" height="{row - 8}" fill="{color}"/>')
        out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" fill="#333">{n} ({100 * n / max(1, total):.1f} %)</text>')
    out.append("</svg>")
    return "".join(out)


def _status_color(code: str) -> str:
    if code == "429":
        return COLORS["429"]
    if code == "error":
        return COLORS["error"]
    return COLORS.get(f"{code[0]}xx", "#757575")


def charts(r: dict[str, Any]) -> list[tuple[str, str]]:
    """(id, svg) of every chart of the report."""
    s = r["series"]
    xs = s["t"]
    x_max = max(1.0, float(len(xs)))
    bands = _breaker_bands(s.get("payments_breaker") or [])
    markers = [(e["t"], "payments 500s on" if "failing" in e["what"] else "payments restored") for e in r["events"]]
    out = []
    out.append(("rps", line_chart("Requests per second, by status class", xs,
                                  [(c, s["status_classes"][c], COLORS[c]) for c in ("2xx", "3xx", "4xx", "429", "5xx", "error")
                                   if any(s["status_classes"][c])],
                                  unit="req/s", stacked=True, bands=bands, markers=markers, x_max=x_max)))
    out.append(("latency", line_chart("Latency per second (ms)", xs,
                                      [("p50", s["p50_ms"], COLORS["p50"]), ("p95", s["p95_ms"], COLORS["p95"]),
                                       ("p99", s["p99_ms"], COLORS["p99"])],
                                      unit="ms", bands=bands, markers=markers, x_max=x_max)))
    total = r["requests"]
    items = sorted(r["status"].items(), key=lambda kv: -kv[1])
    bars = [(f"{k}", v, _status_color(k)) for k, v in items]
    for d, n in sorted(r["details"].items()):
        bars.append((f"503: {d}" if not d.startswith(("error", "timeout")) else d, n, "#9e9e9e"))
    out.append(("status", bar_chart("Status mix (whole run)", bars, total)))
    out.append(("hit", line_chart("Cache hit ratio per second", xs,
                                  [("client-seen", s["hit_ratio"], COLORS["client"]),
                                   ("sidecars' stats", s["sidecar_hit_ratio"], COLORS["sidecars"])],
                                  unit="hit ratio", y_max=1.0, percent=True, markers=markers, x_max=x_max)))
    cpu = s["cpu_percent"]
    names = [n for n in cpu if n.startswith(("sidecar", "envoy"))] + ["loadgen"]
    out.append(("cpu", line_chart("CPU per process (% of one core)", xs,
                                  [(n, cpu.get(n, []), PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)],
                                  unit="% CPU", bands=bands, x_max=x_max)))
    return out


def _breaker_bands(states: list[int | None]) -> list[tuple[float, float, str]]:
    """When some sidecar saw the payments breaker open or half-open: `states[i]` is the state
    sampled at the end of second i (t = i + 1), so a band runs from the first sample that saw it
    open to the first that saw it closed (or the end of the run)."""
    bands, start = [], None
    for i, st in enumerate(states):
        if st in (1, 2) and start is None:
            start = i + 1
        elif st not in (1, 2) and start is not None:
            bands.append((float(start), float(i + 1), "payments breaker open"))
            start = None
    if start is not None:
        bands.append((float(start), float(len(states)), "payments breaker open"))
    return bands


def html_report(r: dict[str, Any], text: str) -> str:
    lat, c, lg = r["latency_ms"], r["cache"], r["loadgen"]
    cards = [("Requests / s", f"{r['rps']:.0f}", f"{r['requests']} in {r['elapsed_s']:.0f} s"),
             ("p50 / p95 / p99", f"{_f1(lat['p50'])} / {_f1(lat['p95'])} / {_f1(lat['p99'])} ms", f"max {_f1(lat['max'])} ms"),
             ("Cache hit ratio", _pct(c["client"]["hit_ratio"]), f"sidecars: {_pct(c['sidecars']['hit_ratio'])}"),
             ("429s", str(r["rate_limits"]["rejected_429"]),
              f"noisy client: {r['rate_limits']['noisy_client']['rejected_429']} of "
              f"{r['rate_limits']['noisy_client']['requests']}"),
             ("Breaker trips", str(r["breakers"]["trips"]), f"{r['breakers']['circuit_open_answers']} answered circuit_open"),
             ("Load generator CPU", f"{lg['cpu_percent']:.0f} %", "not the bottleneck" if not lg["bottleneck_risk"]
              else "may be the bottleneck")]
    procs = "".join(
        f"<tr><td>{_esc(p['name'])}</td><td>{_esc(p['role'])}</td><td>{p['pid']}</td>"
        f"<td>{'' if p['cpu_percent'] is None else p['cpu_percent']}</td><td>{'' if p['cpu_seconds'] is None else p['cpu_seconds']}</td>"
        f"<td>{'' if p['rss_mb_max'] is None else p['rss_mb_max']}</td></tr>" for p in r["processes"])
    procs += (f"<tr><td>loadgen (this)</td><td>client</td><td>{lg['pid']}</td><td>{lg['cpu_percent']}</td>"
              f"<td>{lg['cpu_seconds']}</td><td>{lg['rss_mb'] or ''}</td></tr>")
    kinds = "".join(
        f"<tr><td>{_esc(k)}</td><td>{_esc(v['method'])} {_esc(v['paths'][0])}{' …' if len(v['paths']) > 1 else ''}</td>"
        f"<td>{v['weight']:g}</td><td>{v['requests']}</td><td>{_esc(', '.join(f'{s}: {n}' for s, n in sorted(v['status'].items())))}</td>"
        f"<td>{'' if v['p50_ms'] is None else v['p50_ms']}</td><td>{'' if v['p99_ms'] is None else v['p99_ms']}</td></tr>"
        for k, v in r["kinds"].items())
    events = "".join(f"<li>t = {e['t']:.1f} s: {_esc(e['what'])}</li>" for e in r["events"]) or "<li>none</li>"
    trans = "".join(f"<li>{_esc(k)}: {v}</li>" for k, v in sorted(r["breakers"]["transitions"].items())) or "<li>none</li>"
    sections = "".join(f'<section id="{cid}">{svg}</section>' for cid, svg in charts(r))
    card_html = "".join(f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{_esc(v)}</div>'
                        f'<div class="s">{_esc(sub)}</div></div>' for k, v, sub in cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>extproc load test {_esc(r['started_at'])}</title>
<style>
body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px; color: #222; background: #fafafa; }}
h1 {{ font-size: 20px; margin: 0 0 4px 0; }} .sub {{ color: #666; margin-bottom: 16px; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 16px; }}
.card {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; min-width: 130px; }}
.card .k {{ color: #666; font-size: 12px; }} .card .v {{ font-size: 20px; font-weight: bold; margin: 2px 0; }}
.card .s {{ color: #888; font-size: 11px; }}
section {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; margin-bottom: 12px; padding: 6px; width: max-content; }}
table {{ border-collapse: collapse; background: #fff; margin-bottom: 16px; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; font-size: 12px; text-align: left; }} th {{ background: #f0f0f0; }}
pre {{ background: #fff; border: 1px solid #ddd; padding: 10px; font-size: 12px; overflow-x: auto; }}
</style></head><body>
<h1>extproc load test</h1>
<div class="sub">{_esc(r['started_at'])} · {r['elapsed_s']:.1f} s · {_esc(r['settings']['mode'])}
{'· target ' + format(r['settings']['rps_target'], 'g') + ' rps ' if r['settings']['rps_target'] else ''}·
{r['stack']['envoys']} Envoy(s), {r['stack']['sidecars']} sidecar(s), Redis {_esc(r['stack']['redis'])}</div>
<div class="cards">{card_html}</div>
{sections}
<h2>Events</h2><ul>{events}</ul>
<h2>Breaker transitions (counted by the sidecar that made them)</h2><ul>{trans}</ul>
<h2>Processes</h2>
<table><tr><th>process</th><th>role</th><th>pid</th><th>CPU % (mean, one core)</th><th>CPU s</th><th>RSS max MB</th></tr>{procs}</table>
<h2>Request kinds</h2>
<table><tr><th>kind</th><th>request</th><th>weight</th><th>requests</th><th>status</th><th>p50 ms</th><th>p99 ms</th></tr>{kinds}</table>
<h2>Text report</h2><pre>{_esc(text)}</pre>
<p class="sub">Charts are per-second buckets by the time a request started. The shaded band is when some sidecar
saw the payments breaker open or half-open (its gateway_circuit_breaker_state gauge, sampled each second); dashed
lines are the injected failure's start and end. "client-seen" hit ratio counts X-Cache-Status HIT+STALE over
HIT+STALE+MISS+REVALIDATED; "sidecars' stats" is the same from the sidecars' GET /cache/stats counters.
CPU is from /proc/&lt;pid&gt;/stat. Raw numbers: the JSON report.</p>
</body></html>
"""


def dashboard_svg(r: dict[str, Any]) -> str:
    """Every chart stacked in one SVG with a header of the key numbers (for a PNG: rsvg-convert)."""
    parts, y = [], 84
    lat, c = r["latency_ms"], r["cache"]
    sub = (f"{r['started_at']} · {r['elapsed_s']:.0f} s · {r['stack']['envoys']} Envoy(s), {r['stack']['sidecars']} "
           f"sidecar(s), Redis {r['stack']['redis']} · {r['settings']['mode']}"
           + (f", target {r['settings']['rps_target']:g} rps" if r['settings']['rps_target'] else ""))
    head = (f"{r['rps']:.0f} rps · p50 / p95 / p99 {_f1(lat['p50'])} / {_f1(lat['p95'])} / {_f1(lat['p99'])} ms · hit ratio "
            f"{_pct(c['client']['hit_ratio'])} · 429s {r['rate_limits']['rejected_429']} · breaker trips "
            f"{r['breakers']['trips']} · loadgen CPU {r['loadgen']['cpu_percent']:.0f} %")
    for _, svg in charts(r):
        h = int(svg.split('height="', 1)[1].split('"', 1)[0])
        parts.append(svg.replace("<svg ", f'<svg x="0" y="{y}" ', 1))
        y += h + 8
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{y}" viewBox="0 0 {W} {y}" '
            f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
            f'<rect x="0" y="0" width="{W}" height="{y}" fill="#f5f5f5"/>'
            f'<text x="16" y="26" font-size="16" font-weight="bold" fill="#222">extproc load test</text>'
            f'<text x="16" y="48" font-size="12" fill="#555">{_esc(sub)}</text>'
            f'<text x="16" y="70" font-size="13" fill="#222">{_esc(head)}</text>' + "".join(parts) + "</svg>")


# -------------------------------------------------------------------------------------- CLI ---

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", type=Path, default=None, help="the JSON of `scripts/stack --json FILE` (default: start one)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--rps", type=float, default=None, help="target requests per second, paced (default 200)")
    mode.add_argument("--concurrency", type=int, default=None, help="connections sending flat out (closed loop)")
    ap.add_argument("--connections", type=int, default=None, help="connections for --rps (default 32)")
    ap.add_argument("--mix", default=None, help=f"KIND=WEIGHT,... over the defaults {DEFAULT_MIX}")
    ap.add_argument("--users", type=int, default=None, help="reader users (default: enough to stay under the per-user limit)")
    ap.add_argument("--fail-window", default="0.25,0.6",
                    help="fractions of the run during which /api/payments answers 500 (default 0.25,0.6; 'none' for never)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="the raw numbers (default: next to the HTML)")
    ap.add_argument("--html", type=Path, default=None, help=f"the HTML report (default {DEFAULT_REPORT_DIR.relative_to(ROOT)}/report-<time>.html)")
    ap.add_argument("--svg", type=Path, default=None, help="also write every chart in one SVG (e.g. for rsvg-convert)")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    own = ap.add_argument_group("without --stack: the stack this run starts")
    own.add_argument("--envoys", type=int, default=1)
    own.add_argument("--sidecars", type=int, default=2)
    own.add_argument("--redis", choices=["none", "single", "cluster"], default="single")
    return ap


def settings_from(args: argparse.Namespace) -> Settings:
    if args.concurrency is not None:
        rps, conns = None, args.concurrency
    else:
        rps = args.rps if args.rps is not None else 200.0
        conns = args.connections or 32
    if rps is not None and rps <= 0:
        raise ValueError("--rps must be > 0")
    if conns < 1:
        raise ValueError("--concurrency/--connections must be >= 1")
    if args.duration <= 0:
        raise ValueError("--duration must be > 0")
    window = None
    if args.fail_window and args.fail_window != "none":
        a, _, b = args.fail_window.partition(",")
        window = (float(a), float(b))
        if not 0 <= window[0] < window[1] <= 1:
            raise ValueError("--fail-window wants A,B with 0 <= A < B <= 1")
    mix = parse_mix(args.mix)
    # readers: each well under the demo's 1000/min per user (half of it) at the target rate
    users = args.users or (max(20, math.ceil((rps or 400) * 60 / 500)))
    return Settings(duration=args.duration, rps=rps, concurrency=conns, mix=mix, users=users, fail_window=window,
                    seed=args.seed, progress=not args.quiet)


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> tuple[Path, Path]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    html_path = args.html or DEFAULT_REPORT_DIR / f"report-{stamp}.html"
    json_path = args.json or html_path.with_suffix(".json")
    text = text_report(report)
    for path in (html_path, json_path, args.svg):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    html_path.write_text(html_report(report, text))
    if args.svg:
        args.svg.write_text(dashboard_svg(report))
    return html_path, json_path


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)     # a stack this run started is stopped either way
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    stack = None
    if args.stack is not None:
        info = json.loads(args.stack.read_text())
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import stack as stackmod

        topo = stackmod.Topology(envoys=args.envoys, sidecars=args.sidecars, redis=args.redis, base_port=0,
                                 prometheus=False, state_dir=Path(tempfile.mkdtemp(prefix="extproc-loadtest-")),
                                 overrides={"circuit_breakers.upstreams.payments.open_seconds": 5})
        print(f"loadtest: starting a stack in {topo.state_dir} ...", file=sys.stderr, flush=True)
        stack = stackmod.Stack(topo)
        try:
            stack.start()
            info = stack.info()
        except (RuntimeError, TimeoutError) as exc:
            print(f"loadtest: the stack did not start: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:       # start() stopped what it had started
            print("\nloadtest: interrupted", file=sys.stderr)
            return 130
    try:
        report = asyncio.run(LoadRun(info, settings).run())
    except KeyboardInterrupt:
        print("\nloadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if stack is not None:
            stack.stop()
    html_path, json_path = write_outputs(report, args)
    print(text_report(report))
    print(f"\nreport: {html_path}\nnumbers: {json_path}" + (f"\ncharts: {args.svg}" if args.svg else "")
          + (f"\nthe stack's logs: {info['logs']}" if stack is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
