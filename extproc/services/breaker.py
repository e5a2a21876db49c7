"""Circuit breakers per upstream cluster, one state for the whole fleet.

The transitions are core/breaker.py's, applied atomically in the store (lua/breaker.lua on
Redis), so every replica behind every Envoy shares one breaker per upstream. What costs what:

* **Closed, success:** no store call. Each replica keeps a view of every breaker (state, opened
  at, version, consecutive failures) and a request on a closed breaker is admitted from it.
* **A failure:** one store call (`failure`), exact for the fleet: the fifth consecutive failure
  opens the breaker whichever replicas saw the five. A success after a failure is one store call
  (`success`, resetting the run); a replica knows a run is going on from the failure events.
* **Open:** rejected from the view, no store call, until the open duration has passed; then
  every request claims a probe slot in the store (`acquire`), exactly `half_open_probes` at a
  time for the fleet, and reports how its probe ended (`probe_success` / `probe_failure`, or
  `release` when its client went away: neither).
* **Transitions** are published on `<prefix>:br:events` with their version; a replica applies
  an event whose version is not older than its view, and re-reads every breaker when it
  (re)subscribes. The replica whose call made a transition logs it, once, and counts it.
* **Store down or slow** (`store_timeout_ms`): the replica runs the same transitions on a local
  record (each replica then breaks on its own) until the store answers again; its view keeps
  what it last knew.
* **Failure rate** (optional): each replica counts its own calls over the window and, when the
  rate crosses the threshold with enough calls, trips the shared breaker (`trip`): the lag is at
  most one window of one replica's traffic.
* **Shadow mode:** everything is computed, counted and logged; nothing is rejected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import config as cfgmod
from ..core import breaker as br
from ..store import keys as storekeys
from ..store.base import Store, StoreError
from ..store.follow import follow
from ..telemetry import metrics

log = logging.getLogger("extproc.breaker")
CHANNEL = "events"
RECORD_TTL_MS = 7 * 24 * 3600 * 1000


@dataclass(slots=True)
class View:
    """What this replica believes about one breaker."""
    state: int = br.CLOSED
    opened_at_ms: int = 0
    version: int = 0
    consecutive: int = 0
    forced: int = 0


@dataclass(slots=True)
class RateWindow:
    """This replica's calls over the failure-rate window: (time, failed) pairs."""
    seconds: float
    calls: deque[tuple[float, bool]] = field(default_factory=deque)
    failures: int = 0

    def add(self, now: float, failed: bool) -> tuple[int, int]:
        self.calls.append((now, failed))
        self.failures += failed
        cutoff = now - self.seconds
        while self.calls and self.calls[0][0] < cutoff:
            _, f = self.calls.popleft()
            self.failures -= f
        return len(self.calls), self.failures

    def clear(self) -> None:
        self.calls.clear()
        self.failures = 0


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    params: br.Params
    codes: frozenset[int]
    slow_s: float | None
    shadow: bool
    fallback: cfgmod.Fallback | None
    stale_from_cache: bool
    rate: cfgmod.FailureRate | None
    lean: bool = False
    grpc: bool = False
    grpc_codes: frozenset[int] = frozenset()

    @classmethod
    def compile(cls, name: str, b: cfgmod.Breaker) -> Spec:
        params = br.Params(consecutive=b.consecutive_failures, window=b.failures_in_window,
                           window_ms=int(b.window_seconds * 1000), open_ms=int(b.open_seconds * 1000),
                           probes=b.half_open_probes, close_after=b.close_after or b.half_open_probes)
        return cls(name, params, b.failure_codes(), b.slow_call_ms / 1000 if b.slow_call_ms else None,
                   b.mode == "shadow", b.fallback, b.stale_from_cache, b.failure_rate, b.wiring == "lean",
                   b.grpc, frozenset(b.grpc_failure_codes))


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one request: `rejected` (answer at once, `retry_after_s`), or admitted;
    `probe` when it holds a half-open slot; `would_reject` in shadow mode."""
    spec: Spec
    rejected: bool = False
    probe: bool = False
    would_reject: bool = False
    retry_after_s: int = 0
    state: int = br.CLOSED


class Breakers:
    """The worker's breakers: the views outlive reloads, the specs follow the config."""

    def __init__(self, cfg: cfgmod.CircuitBreakers, store: Store | None, local: Store,
                 clock: Callable[[], float] = time.time, keyspace: storekeys.KeySpace | None = None,
                 retry_seconds: float = 2.0):
        self.space = keyspace or storekeys.current()
        self.store = store
        self.local = local                  # the fallback record when the store cannot answer
        self.clock = clock
        self.retry_seconds = retry_seconds
        self.channel = self.space.channel(storekeys.BREAKER, CHANNEL)
        self.views: dict[str, View] = {}
        self._rates: dict[str, RateWindow] = {}
        self.cfg = cfg
        self.specs: dict[str, Spec] = {}
        self.reconfigure(cfg)
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._degraded_logged = False
        self._background: set[asyncio.Task[None]] = set()
        self.last_shared = True

    def reconfigure(self, cfg: cfgmod.CircuitBreakers) -> None:
        self.cfg = cfg
        self.specs = {name: Spec.compile(name, b) for name, b in cfg.upstreams.items()}
        self._ext_proc = {n: s for n, s in self.specs.items() if not s.lean}
        self._lean_by_policy = {p: self.specs[n] for n, b in cfg.upstreams.items() if b.wiring == "lean"
                                for p in b.policies}
        self._lean = frozenset(n for n, s in self.specs.items() if s.lean)
        for name, spec in self.specs.items():
            self.views.setdefault(name, View())
            metrics.child(metrics.BREAKER_STATE, name).set(self.views[name].state)
            if spec.rate is not None:
                if name not in self._rates or self._rates[name].seconds != spec.rate.window_seconds:
                    self._rates[name] = RateWindow(spec.rate.window_seconds)
            else:
                self._rates.pop(name, None)

    def key(self, name: str) -> str:
        return self.space.key(storekeys.BREAKER, name)

    # -- the store, with the local fallback ------------------------------------------------------
    async def _op(self, spec: Spec, op: str) -> tuple[br.Result, bool]:
        """The transition and whether the shared store made it (False: the local fallback)."""
        now_ms = int(self.clock() * 1000)
        if self.store is not None:
            try:
                async with asyncio.timeout(self.cfg.store_timeout_ms / 1000):
                    result = await self.store.breaker(self.key(spec.name), op, spec.params, now_ms, RECORD_TTL_MS)
                if self._degraded_logged:
                    self._degraded_logged = False
                    log.info("circuit breakers shared through the store again")
                return result, True
            except (TimeoutError, StoreError) as exc:
                metrics.child(metrics.STORE_ERRORS, self.store.name, "breaker").inc()
                if not self._degraded_logged:
                    self._degraded_logged = True
                    log.warning("circuit breaker store unavailable: this replica breaks on its own state",
                                extra={"error": str(exc) or type(exc).__name__})
        return await self.local.breaker(self.key(spec.name), op, spec.params, now_ms, RECORD_TTL_MS), False

    async def _apply(self, spec: Spec, op: str, reason: str = "") -> br.Result:
        r, shared = await self._op(spec, op)
        self.last_shared = shared
        view = self.views.setdefault(spec.name, View())
        before = view.consecutive
        # a local record's versions are not the fleet's: -1 lets the next shared event win
        self._absorb(spec.name, r.state, r.opened_at_ms, r.version if shared else -1, r.consecutive, r.forced,
                     force=not shared)
        if r.changed:
            self._transition(spec, r, reason or op)
        if shared and (r.changed or r.consecutive != before or op.startswith("force") or op == "reset"):
            await self._publish(spec.name, r)
        return r

    def _absorb(self, name: str, state: int, opened_at: int, version: int, consecutive: int, forced: int,
                force: bool = False) -> None:
        view = self.views.setdefault(name, View())
        if version < view.version and not force:
            return
        if state != view.state:
            metrics.child(metrics.BREAKER_STATE, name).set(state)
            if state == br.CLOSED and name in self._rates:
                self._rates[name].clear()
        view.state, view.opened_at_ms, view.version = state, opened_at, version
        view.consecutive, view.forced = consecutive, forced

    def _transition(self, spec: Spec, r: br.Result, reason: str) -> None:
        frm, to = br.STATE_NAMES[r.previous], br.STATE_NAMES[r.state]
        metrics.child(metrics.BREAKER_TRANSITIONS, spec.name, frm, to).inc()
        log.warning("circuit breaker %s -> %s", frm, to,
                    extra={"upstream": spec.name, "from": frm, "to": to, "reason": reason,
                           "consecutive": r.consecutive, "version": r.version,
                           "forced": {0: None, 1: "open", 2: "closed"}[r.forced], "shadow": spec.shadow})

    async def _publish(self, name: str, r: br.Result) -> None:
        if self.store is None:
            return
        msg = f"{name} {r.version} {r.state} {r.opened_at_ms} {r.consecutive} {r.forced}".encode()
        try:
            await self.store.publish(self.channel, msg)
        except StoreError:
            pass          # the others learn it from their next store call or resync

    # -- the request path ---------------------------------------------------------------------
    def spec_for(self, upstream: str) -> Spec | None:
        """The ext_proc-wired breaker of an upstream cluster."""
        return self._ext_proc.get(upstream)

    @property
    def has_ext_proc(self) -> bool:
        return bool(self._ext_proc)

    def lean_for(self, policy: str) -> Spec | None:
        """The lean-wired breaker guarding the routes of an ext_authz policy."""
        return self._lean_by_policy.get(policy)

    def lean_upstreams(self) -> frozenset[str]:
        return self._lean

    async def record_logged(self, upstream: str, probe: bool, status: int, seconds: float,
                            aborted: bool) -> None:
        """Lean wiring: one finished request to `upstream`, from Envoy's access log; `probe` is the
        flag ext_authz put in the request's dynamic metadata when it admitted it as a half-open
        probe (so whichever worker receives the entry settles the probe)."""
        spec = self.specs.get(upstream)
        if spec is None or not spec.lean:
            return
        await self.record(Admission(spec, probe=probe), None if aborted else status, seconds)

    async def admit(self, spec: Spec) -> Admission:
        view = self.views.get(spec.name) or View()
        if view.forced == 2 or (view.state == br.CLOSED and view.forced == 0):
            return Admission(spec)
        now_ms = self.clock() * 1000
        if view.forced == 1 or (view.state == br.OPEN and now_ms < view.opened_at_ms + spec.params.open_ms):
            remaining = spec.params.open_ms if view.forced == 1 else view.opened_at_ms + spec.params.open_ms - now_ms
            return self._reject(spec, view.state, remaining)
        r = await self._apply(spec, "acquire")
        if r.outcome == br.ALLOW:
            return Admission(spec)
        if r.outcome == br.PROBE:
            return Admission(spec, probe=True, state=r.state)
        return self._reject(spec, r.state, r.retry_after_ms)

    def _reject(self, spec: Spec, state: int, remaining_ms: float) -> Admission:
        retry = max(1, int(-(-remaining_ms // 1000)))
        if spec.shadow:
            metrics.child(metrics.BREAKER_SHADOW_REJECTED, spec.name).inc()
            return Admission(spec, would_reject=True, retry_after_s=retry, state=state)
        metrics.child(metrics.BREAKER_REJECTED, spec.name).inc()
        return Admission(spec, rejected=True, retry_after_s=retry, state=state)

    def abandon(self, adm: Admission) -> None:
        """The stream ended before response headers (client gone): a probe frees its slot, in the
        background (the stream's task may be cancelled)."""
        if adm.probe:
            task = asyncio.get_running_loop().create_task(self.record(adm, None, 0.0))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def record(self, adm: Admission, status: int | None, seconds: float, grpc_status: int | None = None) -> None:
        """How an admitted request ended: `status` None when its client went away first; for a gRPC
        upstream `grpc_status` (from the trailers) decides when the HTTP status is 200."""
        spec = adm.spec
        if adm.rejected or adm.would_reject and not adm.probe:
            return
        if status is None:
            if adm.probe:
                await self._apply(spec, "release")
            return
        failed = (status in spec.codes or (grpc_status is not None and grpc_status in spec.grpc_codes)
                  or (spec.slow_s is not None and seconds > spec.slow_s))
        why = (f"status {status}" if status in spec.codes
               else f"grpc-status {grpc_status}" if grpc_status is not None and grpc_status in spec.grpc_codes
               else f"slow call ({seconds * 1000:.0f} ms)")
        if failed:
            metrics.child(metrics.BREAKER_FAILURES, spec.name).inc()
        if adm.probe:
            await self._apply(spec, "probe_failure" if failed else "probe_success",
                              f"probe failed ({why})" if failed else f"probe succeeded (status {status})")
            return
        view = self.views.get(spec.name) or View()
        if failed:
            await self._apply(spec, "failure", why)
        elif view.consecutive > 0 and view.state == br.CLOSED:
            await self._apply(spec, "success")
        if spec.rate is not None and view.state == br.CLOSED:
            calls, failures = self._rates[spec.name].add(self.clock(), failed)
            if calls >= spec.rate.min_calls and failures * 100 >= spec.rate.percent * calls:
                self._rates[spec.name].clear()
                await self._apply(spec, "trip", f"failure rate {failures}/{calls} over "
                                                f"{spec.rate.window_seconds:g} s")

    # -- the admin API ------------------------------------------------------------------------
    async def force(self, name: str, op: str) -> br.Result:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(name)
        if op not in ("force_open", "force_close", "reset"):
            raise ValueError(op)
        r = await self._apply(spec, op, f"admin {op}")
        if self.store is not None and not self.last_shared:
            raise StoreError("the store did not answer: applied to this replica's local record only", transient=True)
        return r

    async def snapshot(self) -> list[dict]:
        out = []
        for name, spec in sorted(self.specs.items()):
            r, shared = await self._op(spec, "read")
            self._absorb(name, r.state, r.opened_at_ms, r.version if shared else -1, r.consecutive, r.forced,
                         force=not shared)
            out.append({"upstream": name, "state": br.STATE_NAMES[r.state], "opened_at_ms": r.opened_at_ms or None,
                        "consecutive_failures": r.consecutive, "version": r.version,
                        "forced": {0: None, 1: "open", 2: "closed"}[r.forced], "mode": "shadow" if spec.shadow
                        else "enforce", "open_seconds": spec.params.open_ms / 1000,
                        "half_open_probes": spec.params.probes})
        return out

    # -- following the fleet ------------------------------------------------------------------
    async def start(self, wait_s: float = 2.0) -> None:
        if self.store is None or self._task is not None or not self.specs:
            return
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(), name="breaker-events")
        try:
            await asyncio.wait_for(self._ready.wait(), wait_s)
        except TimeoutError:
            pass

    def _on_message(self, raw: bytes) -> None:
        try:
            name, version, state, opened_at, consecutive, forced = raw.decode().split(" ")
            self._absorb(name, int(state), int(opened_at), int(version), int(consecutive), int(forced))
        except (UnicodeDecodeError, ValueError):
            pass

    async def _follow(self) -> None:
        assert self.store is not None and self._ready is not None
        ready = self._ready
        await follow(self.store, self.channel, resync=self._resync, on_message=self._on_message,
                     on_state=lambda _ok: ready.set(), retry_seconds=self.retry_seconds,
                     what="circuit breaker events", log=log,
                     lost="circuit breaker events: store unreachable; transitions made elsewhere are learnt on "
                          "this replica's next store call")

    async def _resync(self) -> None:
        assert self.store is not None
        for name, spec in list(self.specs.items()):
            r = await self.store.breaker(self.key(name), "read", spec.params, int(self.clock() * 1000), RECORD_TTL_MS)
            self._absorb(name, r.state, r.opened_at_ms, r.version, r.consecutive, r.forced)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
