"""Every Prometheus metric extproc exports, in one place.

Labels are bounded by configuration (service, policy, rule, result, reason, provider), never by
caller: no user, key, IP or raw path. Per-request metrics are counters and histograms; state
changes set gauges. With several workers, prometheus-client's multiprocess mode is used
(PROMETHEUS_MULTIPROC_DIR set by the supervisor before workers import this module), and the
supervisor's /metrics aggregates them.
"""

from __future__ import annotations

import functools
import os
import weakref

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

DECISIONS = Counter(
    "extproc_decisions_total", "Decisions taken, by service, policy, result and reason.",
    ["service", "policy", "result", "reason"])
DECISION_SECONDS = Histogram(
    "extproc_decision_duration_seconds", "Time the sidecar spent deciding one call or stream phase.",
    ["service"], buckets=_LATENCY_BUCKETS)
STREAMS = Counter(
    "extproc_streams_total", "ext_proc streams by how they ended.", ["policy", "end"])
STORE_UP = Gauge(
    "extproc_store_up", "1 when the store answered its last health probe.", ["store"],
    multiprocess_mode="livemin")
STORE_ERRORS = Counter(
    "extproc_store_errors_total", "Store calls that failed, by kind.", ["store", "kind"])
JWKS_KEYS = Gauge(
    "extproc_jwks_keys", "Signing keys currently loaded per provider (0: keys unavailable).", ["provider"],
    multiprocess_mode="livemin")
JWKS_FETCHES = Counter(
    "extproc_jwks_fetches_total", "JWKS fetches by provider and result.", ["provider", "result"])
JWKS_STALE = Gauge(
    "extproc_jwks_stale", "1 when the last JWKS refresh failed and older keys are in use.", ["provider"],
    multiprocess_mode="livemax")
CONFIG_RELOADS = Counter(
    "extproc_config_reloads_total", "Config reload attempts by result.", ["result"])
CONFIG_LOADED_AT = Gauge(
    "extproc_config_loaded_timestamp_seconds", "When the config in force was loaded.",
    multiprocess_mode="livemax")
JWT_OK = Counter(
    "gateway_jwt_validation_success_total", "Credentials verified (JWT or introspection), by provider.",
    ["provider"])
JWT_ERRORS = Counter(
    "gateway_jwt_validation_errors_total", "Credentials rejected, by provider and reason.", ["provider", "reason"])
AUTH_DECISIONS = Counter(
    "gateway_auth_decisions_total", "Authentication/authorization outcomes by policy.", ["policy", "result"])
AUTH_CACHE = Counter(
    "extproc_auth_cache_total", "Decision-cache lookups for presented credentials (hit: no signature check).",
    ["result"])
REVOCATIONS = Counter(
    "extproc_revocations_total", "Revocations recorded through this replica, by kind.", ["kind"])
REVOCATION_COMPLETE = Gauge(
    "extproc_revocation_list_complete", "1 while this replica's copy of the revocation list is believed complete.",
    multiprocess_mode="livemin")
RATELIMIT_DECISIONS = Counter(
    "gateway_ratelimit_decisions_total", "Rate-limit outcomes per rule (ok, near_limit, over_limit, over_limit_cached, "
    "shadow_ok, shadow_over_limit, local_fallback, fail_open, store_unavailable).", ["rule", "result"])
RATELIMIT_BATCH_DECISIONS = Counter(
    "gateway_ratelimit_batch_decisions_total", "Checks of batched rate-limit rules (sync mode batched) by where "
    "they were decided: local (admitted, no store call), over (rejected locally: this replica's unsynced units "
    "spent what was left), cached (rejected: the store said so until its Retry-After), store (unknown, stale, "
    "new-window or exhausted key: a per-request store call).", ["rule", "path"])
RATELIMIT_BATCH_FLUSHES = Counter(
    "gateway_ratelimit_batch_flushes_total", "Syncs of batched rate-limit counters with the store, by result: ok, "
    "saturated (some key's pending units refused: what remained was charged), error (units kept for the next "
    "interval).", ["result"])
RATELIMIT_BATCH_UNITS = Counter(
    "gateway_ratelimit_batch_units_total", "Units admitted locally by batched rate-limit rules, by what the store "
    "made of them: charged; refused (admitted past the limit: the over-admission); dropped (their window was "
    "over, or past the limit while the store was down).", ["rule", "result"])
RATELIMIT_BATCH_KEYS = Gauge(
    "gateway_ratelimit_batch_keys", "Counter keys batched rate-limit rules hold locally (bounded).",
    multiprocess_mode="livesum")
RATELIMIT_BATCH_PENDING = Gauge(
    "gateway_ratelimit_batch_pending_units", "Units batched rate-limit rules admitted locally and have not charged "
    "to the store yet (grows while the store is down; bounded by each rule's limit per key).",
    multiprocess_mode="livesum")
STORE_SECONDS = Histogram(
    "extproc_store_duration_seconds", "Store round trips on the request path, by operation.", ["op"],
    buckets=_LATENCY_BUCKETS)
CONCURRENT_REQUESTS = Gauge(
    "gateway_concurrent_requests", "ext_proc streams holding a concurrency permit (in-flight requests), by route "
    "(the policy name the route gives ext_proc).", ["route"], multiprocess_mode="livesum")
CONCURRENCY_LIMIT_REACHED = Counter(
    "gateway_concurrency_limit_reached_total", "Requests that found their in-flight cap full (rejected, queued, "
    "or let through in shadow mode), by route.", ["route"])
RLS_DECISIONS = Counter(
    "extproc_rls_decisions_total",
    "RateLimitService (ShouldRateLimit) descriptor outcomes, by domain, configured descriptor and result.",
    ["domain", "descriptor", "result"])
CACHE_HITS = Counter(
    "gateway_cache_hits_total", "Requests answered from the response cache (fresh, collapsed, revalidated or "
    "stale), by cache rule.", ["route"])
CACHE_MISSES = Counter(
    "gateway_cache_misses_total", "Cacheable requests sent upstream (no usable entry), by cache rule.", ["route"])
CACHE_BYPASS = Counter(
    "gateway_cache_bypass_total", "Requests or responses on a cached route that the cache stepped aside for, "
    "by cache rule and reason (method, range, no_store, private, set_cookie, authenticated, too_large, ...).",
    ["route", "reason"])
CACHE_STALE = Counter(
    "gateway_cache_stale_total", "Stale entries served (stale-while-revalidate, stale-if-error).", ["route"])
CACHE_REVALIDATED = Counter(
    "gateway_cache_revalidated_total", "Stale entries refreshed by a 304 from the upstream.", ["route"])
CACHE_COLLAPSED = Counter(
    "gateway_cache_collapsed_total", "Concurrent misses answered by the one request that went upstream.", ["route"])
CACHE_SHADOW_HITS = Counter(
    "gateway_cache_shadow_hits_total", "Would-be hits on rules in shadow mode (counted, not served).", ["route"])
CACHE_STORES = Counter(
    "gateway_cache_stores_total", "Responses stored, by cache rule.", ["route"])
CACHE_ENTRIES = Gauge(
    "gateway_cache_entries", "Entries held by a cache tier (memory: this process's LRU).", ["tier"],
    multiprocess_mode="livesum")
CACHE_BYTES = Gauge(
    "gateway_cache_stored_bytes", "Bytes held by a cache tier (memory: this process's LRU, within "
    "cache.memory_max_bytes).", ["tier"], multiprocess_mode="livesum")
CACHE_WRITTEN_BYTES = Counter(
    "gateway_cache_written_bytes_total", "Encoded entry bytes written, by tier (store: the shared Redis tier).",
    ["tier"])
CACHE_ERRORS = Counter(
    "gateway_cache_errors_total", "Cache failures that made it step aside (store_timeout, store_error, "
    "store_write, bad_entry, purge_share, write_queue_full).", ["kind"])
CACHE_INVALIDATIONS = Counter(
    "gateway_cache_invalidations_total", "Purge records made through this replica (writes and admin purges).",
    ["origin"])
CACHE_INVALIDATION_LAG = Histogram(
    "gateway_cache_invalidation_lag_seconds", "From a purge on any replica to this replica applying it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0))
BREAKER_STATE = Gauge(
    "gateway_circuit_breaker_state", "Circuit breaker state per upstream as this replica knows it (0 closed, "
    "1 open, 2 half-open).", ["upstream"], multiprocess_mode="livemax")
BREAKER_FAILURES = Counter(
    "gateway_circuit_breaker_failures_total", "Responses counted as failures (status or slow call), per upstream.",
    ["upstream"])
BREAKER_REJECTED = Counter(
    "gateway_circuit_breaker_rejected_total", "Requests answered at once because the breaker was open (or "
    "half-open with every probe slot taken), per upstream.", ["upstream"])
BREAKER_SHADOW_REJECTED = Counter(
    "gateway_circuit_breaker_shadow_rejected_total", "Would-be rejections of breakers in shadow mode.",
    ["upstream"])
BREAKER_TRANSITIONS = Counter(
    "gateway_circuit_breaker_transitions_total", "State changes, counted by the replica that made them.",
    ["upstream", "from", "to"])
REQUESTS = Counter(
    "gateway_requests_total", "Requests Envoy finished, from its access-log stream: by route (the policy "
    "ext_authz decided with, `none` without ext_authz), method and status.", ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "gateway_request_duration_seconds", "Whole-request duration as Envoy logged it, by route.", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
ACCESS_LOG_ENTRIES = Counter(
    "extproc_access_log_entries_total", "Access-log entries received from Envoy's gRPC access logger.")
LOOP_LAG = Histogram(
    "extproc_event_loop_lag_seconds", "How late the event loop ran a 250 ms timer (sampled 4× a second): "
    "time every request on this process waited for the loop.", buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01,
                                                                          0.025, 0.05, 0.1, 0.25, 1.0))
IN_FLIGHT = Gauge(
    "extproc_in_flight_calls", "ext_authz calls and ext_proc streams being served (sampled 4× a second).",
    ["service"], multiprocess_mode="livesum")
READY = Gauge(
    "extproc_ready", "1 while serving (config loaded, not draining).", multiprocess_mode="livemin")


def observe_many(histogram, buckets: list[int], total: float) -> None:
    """Add counted observations to a histogram child: `buckets[i]` observations fell in its i-th
    bucket (the first upper bound >= the value), summing to `total`. What `observe()` does per
    value, once per batch (tests/unit/test_observability.py holds it to `observe()`)."""
    histogram._sum.inc(total)
    for i, n in enumerate(buckets):
        if n:
            histogram._buckets[i].inc(n)


@functools.lru_cache(maxsize=8192)
def child(metric, *labels: str):
    """A labelled child, cached: `labels()` costs microseconds, this lookup does not.
    Bounded because label values are bounded by configuration."""
    return metric.labels(*labels)


def _registry():
    if MULTIPROC:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


_TALLIES: weakref.WeakSet = weakref.WeakSet()


def flush_before_collect(tally) -> None:
    """`tally.flush()` adds counts kept off the hot path (services/express.py); it runs before
    this process renders or sums its metrics."""
    _TALLIES.add(tally)


def flush_pending() -> None:
    for tally in list(_TALLIES):
        tally.flush()


def render() -> bytes:
    """The exposition text; aggregated over workers in multiprocess mode."""
    flush_pending()
    return generate_latest(_registry())


def sums(*names: str, by: str | None = None) -> dict[str, float] | dict[str, dict[str, float]]:
    """Current values of the named samples (a counter's `_total`, a gauge's name) summed over labels
    and workers; with `by`, broken down by that label as well."""
    flush_pending()
    wanted = set(names)
    flat: dict[str, float] = dict.fromkeys(names, 0.0)
    split: dict[str, dict[str, float]] = {n: {} for n in names}
    for family in _registry().collect():
        for sample in family.samples:
            if sample.name in wanted:
                flat[sample.name] += sample.value
                if by is not None:
                    label = sample.labels.get(by, "")
                    split[sample.name][label] = split[sample.name].get(label, 0.0) + sample.value
    return split if by is not None else flat


def mark_process_dead(pid: int) -> None:
    if MULTIPROC:
        _mp.mark_process_dead(pid)
