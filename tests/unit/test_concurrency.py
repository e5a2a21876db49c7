"""core/concurrency.py: permit accounting for the in-flight caps, the wait queue, reconfiguring
with permits outstanding, shadow mode; and the exchange's REJECT step at request headers.

Pure bookkeeping: no event loop, no clock. A random walk checks the invariants over thousands
of interleavings (counts equal the permits held, caps never exceeded, the queue stays bounded).
"""

from __future__ import annotations

import json
import random

import pytest

from extproc import config as cfgmod
from extproc.core.concurrency import (
    EXEMPT,
    SCOPE_HEADER,
    ConcurrencyLimiter,
    Limits,
    Permit,
    Rejection,
    Scope,
    Ticket,
    TicketState,
)
from extproc.core.exchange import OVER_LIMIT, TABLE, Action, Exchange, Phase


def limiter(**kw) -> ConcurrencyLimiter:
    return ConcurrencyLimiter.compile(cfgmod.Concurrency(**kw))


def take(lim: ConcurrencyLimiter, route: str, n: int) -> list[Permit]:
    out = []
    for _ in range(n):
        p = lim.try_acquire(route)
        assert isinstance(p, Permit), p
        out.append(p)
    return out


# ----------------------------------------------------------------------------------- compile ---

def test_compile_reads_every_setting():
    lim = limiter(global_limit=100, default_route_limit=10, routes={"api": 20}, exclude_policies=["sse"],
                  over_limit_status=429, queue_timeout_ms=200, mode="shadow")
    assert lim.limits == Limits(global_limit=100, default_route_limit=10, routes={"api": 20},
                                excluded=frozenset({"sse"}), status=429, queue_timeout_ms=200, shadow=True)
    assert lim.limits.route_limit("api") == 20
    assert lim.limits.route_limit("other") == 10
    assert lim.limits.capped


def test_default_config_caps_nothing_but_still_counts_for_the_gauge():
    lim = ConcurrencyLimiter.compile(cfgmod.Config().concurrency)
    assert not lim.limits.capped
    permits = take(lim, "api", 1000)
    assert lim.in_flight("api") == lim.in_flight() == 1000
    for p in permits:
        lim.release(p)
    assert lim.in_flight() == 0


# ----------------------------------------------------------------------------------- the caps ---

def test_route_cap_rejects_the_cap_plus_first_and_a_release_readmits():
    lim = limiter(default_route_limit=3)
    held = take(lim, "public", 3)
    rej = lim.try_acquire("public")
    assert rej == Rejection("public", Scope.ROUTE, 3, 503)
    assert lim.in_flight("public") == 3                    # a rejection takes nothing
    assert isinstance(lim.try_acquire("api"), Permit)      # another route has its own cap
    lim.release(held[0])
    assert isinstance(lim.try_acquire("public"), Permit)


def test_routes_override_the_default_route_limit():
    lim = limiter(default_route_limit=1, routes={"api": 3})
    take(lim, "api", 3)
    assert lim.try_acquire("api") == Rejection("api", Scope.ROUTE, 3, 503)
    take(lim, "public", 1)
    assert lim.try_acquire("public") == Rejection("public", Scope.ROUTE, 1, 503)


def test_a_route_listed_alone_is_capped_and_others_are_not():
    lim = limiter(routes={"payments": 2})
    take(lim, "payments", 2)
    assert isinstance(lim.try_acquire("payments"), Rejection)
    take(lim, "api", 500)


def test_global_cap_spans_routes():
    lim = limiter(global_limit=4, default_route_limit=3)
    take(lim, "a", 3)
    take(lim, "b", 1)
    assert lim.try_acquire("c") == Rejection("c", Scope.GLOBAL, 4, 503)
    assert lim.in_flight() == 4


def test_a_full_route_is_named_before_a_full_global():
    lim = limiter(global_limit=3, default_route_limit=3)
    take(lim, "a", 3)
    assert lim.try_acquire("a").scope is Scope.ROUTE     # freeing global capacity would not help "a"
    assert lim.try_acquire("b").scope is Scope.GLOBAL


def test_excluded_policies_take_no_permit():
    lim = limiter(global_limit=1, default_route_limit=1, exclude_policies=["sse"])
    take(lim, "api", 1)
    for _ in range(10):
        assert lim.try_acquire("sse") is EXEMPT
    assert lim.in_flight() == 1 and lim.in_flight("sse") == 0
    assert lim.release(EXEMPT) == ()
    assert lim.in_flight() == 1


def test_release_is_idempotent():
    lim = limiter(default_route_limit=2)
    a, b = take(lim, "api", 2)
    lim.release(a)
    lim.release(a)
    lim.release(a)
    assert lim.in_flight("api") == 1 and lim.in_flight() == 1
    assert not a.held and b.held
    lim.release(b)
    lim.release(b)
    assert lim.in_flight() == 0
    take(lim, "api", 2)
    assert isinstance(lim.try_acquire("api"), Rejection)


@pytest.mark.parametrize("status", [429, 503])
def test_rejection_answer(status):
    lim = limiter(global_limit=1, default_route_limit=5, over_limit_status=status)
    take(lim, "api", 1)
    rej = lim.try_acquire("public")
    assert isinstance(rej, Rejection)
    assert rej.status == status
    assert dict(rej.headers()) == {"content-type": "application/json", "retry-after": "1", SCOPE_HEADER: "global"}
    body = json.loads(rej.body())
    assert body == {"error": {429: "too_many_requests", 503: "unavailable"}[status], "reason": "concurrency_limit",
                    "message": "too many requests in flight for all routes (limit 1); retry later",
                    "limit": "global", "max_in_flight": 1, "route": "public"}
    assert lim.try_acquire("public") is rej               # built once per (route, scope)


def test_route_rejection_body_names_the_route():
    lim = limiter(default_route_limit=1)
    take(lim, "api", 1)
    rej = lim.try_acquire("api")
    assert dict(rej.headers())[SCOPE_HEADER] == "route"
    body = json.loads(rej.body())
    assert (body["limit"], body["route"], body["max_in_flight"]) == ("route", "api", 1)
    assert "route 'api'" in body["message"]


def test_shadow_mode_counts_and_never_rejects():
    lim = limiter(global_limit=5, default_route_limit=2, mode="shadow", queue_timeout_ms=100)
    held = take(lim, "api", 6)
    assert [p.over for p in held[:2]] == [None, None]
    assert held[2].over == Rejection("api", Scope.ROUTE, 2, 503)
    assert lim.in_flight("api") == 6                       # the count is the truth, over the cap
    assert lim.try_acquire("b").over == Rejection("b", Scope.GLOBAL, 5, 503)
    assert lim.enqueue("api") is None                      # shadow mode never waits
    for p in held:
        lim.release(p)
    assert lim.in_flight("api") == 0


# ------------------------------------------------------------------------------------- queue ---

def test_no_queue_without_a_queue_timeout():
    lim = limiter(default_route_limit=1)
    take(lim, "api", 1)
    assert isinstance(lim.try_acquire("api"), Rejection)
    assert lim.enqueue("api") is None


def test_waiters_are_granted_in_arrival_order():
    lim = limiter(global_limit=3, queue_timeout_ms=100)
    a, b, _ = take(lim, "x", 3)
    t1, t2, t3 = lim.enqueue("x"), lim.enqueue("y"), lim.enqueue("x")
    assert lim.waiting() == 3 and lim.waiting("x") == 2
    ((granted, p),) = lim.release(a)
    assert granted is t1 and t1.state is TicketState.GRANTED and p.route == "x" and p.held
    ((granted, p),) = lim.release(b)
    assert granted is t2 and p.route == "y"
    assert lim.waiting() == 1 and t3.state is TicketState.WAITING
    assert lim.in_flight() == 3                            # each grant took the released place


def test_a_waiter_blocked_by_its_route_does_not_hold_up_other_routes():
    lim = limiter(global_limit=3, default_route_limit=2, queue_timeout_ms=100)
    a1, a2 = take(lim, "a", 2)
    (b1,) = take(lim, "b", 1)
    assert lim.try_acquire("a").scope is Scope.ROUTE
    ta = lim.enqueue("a")
    assert lim.try_acquire("b").scope is Scope.GLOBAL
    tb = lim.enqueue("b")
    grants = lim.release(b1)                    # frees global and route b, not route a
    assert [t for t, _ in grants] == [tb]
    assert ta.state is TicketState.WAITING
    grants = lim.release(a1)
    assert [t for t, _ in grants] == [ta]
    assert lim.in_flight("a") == 2 and lim.in_flight("b") == 1


def test_a_new_arrival_never_overtakes_a_waiter_that_could_run():
    lim = limiter(global_limit=1, queue_timeout_ms=100)
    (p,) = take(lim, "x", 1)
    t = lim.enqueue("x")
    assert lim.release(p)[0][0] is t            # the place went to the waiter inside release
    assert isinstance(lim.try_acquire("x"), Rejection)


def test_queue_is_bounded_by_the_caps():
    lim = limiter(global_limit=4, default_route_limit=2, queue_timeout_ms=100)
    take(lim, "a", 2)
    take(lim, "b", 2)
    assert [lim.enqueue("a") is not None for _ in range(3)] == [True, True, False]   # route a: 2 wait
    assert [lim.enqueue("b") is not None for _ in range(3)] == [True, True, False]
    assert lim.enqueue("c") is None                        # 4 wait in all: the global cap's worth
    assert lim.waiting() == 4


def test_abandon_leaves_the_queue_and_is_idempotent():
    lim = limiter(default_route_limit=1, queue_timeout_ms=100)
    (p,) = take(lim, "a", 1)
    t1, t2 = lim.enqueue("a"), lim.enqueue("a")
    assert t2 is None                                      # route cap 1: one waiter
    lim.abandon(t1)
    lim.abandon(t1)
    assert t1.state is TicketState.ABANDONED and lim.waiting() == 0
    assert lim.release(p) == ()
    assert lim.in_flight() == 0
    assert lim.enqueue("a") is not None                    # its place in the queue is free again


def test_abandon_after_a_grant_changes_nothing():
    lim = limiter(default_route_limit=1, queue_timeout_ms=100)
    (p,) = take(lim, "a", 1)
    t = lim.enqueue("a")
    ((_, granted),) = lim.release(p)
    lim.abandon(t)                                         # the waiter timed out in the same instant
    assert t.state is TicketState.GRANTED and lim.in_flight("a") == 1
    lim.release(granted)                                   # the servicer hands the permit back
    assert lim.in_flight() == 0


# ---------------------------------------------------------------------------------- reconfigure ---

def test_reconfigure_keeps_counts_and_old_permits_release_against_them():
    lim = limiter(default_route_limit=5)
    old = take(lim, "api", 4)
    assert lim.reconfigure(cfgmod.Concurrency(default_route_limit=2)) == ()
    assert lim.in_flight("api") == 4
    assert lim.try_acquire("api") == Rejection("api", Scope.ROUTE, 2, 503)   # cached rejections were cleared
    for p in old[:2]:
        lim.release(p)
    assert isinstance(lim.try_acquire("api"), Rejection)   # 2 still in flight: at the new cap
    lim.release(old[2])
    assert isinstance(lim.try_acquire("api"), Permit)


def test_reconfigure_raising_a_cap_admits_waiters_at_once():
    lim = limiter(default_route_limit=1, queue_timeout_ms=100)
    take(lim, "api", 1)
    t = lim.enqueue("api")
    grants = lim.reconfigure(cfgmod.Concurrency(default_route_limit=2, queue_timeout_ms=100))
    assert [g[0] for g in grants] == [t] and lim.in_flight("api") == 2


def test_reconfigure_excluding_a_route_grants_its_waiters_no_permit_and_old_permits_still_count():
    lim = limiter(default_route_limit=1, queue_timeout_ms=100)
    (p,) = take(lim, "sse", 1)
    t = lim.enqueue("sse")
    grants = lim.reconfigure(cfgmod.Concurrency(default_route_limit=1, exclude_policies=["sse"]))
    assert grants == ((t, EXEMPT),)
    assert lim.in_flight("sse") == 1
    lim.release(p)
    assert lim.in_flight() == 0


def test_reconfigure_to_no_caps_admits_everything():
    lim = limiter(global_limit=1, queue_timeout_ms=100)
    take(lim, "a", 1)
    t = lim.enqueue("a")
    assert [g[0] for g in lim.reconfigure(Limits())] == [t]
    take(lim, "a", 10)
    assert lim.in_flight() == 12


def test_snapshot():
    lim = limiter(global_limit=3, default_route_limit=2, queue_timeout_ms=50)
    take(lim, "a", 2)
    take(lim, "b", 1)
    lim.enqueue("a")
    assert lim.snapshot() == {"global_limit": 3, "default_route_limit": 2, "routes": {}, "mode": "enforce",
                              "queue_timeout_ms": 50, "in_flight": 3, "in_flight_by_route": {"a": 2, "b": 1},
                              "waiting": 1, "waiting_by_route": {"a": 1}}
    assert sorted(lim.routes()) == ["a", "b"]


# ---------------------------------------------------------------------------- random walk ---

@pytest.mark.parametrize("seed", range(20))
def test_random_walk_keeps_the_invariants(seed):
    rnd = random.Random(seed)
    routes = ["a", "b", "c", "sse"]
    cfgs = [cfgmod.Concurrency(global_limit=5, default_route_limit=3, routes={"c": 1}, exclude_policies=["sse"],
                               queue_timeout_ms=100),
            cfgmod.Concurrency(global_limit=3, default_route_limit=2, queue_timeout_ms=100),
            cfgmod.Concurrency(default_route_limit=4, queue_timeout_ms=100),
            cfgmod.Concurrency(global_limit=6, queue_timeout_ms=0)]
    lim = ConcurrencyLimiter.compile(cfgs[0])
    held: list[Permit] = []
    waiting: list[Ticket] = []
    released: list[Permit] = []

    def absorb(grants):
        for t, p in grants:
            waiting.remove(t)
            if p.held:
                held.append(p)

    for _ in range(3000):
        op = rnd.random()
        if op < 0.4:
            route = rnd.choice(routes)
            got = lim.try_acquire(route)
            if isinstance(got, Permit):
                if got.held:
                    held.append(got)
                else:
                    assert got is EXEMPT and route in lim.limits.excluded
            else:
                t = lim.enqueue(route)
                if t is not None:
                    waiting.append(t)
        elif op < 0.75 and held:
            p = held.pop(rnd.randrange(len(held)))
            absorb(lim.release(p))
            released.append(p)
        elif op < 0.85 and waiting:
            t = waiting.pop(rnd.randrange(len(waiting)))
            lim.abandon(t)
        elif op < 0.9 and released:
            assert lim.release(rnd.choice(released)) == ()       # releasing again: nothing
        elif op < 0.93:
            absorb(lim.reconfigure(rnd.choice(cfgs)))
        # the invariants, after every step
        assert lim.in_flight() == len(held)
        for r in routes:
            assert lim.in_flight(r) == sum(p.route == r for p in held)
            assert lim.waiting(r) == sum(t.route == r for t in waiting)
        assert all(t.state is TicketState.WAITING for t in waiting)
        lims = lim.limits
        for t in waiting:         # nobody waits while a place is free for them
            cap = lims.route_limit(t.route)
            assert ((cap is not None and lim.in_flight(t.route) >= cap)
                    or (lims.global_limit is not None and lim.in_flight() >= lims.global_limit))
    for t in waiting:
        lim.abandon(t)
    for p in held:
        assert lim.release(p) == ()                        # nobody waits any more
    assert lim.in_flight() == 0 and lim.waiting() == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_walk_never_exceeds_fixed_caps(seed):
    rnd = random.Random(seed)
    lim = limiter(global_limit=7, default_route_limit=3, routes={"big": 5}, queue_timeout_ms=100)
    held: list[Permit] = []
    waiting: list[Ticket] = []
    for _ in range(3000):
        if rnd.random() < 0.55:
            route = rnd.choice(["a", "b", "big"])
            got = lim.try_acquire(route)
            if isinstance(got, Permit):
                held.append(got)
            elif (t := lim.enqueue(route)) is not None:
                waiting.append(t)
        elif held:
            for t, p in lim.release(held.pop(rnd.randrange(len(held)))):
                waiting.remove(t)
                held.append(p)
        assert lim.in_flight() <= 7
        assert lim.in_flight("a") <= 3 and lim.in_flight("b") <= 3 and lim.in_flight("big") <= 5
        assert lim.waiting() <= 7


# ------------------------------------------------------------------------------- the exchange ---

def test_exchange_rejected_at_request_headers():
    ex = Exchange()
    assert ex.opens("request_headers")
    assert ex.step("request_headers", over_limit=True) is Action.REJECT
    assert ex.phase is Phase.REJECTED
    assert not ex.opens("request_headers")           # a second permit is never asked for
    assert ex.step("response_headers") is Action.CONTINUE   # Envoy sends nothing more; if it did: no timing
    assert ex.phase is Phase.REJECTED
    assert ex.end_kind() == "rejected"


def test_only_request_headers_open_the_exchange():
    assert OVER_LIMIT == {(Phase.AWAIT_REQUEST_HEADERS, "request_headers"): (Action.REJECT, Phase.REJECTED)}
    assert set(OVER_LIMIT) <= set(TABLE)
    for kind in ("request_body", "response_headers", "request_trailers", ""):
        assert not Exchange().opens(kind)
    ex = Exchange()
    ex.step("request_headers")
    assert not ex.opens("request_headers")
    # over_limit changes nothing where no rejection is possible
    assert ex.step("response_headers", over_limit=True) is Action.CONTINUE_WITH_TIMING
