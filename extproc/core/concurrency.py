"""In-flight caps: which ext_proc stream may proceed now, per replica.

Theory of operation
-------------------
ext_proc sees a request start (request headers) and end (the stream closing), so an in-flight
count per route is exact for this replica. A stream takes a `Permit` when its request headers
arrive and gives it back when the stream ends, whatever the cause: response done, client abort
(Envoy sends nothing, the stream just ends), Envoy's reset, or a sidecar error. Two caps apply
together: `global_limit` (all routes) and a per-route cap (`routes[name]`, otherwise
`default_route_limit`), where the route is the policy name the stream carries in its
`x-extproc-policy` metadata. A request is admitted if neither cap is full; otherwise the
`Rejection` names the cap that was full, checking the route first (freeing global capacity
would not help a route that is full). Policies in `exclude_policies` (long-lived streams: SSE,
WebSocket) take no permit at all; everything else holds its permit for its whole life.

Queue. With `queue_timeout_ms > 0` a rejected request may wait for a permit instead (the
servicer bounds the wait by that timeout; the limiter never reads a clock). Waiters are kept in
arrival order; a released permit goes to the first waiter whose caps now both admit it, so a
waiter blocked by its own route's cap does not hold up waiters of other routes, and a new
arrival never overtakes a waiter that could run (freed capacity is handed over inside
`release`). The queue is bounded by the caps themselves: at most `route cap` requests wait per
route and at most `global_limit` in all, so a waiter can be served by one cap's worth of
releases. `queue_timeout_ms` must stay below Envoy's ext_proc `message_timeout` (500 ms in our
envoy.yaml), or Envoy answers 504 first (it then cancels the stream, and the waiter leaves).

Shadow mode decides the same way but always admits: the permit carries the would-be rejection
(`Permit.over`) so it is counted, and the in-flight count may exceed the cap.

Reload. In-flight counts are the worker's state, not the config's: one limiter lives for the
worker's life and `reconfigure` swaps its limits while keeping the counts, so permits taken
before a reload are released against the same counts (a cap lowered below the current count
just admits nothing until enough streams end; a cap raised may admit waiters at once).

Everything here is synchronous bookkeeping with no clock and no I/O: `release`, `reconfigure`
return the waiters they admitted (`Grant`s) and the servicer wakes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports pydantic and yaml; the core needs only the shape
    from ..config import Concurrency

REASON = "concurrency_limit"      # the `reason` in the JSON body (same word as the log/metric)
RETRY_AFTER_SECONDS = 1
SCOPE_HEADER = "x-extproc-concurrency"

_STATUS_WORDS = {429: "too_many_requests", 503: "unavailable"}


class Scope(StrEnum):
    """Which cap was full; also the value of the `x-extproc-concurrency` answer header."""
    GLOBAL = "global"
    ROUTE = "route"


@dataclass(frozen=True, slots=True)
class Rejection:
    """The cap a request found full, and how the client is answered (429 or 503)."""
    route: str
    scope: Scope
    limit: int
    status: int

    def headers(self) -> tuple[tuple[str, str], ...]:
        return (("content-type", "application/json"), ("retry-after", str(RETRY_AFTER_SECONDS)),
                (SCOPE_HEADER, self.scope.value))

    def body(self) -> bytes:
        what = "all routes" if self.scope is Scope.GLOBAL else f"route {self.route!r}"
        doc = {"error": _STATUS_WORDS.get(self.status, "error"), "reason": REASON,
               "message": f"too many requests in flight for {what} (limit {self.limit}); retry later",
               "limit": self.scope.value, "max_in_flight": self.limit, "route": self.route}
        return json.dumps(doc, separators=(",", ":")).encode()


class Permit:
    """One admitted stream's share of the caps; `held` until released (release is idempotent)."""
    __slots__ = ("route", "held", "over")

    def __init__(self, route: str, held: bool = True, over: Rejection | None = None):
        self.route = route
        self.held = held
        self.over = over          # shadow mode: the rejection enforce mode would have answered

    def __repr__(self) -> str:
        return f"Permit({self.route!r}, held={self.held}, over={self.over})"


#: What an excluded policy gets: counts nothing, releases nothing.
EXEMPT = Permit("", held=False)


class TicketState(Enum):
    WAITING = "waiting"
    GRANTED = "granted"          # a permit was handed to it (see the Grant)
    ABANDONED = "abandoned"      # its waiter left (timeout, stream cancelled) before a grant


class Ticket:
    """A place in the wait queue. Identity is the key: the servicer maps it to its waiter."""
    __slots__ = ("route", "state")

    def __init__(self, route: str):
        self.route = route
        self.state = TicketState.WAITING

    def __repr__(self) -> str:
        return f"Ticket({self.route!r}, {self.state.value})"


Grant = tuple[Ticket, Permit]
_NO_GRANTS: tuple[Grant, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps from one config, compiled once; the hot path only reads them."""
    global_limit: int | None = None
    default_route_limit: int | None = None
    routes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    excluded: frozenset[str] = frozenset()
    status: int = 503
    queue_timeout_ms: int = 0
    shadow: bool = False

    @classmethod
    def compile(cls, cfg: Concurrency) -> Limits:
        return cls(global_limit=cfg.global_limit, default_route_limit=cfg.default_route_limit,
                   routes=MappingProxyType(dict(cfg.routes)), excluded=frozenset(cfg.exclude_policies),
                   status=cfg.over_limit_status, queue_timeout_ms=cfg.queue_timeout_ms,
                   shadow=cfg.mode == "shadow")

    def route_limit(self, route: str) -> int | None:
        return self.routes.get(route, self.default_route_limit)

    @property
    def capped(self) -> bool:
        """Some cap is configured (without one, permits only feed the in-flight gauge)."""
        return self.global_limit is not None or self.default_route_limit is not None or bool(self.routes)


class ConcurrencyLimiter:
    """Permit accounting for one worker: counts per route and in total, plus the wait queue."""

    __slots__ = ("limits", "_total", "_in_flight", "_queue", "_waiting", "_rejections")

    def __init__(self, limits: Limits):
        self.limits = limits
        self._total = 0
        self._in_flight: dict[str, int] = {}
        self._queue: dict[Ticket, None] = {}      # insertion-ordered: FIFO with O(1) removal
        self._waiting: dict[str, int] = {}
        self._rejections: dict[tuple[str, Scope], Rejection] = {}

    @classmethod
    def compile(cls, cfg: Concurrency) -> ConcurrencyLimiter:
        return cls(Limits.compile(cfg))

    # -- admission ------------------------------------------------------------------------------
    def _over(self, route: str) -> Scope | None:
        lim = self.limits
        cap = lim.routes.get(route, lim.default_route_limit)
        if cap is not None and self._in_flight.get(route, 0) >= cap:
            return Scope.ROUTE
        if lim.global_limit is not None and self._total >= lim.global_limit:
            return Scope.GLOBAL
        return None

    def _take(self, route: str, over: Rejection | None = None) -> Permit:
        self._total += 1
        self._in_flight[route] = self._in_flight.get(route, 0) + 1
        return Permit(route, over=over)

    def rejection(self, route: str, scope: Scope) -> Rejection:
        key = (route, scope)
        rej = self._rejections.get(key)
        if rej is None:
            lim = self.limits
            cap = lim.global_limit if scope is Scope.GLOBAL else lim.route_limit(route)
            assert cap is not None
            rej = self._rejections[key] = Rejection(route, scope, cap, lim.status)
        return rej

    def try_acquire(self, route: str) -> Permit | Rejection:
        """A permit for one stream of `route` (its policy name), or the cap that is full."""
        if route in self.limits.excluded:
            return EXEMPT
        scope = self._over(route)
        if scope is None:
            return self._take(route)
        rej = self.rejection(route, scope)
        if self.limits.shadow:
            return self._take(route, over=rej)
        return rej

    def enqueue(self, route: str) -> Ticket | None:
        """A place in the wait queue for a rejected request, or None: no queue configured, or
        it holds a cap's worth of waiters already."""
        lim = self.limits
        if lim.queue_timeout_ms <= 0 or lim.shadow:
            return None
        cap = lim.route_limit(route)
        if cap is not None and self._waiting.get(route, 0) >= cap:
            return None
        if lim.global_limit is not None and len(self._queue) >= lim.global_limit:
            return None
        ticket = Ticket(route)
        self._queue[ticket] = None
        self._waiting[route] = self._waiting.get(route, 0) + 1
        return ticket

    def abandon(self, ticket: Ticket) -> None:
        """The waiter left. A ticket already granted is not touched: its permit is the
        waiter's to release (or was released by whoever found the waiter gone)."""
        if ticket.state is TicketState.WAITING:
            ticket.state = TicketState.ABANDONED
            del self._queue[ticket]
            self._waiting[ticket.route] -= 1

    # -- release --------------------------------------------------------------------------------
    def release(self, permit: Permit) -> tuple[Grant, ...]:
        """Give a permit back (again: nothing happens). Returns the waiters now admitted."""
        if not permit.held:
            return _NO_GRANTS
        permit.held = False
        self._total -= 1
        self._in_flight[permit.route] -= 1
        if not self._queue:
            return _NO_GRANTS
        return self._grant()

    def _grant(self) -> tuple[Grant, ...]:
        out: list[Grant] = []
        lim = self.limits
        for ticket in list(self._queue):
            route = ticket.route
            if route in lim.excluded:            # excluded by a reload while it waited
                permit = EXEMPT
            elif lim.shadow or self._over(route) is None:
                permit = self._take(route)
            elif lim.global_limit is not None and self._total >= lim.global_limit:
                break                            # nobody behind it fits either
            else:
                continue                         # its route is full; later routes may fit
            del self._queue[ticket]
            self._waiting[route] -= 1
            ticket.state = TicketState.GRANTED
            out.append((ticket, permit))
        return tuple(out)

    def reconfigure(self, cfg: Concurrency | Limits) -> tuple[Grant, ...]:
        """New limits, same counts. Returns the waiters that the new limits admit at once."""
        self.limits = cfg if isinstance(cfg, Limits) else Limits.compile(cfg)
        self._rejections.clear()
        return self._grant() if self._queue else _NO_GRANTS

    # -- reading --------------------------------------------------------------------------------
    def in_flight(self, route: str | None = None) -> int:
        """Permits held by `route`, or by all routes."""
        return self._total if route is None else self._in_flight.get(route, 0)

    def waiting(self, route: str | None = None) -> int:
        return len(self._queue) if route is None else self._waiting.get(route, 0)

    def routes(self) -> Iterator[str]:
        """Every route that has held a permit (for the gauge: one series per route seen)."""
        return iter(list(self._in_flight))

    def snapshot(self) -> dict:
        """For the admin API and logs."""
        lim = self.limits
        return {"global_limit": lim.global_limit, "default_route_limit": lim.default_route_limit,
                "routes": dict(lim.routes), "mode": "shadow" if lim.shadow else "enforce",
                "queue_timeout_ms": lim.queue_timeout_ms, "in_flight": self._total,
                "in_flight_by_route": {r: n for r, n in self._in_flight.items() if n},
                "waiting": len(self._queue),
                "waiting_by_route": {r: n for r, n in self._waiting.items() if n}}
