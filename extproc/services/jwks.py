"""Keeps each JWT provider's signing keys loaded, in the background.

Key sources: a JWKS URI, an OpenID discovery document naming one (its `issuer` must equal the
provider's, OpenID Connect Discovery §4.3), a JWKS file (re-read when it changes), an inline
JWKS, a PEM public key, or an HMAC secret from a file or the environment.

A request never waits on a scheduled fetch: it reads the KeySet in force. Remote keys are
fetched once before the worker reports SERVING (bounded by `fetch_timeout_ms`), then refreshed
before they go stale (Cache-Control max-age honoured, bounded by `refresh_interval_seconds`).
When a fetch fails the last good keys stay in force and `extproc_jwks_stale` says so; a
provider whose keys were never loaded answers `keys_unavailable` (401), as Envoy's jwt_authn
does. Rotation: a token naming an unknown `kid` may trigger one early refetch per
`unknown_kid_refetch_seconds` — so a flood of forged kids causes no refetch storm — and the
request that triggered it waits for that fetch at most `UNKNOWN_KID_WAIT` seconds.
State changes log once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import aiohttp

from ..config import Provider, file_signature, read_secret
from ..core.jwt import NO_KEYS, KeySet, ProviderRules
from ..telemetry import metrics

log = logging.getLogger("extproc.jwks")
_MAX_AGE = re.compile(r"max-age=(\d+)")
MAX_DOCUMENT_BYTES = 512 * 1024
UNKNOWN_KID_WAIT = 0.15
MIN_REFRESH_SECONDS = 5.0


def rules_for(name: str, p: Provider) -> ProviderRules:
    return ProviderRules(name=name, issuer=p.issuer or "", audiences=tuple(p.audiences),
                         algorithms=frozenset(p.algorithms), leeway=p.leeway_seconds,
                         required_claims=tuple(p.required_claims))


class KeySource:
    """One provider's keys. `sink[name]` is what requests read, replaced whole on each change."""

    def __init__(self, name: str, provider: Provider, sink: dict[str, tuple[ProviderRules, KeySet]],
                 clock=time.monotonic):
        self.name = name
        self.provider = provider
        self.sink = sink
        self.rules = rules_for(name, provider)
        self.keyset: KeySet = NO_KEYS
        self.clock = clock
        sink[name] = (self.rules, NO_KEYS)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stale = False
        self._failing = False
        self._jwks_uri: str | None = provider.jwks_uri
        self._file_sig: tuple[int, int, int] | None = None
        self._last_fetch = -1e18
        self._wake = asyncio.Event()
        self._fetched = asyncio.Event()

    KEY_FIELDS = ("jwks_uri", "discovery_uri", "jwks_file", "jwks", "pem_file", "secret_file", "secret_env",
                  "algorithms")

    def adopt(self, old: KeySource) -> None:
        """Start from the keys of the source this one replaces (a reload), when they come from the
        same place: an IdP outage during a reload must not drop keys that were in force."""
        if all(getattr(old.provider, f) == getattr(self.provider, f) for f in self.KEY_FIELDS) and old.keyset.loaded:
            self.keyset = old.keyset
            self.sink[self.name] = (self.rules, old.keyset)
            self._stale = old._stale

    @property
    def remote(self) -> bool:
        return self.provider.jwks_uri is not None or self.provider.discovery_uri is not None

    # -- installing keys --------------------------------------------------------------------------
    def _install(self, keyset: KeySet, origin: str) -> None:
        before = set(self.keyset.keys)
        first = not self.keyset.loaded
        self.keyset = keyset
        self.sink[self.name] = (self.rules, keyset)
        metrics.JWKS_KEYS.labels(self.name).set(len(keyset.keys))
        if first or self._stale or before != set(keyset.keys):
            log.info("jwks loaded", extra={"provider": self.name, "keys": len(keyset.keys), "source": origin,
                                           "added": sorted(set(keyset.keys) - before),
                                           "removed": sorted(before - set(keyset.keys))})
        self._set_stale(False)

    def _set_stale(self, stale: bool) -> None:
        # written every time: a source built by a reload shares its label with the one it replaces
        self._stale = stale
        metrics.JWKS_STALE.labels(self.name).set(1 if stale else 0)

    def _load_local(self) -> None:
        p = self.provider
        try:
            if p.jwks_file is not None:
                self._file_sig = file_signature(p.jwks_file)
                self._install(KeySet.from_jwks(json.loads(p.jwks_file.read_text()), self.rules.algorithms), str(p.jwks_file))
            elif p.jwks is not None:
                self._install(KeySet.from_jwks(p.jwks, self.rules.algorithms), "inline jwks")
            elif p.pem_file is not None:
                self._install(KeySet.from_public_pem(p.pem_file.read_bytes()), str(p.pem_file))
            else:
                secret = read_secret(p.secret_file, p.secret_env, f"providers.{self.name}.secret")
                if not secret:
                    raise ValueError("the shared secret is empty or its variable is unset")
                self._install(KeySet.from_secret(secret.encode()), "shared secret")
            metrics.JWKS_FETCHES.labels(self.name, "ok").inc()
        except Exception as exc:  # noqa: BLE001 - a bad key source is reported, never fatal
            metrics.JWKS_FETCHES.labels(self.name, "error").inc()
            metrics.JWKS_KEYS.labels(self.name).set(len(self.keyset.keys))
            if self.keyset.loaded:
                self._set_stale(True)
            log.error("keys unusable", extra={"provider": self.name, "error": f"{type(exc).__name__}: {exc}"})

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.remote:
            self._load_local()
            if self.provider.jwks_file is not None:
                self._task = asyncio.create_task(self._watch_file(), name=f"jwks-file-{self.name}")
            return
        metrics.JWKS_KEYS.labels(self.name).set(len(self.keyset.keys))
        # the first fetch happens before the worker reports SERVING, so a restarted sidecar does
        # not answer keys_unavailable to valid tokens meanwhile; later ones run in the background
        delay = await self._attempt()
        self._task = asyncio.create_task(self._refresh_loop(delay), name=f"jwks-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- remote -----------------------------------------------------------------------------------
    async def _get_json(self, url: str) -> tuple[object, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.provider.fetch_timeout_ms / 1000))
        async with self._session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} from {url}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise ValueError("document too large")
                chunks.append(chunk)
            body = b"".join(chunks)
            return json.loads(body), resp.headers.get("cache-control", "")

    async def fetch_once(self) -> float:
        """Fetch the keys; returns seconds until the next refresh. Raises on failure."""
        self._last_fetch = self.clock()
        if self._jwks_uri is None:
            assert self.provider.discovery_uri is not None
            doc, _ = await self._get_json(self.provider.discovery_uri)
            if not isinstance(doc, dict) or not isinstance(doc.get("jwks_uri"), str):
                raise ValueError("discovery document has no jwks_uri")
            if doc.get("issuer") != self.provider.issuer:
                raise ValueError("discovery document's issuer differs from the provider's issuer")
            if not doc["jwks_uri"].startswith(("http://", "https://")):
                raise ValueError("discovery jwks_uri is not an http(s) URL")
            self._jwks_uri = doc["jwks_uri"]
        doc, cache_control = await self._get_json(self._jwks_uri)
        self._install(KeySet.from_jwks(doc, self.rules.algorithms), self._jwks_uri)
        metrics.JWKS_FETCHES.labels(self.name, "ok").inc()
        interval = self.provider.refresh_interval_seconds
        m = _MAX_AGE.search(cache_control)
        if m:
            # refresh a little before the document's own max-age, bounded below
            interval = min(interval, max(MIN_REFRESH_SECONDS, int(m.group(1)) * 0.9))
        return interval

    async def _attempt(self) -> float:
        """One fetch; returns the delay before the next. Failures keep the old keys, log once."""
        try:
            delay = await self.fetch_once()
            if self._failing:
                log.info("jwks fetch recovered", extra={"provider": self.name})
            self._failing = False
            return delay
        except Exception as exc:  # noqa: BLE001 - any fetch failure keeps the old keys
            metrics.JWKS_FETCHES.labels(self.name, "error").inc()
            if self.keyset.loaded:
                self._set_stale(True)
            if self.provider.discovery_uri is not None:
                self._jwks_uri = None          # re-read the discovery document next time
            if not self._failing:
                log.warning("jwks fetch failed; %s", "keeping last good keys" if self.keyset.loaded
                            else "keys unavailable until a fetch succeeds",
                            extra={"provider": self.name, "error": f"{type(exc).__name__}: {exc}"})
            self._failing = True
            return self.provider.retry_interval_seconds
        finally:
            self._fetched.set()
            self._fetched = asyncio.Event()

    async def _refresh_loop(self, delay: float) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()
            delay = await self._attempt()

    def refetch_for_unknown_kid(self) -> asyncio.Event | None:
        """Ask for an early refetch because a token named a kid we do not know. At most one per
        `unknown_kid_refetch_seconds`; returns an event set when that fetch ends, or None."""
        if not self.remote or self._task is None:
            return None
        if self.clock() - self._last_fetch < self.provider.unknown_kid_refetch_seconds:
            return None
        self._last_fetch = self.clock()     # claim the slot now: concurrent forged kids share it
        waiter = self._fetched
        self._wake.set()
        return waiter

    async def _watch_file(self) -> None:
        assert self.provider.jwks_file is not None
        while True:
            await asyncio.sleep(min(self.provider.refresh_interval_seconds, MIN_REFRESH_SECONDS))
            if file_signature(self.provider.jwks_file) != self._file_sig:
                self._load_local()

