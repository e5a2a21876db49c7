"""The one store contract every backend answers: memory, Redis, Redis Cluster.

Decides the shape of shared state as the rest of the sidecar sees it: a handful of
operations (bytes get/set/delete, counters, an atomic fixed-window hit, a request's rate
limits checked and charged together or only read, a scored set, and pub/sub), all async, and one error type. Drivers' exceptions never cross this boundary: each backend turns them into
`StoreError`, whose `transient` flag says whether retrying later can help (connection lost,
timeout, cluster failover) or not (a wrong-type value, bad credentials), and whose `timeout`
flag lets callers report `store_timeout` apart from `store_error`. What a store failure
*means* for a request (fail open, fail closed) is the calling policy's decision, not the
store's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from extproc.core.breaker import Params as BreakerParams
from extproc.core.breaker import Result as BreakerResult
from extproc.core.ratelimit import Limit, Outcome


class StoreError(Exception):
    """A store operation failed; the message names the backend and the operation.

    `transient`: the same call may succeed later (network, timeout, failover, overload).
    `timeout`: the backend did not answer in time (implies transient).
    """

    def __init__(self, message: str, *, transient: bool, timeout: bool = False):
        super().__init__(message)
        self.message = message
        self.transient = transient or timeout
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"StoreError({self.message!r}, transient={self.transient}, timeout={self.timeout})"


@dataclass(frozen=True, slots=True)
class WindowResult:
    """The answer to one fixed-window hit.

    `count` is the window's total after this hit (unchanged when rejected), `remaining` is
    `limit - count` floored at 0, and `reset_after_ms` is the time until the window's counter
    disappears (the full window when no window was running).
    """

    allowed: bool
    count: int
    remaining: int
    reset_after_ms: int


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One rule of one request: charge `cost` (default: the rule's) against `limit` at `key`.

    `key` comes from `KeySpace.rate_limit(tag, limit)`; checks whose keys share a hash tag are
    decided in one atomic script.
    """

    key: str
    limit: Limit
    cost: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limit, Limit):
            raise TypeError(f"RateCheck.limit is a Limit, got {type(self.limit).__name__}")
        cost = self.limit.cost if self.cost is None else self.cost
        self.limit.check_cost(cost)
        object.__setattr__(self, "cost", cost)

    @property
    def units(self) -> int:
        return self.cost  # type: ignore[return-value]  # resolved in __post_init__


@dataclass(frozen=True, slots=True)
class RateResult:
    """One check's answer: the rule's `Outcome`, and whether this request is now counted
    against it (`charged`: true for every rule of an admitted request, false for all rules of
    a rejected one)."""

    outcome: Outcome
    charged: bool


@runtime_checkable
class Subscription(Protocol):
    """Messages published on one channel after `Store.subscribe` returned, in publish order.

    `async for message in sub` yields each message's bytes. Delivery is at most once, and a
    subscription never hides a gap: when the backend loses it (connection closed, a silent
    partition caught by the subscription's own PING, a subscriber that fell too far behind)
    the iteration raises `StoreError(transient=True)` once and then ends. It does NOT
    reconnect by itself: messages published meanwhile are gone, so the caller subscribes
    again and then re-reads whatever state the messages were about (subscribe first, then
    read, and nothing falls between the two). `close()` ends the iteration quietly
    (`StopAsyncIteration`, also for a reader already waiting) and is idempotent.
    """

    channel: str

    def __aiter__(self) -> Subscription:
        ...

    async def __anext__(self) -> bytes:
        ...

    async def close(self) -> None:
        ...


@runtime_checkable
class Store(Protocol):
    """Shared state for the sidecar's policies.

    Keys are built with `extproc.store.keys` so that everything one operation touches
    shares a Redis Cluster hash tag. TTLs are milliseconds and must be >= 1.
    """

    name: str  # "memory" | "redis" | "redis-cluster"

    async def get(self, key: str) -> bytes | None:
        """The value, or None when the key is missing or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        """Store `value`; without `ttl_ms` the key never expires (an old TTL is dropped)."""
        ...

    async def delete(self, *keys: str) -> int:
        """Remove keys; returns how many existed."""
        ...

    async def incr(self, key: str, amount: int = 1, ttl_ms: int | None = None) -> int:
        """Add `amount` to an integer counter (missing counts as 0) and return the new value.

        `ttl_ms` applies only when this call creates the key; an existing key keeps its
        expiry. A value that is not an integer raises StoreError(transient=False).
        """
        ...

    async def fixed_window_hit(self, key: str, limit: int, window_ms: int, cost: int = 1) -> WindowResult:
        """Atomically charge `cost` against `limit` in the window stored at `key`.

        The window starts at its first admitted hit (the key lives `window_ms`). A hit that
        would exceed the limit is rejected and not charged, so later cheaper hits may pass.
        """
        ...

    async def rate_limit(self, checks: Sequence[RateCheck], now_ms: int | None = None) -> list[RateResult]:
        """Decide one request against all its rules; one RateResult per check, in order.

        The request is admitted iff every outcome is allowed, and then every rule is charged;
        a rejected request is charged to no rule. Checks whose keys share a Redis Cluster slot
        are checked and charged atomically in one script (on standalone Redis and in memory:
        all checks). Across slots each slot's group is charged atomically and, when any group
        rejects, the groups that were charged are refunded in a second round trip; until then
        (one round trip) concurrent requests may see that charge, so they can be rejected by
        up to the rejected requests' costs, never admitted beyond a limit. A refund that fails
        leaves its cost counted until the window (or bucket) resets.

        Time is the backend's clock (Redis `TIME`, the memory store's injected wall clock);
        `now_ms` (Unix ms) overrides it, for tests and tools only. Duplicate keys, costs < 1
        raise ValueError before any I/O. Redis scripts are sent by SHA; calls that concurrent
        requests make in one event-loop tick share one pipeline.
        """
        ...

    async def rate_usage(self, checks: Sequence[RateCheck], now_ms: int | None = None) -> list[Outcome]:
        """What `rate_limit(checks, now_ms)` would answer for each check, charging nothing: no
        state is created or changed and no TTL is touched. Read-only, for the admin's usage view.

        One Outcome per check, in order, each the rule's own (`extproc.core.ratelimit.peek`):
        `allowed` says this rule alone would admit a request of the check's cost, `remaining`
        is what is left now (before any request), `reset_after_ms` is when the whole limit is
        back. Missing or expired state reads as the full quota. Each Cluster slot's checks are
        read in one script (the same one `rate_limit` runs, in its "peek" mode); the slots are
        read concurrently, so different slots may be read at instants a few ms apart. Time and
        argument checks are as for `rate_limit`.
        """
        ...

    async def breaker(self, key: str, op: str, params: BreakerParams, now_ms: int, ttl_ms: int) -> BreakerResult:
        """Apply one circuit-breaker transition (`extproc.core.breaker.step`) to the record at
        `key`, atomically: every replica's outcomes and probe claims are serialised. The record
        lives `ttl_ms` past its last change. Unknown ops raise ValueError before any I/O."""
        ...

    async def byte_usage(self, match: str, limit: int = 100_000) -> tuple[int, int, bool]:
        """(keys, bytes, truncated) over the byte-string keys matching the glob `match` (Redis
        SCAN semantics: every node of a Cluster), stopping after `limit` keys. For operators'
        statistics only, never the request path; keys of other types are skipped."""
        ...

    async def zadd(self, key: str, member: str, score: float) -> None:
        """Add `member` to the scored set at `key`, or move it to `score` when present.

        A scored set is Redis's sorted set: distinct text members, each with a finite float
        score. The set has no TTL of its own: callers that score by expiry time drop old
        members with `zrem_below`. A key holding another type raises StoreError(transient=False).
        """
        ...

    async def zrange_from(self, key: str, min_score: float) -> list[tuple[str, float]]:
        """Every `(member, score)` with score >= `min_score`, ordered by (score, member).

        Read in pages (never one unbounded reply), so members added or removed while it
        runs may or may not be included; members present throughout always are. A missing
        key is an empty set.
        """
        ...

    async def zrem_below(self, key: str, max_score: float) -> int:
        """Remove the members scored <= `max_score`; returns how many were removed."""
        ...

    async def publish(self, channel: str, message: bytes) -> None:
        """Send `message` to every current subscriber of `channel` (fire and forget).

        Channels are not keys: on Redis Cluster a PUBLISH reaches the subscribers on every
        node. Nobody listening is not an error.
        """
        ...

    async def subscribe(self, channel: str) -> Subscription:
        """Listen on `channel`; returns once the backend confirmed the subscription, so a
        message published after this returns is delivered. Raises StoreError when the
        backend is unreachable. The caller closes the subscription."""
        ...

    async def ping(self) -> None:
        """Return when the backend answers; raise StoreError when it does not."""
        ...

    async def close(self) -> None:
        """Release connections; call from the event loop that used the store."""
        ...


def check_ttl(ttl_ms: int | None) -> None:
    """Reject TTLs Redis would refuse, before any I/O, identically for every backend."""
    if ttl_ms is not None and (not isinstance(ttl_ms, int) or ttl_ms < 1):
        raise ValueError(f"ttl_ms must be a positive integer of milliseconds, got {ttl_ms!r}")


def check_window(limit: int, window_ms: int, cost: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    if window_ms < 1:
        raise ValueError(f"window_ms must be >= 1, got {window_ms!r}")
    if cost < 1:
        raise ValueError(f"cost must be >= 1, got {cost!r}")


def check_rate_checks(checks: Sequence[RateCheck], now_ms: int | None) -> None:
    """The arguments of `rate_limit`, checked identically for every backend before any I/O."""
    seen: set[str] = set()
    for check in checks:
        if not isinstance(check, RateCheck):
            raise TypeError(f"rate_limit takes RateCheck items, got {type(check).__name__}")
        if check.key in seen:
            raise ValueError(f"rate_limit: key {check.key!r} appears twice in one request")
        seen.add(check.key)
    if now_ms is not None and (isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms < 0):
        raise ValueError(f"now_ms is a non-negative integer of Unix milliseconds, got {now_ms!r}")


def check_score(score: float) -> float:
    """Scores are finite numbers on every backend (Redis would accept inf, memory NaN)."""
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ValueError(f"scores are finite numbers, got {score!r}")
    return float(score)


def check_bound(bound: float) -> float:
    """A range bound: any number but NaN (-inf and inf mean "no bound")."""
    if isinstance(bound, bool) or not isinstance(bound, int | float) or math.isnan(bound):
        raise ValueError(f"score bounds are numbers, got {bound!r}")
    return float(bound)


def check_member(member: str) -> str:
    if not isinstance(member, str):
        raise TypeError(f"scored-set members are str, got {type(member).__name__}")
    return member


def as_bytes(value: bytes) -> bytes:
    """Values are bytes on every backend (Redis would silently stringify anything else)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"store values are bytes, got {type(value).__name__}")
