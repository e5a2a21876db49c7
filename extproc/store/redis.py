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
import math
import random
import weakref
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from extproc.store.base import (
    StoreError,
    WindowResult,
    as_bytes,
    check_bound,
    check_member,
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
                 pubsub_ping_seconds: float = 5.0):
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
        try:
            await self._client.aclose()
        except _DRIVER_ERRORS:
            pass  # closing: the connections are going away either way
