"""The express lane of ext_authz: a repeat credential answered with the bytes it got last time.

A repeat JWT already costs no signature check (the decision cache), and the full path keeps its
reply's grant part serialised (authz.ok_reply_bytes) and its counts in the same tally as this
lane; but it still builds a Request, walks the policy steps and assembles a Decision: on a busy
sidecar that was as much CPU again as the gRPC call itself. When nothing in a policy's decision
depends on the request beyond the credential, the answer to a repeat credential is the same
reply every time, so:

* A policy is *express* when its allowed answer depends only on the credential: it has
  providers (any_of), no IP list, no authorization rules, no all_of, no revoke-on-use, its
  providers all read the same one header, no rate-limit rule can match it, no lean circuit
  breaker guards it, and neither decision logs, DEBUG logging nor tracing are on (those write
  per-request fields). Worked out once per config (Runtime).
* After the full path allows a request of an express policy from a grant of one of its providers
  (Reason OK, not shadowed, no query parameter stripped) for the second time, the serialised
  reply is kept here, keyed by (policy, the raw header value), bounded (LRU,
  `server.token_cache_entries`, as the decision and verified-token caches); a
  credential allowed once leaves only its hash in a bounded set (fresh tokens cost nothing).
* A later request with the byte-identical header value is answered with those bytes once the
  same O(1) checks the decision cache's hit makes still hold: not expired, signing key still
  published, not revoked (the local fleet-wide deny-list, and fail-closed revocation while the
  list is incomplete). Anything else — a header over the size bound, a query string when a
  credential may be in it, a failed check — goes down the full path, which decides and
  answers exactly as before (a revoked token then gets its 401 there).
* The per-request parts are added to the stored bytes, not rebuilt: the Server-Timing header is
  a second serialised CheckResponse appended (protobuf merges concatenated messages: repeated
  fields append). A hit appends what it counts and its duration to two lists (`Tally`); the
  counts and histogram buckets are worked out and added to their Prometheus children every
  100 ms and before the process renders its metrics: exact, and at most 100 ms late for a
  scrape of another process (the supervisor's, with several workers).

A new config builds a new Runtime, and with it an empty express table.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from envoy.service.auth.v3 import external_auth_pb2 as pb

from ..core.credentials import extract_header
from ..core.decision import Decision
from ..core.policy import CompiledPolicy, Granted
from ..core.reasons import Reason
from ..telemetry import metrics
from .checkwire import APPEND, response_headers_bytes


def timing_bytes(seconds: float) -> bytes:
    """A serialised CheckResponse carrying only `server-timing: authz;dur=<ms>`, to append; built
    once per whole microsecond (the express lane's durations are a few tens of them)."""
    us = int(seconds * 1e6)
    got = _TIMING.get(us)
    if got is None:
        got = response_headers_bytes((("server-timing", f"authz;dur={us / 1000:.3f}"),), APPEND)
        if us < _TIMING_MAX_US:
            _TIMING[us] = got
    return got


_TIMING_MAX_US = 5000           # bounds the table: 5 000 entries of ~45 bytes
_TIMING: dict[int, bytes] = {}


@dataclass(slots=True)
class Entry:
    granted: Granted
    policy: CompiledPolicy
    provider: str
    reply: bytes                       # the serialised CheckResponse, without Server-Timing
    counters: tuple                    # the metric children a hit increments
    # what the last full validity check saw: the provider's key set (a refresh installs a new
    # tuple) and the revocation list's version; while both are the same, so is the answer
    keys: object = None
    revocations: int = -1


@dataclass(frozen=True, slots=True)
class Lane:
    """An express policy: where its credential is and what its reply counts."""
    name: str
    policy: CompiledPolicy
    provider: str                      # the first provider (whose source plan reads the header)
    providers: frozenset[str]          # every provider of the policy: all read that one header
    header: str                        # the one header its providers read
    label: str                         # the policy's metric label


class Tally:
    """Hot-path counts added to their Prometheus children every `FLUSH_SECONDS`, and before
    this process renders or sums its metrics (`metrics.flush_pending`). A hit only appends its
    counters and its duration to two lists (`add`); the counting and the histogram's buckets are
    worked out at the flush, in one tight loop."""

    FLUSH_SECONDS = 0.1

    def __init__(self, histogram) -> None:
        self._hist = histogram
        self._bounds = list(getattr(histogram, "_upper_bounds", ()))
        self.counters: list[tuple] = []       # per hit since the last flush: what it increments
        self.durations: list[float] = []      # and how long it took
        self.scheduled = False
        metrics.flush_before_collect(self)

    def add(self, counters: tuple, seconds: float) -> None:
        self.counters.append(counters)
        self.durations.append(seconds)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self.scheduled = False      # a pending timer finds nothing to add, harmlessly
        hits, self.counters = self.counters, []
        durations, self.durations = self.durations, []
        for counters, n in Counter(hits).items():
            for c in counters:
                c.inc(n)
        if not durations:
            return
        if not self._bounds:
            for d in durations:
                self._hist.observe(d)
            return
        buckets = [0] * len(self._bounds)
        bounds = self._bounds
        for d in durations:
            buckets[bisect.bisect_left(bounds, d)] += 1
        metrics.observe_many(self._hist, buckets, sum(durations))


class Express:
    """The express table of one Runtime (see the module docstring)."""

    def __init__(self, rt, tally: Tally) -> None:
        self.rt = rt
        self.tally = tally
        self.identity = rt.identity
        self.max_header_bytes = rt.max_header_bytes
        self.max_entries = rt.config.server.token_cache_entries
        self.lanes: dict[str, Lane] = {}
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._seen: OrderedDict[int, None] = OrderedDict()     # credentials allowed once, by hash (see learn)
        self.hits = 0
        policies = rt.policies
        self._query = bool(policies.credential_query_params)    # a credential may be in the query
        if rt.config.telemetry.decision_logs:
            return
        for name, policy in policies.policies.items():
            lane = _lane(policy, policies.providers, rt)
            if lane is not None:
                self.lanes[name] = lane
        if policies.default is not None and policies.default in self.lanes:
            self.lanes[""] = self.lanes[policies.default]

    def __len__(self) -> int:
        return len(self._entries)

    def answer(self, request: pb.CheckRequest, size: int, start: float) -> bytes | None:
        """The stored reply for this request, with its Server-Timing, counted; or None (the full
        path decides). `size` is the serialised request's length, a bound on its header bytes;
        `start` the call's perf_counter()."""
        attrs = request.attributes
        lane = self.lanes.get(attrs.context_extensions.get("policy", ""))
        if lane is None:
            return None
        http = attrs.request.http
        key = (lane.name, http.headers.get(lane.header))
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        now = time.time()
        g = entry.granted
        if now >= g.expires_at:
            del entries[key]
            return None
        if size > self.max_header_bytes or (self._query and "?" in http.path):
            return None      # maybe too many header bytes (the full path counts them), or a credential in the query
        identity = self.identity
        keys = identity.keys.get(entry.provider)
        rl = identity.revocations
        version = rl.version if rl is not None else 0
        if keys is not entry.keys or version != entry.revocations:
            if not identity.still_granted(g, entry.provider, entry.policy, now):
                return None
            entry.keys, entry.revocations = keys, version
        entries.move_to_end(key)
        self.hits += 1
        elapsed = time.perf_counter() - start
        self.tally.add(entry.counters, elapsed)
        return entry.reply + timing_bytes(elapsed)

    def learn(self, request: pb.CheckRequest, decision: Decision, now: float, build) -> None:
        """After the full path allowed a request: keep its reply when it qualifies. `build`
        turns the Decision into the serialised reply the full path sends (without Server-Timing)."""
        if decision.reason is not Reason.OK or decision.would_deny or decision.remove_query:
            return
        attrs = request.attributes
        lane = self.lanes.get(attrs.context_extensions.get("policy", ""))
        if lane is None or decision.policy != lane.policy.name:
            return
        raw = attrs.request.http.headers.get(lane.header)
        if raw is None:
            return
        # a credential is kept from its second allowed request on: a token seen once (a fresh
        # token per request) costs no reply bytes here, only an int in a bounded set
        seen = hash((lane.name, raw))
        if seen not in self._seen:
            self._seen[seen] = None
            if len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)      # O(1): no scan past deleted slots
            return
        del self._seen[seen]
        plan = self.rt.policies.providers[lane.provider]
        token = extract_header(raw, plan.sources[0])
        if token is None:
            return
        g = self.rt.identity.decisions.peek(lane.policy.name, token)
        if g is None or g.principal is not decision.principal or g.principal.provider not in lane.providers:
            return
        if g.headers != decision.headers or g.remove != decision.remove_headers or g.metadata is not decision.metadata:
            return
        if now >= g.expires_at:
            return
        reply = build(decision)
        counters = (metrics.child(metrics.DECISIONS, "authz", lane.label, "allow", Reason.OK.value),
                    metrics.child(metrics.AUTH_DECISIONS, lane.label, "allow"),
                    metrics.child(metrics.AUTH_CACHE, "hit"))
        key = (lane.policy.name, raw)
        self._entries[key] = Entry(g, lane.policy, g.principal.provider, reply, counters)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _lane(policy: CompiledPolicy, plans, rt) -> Lane | None:
    if (policy.public or policy.ip is not None or policy.rules is not None or policy.all_of
            or policy.revoke_presented or not policy.any_of):
        return None
    provider = policy.any_of[0]
    plan = plans.get(provider)
    if plan is None or len(plan.sources) != 1 or plan.sources[0].kind != "header":
        return None
    if any(plans.get(p) is None or plans[p].sources != plan.sources for p in policy.any_of[1:]):
        return None      # the providers read different places: the header alone is not the credential
    limiter = rt.ratelimiter
    if limiter is not None and any((not r.policies or policy.name in r.policies) and not r.api_key_tiers
                                   for r in limiter.rules):
        return None      # a rule may count this request (rules by API-key tier never match a JWT)
    if any(b.wiring == "lean" and policy.name in b.policies for b in rt.config.circuit_breakers.upstreams.values()):
        return None
    return Lane(policy.name, policy, provider, frozenset(policy.any_of), plan.sources[0].name,
                rt.policy_label(policy.name))

