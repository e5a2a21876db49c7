"""Admin API routes for API keys (every route needs the admin bearer token).

GET    /apikeys        every key: config keys (source "config") and store keys (source "store");
                       ids, owners, scopes, tiers, expiry and digests, never a key
POST   /apikeys        {owner, scopes?, tier?, expires_in_seconds?, id?} -> 201 with the new key in
                       `key`: shown this once, never stored or logged (only its digest is kept)
DELETE /apikeys/{id}   204 revoked · 404 no such store key · 409 a config key (edit extproc.yaml)

Errors: 400 bad request body, 409 id taken or `api_keys.from_store` off, 503 store unavailable.
Each change writes one structured audit line (`action`, `key_id`, `owner`), never the key. A
revoked key stops working on this replica at once and on the others within the registry's
`cache_seconds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..core.apikeys import KeyRecord
from ..services.apikeys import ApiKeyError, ApiKeyRegistry, ConfigManagedKey
from ..store.base import StoreError

Authorize = Callable[[web.Request], web.Response | None]

_CREATE_FIELDS = {"owner", "scopes", "tier", "expires_in_seconds", "id"}
MAX_EXPIRES_IN_SECONDS = 10 * 366 * 86400


def record_json(r: KeyRecord) -> dict[str, Any]:
    return {"id": r.id, "source": r.source, "owner": r.owner, "scopes": list(r.scopes), "tier": r.tier,
            "expires_at": r.expires_at, "created_at": r.created_at, "digest": r.digest}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _store_error(exc: StoreError) -> web.Response:
    return _error(503, f"store unavailable: {exc.message}")


def _create_args(body: Any, now: float) -> dict[str, Any]:
    """The registry's create() arguments from a POST body; ValueError names the bad field."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object such as {\"owner\": \"team-a\", \"scopes\": [\"read\"]}")
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_CREATE_FIELDS))})")
    owner = body.get("owner")
    if not isinstance(owner, str) or not owner:
        raise ValueError("owner is required (a non-empty string)")
    scopes = body.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError("scopes must be a list of strings")
    tier = body.get("tier", "default")
    if not isinstance(tier, str):
        raise ValueError("tier must be a string")
    key_id = body.get("id")
    if key_id is not None and not isinstance(key_id, str):
        raise ValueError("id must be a string")
    expires_in = body.get("expires_in_seconds")
    expires_at = None
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or not (
                0 < expires_in <= MAX_EXPIRES_IN_SECONDS):
            raise ValueError(f"expires_in_seconds must be a number of seconds in (0, {MAX_EXPIRES_IN_SECONDS}]")
        expires_at = now + float(expires_in)
    return {"owner": owner, "scopes": scopes, "tier": tier, "expires_at": expires_at, "key_id": key_id}


def add_routes(app: web.Application, registry: ApiKeyRegistry, authorize: Authorize, audit: logging.Logger,
               *, clock: Callable[[], float] = time.time) -> None:
    """Mount /apikeys on `app`; `authorize` answers a response to send when the caller may not."""

    async def list_keys(request: web.Request) -> web.Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        try:
            records = await registry.list()
        except StoreError as exc:
            return _store_error(exc)
        return web.json_response({"keys": [record_json(r) for r in records]})

    async def create_key(request: web.Request) -> web.Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body must be JSON")
        try:
            args = _create_args(body, clock())
            raw, record = await registry.create(**args)
        except ApiKeyError as exc:
            return _error(409, str(exc))
        except StoreError as exc:
            return _store_error(exc)
        except ValueError as exc:
            return _error(400, str(exc))
        audit.info("api key created", extra={"action": "apikey.create", "key_id": record.id,
                                             "owner": record.owner, "scopes": list(record.scopes),
                                             "tier": record.tier, "expires_at": record.expires_at,
                                             "remote": request.remote})
        out = record_json(record)
        out["key"] = raw
        return web.json_response(out, status=201, headers={"Cache-Control": "no-store"})

    async def revoke_key(request: web.Request) -> web.Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        key_id = request.match_info["id"]
        try:
            revoked = await registry.revoke(key_id)
        except ConfigManagedKey as exc:
            return _error(409, str(exc))
        except StoreError as exc:
            return _store_error(exc)
        if revoked is None:
            return _error(404, f"no store-managed api key with id {key_id!r}")
        audit.info("api key revoked", extra={"action": "apikey.revoke", "key_id": key_id,
                                             "owner": revoked.owner, "remote": request.remote})
        return web.Response(status=204)

    app.router.add_get("/apikeys", list_keys)
    app.router.add_post("/apikeys", create_key)
    app.router.add_delete("/apikeys/{id}", revoke_key)
