"""The circuit breaker's state machine, as one function over a small state record.

The same transitions run in three places: `step()` here (the in-memory store, and each
replica's local fallback when the shared store is down) and `store/lua/breaker.lua` (Redis,
atomically, so every replica and every Envoy shares one breaker). The contract tests run the
same cases on both; change them together.

States: CLOSED (0) -> OPEN (1) when a trigger fires; OPEN -> HALF_OPEN (2) once `open_ms` has
passed (taken by the first `acquire` after it); HALF_OPEN admits at most `probes` requests at
a time, closes after `close_after` probe successes, reopens on a probe failure.

Triggers (0 = off): `consecutive` failures in a row (a success resets the run), or `window`
failures within the last `window_ms` (the dual-port gateway's "3 failures in 10.5 s"). A failure
rate over a window is evaluated per replica (services/breaker.py) and trips the shared breaker
with `trip`.

Outcomes: `failure` / `success` for requests admitted while closed (they count only while the
breaker is still closed), `probe_failure` / `probe_success` for half-open probes, `release` for
a probe whose client went away (neither: its slot is freed).

Forcing (the admin API): `force_open` holds the breaker open until `reset`; `force_close`
holds it closed (nothing trips) until `reset`; `reset` clears the force and closes.

A probe whose outcome never comes (its replica died, its log entry was lost) would hold its slot
forever; slots all claimed longer than `open_ms` ago are freed by the next `acquire`.

The record: s (state), t (opened at, ms; in HALF_OPEN the last probe claim), c (consecutive failures), p (probes in flight),
k (probe successes), v (version: +1 on every transition, so replicas order what they hear),
f (forced: 0 none, 1 open, 2 closed), w (failure times within the window, oldest first).
"""

from __future__ import annotations

from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}

# acquire results
ALLOW, PROBE, REJECT = 0, 1, 2

OPS = ("acquire", "failure", "success", "probe_failure", "probe_success", "release", "trip",
       "force_open", "force_close", "reset", "read")
MAX_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class Params:
    consecutive: int        # failures in a row that open it (0: off)
    window: int             # failures within window_ms that open it (0: off)
    window_ms: int
    open_ms: int
    probes: int             # concurrent half-open probes (>= 1)
    close_after: int        # probe successes that close it (>= 1)

    def args(self) -> list[int]:
        return [self.consecutive, self.window, self.window_ms, self.open_ms, self.probes, self.close_after]


@dataclass(frozen=True, slots=True)
class Result:
    state: int
    opened_at_ms: int
    version: int
    outcome: int            # acquire: ALLOW / PROBE / REJECT; other ops: 0
    consecutive: int
    forced: int
    previous: int           # the state before this op (== state when nothing changed)
    retry_after_ms: int = 0

    @property
    def changed(self) -> bool:
        return self.previous != self.state

    def to_list(self) -> list[int]:
        return [self.state, self.opened_at_ms, self.version, self.outcome, self.consecutive, self.forced,
                self.previous, self.retry_after_ms]

    @classmethod
    def from_list(cls, raw) -> Result:
        return cls(*(int(x) for x in raw))


def step(rec: dict, op: str, now_ms: int, p: Params) -> Result:
    """Apply `op` to `rec` (mutated in place; a new breaker is an empty dict)."""
    if op not in OPS:
        raise ValueError(f"unknown breaker op {op!r}")
    s, t, c = rec.get("s", CLOSED), rec.get("t", 0), rec.get("c", 0)
    pr, k, v, f = rec.get("p", 0), rec.get("k", 0), rec.get("v", 0), rec.get("f", 0)
    w: list[int] = list(rec.get("w", ()))
    prev = s
    outcome = 0
    retry = 0

    def open_now() -> None:
        nonlocal s, t, pr, k, v, c, w
        s, t, pr, k, c, w = OPEN, now_ms, 0, 0, 0, []
        v += 1

    def close_now() -> None:
        nonlocal s, pr, k, v, c, w
        if s != CLOSED:
            v += 1
        s, pr, k, c, w = CLOSED, 0, 0, 0, []

    if op == "force_open":
        f = 1
        if s != OPEN:
            open_now()
    elif op == "force_close":
        f = 2
        close_now()
    elif op == "reset":
        f = 0
        close_now()
    elif op == "read":
        pass
    elif f == 1:
        if op == "acquire":
            outcome, retry = REJECT, p.open_ms
    elif f == 2:
        if op == "acquire":
            outcome = ALLOW
    elif op == "acquire":
        if s == OPEN and now_ms >= t + p.open_ms:
            s, pr, k, t = HALF_OPEN, 0, 0, now_ms
            v += 1
        elif s == HALF_OPEN and pr >= p.probes and now_ms >= t + p.open_ms:
            pr = 0          # probes claimed an open duration ago never reported: their slots are lost, free them
        if s == CLOSED:
            outcome = ALLOW
        elif s == OPEN:
            outcome, retry = REJECT, t + p.open_ms - now_ms
        elif pr < p.probes:
            pr += 1
            t = now_ms      # in HALF_OPEN, t is the last probe claim
            outcome = PROBE
        else:
            outcome, retry = REJECT, 1000
    elif op == "probe_failure":
        if s == HALF_OPEN:
            open_now()
    elif op == "failure":
        # a request admitted while closed; one that ends after the breaker opened counts for nothing
        if s == CLOSED:
            c += 1
            if p.window > 0:
                w = [x for x in w if x > now_ms - p.window_ms]
                w.append(now_ms)
                w = w[-min(p.window, MAX_WINDOW):]
            if (p.consecutive > 0 and c >= p.consecutive) or (p.window > 0 and len(w) >= p.window):
                open_now()
    elif op == "success":
        if s == CLOSED:
            c = 0
    elif op == "probe_success":
        if s == HALF_OPEN:
            pr = max(0, pr - 1)
            k += 1
            if k >= p.close_after:
                close_now()
    elif op == "release":
        if s == HALF_OPEN:
            pr = max(0, pr - 1)
    elif op == "trip":
        if s == CLOSED:
            open_now()
    rec.update(s=s, t=t, c=c, p=pr, k=k, v=v, f=f, w=w)
    return Result(s, t, v, outcome, c, f, prev, max(0, retry))
