"""Keeps each provider's signing keys loaded, in the background.

A request never waits on a key fetch: it reads the KeySet in force. Remote JWKS are fetched
with a timeout and refreshed before they go stale (Cache-Control max-age honoured, bounded by
the provider's refresh interval); when a fetch fails the last good keys stay in force and
`extproc_jwks_stale` says so. A provider whose keys were never loaded answers
`keys_unavailable` (401), as Envoy's jwt_authn does. State changes log once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import aiohttp

from ..config import Provider
from ..core.jwt import NO_KEYS, KeySet, ProviderRules
from ..telemetry import metrics

log = logging.getLogger("extproc.jwks")
_MAX_AGE = re.compile(r"max-age=(\d+)")
MAX_JWKS_BYTES = 512 * 1024


def rules_for(name: str, p: Provider) -> ProviderRules:
    return ProviderRules(name=name, issuer=p.issuer, audiences=tuple(p.audiences),
                         algorithms=frozenset(p.algorithms), leeway=p.leeway_seconds,
                         required_claims=tuple(p.required_claims))


class KeySource:
    """One provider's keys: a file read at load, or a URI refreshed by a background task."""

    def __init__(self, name: str, provider: Provider, sink: dict[str, tuple[ProviderRules, KeySet]]):
        # `sink` is the mapping requests read: updated in place, so a request never copies it
        self.name = name
        self.sink = sink
        self.provider = provider
        self.rules = rules_for(name, provider)
        self.keyset: KeySet = NO_KEYS
        sink[name] = (self.rules, NO_KEYS)
        self._task: asyncio.Task[None] | None = None
        self._stale = False
        self._failing = False
        self._session: aiohttp.ClientSession | None = None

    def _install(self, keyset: KeySet, origin: str) -> None:
        first = not self.keyset.loaded
        self.keyset = keyset
        self.sink[self.name] = (self.rules, keyset)
        metrics.JWKS_KEYS.labels(self.name).set(len(keyset.keys))
        if first or self._stale:
            log.info("jwks loaded", extra={"provider": self.name, "keys": len(keyset.keys), "source": origin})
        self._set_stale(False)

    def _set_stale(self, stale: bool) -> None:
        if stale != self._stale:
            self._stale = stale
            metrics.JWKS_STALE.labels(self.name).set(1 if stale else 0)

    def load_file(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            self._install(KeySet.from_jwks(doc), str(path))
            metrics.JWKS_FETCHES.labels(self.name, "ok").inc()
        except (OSError, ValueError) as exc:
            metrics.JWKS_FETCHES.labels(self.name, "error").inc()
            metrics.JWKS_KEYS.labels(self.name).set(len(self.keyset.keys))
            log.error("jwks file unusable", extra={"provider": self.name, "path": str(path), "error": str(exc)})

    async def start(self) -> None:
        if self.provider.jwks_file is not None:
            self.load_file(self.provider.jwks_file)
            return
        metrics.JWKS_KEYS.labels(self.name).set(0)
        # the first fetch happens before the worker reports SERVING (bounded by fetch_timeout_ms),
        # so a restarted sidecar does not answer keys_unavailable to valid tokens meanwhile;
        # later refreshes run in the background and no request ever waits on one
        delay = await self._attempt()
        self._task = asyncio.create_task(self._refresh_loop(delay), name=f"jwks-{self.name}")

    async def fetch_once(self) -> float:
        """Fetch the JWKS; returns seconds until the next refresh. Raises on failure."""
        assert self.provider.jwks_uri is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.provider.fetch_timeout_ms / 1000))
        async with self._session.get(self.provider.jwks_uri, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            keyset = KeySet.from_jwks(json.loads(body))
            cache_control = resp.headers.get("cache-control", "")
        self._install(keyset, self.provider.jwks_uri)
        metrics.JWKS_FETCHES.labels(self.name, "ok").inc()
        interval = self.provider.refresh_interval_seconds
        m = _MAX_AGE.search(cache_control)
        if m:
            # refresh a little before the document's own max-age, never more often than every 5 s
            interval = min(interval, max(5.0, int(m.group(1)) * 0.9))
        return interval

    async def _attempt(self) -> float:
        """One fetch; returns the delay before the next. Failures keep the old keys, log once."""
        try:
            delay = await self.fetch_once()
            self._failing = False
            return delay
        except Exception as exc:  # noqa: BLE001 - any fetch failure keeps the old keys
            metrics.JWKS_FETCHES.labels(self.name, "error").inc()
            if self.keyset.loaded:
                self._set_stale(True)
            if not self._failing:
                log.warning("jwks fetch failed; %s", "keeping last good keys" if self.keyset.loaded
                            else "keys unavailable until a fetch succeeds",
                            extra={"provider": self.name, "uri": self.provider.jwks_uri,
                                   "error": f"{type(exc).__name__}: {exc}"})
            self._failing = True
            return self.provider.retry_interval_seconds

    async def _refresh_loop(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self._attempt()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
