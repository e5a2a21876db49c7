"""The shared store on Redis or Redis Cluster, with driver errors stopped at the boundary.

Decides how the sidecar talks to Redis:

* One client per process, built without I/O (connections open lazily) so the sidecar starts
  and serves its fallbacks while Redis is down; `ping()` reports health.
* Standalone uses a *blocking* pool: past `max_connections` in-flight calls a request waits
  up to `timeout_ms` for a free connection rather than failing at once. Cluster nodes keep
  their own pools (redis-py raises at the per-node limit; that becomes a transient error).
* No driver retries (`Retry(NoBackoff(), 0)`): a retried script could charge a counter
  twice, and the caller's budget (Envoy's ext_authz / ext_proc timeout) is tighter than any
  useful backoff. A failed call is a StoreError now; the policy's failure mode decides.
  Cluster MOVED/ASK redirects are still followed (they are not failures).
* Reads and writes time out after `timeout_ms` (socket timeout), connects after
  `connect_timeout_ms`.
* Multi-step operations are Lua scripts from `lua/*.lua`, read once, run by EVALSHA through
  redis-py's `register_script` (which reloads them after NOSCRIPT, e.g. a Redis restart).
  Their keys share a hash tag (see `keys.py`), so they run unchanged on Cluster.
* Rate limits (`rate_limit`) run `lua/ratelimit.lua` by EVALSHA, one call per Cluster slot
  a request's rules span (one call for all of them on standalone Redis). The script's SHA is
  computed once; after NOSCRIPT (a restart or failover emptied the script cache) it is loaded
  and the refused calls are sent again (a refused call ran nothing, so this cannot double
  charge). `rate_usage` runs the same script in its "peek" mode, which writes nothing.
* Auto-batching: the client CPU of one EVALSHA is most of a rate-limited request's cost
  (redis-py spends ~120-160 us per call at 32 concurrent callers, about half of that when the
  calls are pipelined; see ../shared/ENVOY-NOTES.md and scripts/bench_store.py). So a
  rate-limit call made while another is outstanding is queued, and the calls queued in one
  event-loop tick go out together as one non-transactional pipeline (on Cluster one pipeline
  per node, in parallel, so a dead master fails only its own slots' calls). A call made when
  none is outstanding goes straight out: an idle sidecar pays no extra task or tick. Each
  queued call still gets its own result or error; a failed pipeline fails its calls with the
  same StoreError. `autobatch=False` sends every call on its own (for the bench).
* Cluster routing needs the slot map: redis-py 8 sends a keyed command issued before the
  client knows its default node (first use, or after it dropped its topology on
  CLUSTERDOWN) to a random node, and a burst of such commands turns into a MOVED storm
  that makes it close every connection in flight. `_discover()` loads the topology once,
  under a lock, before any command needs it; when that fails, the calls queued behind it
  fail with the same error instead of each waiting for its own connect timeout.
* Every exception of the driver (redis errors, cluster errors, OSError, timeouts) becomes
  `StoreError`; `_classify` says which ones are transient and which are timeouts.
* Scored sets are sorted sets; `zrange_from` reads them with ZSCAN pages (each one short
  enough for the socket timeout, and members present throughout are never skipped, unlike
  LIMIT offsets while members are removed) and sorts client-side.
* Pub/sub: PUBLISH goes through the normal client. Each subscription is its own connection
  (not from the pool: it is held for as long as the subscriber listens), to the server or,
  on Cluster, to a random node: classic PUBLISH is broadcast over the cluster bus, so every
  node delivers every channel. redis-py's PubSub reconnects and resubscribes silently, which
  would hide lost messages; `RedisSubscription` instead raises StoreError once and ends
  (see `Subscription` in base.py). A silent partition (no RST, no FIN) is caught by a PING
  sent after `pubsub_ping_seconds` without traffic, which must be answered within
  `max(1 s, timeout)`. Its handshake waits up to max(timeout, connect timeout): it is off the
  request path. `close()` closes the subscriptions still open.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import random
import weakref
from collections.abc import Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.maint_notifications import MaintNotificationsConfig

from extproc.core import breaker, ratelimit
from extproc.store.base import (
    RateCheck,
    RateResult,
    StoreError,
    WindowResult,
    as_bytes,
    check_bound,
    check_member,
    check_rate_checks,
    check_score,
    check_ttl,
    check_window,
)

# Exceptions the driver may raise; anything else is a bug and propagates unchanged.
_DRIVER_ERRORS = (rex.RedisError, rex.RedisClusterException, OSError)

# Not worth retrying: wrong credentials or ACLs, a bad value type, a script or usage error.
_PERMANENT = (
    rex.AuthenticationError,
    rex.AuthorizationError,
    rex.AuthenticationWrongNumberOfArgsError,
    rex.NoPermissionError,
    rex.DataError,
    rex.ClusterCrossSlotError,
)
# Response errors that mean "the server cannot serve right now", not "your command is wrong".
_TRANSIENT_RESPONSES = (
    rex.ClusterError,  # includes ClusterDownError, MasterDownError
    rex.TryAgainError,
    rex.AskError,      # includes MovedError, when redirects ran out during resharding
    rex.ReadOnlyError,  # a failover demoted the node we talk to
    rex.OutOfMemoryError,
    rex.BusyLoadingError,
)


def _classify(exc: BaseException) -> tuple[bool, bool]:
    """(transient, timeout) for a driver exception.

    The cluster client wraps the real failure (`RedisClusterException(...) from cause`), so
    the whole `__cause__` chain is read: a timeout anywhere makes it a timeout, a permanent
    cause anywhere makes it permanent.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__
    if any(isinstance(e, rex.TimeoutError | TimeoutError) for e in chain):
        return True, True
    for e in chain:
        if isinstance(e, _PERMANENT) or (
                isinstance(e, rex.RedisClusterException) and "cluster mode is not enabled" in str(e).lower()):
            return False, False
    if isinstance(exc, _TRANSIENT_RESPONSES):
        return True, False
    if isinstance(exc, rex.ResponseError):
        # BUSY: a script is running too long on the server; it will end or be killed.
        return str(exc).startswith("BUSY"), False
    return True, False  # connection loss, refused, protocol confusion, no reachable node


@functools.cache
def _script_text(name: str) -> str:
    return resources.files("extproc.store").joinpath("lua", name).read_text(encoding="utf-8")


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _bound(score: float) -> str:
    if math.isinf(score):
        return "+inf" if score > 0 else "-inf"
    return repr(score)


_ZSCAN_PAGE = 1000

_RATELIMIT_LUA = "ratelimit.lua"
_PER_RULE = 6      # values per rule in the script's reply (after `now` and `admitted`)


def _script_sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _rate_args(mode: str, now: str, checks: Sequence[RateCheck], windows: Sequence[int] | None = None) -> list:
    args: list[Any] = [mode, now]
    for i, check in enumerate(checks):
        args.extend(check.limit.script_args(check.units))
        args.append(0 if windows is None else windows[i])
    return args


def _outcomes(checks: Sequence[RateCheck], reply: list) -> tuple[bool, list[ratelimit.Outcome], list[int]]:
    """(admitted, outcomes, charged window ids) from a "charge" reply."""
    outcomes, windows = [], []
    for i, check in enumerate(checks):
        allowed, remaining, reset, retry, window_ms, wid = reply[2 + i * _PER_RULE: 2 + (i + 1) * _PER_RULE]
        outcomes.append(ratelimit.Outcome(check.limit.name, allowed == 1, check.limit.limit, remaining, reset,
                                          retry, window_ms))
        windows.append(wid)
    return reply[1] == 1, outcomes, windows


class RedisSubscription:
    """One channel on its own connection; see `Subscription` in base.py for the contract."""

    def __init__(self, store: RedisStore, channel: str, conn: AbstractConnection, ping_seconds: float,
                 pong_timeout: float):
        self.channel = channel
        self._store = store
        self._conn = conn
        self._ping_seconds = ping_seconds
        self._pong_timeout = pong_timeout
        self._pong_due: float | None = None
        self._closed = False

    def __aiter__(self) -> RedisSubscription:
        return self

    async def __anext__(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise StopAsyncIteration
            try:
                if self._pong_due is None:
                    wait = self._ping_seconds
                else:
                    wait = self._pong_due - loop.time()
                    if wait <= 0:
                        raise StoreError(f"{self._store.name} subscription to {self.channel!r}: no answer to "
                                         f"PING within {self._pong_timeout:g}s; messages may have been lost",
                                         transient=True, timeout=True)
                # an explicit timeout makes an idle read return None instead of raising
                reply = await self._conn.read_response(timeout=wait, push_request=True)
                if reply is None:
                    if self._pong_due is None:
                        await self._conn.send_command("PING", check_health=False)
                        self._pong_due = loop.time() + self._pong_timeout
                    continue
            except StoreError:
                await self._shutdown()
                raise
            except Exception as exc:  # noqa: BLE001 - after close() the reader sees whatever the socket did
                if self._closed:
                    raise StopAsyncIteration from None
                if not isinstance(exc, _DRIVER_ERRORS):
                    raise
                await self._shutdown()
                raise self._store._error(f"subscription to {self.channel!r} lost (messages may have been "
                                         "lost)", exc) from exc
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind == b"message" and len(reply) == 3:
                    return reply[2]
                if kind == b"pong":   # RESP2 answers PING in subscribed mode as a message
                    self._pong_due = None
            elif reply == b"PONG":    # RESP3 (redis-py's default) answers it plainly
                self._pong_due = None
            # anything else (a late subscribe confirmation) carries no message

    async def _shutdown(self) -> None:
        self._closed = True
        self._store._subscriptions.discard(self)
        try:
            await self._conn.disconnect(nowait=True)
        except _DRIVER_ERRORS:
            pass

    async def close(self) -> None:
        if not self._closed:
            await self._shutdown()


class RedisStore:
    """Store on Redis (`cluster=False`) or Redis Cluster (`cluster=True`, url = a startup node)."""

    def __init__(self, url: str, *, cluster: bool = False, password: str | None = None,
                 timeout_ms: int = 50, connect_timeout_ms: int = 500, max_connections: int = 64,
                 pubsub_ping_seconds: float = 5.0, autobatch: bool = True):
        if timeout_ms < 1 or connect_timeout_ms < 1 or max_connections < 1:
            raise ValueError("timeout_ms, connect_timeout_ms and max_connections must be >= 1")
        if not pubsub_ping_seconds > 0:
            raise ValueError("pubsub_ping_seconds must be > 0")
        self.name = "redis-cluster" if cluster else "redis"
        self._cluster = cluster
        self._pubsub_ping_seconds = pubsub_ping_seconds
        self._pong_timeout = max(1.0, timeout_ms / 1000)
        # a subscription's handshake is off the request path: a loaded Redis that answers in
        # 80 ms must not cost every replica its subscription (and a resync) each time
        self._subscription_timeout = max(timeout_ms, connect_timeout_ms) / 1000
        self._subscriptions: weakref.WeakSet[RedisSubscription] = weakref.WeakSet()
        self._discovery = asyncio.Lock()  # binds to a loop only when first contended
        self._discovery_failures = 0
        self._discovery_error: StoreError | None = None
        self.url = _redact(url)
        options: dict = {
            "socket_timeout": timeout_ms / 1000,
            "socket_connect_timeout": connect_timeout_ms / 1000,
            "retry": Retry(NoBackoff(), 0),
            # Redis Enterprise maintenance push messages: on OSS Redis the handshake is only
            # one more round trip per new connection (and a debug log line).
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        if password is not None:
            options["password"] = password
        self._client: Redis | RedisCluster
        if cluster:
            self._client = RedisCluster.from_url(url, max_connections=max_connections, **options)
        else:
            pool = BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                   timeout=timeout_ms / 1000, **options)
            self._client = Redis.from_pool(pool)
        self._fixed_window = self._client.register_script(_script_text("fixed_window.lua"))
        self._incr_ttl = self._client.register_script(_script_text("incr_ttl.lua"))
        self._breaker = self._client.register_script(_script_text("breaker.lua"))
        self._ratelimit_text = _script_text(_RATELIMIT_LUA)
        self._ratelimit_sha = _script_sha(self._ratelimit_text)
        self._autobatch = autobatch
        self._outstanding = 0            # rate-limit script calls sent or queued, not yet answered
        self._queue: list[tuple[list[str], list, asyncio.Future]] = []
        self._batches: set[asyncio.Task] = set()
        # counters for metrics: refunds that failed (their cost stays counted until the window
        # or bucket resets), rate-limit calls sent in a pipeline, and those pipelines
        self.refund_failures = 0
        self.batched_calls = 0
        self.pipelines = 0

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, name={self.name!r})"

    def _error(self, op: str, exc: BaseException) -> StoreError:
        transient, timeout = _classify(exc)
        detail = str(exc) or type(exc).__name__
        return StoreError(f"{self.name} {op}: {type(exc).__name__}: {detail}", transient=transient,
                          timeout=timeout)

    def _undiscovered(self) -> bool:
        return self._cluster and self._client.get_default_node() is None  # type: ignore[union-attr]

    async def _discover(self) -> None:
        failures_before = self._discovery_failures
        async with self._discovery:
            if not self._undiscovered():
                return
            if self._discovery_failures != failures_before and self._discovery_error is not None:
                # The attempt this call queued behind has just failed: share its answer
                # rather than queue one more connect timeout per waiting request.
                last = self._discovery_error
                raise StoreError(last.message, transient=last.transient, timeout=last.timeout)
            try:
                await self._client.initialize()  # type: ignore[union-attr]
            except _DRIVER_ERRORS as exc:
                self._discovery_failures += 1
                self._discovery_error = self._error("cluster discovery", exc)
                raise

    async def get(self, key: str) -> bytes | None:
        try:
            if self._undiscovered():
                await self._discover()
            return await self._client.get(key)
        except _DRIVER_ERRORS as exc:
            raise self._error("get", exc) from exc

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        check_ttl(ttl_ms)
        value = as_bytes(value)
        try:
            if self._undiscovered():
                await self._discover()
            await self._client.set(key, value, px=ttl_ms)
        except _DRIVER_ERRORS as exc:
            raise self._error("set", exc) from exc

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        try:
            if self._undiscovered():
                await self._discover()
            return int(await self._client.delete(*keys))
        except _DRIVER_ERRORS as exc:
            raise self._error("delete", exc) from exc

    async def incr(self, key: str, amount: int = 1, ttl_ms: int | None = None) -> int:
        check_ttl(ttl_ms)
        try:
            if self._undiscovered():
                await self._discover()
            if ttl_ms is None:
                return int(await self._client.incrby(key, amount))
            return int(await self._incr_ttl(keys=[key], args=[amount, ttl_ms]))
        except _DRIVER_ERRORS as exc:
            raise self._error("incr", exc) from exc

    async def fixed_window_hit(self, key: str, limit: int, window_ms: int, cost: int = 1) -> WindowResult:
        check_window(limit, window_ms, cost)
        try:
            if self._undiscovered():
                await self._discover()
            allowed, count, reset_ms = await self._fixed_window(keys=[key], args=[limit, window_ms, cost])
        except _DRIVER_ERRORS as exc:
            raise self._error("fixed_window_hit", exc) from exc
        return WindowResult(allowed == 1, count, max(0, limit - count), reset_ms)

    async def breaker(self, key: str, op: str, params: breaker.Params, now_ms: int, ttl_ms: int) -> breaker.Result:
        if op not in breaker.OPS:
            raise ValueError(f"unknown breaker op {op!r}")
        check_ttl(ttl_ms)
        try:
            if self._undiscovered():
                await self._discover()
            raw = await self._breaker(keys=[key], args=[op, int(now_ms), *params.args(), int(ttl_ms)])
        except _DRIVER_ERRORS as exc:
            raise self._error("breaker", exc) from exc
        return breaker.Result.from_list(raw)

    async def rate_limit(self, checks: Sequence[RateCheck], now_ms: int | None = None) -> list[RateResult]:
        if not await self._rate_ready("rate_limit", checks, now_ms):
            return []
        now = "" if now_ms is None else str(now_ms)
        groups = self._slot_groups(checks)
        if len(groups) == 1:
            reply = await self._ratelimit_call(checks, _rate_args("charge", now, checks))
            admitted, outcomes, _ = _outcomes(checks, reply)
            return [RateResult(o, admitted) for o in outcomes]
        return await self._rate_limit_across_slots(checks, groups, now)

    async def rate_usage(self, checks: Sequence[RateCheck], now_ms: int | None = None) -> list[ratelimit.Outcome]:
        # the same script in "peek" mode, one call per slot (queued and pipelined like any
        # rate-limit call); nothing to refund, since nothing is charged
        if not await self._rate_ready("rate_usage", checks, now_ms):
            return []
        now = "" if now_ms is None else str(now_ms)
        groups = self._slot_groups(checks)
        parts = [[checks[i] for i in group] for group in groups]
        replies = await asyncio.gather(*(self._ratelimit_call(part, _rate_args("peek", now, part)) for part in parts),
                                       return_exceptions=True)
        results: list[ratelimit.Outcome | None] = [None] * len(checks)
        for group, part, reply in zip(groups, parts, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            _, outcomes, _ = _outcomes(part, reply)
            for i, outcome in zip(group, outcomes, strict=True):
                results[i] = outcome
        return results  # type: ignore[return-value]

    async def _rate_ready(self, op: str, checks: Sequence[RateCheck], now_ms: int | None) -> bool:
        """Validate a rate-limit call and load the Cluster topology it needs; False: nothing to do."""
        check_rate_checks(checks, now_ms)
        if not checks:
            return False
        if self._undiscovered():
            try:
                await self._discover()
            except _DRIVER_ERRORS as exc:
                raise self._error(op, exc) from exc
        return True

    async def _rate_limit_across_slots(self, checks: Sequence[RateCheck], groups: list[list[int]],
                                       now: str) -> list[RateResult]:
        """Charge each slot's group atomically, all at once; refund the charged groups when
        another group rejected (the only case with a second round trip)."""
        parts = [[checks[i] for i in group] for group in groups]
        replies = await asyncio.gather(*(self._ratelimit_call(part, _rate_args("charge", now, part))
                                         for part in parts), return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                # groups that did charge stay charged: whether the request goes ahead is the
                # calling policy's failure mode, unknown here
                raise reply
        decided = [_outcomes(part, reply) for part, reply in zip(parts, replies, strict=True)]  # type: ignore[arg-type]
        admitted = all(ok for ok, _, _ in decided)
        results: list[RateResult | None] = [None] * len(checks)
        refunds = []
        for group, part, (ok, outcomes, windows) in zip(groups, parts, decided, strict=True):
            if ok and not admitted:
                refunds.append(self._ratelimit_call(part, _rate_args("refund", now, part, windows)))
                outcomes = [ratelimit.refunded(o, c.units) for o, c in zip(outcomes, part, strict=True)]
            for i, outcome in zip(group, outcomes, strict=True):
                results[i] = RateResult(outcome, admitted)
        if refunds:
            for done in await asyncio.gather(*refunds, return_exceptions=True):
                if isinstance(done, StoreError):
                    self.refund_failures += 1
                elif isinstance(done, BaseException):
                    raise done
        return results  # type: ignore[return-value]

    def _slot_groups(self, checks: Sequence[RateCheck]) -> list[list[int]]:
        """Indexes of the checks one script may decide together: all of them on standalone
        Redis, those of one slot on Cluster."""
        if not self._cluster:
            return [list(range(len(checks)))]
        slots: dict[int, list[int]] = {}
        for i, check in enumerate(checks):
            slots.setdefault(key_slot(check.key.encode()), []).append(i)
        return list(slots.values())

    async def _ratelimit_call(self, checks: Sequence[RateCheck], args: list) -> list:
        keys = [check.key for check in checks]
        try:
            if not self._autobatch or self._outstanding == 0:
                self._outstanding += 1
                try:
                    return await self._evalsha(keys, args)
                finally:
                    self._outstanding -= 1
            self._outstanding += 1
            try:
                loop = asyncio.get_running_loop()
                future: asyncio.Future = loop.create_future()
                self._queue.append((keys, args, future))
                if len(self._queue) == 1:
                    loop.call_soon(self._flush)
                return await future
            finally:
                self._outstanding -= 1
        except _DRIVER_ERRORS as exc:
            raise self._error("rate_limit", exc) from exc

    async def _evalsha(self, keys: list[str], args: list) -> list:
        try:
            return await self._client.evalsha(self._ratelimit_sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            await self._client.script_load(self._ratelimit_text)
            return await self._client.evalsha(self._ratelimit_sha, len(keys), *keys, *args)

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if batch:
            self.batched_calls += len(batch)
            self.pipelines += 1
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send_batch(self, batch: list[tuple[list[str], list, asyncio.Future]]) -> None:
        if self._cluster and len(batch) > 1:
            parts = self._by_node(batch)
            if len(parts) > 1:
                await asyncio.gather(*(self._send_part(part) for part in parts))
                return
        await self._send_part(batch)

    def _by_node(self, batch: list[tuple[list[str], list, asyncio.Future]]) -> list[list]:
        """The batch split by the node serving each call's slot: redis-py's cluster pipeline
        fails all of its commands when one node fails, so each node gets its own pipeline
        and a dead master fails only the calls for its slots (a stale slot map only costs
        the MOVED redirects the pipeline follows)."""
        parts: dict[str, list] = {}
        for item in batch:
            try:
                node = self._client.get_node_from_key(item[0][0])  # type: ignore[union-attr]
                name = "" if node is None else node.name
            except _DRIVER_ERRORS:
                name = ""
            parts.setdefault(name, []).append(item)
        return list(parts.values())

    async def _send_part(self, batch: list[tuple[list[str], list, asyncio.Future]]) -> None:
        try:
            replies = await self._pipeline(batch)
            refused = [i for i, reply in enumerate(replies) if isinstance(reply, rex.NoScriptError)]
            if refused:
                await self._client.script_load(self._ratelimit_text)
                for i, reply in zip(refused, await self._pipeline([batch[i] for i in refused]), strict=True):
                    replies[i] = reply
        except _DRIVER_ERRORS as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(self._error("rate_limit", exc))
            return
        except BaseException:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(f"{self.name} rate_limit: pipeline cancelled",
                                                    transient=True))
            raise
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue        # its caller was cancelled; the script ran anyway
            if isinstance(reply, BaseException):
                future.set_exception(self._error("rate_limit", reply))
            else:
                future.set_result(reply)

    async def _pipeline(self, batch: list[tuple[list[str], list, asyncio.Future]]) -> list:
        # EVALSHA queued as a raw command: redis-py's Script objects would add a SCRIPT EXISTS
        # round trip to every pipeline, and its cluster pipeline refuses `.evalsha()` although
        # it routes the raw command by its keys (all of one slot here) like any other
        pipe = self._client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.execute_command("EVALSHA", self._ratelimit_sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def byte_usage(self, match: str, limit: int = 100_000) -> tuple[int, int, bool]:
        keys = size = seen = 0
        batch: list[str] = []

        async def flush() -> tuple[int, int]:
            pipe = self._client.pipeline(transaction=False)
            for k in batch:
                pipe.strlen(k)
            replies = await pipe.execute(raise_on_error=False)
            batch.clear()
            sizes = [r for r in replies if isinstance(r, int) and not isinstance(r, bool)]  # other types: WRONGTYPE
            return len(sizes), sum(sizes)

        try:
            if self._undiscovered():
                await self._discover()
            async for key in self._client.scan_iter(match=match, count=1000):
                if seen >= limit:
                    if batch:
                        n, b = await flush()
                        keys, size = keys + n, size + b
                    return keys, size, True
                seen += 1
                batch.append(key.decode() if isinstance(key, bytes) else key)
                if len(batch) >= 500:
                    n, b = await flush()
                    keys, size = keys + n, size + b
            if batch:
                n, b = await flush()
                keys, size = keys + n, size + b
        except _DRIVER_ERRORS as exc:
            raise self._error("byte_usage", exc) from exc
        return keys, size, False

    async def zadd(self, key: str, member: str, score: float) -> None:
        check_member(member)
        score = check_score(score)
        try:
            if self._undiscovered():
                await self._discover()
            await self._client.zadd(key, {member: score})
        except _DRIVER_ERRORS as exc:
            raise self._error("zadd", exc) from exc

    async def zrange_from(self, key: str, min_score: float) -> list[tuple[str, float]]:
        min_score = check_bound(min_score)
        found: dict[str, float] = {}   # ZSCAN may repeat a member while the set is rehashed
        try:
            if self._undiscovered():
                await self._discover()
            cursor = 0
            while True:
                cursor, page = await self._client.zscan(key, cursor, count=_ZSCAN_PAGE)
                for member, score in page:
                    if score >= min_score:
                        found[member.decode()] = score
                if cursor == 0:
                    break
        except _DRIVER_ERRORS as exc:
            raise self._error("zrange_from", exc) from exc
        return sorted(found.items(), key=lambda ms: (ms[1], ms[0]))

    async def zrem_below(self, key: str, max_score: float) -> int:
        max_score = check_bound(max_score)
        try:
            if self._undiscovered():
                await self._discover()
            return int(await self._client.zremrangebyscore(key, "-inf", _bound(max_score)))
        except _DRIVER_ERRORS as exc:
            raise self._error("zrem_below", exc) from exc

    async def publish(self, channel: str, message: bytes) -> None:
        message = as_bytes(message)
        try:
            if self._undiscovered():
                await self._discover()
            await self._client.publish(channel, message)
        except _DRIVER_ERRORS as exc:
            raise self._error("publish", exc) from exc

    async def subscribe(self, channel: str) -> RedisSubscription:
        conn: AbstractConnection | None = None
        try:
            if self._undiscovered():
                await self._discover()
            conn = self._new_connection()
            await conn.connect()
            await conn.send_command("SUBSCRIBE", channel, check_health=False)
            reply = await conn.read_response(push_request=True)
            if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                raise rex.ResponseError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        except _DRIVER_ERRORS as exc:
            if conn is not None:
                try:
                    await conn.disconnect(nowait=True)
                except _DRIVER_ERRORS:
                    pass
            raise self._error("subscribe", exc) from exc
        sub = RedisSubscription(self, channel, conn, self._pubsub_ping_seconds, self._pong_timeout)
        self._subscriptions.add(sub)
        return sub

    def _new_connection(self) -> AbstractConnection:
        """A connection outside the pools, configured as the pool's (auth, timeouts, TLS)."""
        if self._cluster:
            nodes = self._client.get_nodes()  # type: ignore[union-attr]
            if not nodes:
                raise rex.RedisClusterException("no cluster node known")
            node = random.choice(nodes)
            cls, kwargs = node.connection_class, node.connection_kwargs
        else:
            pool = self._client.connection_pool  # type: ignore[union-attr]
            cls, kwargs = pool.connection_class, pool.connection_kwargs
        return cls(**{**kwargs, "socket_timeout": self._subscription_timeout})

    async def ping(self) -> None:
        try:
            if self._undiscovered():
                await self._discover()
            ok = await self._client.ping()
        except _DRIVER_ERRORS as exc:
            raise self._error("ping", exc) from exc
        if ok is False:
            raise StoreError(f"{self.name} ping: no PONG", transient=True)

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        if self._batches:   # pipelines in flight end within the socket timeout
            await asyncio.gather(*self._batches, return_exceptions=True)
        try:
            await self._client.aclose()
        except _DRIVER_ERRORS:
            pass  # closing: the connections are going away either way
