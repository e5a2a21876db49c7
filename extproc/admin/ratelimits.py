"""Admin API routes for rate limits: the rules in force, one partition's usage, and its reset.

GET  /ratelimits          the configured rules (name, algorithm, limit, period, count_by, mode,
                          fail, ...): configuration only, no token (like GET /config)
GET  /ratelimits/usage?rule=NAME&value=V1[&value=V2...][&tier=T][&cost=N]
                          how much of rule NAME the partition (V1, V2, ...) has used, has left and
                          when it resets, read from the store and charged NOTHING (bearer token:
                          the answer is about one user, key, org or IP)
POST /ratelimits/reset    {"rule": NAME, "values": [V1, ...]}: that partition starts afresh on
                          every replica (bearer token)

`value` repeats once per `count_by` entry of the rule, in order (a `global` entry may be left
out); a rule with `missing: ip` counts a request without the value under `ip=<client ip>`.
`tier` holds the partition to that tier's limit (tiers share the counter, only the limit
differs); without it the rule's own limit applies. Errors: 400 bad parameters, 404 no such rule,
503 the store did not answer (usage is never guessed from a replica's local state). The usage
answer is documented field by field in docs/ratelimit-admin.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import config as cfgmod
from ..services.ratelimit import RateLimiter, Usage
from ..store.base import StoreError

Authorize = Callable[[web.Request], web.Response | None]

#: The longest an admin usage read waits for the store (its own socket timeout is shorter).
USAGE_TIMEOUT_S = 5.0
_USAGE_PARAMS = {"rule", "value", "tier", "cost"}


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _seconds(ms: int) -> int:
    """Whole seconds rounded up, as X-RateLimit-Reset and Retry-After count them."""
    return -(-ms // 1000) if ms > 0 else 0


def rule_json(rule: cfgmod.RateRule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": rule.name, "algorithm": rule.algorithm, "limit": rule.limit, "period": rule.period,
        "count_by": list(rule.count_by), "mode": rule.mode, "fail": rule.fail, "missing": rule.missing,
        "cost": rule.cost, "policies": list(rule.policies), "api_key_tiers": list(rule.api_key_tiers),
        "when": rule.when.model_dump(mode="json", exclude_defaults=True),
        "tiers": {name: t.model_dump(mode="json", exclude_none=True) for name, t in rule.tiers.items()},
    }
    if rule.algorithm == "token_bucket":
        out["burst"] = rule.limit if rule.burst is None else rule.burst
    return out


def usage_json(u: Usage, now_s: float) -> dict[str, Any]:
    o, lim = u.outcome, u.limit
    reset_at = dt.datetime.fromtimestamp(now_s, dt.UTC) + dt.timedelta(milliseconds=o.reset_after_ms)
    out: dict[str, Any] = {
        "rule": u.rule.name, "values": list(u.values), "count_by": list(u.rule.count_by),
        "tier": u.tier, "tiers": sorted(u.rule.tier_limits),
        "algorithm": str(lim.algorithm), "period": str(lim.period),
        "mode": "shadow" if u.rule.shadow else "enforce",
        "limit": o.limit, "used": u.used, "remaining": o.remaining,
        "reset_after_s": _seconds(o.reset_after_ms), "reset_after_ms": o.reset_after_ms,
        "reset_at": reset_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "cost": u.cost, "allowed": o.allowed,
        "retry_after_s": _seconds(o.retry_after_ms), "retry_after_ms": o.retry_after_ms,
        "window_s": _seconds(o.window_ms), "window_ms": o.window_ms,
        "key": u.key,
    }
    if lim.refill_per_second is not None:
        rate = lim.refill_per_second
        out["refill_per_second"] = float(rate)
        out["refill_per_second_exact"] = f"{rate.numerator}/{rate.denominator}"
    return out


def _usage_args(request: web.Request) -> tuple[str, list[str], str | None, int | None]:
    q = request.query
    unknown = sorted(set(q) - _USAGE_PARAMS)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_USAGE_PARAMS))})")
    rules = q.getall("rule", [])
    if len(rules) != 1 or not rules[0]:
        raise ValueError("give one rule: /ratelimits/usage?rule=NAME&value=V1[&value=V2...]")
    tiers = q.getall("tier", [])
    if len(tiers) > 1 or (tiers and not tiers[0]):
        raise ValueError("tier is given at most once and not empty")
    costs = q.getall("cost", [])
    cost = None
    if costs:
        if len(costs) > 1 or not costs[0].isascii() or not costs[0].isdigit() or int(costs[0]) < 1:
            raise ValueError("cost is one integer >= 1")
        cost = int(costs[0])
    return rules[0], q.getall("value", []), (tiers[0] if tiers else None), cost


def add_routes(app: web.Application, limiter_ref: Callable[[], RateLimiter], authorize: Authorize,
               audit: logging.Logger, *, clock: Callable[[], float] = time.time) -> None:
    """Mount /ratelimits, /ratelimits/usage and /ratelimits/reset on `app`. `limiter_ref` returns
    the RateLimiter in force (a reload swaps it); `authorize` answers a response to send when the
    caller may not."""

    async def list_rules(request: web.Request) -> web.Response:
        limiter = limiter_ref()
        return web.json_response({
            "store": getattr(limiter.store, "name", "store"),
            "store_timeout_ms": limiter.cfg.store_timeout_ms, "local_fallback": limiter.cfg.local_fallback,
            "rules": [rule_json(r) for r in limiter.cfg.rules],
        })

    async def usage(request: web.Request) -> web.Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        try:
            rule, values, tier, cost = _usage_args(request)
        except ValueError as exc:
            return _error(400, str(exc))
        limiter = limiter_ref()
        try:
            async with asyncio.timeout(USAGE_TIMEOUT_S):
                u = await limiter.usage(rule, values, tier=tier, cost=cost)
        except KeyError:
            return _error(404, f"no rate-limit rule {rule!r}", rules=[r.name for r in limiter.rules])
        except ValueError as exc:
            return _error(400, str(exc))
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc.message}", rule=rule)
        except TimeoutError:
            return _error(503, f"store unavailable: no answer within {USAGE_TIMEOUT_S:g} s", rule=rule)
        return web.json_response(usage_json(u, clock()), headers={"Cache-Control": "no-store"})

    async def reset(request: web.Request) -> web.Response:
        """POST {"rule": NAME, "values": [count-by values in order]}: that partition starts afresh."""
        denied = authorize(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
            rule, values = body["rule"], body["values"]
            if not isinstance(rule, str) or not isinstance(values, list) or not values \
                    or not all(isinstance(v, str) and v for v in values):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _error(400, "expected {\"rule\": NAME, \"values\": [VALUE, ...]}")
        try:
            deleted = await limiter_ref().reset(rule, values)
        except KeyError:
            return _error(404, f"no rate-limit rule {rule!r}")
        except ValueError as exc:
            return _error(400, str(exc))
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")
        audit.info("rate limit reset", extra={"action": "ratelimit.reset", "rule": rule})
        return web.json_response({"rule": rule, "deleted": deleted})

    app.router.add_get("/ratelimits", list_rules)
    app.router.add_get("/ratelimits/usage", usage)
    app.router.add_post("/ratelimits/reset", reset)
