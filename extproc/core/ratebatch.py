"""Batched rate limits for very hot keys: decide locally, reconcile with the store every few ms.

Theory of operation
-------------------
A rule in `sync: {mode: batched}` keeps, per counter key, what the store said last (`remaining`
after its answer, the reset, the window) and the units this replica admitted since. A request's
check of cost c on key k is routed by `BatchTable.decide`:

* LOCAL: `remaining - pending - inflight - reserved >= c` on a known, current state. Admitted
  here, no store call; its c units are *reserved*, then *confirmed* into `pending` when the
  whole request is admitted, or released when another rule rejects it (a rejected request is
  charged to no rule, batched or not).
* OVER: fewer than c units left, and some of this replica's own units are not synced yet:
  rejected here (while the store answers; when it does not, STORE, where the rule's fail-open
  answer applies). Asking the store would not help: it has not seen those units, so it would
  admit them a second time. The next sync says what is really left.
* CACHED: the store rejected a request of at least this cost on k and its Retry-After has not
  passed: rejected here (what `DenyCache` does for per-request rules).
* STORE: k is unknown (its first request, or evicted), its window rolled over since the store
  answered, its state is older than `stale_ms` with nothing of ours unsynced, or it is spent
  with nothing of ours unsynced. The request is decided by the store, exactly as a per-request
  rule's, and the answer (`learn`) becomes k's state.

Every interval the service takes each key's `pending` units (`take`) and charges them to the
store; the answer (`settle`) becomes the key's state. A key decided here lately with nothing to
send is read instead for a few intervals (a refresh, charging nothing), so what the other
replicas charged reaches this one although its own traffic stopped. When the store refuses a
flush (fewer units left than pending), the service charges exactly what remains, so the store
ends saturated, never under-counted; the refused units are the over-admission, reported by
`settle`. A flush that fails puts its units back (`failed`), capped at the rule's limit, for
the next interval; meanwhile decisions go on against the last known state, however old, and a
key spent on it goes to the store like a per-request rule (whose fail-open answer applies).

Over-admission bound
--------------------
Local units reach the store up to one *sync period* after they are admitted (the interval plus
the flush's round trip). A replica admits locally only out of the `remaining` the store last
told it, minus its own unsynced units, so between two of its syncs it admits at most that
`remaining`, and every sync refreshes it. Hence, per replica, what it admits past the limit in
one sync period is at most min(r_i, a_i): the remaining it last saw and what it admits locally
in that period. With R replicas and r left in the store, the fleet admits past the limit at most

    sum_i min(r_i, a_i) - r   <=   (R - 1) * limit

(a cold key hit by a burst: every replica learns "almost all left" and spends it), and under
sustained traffic about the fleet's admission rate times one sync period, once per exhaustion:
after that sync every replica knows the key spent and asks the store per request (exact),
remembering its rejections until their Retry-After. A single replica does not over-admit: its
own unsynced units are always subtracted (the one exception: a sliding window's last-interval
units are not yet in the store when the first request of the next window asks it). Under-
admission: none from counting (the store's count only holds admitted units, so a request it
rejects found the fleet at the limit); a token bucket's refill since the last sync is only used
after the next one. A flush that timed out but was applied is sent again: counted twice.

Answers and their order. Several store calls on one key can be in flight at once (requests
sent to the store, a flush, a refresh), and the store may run them in another order than they
were sent (Redis runs pipelines of different connections in any order). So an answer replaces
what is known only when its call was the key's only call in flight from its sending to its
answer: everything answered before it was sent, it ran after all of that. Any other answer is
merged with `min` (what remains in a window only shrinks, but for a bucket's refill, which the
next lone answer brings back), so an answer that ran before one of this replica's flushes can
never hide that flush's units. `sending` counts a call before it goes out (creating the entry
of a key seen for the first time); `learn`, `settle`, `failed` and `finish` count it back.

Windows: units pending across a fixed window's boundary are dropped (they count in a window
that is over); a sliding window's are charged into the next window (where they would still
weigh as `prev`: conservative), and dropped when older than that. A bucket's never age.

The table is bounded (`max_keys`): keys idle for `idle_ms` with nothing pending are evicted
(least recently used first), and when it is full of busy keys a new key stays per-request.
Nothing here does I/O or reads the clock: `now_ms` is an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice

from .ratelimit import Algorithm, Limit, Outcome


class Route(StrEnum):
    LOCAL = "local"      # admitted here; `cost` reserved until `confirm` or `release`
    OVER = "over"        # rejected here: the known remaining is spent by this replica's own units
    CACHED = "cached"    # rejected here: the store said no until `retry_at`
    STORE = "store"      # ask the store for this request


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_FOREVER = 2**62
#: A key is refreshed (read, nothing charged) for this many intervals after its last use here.
REFRESH_INTERVALS = 3


def _window(limit: Limit, now_ms: int) -> tuple[int, int, int]:
    """(id, start, end) of the window holding `now_ms`; a bucket has one endless window."""
    if limit.algorithm is Algorithm.TOKEN_BUCKET:
        return 0, 0, _FOREVER
    return limit.period.window(now_ms)


@dataclass(slots=True, eq=False)
class Entry:
    """One counter key as this replica knows it (the store's answers plus local units)."""

    key: str
    limit: Limit
    interval_ms: int
    known: bool = False          # a store answer arrived (else: its first call is in flight)
    remaining: int = 0           # what the store has left, as its answers say
    synced_ms: int = 0           # when the last answer arrived
    reset_at: int = 0            # synced_ms + its reset_after_ms
    window_ms: int = 0
    wid: int = 0                 # window id at synced_ms (0 for a bucket)
    win_start: int = 0           # that window's bounds: a request outside it asks the store
    win_end: int = 0
    retry_at: int = 0            # the store rejected a request of `retry_cost` units until then
    retry_cost: int = 0
    pending: int = 0             # admitted and confirmed here, not yet sent
    pending_wid: int = 0         # the window the oldest pending unit was admitted in
    reserved: int = 0            # admitted here, the request's other rules not yet decided
    inflight: int = 0            # sent in a flush not yet answered
    calls: int = 0               # store calls on this key in flight
    overlapped: bool = False     # some of them were in flight together: merge their answers
    due_ms: int = 0              # the next flush of this key's pending units
    used_ms: int = 0             # the last request

    @property
    def available(self) -> int:
        return self.remaining - self.pending - self.reserved - self.inflight

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.reserved or self.inflight or self.calls)


@dataclass(frozen=True, slots=True)
class Local:
    """`BatchTable.decide`'s answer; `outcome` is None for `Route.STORE`."""

    route: Route
    outcome: Outcome | None = None
    entry: Entry | None = None
    cost: int = 0


STORE = Local(Route.STORE)


@dataclass(frozen=True, slots=True)
class Flush:
    """`units` of `entry`'s pending units sent to the store (0: a refresh, charging nothing)."""

    entry: Entry
    limit: Limit
    units: int
    wid: int                     # the window the oldest of these units was admitted in


@dataclass(slots=True)
class BatchTable:
    """Every batched key of one rate limiter. A known state with nothing of ours unsynced is
    trusted for `stale_ms(entry)` (four intervals and `grace_ms`, the store's timeout)."""

    max_keys: int = 10_000
    idle_ms: int = 1_000
    grace_ms: int = 20
    _entries: OrderedDict[str, Entry] = field(default_factory=OrderedDict)   # least recently used first
    _dirty: dict[str, Entry] = field(default_factory=dict)                   # keys with pending units
    _active: dict[str, Entry] = field(default_factory=dict)                  # keys decided here lately

    def __post_init__(self) -> None:
        if self.max_keys < 1 or self.idle_ms < 1 or self.grace_ms < 0:
            raise ValueError("max_keys and idle_ms must be >= 1, grace_ms >= 0")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def stale_ms(self, entry: Entry) -> int:
        # four intervals and the store's timeout: a hot key's flushes keep it fresh
        return 4 * entry.interval_ms + self.grace_ms

    @property
    def pending_units(self) -> int:
        return sum(e.pending for e in self._dirty.values())

    # -- the request path ------------------------------------------------------------------
    def decide(self, key: str, limit: Limit, cost: int, now_ms: int, *, store_ok: bool = True) -> Local:
        """Route one request's check of `cost` on `key`. LOCAL reserves `cost` (then `confirm`
        or `release` it); while the store is not answering (`store_ok` false) a known state is
        used however old it is (fail-open on what was last known)."""
        e = self._entries.get(key)
        if e is None:
            return STORE
        self._entries.move_to_end(key)
        e.used_ms = now_ms
        if not e.known or (e.limit is not limit and e.limit != limit):
            return STORE
        self._active[key] = e
        if now_ms < e.retry_at and cost >= e.retry_cost:
            return Local(Route.CACHED, Outcome(limit.name, False, limit.limit, max(0, e.available),
                                               max(0, e.reset_at - now_ms), e.retry_at - now_ms, e.window_ms))
        if not e.win_start <= now_ms < e.win_end:
            return STORE           # a new window: what the store said is about the last one
        unsynced = e.pending + e.inflight + e.reserved
        if store_ok and not unsynced and now_ms - e.synced_ms > self.stale_ms(e):
            return STORE
        left = e.available - cost
        if left >= 0:
            e.reserved += cost
            return Local(Route.LOCAL, Outcome(limit.name, True, limit.limit, left,
                                              self._reset_after(e, left, now_ms), 0, e.window_ms), e, cost)
        if unsynced and store_ok:
            # spent by this replica's own units, which the store has not seen yet: asking it
            # would admit them twice. The next sync says what is really left. (With the store
            # not answering, the request goes to it anyway, and the rule's fail-open answer
            # applies: the last known state of a bucket would never refill.)
            return Local(Route.OVER, Outcome(limit.name, False, limit.limit, max(0, e.available),
                                             self._reset_after(e, max(0, e.available), now_ms),
                                             self._retry_after(e, -left, now_ms), e.window_ms))
        return STORE               # exhausted as far as known, nothing of ours unsynced: exact

    def _reset_after(self, e: Entry, left: int, now_ms: int) -> int:
        """Until the whole limit is back, from the local estimate (as the algorithms report it)."""
        lim = e.limit
        if left >= lim.limit:
            return 0
        if lim.algorithm is Algorithm.TOKEN_BUCKET:
            return _ceil_div((lim.limit - left) * lim.scale, lim.refill_units)
        _, _, end = lim.period.window(now_ms)
        if lim.algorithm is Algorithm.FIXED_WINDOW:
            return end - now_ms
        _, start2, end2 = lim.period.window(end)
        return max(e.reset_at - now_ms, end - now_ms + (end2 - start2))

    def _retry_after(self, e: Entry, short: int, now_ms: int) -> int:
        """A Retry-After hint for `short` missing units (the store answers exactly once synced)."""
        lim = e.limit
        if lim.algorithm is Algorithm.TOKEN_BUCKET:
            return max(1, _ceil_div(short * lim.scale, lim.refill_units))
        if lim.algorithm is Algorithm.FIXED_WINDOW:
            return max(1, lim.period.window(now_ms)[2] - now_ms)
        return max(1, _ceil_div(e.window_ms * short, max(1, lim.limit)))   # about `short` units' share

    def confirm(self, d: Local, now_ms: int) -> None:
        """The request `d` reserved for was admitted: its units become pending."""
        e = d.entry
        if e is None or d.route is not Route.LOCAL:
            return
        e.reserved = max(0, e.reserved - d.cost)
        self._add_pending(e, d.cost, now_ms)

    def release(self, d: Local) -> None:
        """The request `d` reserved for was rejected (or failed): its units were never used."""
        if d.entry is not None and d.route is Route.LOCAL:
            d.entry.reserved = max(0, d.entry.reserved - d.cost)

    def _add_pending(self, e: Entry, units: int, now_ms: int, wid: int | None = None) -> None:
        if wid is None:
            wid = e.wid if e.win_start <= now_ms < e.win_end else _window(e.limit, now_ms)[0]
        if e.pending <= 0:
            e.pending_wid = wid
            e.due_ms = max(e.due_ms, now_ms)
        else:
            e.pending_wid = min(e.pending_wid, wid)
        e.pending += units
        if e.key in self._entries:
            self._dirty[e.key] = e

    # -- store calls and their answers -----------------------------------------------------
    def sending(self, key: str, limit: Limit, interval_ms: int, now_ms: int) -> None:
        """A store call on `key` is about to go out (a request's check): count it in flight,
        creating the key's entry at its first call when there is room. Count it back with
        `learn` or `finish`."""
        e = self._entries.get(key)
        if e is None:
            if not self._make_room(now_ms):
                return             # full of busy keys: this one stays per-request
            e = Entry(key, limit, interval_ms, used_ms=now_ms)
            self._entries[key] = e
        self._count(e)

    @staticmethod
    def _count(e: Entry) -> None:
        if e.calls:
            e.overlapped = True
        e.calls += 1

    def finish(self, key: str) -> None:
        """A call counted by `sending` is over (answered and learnt, or failed)."""
        e = self._entries.get(key)
        if e is not None:
            self._uncount(e)

    @staticmethod
    def _uncount(e: Entry) -> None:
        e.calls = max(0, e.calls - 1)
        if not e.calls:
            e.overlapped = False

    def learn(self, key: str, limit: Limit, interval_ms: int, outcome: Outcome, cost: int, now_ms: int) -> None:
        """The store answered a request's check of `cost` on `key` (a call counted by
        `sending`, still counted: `finish` it after): what the key has left."""
        e = self._entries.get(key)
        if e is None:
            return
        if e.limit is not limit and e.limit != limit:
            e.limit, e.known = limit, False     # another limit on the key (a tier): start afresh
        e.interval_ms = interval_ms
        self._apply(e, outcome, now_ms)
        if outcome.allowed:
            e.retry_at = e.retry_cost = 0
        else:
            e.retry_at, e.retry_cost = now_ms + max(1, outcome.retry_after_ms), cost

    def _apply(self, e: Entry, outcome: Outcome, now_ms: int) -> None:
        wid, start, end = _window(e.limit, now_ms)
        alone = e.calls <= 1 and not e.overlapped
        if e.known and not alone and wid == e.wid:
            # another call on this key was in flight meanwhile: the store may have run the two
            # in either order, and the smaller remaining is the later one
            e.remaining = min(e.remaining, outcome.remaining)
        else:
            e.remaining = outcome.remaining
        e.known = True
        e.synced_ms = now_ms
        e.reset_at = now_ms + outcome.reset_after_ms
        e.window_ms = outcome.window_ms
        e.wid, e.win_start, e.win_end = wid, start, end

    # -- the flusher -----------------------------------------------------------------------
    def take(self, now_ms: int, force: bool = False) -> tuple[list[Flush], dict[str, int]]:
        """Every key's pending units that are due (all of them with `force`), moved to
        `inflight`: one Flush per key, its call counted in flight. Keys decided here in the
        last `REFRESH_INTERVALS` intervals with nothing to send get a refresh (a Flush of 0
        units: read the store, charge nothing) once per interval: the other replicas' last
        units reach the store within about an interval, and this replica learns of them
        although its own traffic stopped. Returns (flushes, units dropped by rule name because
        their window is over)."""
        out: list[Flush] = []
        dropped: dict[str, int] = {}
        for key, e in list(self._active.items()):
            if now_ms - e.used_ms > REFRESH_INTERVALS * e.interval_ms or key not in self._entries:
                del self._active[key]
            elif (e.known and e.pending <= 0 and not e.calls and now_ms >= e.retry_at
                  and (force or (now_ms - e.synced_ms >= e.interval_ms and now_ms >= e.due_ms))):
                e.due_ms = now_ms + e.interval_ms
                self._count(e)
                out.append(Flush(e, e.limit, 0, e.wid))
        for key, e in list(self._dirty.items()):
            if e.pending <= 0:
                del self._dirty[key]
                continue
            if not force and now_ms < e.due_ms:
                continue
            del self._dirty[key]
            units, e.pending = e.pending, 0
            if e.limit.algorithm is not Algorithm.TOKEN_BUCKET:
                # a fixed window's units count in their own window only; a sliding window's
                # still weigh in the next one (charged there: conservative), not after
                too_old = e.pending_wid + (0 if e.limit.algorithm is Algorithm.FIXED_WINDOW else 1)
                if _window(e.limit, now_ms)[0] > too_old:
                    dropped[e.limit.name] = dropped.get(e.limit.name, 0) + units
                    continue
            e.inflight += units
            e.due_ms = now_ms + e.interval_ms
            self._count(e)
            out.append(Flush(e, e.limit, units, e.pending_wid))
        return out, dropped

    def settle(self, f: Flush, outcome: Outcome, charged: int, now_ms: int) -> int:
        """The store answered flush `f`: `charged` of its units are counted (all of them, or
        what remained when it refused them), `outcome` is the store's answer to its last call
        (for a refresh, the store's read-only view). After a refusal this is the store
        saturated: the key is locally spent, so its requests ask the store until an answer
        shows room again. Returns the units refused: the over-admission."""
        e = f.entry
        if e.limit is f.limit or e.limit == f.limit:
            self._apply(e, outcome, now_ms)
        e.inflight = max(0, e.inflight - f.units)
        self._uncount(e)
        return max(0, f.units - charged)

    def failed(self, f: Flush, now_ms: int) -> int:
        """Flush `f` did not reach the store: its units go back to pending, capped at the
        rule's limit (a flush can never charge more). Returns the units dropped by the cap."""
        e = f.entry
        e.inflight = max(0, e.inflight - f.units)
        self._uncount(e)
        if not f.units:
            return 0
        self._add_pending(e, f.units, now_ms, f.wid)
        e.due_ms = now_ms + e.interval_ms
        over = max(0, e.pending - e.limit.limit)
        e.pending -= over
        return over

    # -- housekeeping ----------------------------------------------------------------------
    def evict(self, now_ms: int, budget: int = 1_000) -> int:
        """Drop keys idle for `idle_ms` with nothing pending, reserved or in flight, least
        recently used first (at most `budget` looked at). Returns how many were dropped."""
        victims = []
        for e in islice(self._entries.values(), budget):
            if now_ms - e.used_ms < self.idle_ms:
                break              # everything after it was used more recently
            if not (e.busy or now_ms < e.retry_at):
                victims.append(e.key)
        for key in victims:
            del self._entries[key]
            self._active.pop(key, None)
        return len(victims)

    def _make_room(self, now_ms: int) -> bool:
        if len(self._entries) < self.max_keys:
            return True
        self.evict(now_ms)
        if len(self._entries) < self.max_keys:
            return True
        key, e = next(iter(self._entries.items()))
        if e.busy:
            return False
        del self._entries[key]
        self._active.pop(key, None)
        return True

    def forget(self, key: str) -> None:
        """An admin reset: the key's state and pending units are void."""
        e = self._entries.pop(key, None)
        self._dirty.pop(key, None)
        self._active.pop(key, None)
        if e is not None:
            e.pending = 0

    def adopt(self, other: BatchTable, interval_for: Callable[[Entry], int | None]) -> int:
        """Move `other`'s entries whose rule is unchanged here (`interval_for` gives the new
        interval, or None to leave the entry to `other`, which flushes it before it goes).
        Returns how many moved."""
        moved = 0
        for key, e in list(other._entries.items()):
            interval = interval_for(e)
            if interval is None or key in self._entries or len(self._entries) >= self.max_keys:
                continue
            del other._entries[key]
            other._dirty.pop(key, None)
            other._active.pop(key, None)
            e.interval_ms = interval
            self._entries[key] = e
            if e.pending > 0:
                self._dirty[key] = e
            moved += 1
        return moved
