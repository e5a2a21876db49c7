"""Admin API route for revoking tokens fleet-wide (needs the admin bearer token).

POST /revoke   one of
               {"jti": "...", "exp": <epoch>}                 a token by its jti
               {"token_digest": "<sha256 hex>", "exp": <epoch>}  a token without jti (or opaque)
               {"sub": "...", "before": <epoch, default now>}   every token of a subject issued
                                                               before `before` ("log out everywhere")
               -> 200 {"revoked": {...}} naming what was revoked and until when

Errors: 400 bad body (unknown fields, several or none of jti/token_digest/sub, a bad epoch);
503 the store could not be written: the revocation is enforced by this replica at once but
not yet by the others — retrying is safe (revoking twice is the same revocation).
Each authorized call writes one structured audit line (`action` revoke.jti, revoke.digest or
revoke.subject, `result`), naming the jti, digest or subject — a token never reaches this API,
let alone the log. `exp` is the token's own expiry: the entry lasts that long (plus the
verifier's leeway), so a wrong, far-future value only costs memory; it is capped at a year.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..services.revocation import Revocation, RevocationList
from ..store.base import StoreError

Authorize = Callable[[web.Request], web.Response | None]

MAX_ID_LENGTH = 1024
MAX_EXP_AHEAD_SECONDS = 366 * 86400
MAX_BEFORE_AHEAD_SECONDS = 60.0          # clock skew; a logout cannot reach into the future
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"jti": {"jti", "exp"}, "token_digest": {"token_digest", "exp"}, "sub": {"sub", "before"}}
_ACTIONS = {"jti": "revoke.jti", "token_digest": "revoke.digest", "sub": "revoke.subject"}


class _Invalid(ValueError):
    pass


def _epoch(body: dict[str, Any], name: str, now: float, *, required: bool, max_ahead: float) -> float | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _Invalid(f"{name} is required (epoch seconds)")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise _Invalid(f"{name} must be a positive number of epoch seconds")
    if value > now + max_ahead:
        raise _Invalid(f"{name} is more than {max_ahead:g} s in the future")
    return float(value)


def _ident(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise _Invalid(f"{name} must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    return value


def parse_request(body: Any, now: float) -> tuple[str, dict[str, Any]]:
    """(kind, arguments) from a POST /revoke body; `_Invalid` names what is wrong."""
    if not isinstance(body, dict):
        raise _Invalid('expected a JSON object such as {"jti": "...", "exp": 1767225600}')
    kinds = [k for k in _FIELDS if k in body]
    if len(kinds) != 1:
        raise _Invalid("give exactly one of jti, token_digest or sub")
    kind = kinds[0]
    unknown = sorted(set(body) - _FIELDS[kind])
    if unknown:
        raise _Invalid(f"unknown field(s) {', '.join(unknown)} with {kind} "
                       f"(allowed: {', '.join(sorted(_FIELDS[kind]))})")
    ident = _ident(body, kind)
    if kind == "token_digest":
        ident = ident.lower()
        if not _DIGEST.fullmatch(ident):
            raise _Invalid("token_digest is the SHA-256 of the whole token, as 64 hex digits")
    if kind == "sub":
        return kind, {"sub": ident,
                      "before": _epoch(body, "before", now, required=False, max_ahead=MAX_BEFORE_AHEAD_SECONDS)}
    return kind, {"id": ident, "exp": _epoch(body, "exp", now, required=True, max_ahead=MAX_EXP_AHEAD_SECONDS)}


def _describe(kind: str, rev: Revocation) -> dict[str, Any]:
    if kind == "sub":
        return {"kind": "subject", "sub": rev.id, "not_before": rev.not_before, "until": rev.until}
    return {"kind": "token", kind: rev.id, "until": rev.until}


def add_routes(app: web.Application, revocations: RevocationList, authorize: Authorize, audit: logging.Logger,
               *, clock: Callable[[], float] = time.time) -> None:
    """Mount POST /revoke on `app`; `authorize` answers a response to send when the caller may not."""

    async def revoke(request: web.Request) -> web.Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            audit.info("revocation refused", extra={"action": "revoke", "result": "invalid",
                                                    "error": "body is not JSON", "remote": request.remote})
            return web.json_response({"error": "request body must be JSON"}, status=400)
        try:
            kind, args = parse_request(body, clock())
        except _Invalid as exc:
            audit.info("revocation refused", extra={"action": "revoke", "result": "invalid", "error": str(exc),
                                                    "remote": request.remote})
            return web.json_response({"error": str(exc)}, status=400)
        action = _ACTIONS[kind]
        named = {"sub": args["sub"]} if kind == "sub" else {kind: args["id"]}
        try:
            if kind == "sub":
                rev = await revocations.revoke_subject(args["sub"], args["before"])
            else:
                rev = await revocations.revoke_token(args["id"], args["exp"])
        except StoreError as exc:
            audit.info("revocation not shared", extra={"action": action, "result": "store_unavailable",
                                                       **named, "error": exc.message, "remote": request.remote})
            return web.json_response({"error": f"store unavailable: {exc.message}", "enforced_here": True,
                                      "shared": False, "retry": "safe"}, status=503)
        described = _describe(kind, rev)
        audit.info("revoked", extra={"action": action, "result": "ok", **named, "until": rev.until,
                                     "not_before": rev.not_before, "remote": request.remote})
        return web.json_response({"revoked": described}, headers={"Cache-Control": "no-store"})

    app.router.add_post("/revoke", revoke)
