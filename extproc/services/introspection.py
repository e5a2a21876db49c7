"""OAuth 2.0 Token Introspection (RFC 7662) for opaque tokens: ask the authorization server,
remember its answer briefly.

What it decides: whether the server says a token is active, with which claims — or that it
could not be asked. One POST per token per cache lifetime (RFC 7662 §2.1: form-encoded
`token` and `token_type_hint=access_token`, client authentication by HTTP Basic with the
client id and secret form-urlencoded first, RFC 6749 §2.3.1), with `timeout_ms` for the
whole exchange.

* `active: true` -> `reason=OK` and the response members as claims. Cached until
  min(now + cache_ttl_seconds, exp): never past the token's own expiry (§4 lets a client cache
  "with the understanding that the token may be revoked"; the bound is what keeps a
  revocation at the server effective). An active answer whose `exp` has already passed is
  treated as inactive.
* `active: false` -> `INTROSPECTION_INACTIVE`, cached for `negative_cache_seconds` so a
  replayed dead token does not become one request per call.
* Anything else -> `INTROSPECTION_UNAVAILABLE`, never cached: connection refused, timeout,
  a non-200 status (a 401 means our client credentials are wrong), a body that is not a JSON
  object with a boolean `active`, a non-numeric `exp`, more than 64 KiB.
* The cache is a bounded LRU (`max_entries`) keyed by the SHA-256 of the token, so the
  token itself is neither kept as a key nor ever logged. Concurrent lookups of one token
  share one request (single-flight); a caller that gives up does not cancel it for the others.
* The endpoint's health is logged on change only ("unavailable" once, "reachable" once).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus

import aiohttp

from ..config import Introspection
from ..core.reasons import Reason

log = logging.getLogger("extproc.introspection")

MAX_RESPONSE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class IntrospectionResult:
    active: bool
    claims: dict[str, Any] = field(default_factory=dict)
    reason: Reason = Reason.OK


UNAVAILABLE = IntrospectionResult(False, {}, Reason.INTROSPECTION_UNAVAILABLE)
INACTIVE = IntrospectionResult(False, {}, Reason.INTROSPECTION_INACTIVE)


class _Unavailable(Exception):
    """Why the server could not be asked (a short text for the state-change log line)."""


def basic_auth(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded, then RFC 7617 Basic."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


class Introspector:
    """One provider's introspection client and cache; see the module docstring."""

    def __init__(self, cfg: Introspection, secret: str | None,
                 session_factory: Callable[[], aiohttp.ClientSession] = aiohttp.ClientSession,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self._auth = basic_auth(cfg.client_id, secret or "") if cfg.client_id is not None else None
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._timeout = cfg.timeout_ms / 1000
        self._cache: OrderedDict[bytes, tuple[IntrospectionResult, float]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[IntrospectionResult]] = {}
        self._failing: bool | None = None     # None: never asked yet
        self.requests = 0                     # HTTP requests sent (for tests and metrics)

    async def introspect(self, token: str, now_epoch: float) -> IntrospectionResult:
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None:
            result, until = cached
            exp = result.claims.get("exp")
            if self._clock() < until and not (result.active and exp is not None and exp <= now_epoch):
                self._cache.move_to_end(key)
                return result
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._lookup(key, token, now_epoch), name="introspection")
            self._inflight[key] = task
            task.add_done_callback(lambda _t, key=key: self._inflight.pop(key, None))
        # shielded: one caller's cancellation (its Envoy deadline) must not fail the others
        return await asyncio.shield(task)

    async def _lookup(self, key: bytes, token: str, now_epoch: float) -> IntrospectionResult:
        try:
            doc = await self._ask(token)
            result, ttl = self._judge(doc, now_epoch)
        except _Unavailable as exc:
            self._health(False, str(exc))
            return UNAVAILABLE
        self._health(True, "")
        if ttl > 0:
            self._cache[key] = (result, self._clock() + ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cfg.max_entries:
                self._cache.popitem(last=False)
        return result

    async def _ask(self, token: str) -> dict[str, Any]:
        if self._session is None or self._session.closed:
            self._session = self._session_factory()
        headers = {"Accept": "application/json"}
        if self._auth is not None:
            headers["Authorization"] = self._auth
        form = {"token": token, "token_type_hint": "access_token"}
        self.requests += 1
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.post(self.cfg.endpoint, data=form, headers=headers,
                                              allow_redirects=False,
                                              timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                    if resp.status != 200:
                        raise _Unavailable(f"HTTP {resp.status}")
                    body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
        except TimeoutError:   # before OSError, its base class; aiohttp's timeouts are TimeoutErrors too
            raise _Unavailable(f"no answer within {self.cfg.timeout_ms} ms") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Unavailable(f"{type(exc).__name__}: {exc}") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise _Unavailable("response larger than 64 KiB")
        try:
            doc = json.loads(body)
        except ValueError:
            raise _Unavailable("response is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("active"), bool):
            raise _Unavailable("response is not a JSON object with a boolean 'active' (RFC 7662 §2.2)")
        return doc

    def _judge(self, doc: dict[str, Any], now_epoch: float) -> tuple[IntrospectionResult, float]:
        """The result and how long to cache it (<= 0: not at all)."""
        if not doc["active"]:
            return INACTIVE, self.cfg.negative_cache_seconds
        exp = doc.get("exp")
        if exp is None:
            return IntrospectionResult(True, doc, Reason.OK), self.cfg.cache_ttl_seconds
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
            raise _Unavailable("'exp' is not a number (RFC 7662 §2.2)")
        if exp <= now_epoch:
            return INACTIVE, min(self.cfg.negative_cache_seconds, self.cfg.cache_ttl_seconds)
        return IntrospectionResult(True, doc, Reason.OK), min(self.cfg.cache_ttl_seconds, exp - now_epoch)

    def _health(self, ok: bool, error: str) -> None:
        failing = not ok
        if failing == self._failing:
            return
        if failing:
            log.error("introspection endpoint unavailable: tokens it must judge are refused",
                      extra={"endpoint": self.cfg.endpoint, "error": error})
        elif self._failing is not None:
            log.info("introspection endpoint reachable again", extra={"endpoint": self.cfg.endpoint})
        self._failing = failing

    def __len__(self) -> int:
        return len(self._cache)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
