"""The admin HTTP API (aiohttp), loopback by default.

GET  /metrics   Prometheus exposition (aggregated over workers under the supervisor)
GET  /healthz   liveness: the process answers
GET  /readyz    readiness: config loaded and not draining (503 otherwise); the store's health
                and each provider's keys are reported in the body but never make it 503, since
                each policy's failure setting decides what a store outage means
GET  /config    the config in force, secrets redacted
POST /reload    reload extproc.yaml now (bearer token required)
GET|POST /apikeys, DELETE /apikeys/{id}   store-managed API keys (bearer token required)
GET  /ratelimits, GET /ratelimits/usage?rule=&value=   the rate-limit rules; one partition's usage,
                charged nothing (bearer token required for usage); see admin/ratelimits.py
POST /ratelimits/reset   {"rule", "values"}: one partition of a rule starts afresh (bearer token required)
POST /cache/purge   {"path"|"prefix"|"tag"|"key": VALUE}: void matching cache entries on every replica
                (bearer token required)
GET  /breakers      every circuit breaker: state, consecutive failures, forced, settings
POST /breakers/{upstream}/open|close|reset   force open, force closed, or back to automatic and
                closed; reaches every replica (bearer token required)
GET  /cache/stats   hits, misses, hit ratio, entries and bytes, per rule and in all (from the counters)
GET|POST /logging   the log level per logger; POST changes it at runtime (bearer token required)
POST /revoke    revoke a token (jti or digest) or every token of a subject (bearer token required)

Mutating endpoints need `Authorization: Bearer <token>` with the token from admin.token_file
or admin.token_env; with no token configured they answer 403 and do nothing.
"""

from __future__ import annotations

import hmac
import logging
from typing import Protocol

from aiohttp import web

from .. import config as cfgmod
from ..store import StoreError
from ..telemetry import metrics

log = logging.getLogger("extproc.admin")
audit = logging.getLogger("extproc.audit")
audit.setLevel(logging.INFO)        # audit lines survive --log-level warning


class Target(Protocol):
    cfg: cfgmod.Config

    def readiness(self) -> tuple[bool, dict]: ...

    async def reload(self, reason: str) -> tuple[bool, str]: ...


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class AdminServer:
    def __init__(self, cfg: cfgmod.Admin, target: Target, apikeys=None, revocations=None, ratelimiter=None,
                 cache=None, breakers=None):
        self.cfg = cfg
        self.target = target
        self.apikeys = apikeys
        self.revocations = revocations
        self.ratelimiter = ratelimiter     # callable returning the RateLimiter in force
        self.cache = cache                 # the ResponseCache (purges reach every replica through the store)
        self.breakers = breakers           # the Breakers (forcings reach every replica through the store)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/config", self.config)
        app.router.add_post("/reload", self.reload)
        if self.apikeys is not None:
            from .apikeys import add_routes as add_apikey_routes

            add_apikey_routes(app, self.apikeys, self._authorized, audit)
        if self.ratelimiter is not None:
            from .ratelimits import add_routes as add_ratelimit_routes

            add_ratelimit_routes(app, self.ratelimiter, self._authorized, audit)
        if self.cache is not None:
            app.router.add_post("/cache/purge", self.cache_purge)
        from .logs import add_routes as add_logging_routes

        add_logging_routes(app, self._authorized, audit, getattr(self.target, "log_level_changed", None))
        app.router.add_get("/cache/stats", self.cache_stats)
        if self.breakers is not None:
            app.router.add_get("/breakers", self.breaker_list)
            app.router.add_post("/breakers/{name}/{action}", self.breaker_force)
        if self.revocations is not None:
            from .revocation import add_routes as add_revocation_routes

            add_revocation_routes(app, self.revocations, self._authorized, audit)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = _split(self.cfg.listen)
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        socks = getattr(server, "sockets", None) or []
        self.port = socks[0].getsockname()[1] if socks else port
        log.info("admin listening", extra={"listen": f"{host}:{self.port}"})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authorized(self, request: web.Request) -> web.Response | None:
        # read per call (admin calls are rare): a rotated token file applies without a restart
        try:
            token = cfgmod.read_secret(self.cfg.token_file, self.cfg.token_env, "admin.token")
        except cfgmod.ConfigError as exc:
            log.error("admin token unreadable", extra={"error": str(exc)})
            token = None
        if not token:
            return web.json_response({"error": "admin token not configured: set admin.token_file or "
                                      "admin.token_env to enable mutating endpoints"}, status=403)
        got = request.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return web.json_response({"error": "bearer token required"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="extproc-admin"'})
        return None

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, detail = self.target.readiness()
        return web.json_response({"ready": ready, **detail}, status=200 if ready else 503)

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(cfgmod.redacted(self.target.cfg))

    async def cache_purge(self, request: web.Request) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        from ..services.cache import PURGE_KINDS

        try:
            body = await request.json()
            if not isinstance(body, dict) or len(body) != 1:
                raise ValueError
            (kind, value), = body.items()
            if kind not in PURGE_KINDS or not isinstance(value, str) or not value:
                raise ValueError
            if kind in ("path", "prefix") and not value.startswith("/"):
                raise ValueError
        except (ValueError, TypeError):
            return web.json_response({"error": "expected one of {\"path\": \"/…\"}, {\"prefix\": \"/…\"}, "
                                               "{\"tag\": TAG}, {\"key\": X-Cache-Key}"}, status=400)
        try:
            purge = await self.cache.purge(kind, value)
        except StoreError as exc:
            # this replica already voids the entries; the others could not be told
            return web.json_response({"error": f"store unavailable: {exc}", "local": True}, status=503)
        audit.info("cache purge", extra={"action": "cache.purge", "kind": kind, "value": value})
        return web.json_response({"purged": {kind: value}, "at_ms": purge.at_ms})

    async def breaker_list(self, request: web.Request) -> web.Response:
        failures = metrics.sums("gateway_circuit_breaker_failures_total", by="upstream")
        rejected = metrics.sums("gateway_circuit_breaker_rejected_total", by="upstream")
        rows = await self.breakers.snapshot()
        for row in rows:
            row["failures_counted"] = int(failures["gateway_circuit_breaker_failures_total"].get(row["upstream"], 0))
            row["rejected"] = int(rejected["gateway_circuit_breaker_rejected_total"].get(row["upstream"], 0))
        return web.json_response({"breakers": rows})

    async def breaker_force(self, request: web.Request) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        name, action = request.match_info["name"], request.match_info["action"]
        op = {"open": "force_open", "close": "force_close", "reset": "reset"}.get(action)
        if op is None:
            return web.json_response({"error": "action is open, close or reset"}, status=404)
        try:
            r = await self.breakers.force(name, op)
        except KeyError:
            return web.json_response({"error": f"no circuit breaker for upstream {name!r}"}, status=404)
        except StoreError as exc:
            return web.json_response({"error": f"store unavailable: {exc}", "local": True}, status=503)
        from ..core.breaker import STATE_NAMES

        audit.info("circuit breaker forced", extra={"action": f"breaker.{action}", "upstream": name})
        return web.json_response({"upstream": name, "state": STATE_NAMES[r.state],
                                  "forced": {0: None, 1: "open", 2: "closed"}[r.forced]})

    async def cache_stats(self, request: web.Request) -> web.Response:
        names = ("gateway_cache_hits_total", "gateway_cache_misses_total", "gateway_cache_stores_total",
                 "gateway_cache_collapsed_total", "gateway_cache_stale_total", "gateway_cache_revalidated_total",
                 "gateway_cache_shadow_hits_total")
        per_rule = metrics.sums(*names, by="route")
        tiers = metrics.sums("gateway_cache_entries", "gateway_cache_stored_bytes", by="tier")
        bypass = metrics.sums("gateway_cache_bypass_total", by="reason")["gateway_cache_bypass_total"]
        errors = metrics.sums("gateway_cache_errors_total", by="kind")["gateway_cache_errors_total"]

        def summary(hits: float, misses: float) -> dict:
            looked = hits + misses
            return {"hits": int(hits), "misses": int(misses),
                    "hit_ratio": round(hits / looked, 4) if looked else None}

        rules = sorted({r for n in names for r in per_rule[n]})
        out = {
            **summary(sum(per_rule[names[0]].values()), sum(per_rule[names[1]].values())),
            "stored": int(sum(per_rule[names[2]].values())),
            "collapsed": int(sum(per_rule[names[3]].values())),
            "stale_served": int(sum(per_rule[names[4]].values())),
            "revalidated": int(sum(per_rule[names[5]].values())),
            "shadow_hits": int(sum(per_rule[names[6]].values())),
            "bypass": {k: int(v) for k, v in sorted(bypass.items())},
            "errors": {k: int(v) for k, v in sorted(errors.items())},
            "tiers": {tier: {"entries": int(tiers["gateway_cache_entries"].get(tier, 0)),
                             "bytes": int(tiers["gateway_cache_stored_bytes"].get(tier, 0))}
                      for tier in sorted(tiers["gateway_cache_entries"])},
            "rules": {r: summary(per_rule[names[0]].get(r, 0), per_rule[names[1]].get(r, 0)) for r in rules},
        }
        if self.cache is not None:
            store_tier = await self.cache.store_usage()
            if store_tier is not None:
                out["tiers"]["store"] = store_tier
        return web.json_response(out)

    async def reload(self, request: web.Request) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        ok, message = await self.target.reload("admin API")
        return web.json_response({"reloaded": ok, "message": message}, status=200 if ok else 422)
