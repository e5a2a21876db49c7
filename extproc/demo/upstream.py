"""The demo upstream: a small webshop that sits behind Envoy in the demo and the e2e tests.

It plays the services of the webshop plan (products cached 1 h, users 5 min private, orders and
payments never) so the sidecar's policies have something real to guard, and the demo identity
provider: /api/auth/login mints RS256 tokens with the key of `extproc.demo.idp`, and
/.well-known/jwks.json publishes its public half for the sidecar's JWT policy. With
`"token_type": "opaque"` the login issues an opaque random token instead, kept in the state
directory that replicas share (in memory without one; `extproc.demo.opaque`), which the sidecar
checks by RFC 7662 introspection at POST /oauth/introspect (client `extproc`, HTTP Basic, secret
in `<state-dir>/introspection-secret`, see `introspection_secret()`); POST /oauth/revoke
(RFC 7009) deactivates one.

Tests observe it from the side. Every response names the replica that served it
(`x-upstream-replica`), every request except /_control/* is counted per path (GET /_control/hits),
and /_control/fail injects failures by path prefix (a 500, a held request that times out, a TCP
reset) so breakers, retries and timeouts can be driven without a second program. The helpers
/status/{code}, /delay/{ms}, /echo/headers, /echo/cache and /bytes/{n} answer with what a test
asks for. Envoy never routes /_control/: tests reach it on the upstream's own port.

All state is in memory, on one event loop; a restart starts from the seed data.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from multidict import CIMultiDict

from extproc.demo import idp
from extproc.demo.opaque import OpaqueTokens

log = logging.getLogger("extproc.demo.upstream")

REPLICA_HEADER = "x-upstream-replica"
CONTROL_PREFIX = "/_control"

# Cache lifetimes from the webshop plan: products 1 h, users 5 min (per user), orders never.
PRODUCTS_CACHE = "public, max-age=3600"
USERS_CACHE = "private, max-age=300"
NO_STORE = "no-store"
JWKS_CACHE = "public, max-age=300"

FAIL_MODES = ("500", "timeout", "reset")
HOLD_SECONDS = 60.0          # a "timeout" failure holds the request this long at most
MAX_DELAY_MS = 30_000
MAX_BYTES = 32 * 1024 * 1024
TOKEN_TTL_SECONDS = 3600
INTROSPECTION_CLIENT_ID = "extproc"
INTROSPECTION_SECRET_FILE = "introspection-secret"
LOGIN_TOKEN_TYPES = ("jwt", "opaque")
MAX_OPAQUE_TOKENS = 100_000
# RFC 9110 §15.3.5, §15.3.6, §15.4.5: these statuses never carry content.
NO_CONTENT_STATUSES = frozenset({204, 205, 304})
# /echo/cache must not be able to break the message framing or hide which replica answered.
UNSETTABLE_HEADERS = frozenset({
    "content-length", "transfer-encoding", "content-encoding", "connection", "keep-alive",
    "upgrade", "te", "trailer", "proxy-connection", REPLICA_HEADER,
})
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')
_JSON = "application/json"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Reject(Exception):
    """A request the handler refuses: becomes a JSON error response in the middleware."""

    def __init__(self, status: int, error: str, **detail: Any) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


def _strong_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def _not_modified(request: web.Request, etag: str | None, last_modified: float | None) -> bool:
    """RFC 9110 §13.2.2: If-None-Match decides when present; else If-Modified-Since (GET/HEAD)."""
    if request.method not in ("GET", "HEAD"):
        return False
    inm = request.headers.get("If-None-Match")
    if inm is not None:
        if etag is None:
            return False
        if inm.strip() == "*":
            return True
        # §13.1.2: If-None-Match uses the weak comparison, so W/ prefixes are ignored
        wanted = etag.removeprefix("W/")
        return any(tag.removeprefix("W/") == wanted for tag in _ENTITY_TAG.findall(inm))
    if last_modified is not None:
        since = request.if_modified_since
        return since is not None and int(last_modified) <= since.timestamp()
    return False


def _headers_from_query(request: web.Request) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.query.items():
        if name.lower() in UNSETTABLE_HEADERS:
            raise Reject(400, "header_not_settable", header=name)
        headers.add(name, value)
    return headers


def introspection_secret(directory: Path | None = None) -> str:
    """The introspection client's secret: `<state-dir>/introspection-secret`, created (0600)
    on first use. The sidecar reads the same file (`client_secret_file`)."""
    directory = directory or idp.state_dir()
    path = directory / INTROSPECTION_SECRET_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)           # first writer wins when two processes race
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """(client_id, secret) from HTTP Basic, form-urldecoded as RFC 6749 §2.3.1 asks."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else None


class Upstream:
    """The state and handlers of one replica."""

    def __init__(self, replica_id: str, key: idp.SigningKey, state_dir: Path | None = None) -> None:
        self.replica_id = replica_id
        self.key = key
        self.retired_keys: list[idp.SigningKey] = []   # still published after a rotation until retired
        self.state_dir = state_dir
        self._introspection_secret: str | None = None
        # opaque token -> its introspection claims; shared through the state directory (opaque.py)
        self.opaque_tokens = OpaqueTokens(state_dir, MAX_OPAQUE_TOKENS)
        self._verify_key = jwt.PyJWK(key.jwk).key             # to introspect the JWTs it minted too
        self.hits: dict[str, int] = {}
        self.failures: dict[str, str] = {}
        self.echo_counts: dict[str, int] = {}
        self._holds: dict[str, asyncio.Event] = {}   # prefix -> set to let its held requests go
        now = int(time.time())
        self.products: dict[int, dict[str, Any]] = {}
        for pid, (name, price, stock) in enumerate(
                [("Espresso cup", 8.5, 120), ("Pour-over kettle", 49.0, 35),
                 ("Burr grinder", 129.0, 12), ("Coffee beans 1 kg", 24.9, 300)], start=1):
            self.products[pid] = {"id": pid, "name": name, "price": price, "currency": "EUR",
                                  "stock": stock, "updated_at": now}
        self.products_changed = now
        self.users: dict[int, dict[str, Any]] = {
            uid: {"id": uid, "username": name, "email": f"{name}@example.test",
                  "role": "admin" if name == "admin" else "customer"}
            for uid, name in enumerate(sorted(idp.DEMO_USERS), start=1)
        }
        self.orders: dict[int, dict[str, Any]] = {
            1: {"id": 1, "user": "alice", "items": [{"product_id": 1, "quantity": 2}],
                "status": "paid", "created_at": now},
            2: {"id": 2, "user": "bob", "items": [{"product_id": 4, "quantity": 1}],
                "status": "created", "created_at": now},
        }
        self.payments: dict[str, dict[str, Any]] = {
            "pay_1": {"id": "pay_1", "order_id": 1, "amount": 17.0, "currency": "EUR",
                      "status": "captured", "created_at": now},
        }

    # -- responses ------------------------------------------------------------------------

    def json(self, payload: dict[str, Any], status: int = 200, cache: str | None = None,
             headers: CIMultiDict[str] | dict[str, str] | None = None) -> web.Response:
        payload["replica"] = self.replica_id
        resp = web.Response(body=_dumps(payload), status=status, headers=headers)
        if "Content-Type" not in resp.headers:     # /echo/cache may have set its own
            resp.headers["Content-Type"] = _JSON
        if cache is not None:
            resp.headers["Cache-Control"] = cache
        return resp

    def error(self, status: int, error: str, **detail: Any) -> web.Response:
        return self.json({"error": error, "status": status, **detail}, status=status)

    def conditional(self, request: web.Request, payload: dict[str, Any], cache: str,
                    last_modified: float) -> web.Response:
        """A cacheable JSON representation with a strong ETag over its exact bytes."""
        payload["replica"] = self.replica_id
        body = _dumps(payload)
        headers = {"Cache-Control": cache, "ETag": _strong_etag(body),
                   "Last-Modified": _http_date(last_modified)}
        if _not_modified(request, headers["ETag"], last_modified):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=_JSON, headers=headers)

    # -- middleware: replica header, hit counting, failure injection, JSON errors -----------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(CONTROL_PREFIX):
            resp = await self._call(request, handler)
        else:
            self.hits[path] = self.hits.get(path, 0) + 1
            prefix = self._failing_prefix(path) if self.failures else None
            if prefix is None:
                resp = await self._call(request, handler)
            else:
                resp = await self._inject(request, prefix, self.failures[prefix])
        resp.headers[REPLICA_HEADER] = self.replica_id
        return resp

    async def _call(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Reject as exc:
            return self.error(exc.status, exc.error, **exc.detail)
        except web.HTTPException as exc:
            # the router's 404/405 and aiohttp's own 4xx (e.g. 413), as JSON like the rest
            headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "location")}
            resp = self.error(exc.status, (exc.reason or "error").lower().replace(" ", "_"),
                              path=request.path)
            resp.headers.update(headers)
            return resp
        except Exception:
            log.exception("demo upstream %s: unhandled error on %s %s", self.replica_id,
                          request.method, request.path)
            return self.error(500, "internal_error")

    def _failing_prefix(self, path: str) -> str | None:
        best: str | None = None
        for prefix in self.failures:
            if path.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return best

    async def _inject(self, request: web.Request, prefix: str, mode: str) -> web.StreamResponse:
        if mode == "500":
            return self.error(500, "injected_failure", mode=mode, prefix=prefix)
        if mode == "timeout":
            # Held until the client gives up (aiohttp then cancels this handler), the failure is
            # switched off, the server shuts down, or HOLD_SECONDS pass.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._holds.setdefault(prefix, asyncio.Event()).wait(), HOLD_SECONDS)
            return self.error(504, "injected_timeout_ended", mode=mode, prefix=prefix)
        # "reset": linger 0 makes close() send RST, so the client sees a reset, never a reply
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # never delivered: writing to the aborted transport ends the request quietly
        return web.Response(status=500)

    def release_held(self, prefix: str | None = None) -> None:
        """Answer the requests a "timeout" failure holds: those of one prefix, or all."""
        prefixes = list(self._holds) if prefix is None else [prefix]
        for p in prefixes:
            event = self._holds.pop(p, None)
            if event is not None:
                event.set()

    async def on_shutdown(self, _app: web.Application) -> None:
        self.release_held()

    # -- products: cacheable for 1 h, validators on every GET --------------------------------

    async def list_products(self, request: web.Request) -> web.Response:
        payload = {"products": list(self.products.values()), "count": len(self.products)}
        return self.conditional(request, payload, PRODUCTS_CACHE, self.products_changed)

    async def get_product(self, request: web.Request) -> web.Response:
        product = self._product(request)
        return self.conditional(request, {"product": product}, PRODUCTS_CACHE, product["updated_at"])

    async def create_product(self, request: web.Request) -> web.Response:
        fields = _product_fields(await _json_object(request), partial=False)
        now = int(time.time())
        pid = max(self.products, default=0) + 1
        product = {"id": pid, "currency": "EUR", "stock": 0, **fields, "updated_at": now}
        self.products[pid] = product
        self.products_changed = now
        return self.json({"product": product}, status=201, cache=NO_STORE,
                         headers={"Location": f"/api/products/{pid}"})

    async def update_product(self, request: web.Request) -> web.Response:
        product = self._product(request)
        fields = _product_fields(await _json_object(request), partial=True)
        now = int(time.time())
        product.update(fields, updated_at=now)
        self.products_changed = now
        return self.json({"product": product}, cache=NO_STORE)

    async def delete_product(self, request: web.Request) -> web.Response:
        self._product(request)
        del self.products[int(request.match_info["id"])]
        self.products_changed = int(time.time())
        return web.Response(status=204, headers={"Cache-Control": NO_STORE})

    def _product(self, request: web.Request) -> dict[str, Any]:
        pid = int(request.match_info["id"])
        product = self.products.get(pid)
        if product is None:
            raise Reject(404, "product_not_found", id=pid)
        return product

    # -- users (private, 5 min), orders and payments (never stored) --------------------------

    async def list_users(self, request: web.Request) -> web.Response:
        return self.json({"users": list(self.users.values())}, cache=USERS_CACHE)

    async def get_user(self, request: web.Request) -> web.Response:
        uid = int(request.match_info["id"])
        user = self.users.get(uid)
        if user is None:
            raise Reject(404, "user_not_found", id=uid)
        return self.json({"user": user}, cache=USERS_CACHE)

    async def list_orders(self, request: web.Request) -> web.Response:
        return self.json({"orders": list(self.orders.values()), "count": len(self.orders)},
                         cache=NO_STORE)

    async def get_order(self, request: web.Request) -> web.Response:
        oid = int(request.match_info["id"])
        order = self.orders.get(oid)
        if order is None:
            raise Reject(404, "order_not_found", id=oid)
        return self.json({"order": order}, cache=NO_STORE)

    async def create_order(self, request: web.Request) -> web.Response:
        body = await _json_object(request, allow_empty=True)
        oid = max(self.orders, default=0) + 1
        order = {**{k: v for k, v in body.items() if k not in ("id", "replica")},
                 "id": oid, "status": "created", "created_at": int(time.time())}
        self.orders[oid] = order
        return self.json({"order": order}, status=201, cache=NO_STORE,
                         headers={"Location": f"/api/orders/{oid}"})

    async def get_payment(self, request: web.Request) -> web.Response:
        pay_id = request.match_info["id"]
        payment = self.payments.get(pay_id)
        if payment is None:
            raise Reject(404, "payment_not_found", id=pay_id)
        return self.json({"payment": payment}, cache=NO_STORE)

    async def create_payment(self, request: web.Request) -> web.Response:
        pay_id = request.match_info.get("id") or f"pay_{uuid.uuid4().hex[:12]}"
        body = await _json_object(request, allow_empty=True)
        existed = pay_id in self.payments
        payment = {**self.payments.get(pay_id, {"status": "captured", "created_at": int(time.time())}),
                   **{k: v for k, v in body.items() if k not in ("id", "replica")}, "id": pay_id}
        self.payments[pay_id] = payment
        return self.json({"payment": payment}, status=200 if existed else 201, cache=NO_STORE,
                         headers={"Location": f"/api/payments/{pay_id}"})

    # -- the demo identity provider ---------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        if request.content_type in _FORM_TYPES:
            form = await request.post()
            username, password = form.get("username"), form.get("password")
            token_type = form.get("token_type", "jwt")
        else:
            body = await _json_object(request)
            username, password = body.get("username"), body.get("password")
            token_type = body.get("token_type", "jwt")
        if not isinstance(username, str) or not isinstance(password, str):
            raise Reject(400, "invalid_request", message="username and password are required")
        if token_type not in LOGIN_TOKEN_TYPES:
            raise Reject(400, "invalid_request", message="token_type must be jwt or opaque")
        expected = idp.DEMO_USERS.get(username)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return self.json({"error": "invalid_credentials", "status": 401}, status=401, cache=NO_STORE)
        scopes = ["read", "write"] + (["admin"] if username == "admin" else [])
        if token_type == "opaque":
            token = self.issue_opaque(username, scopes)
        else:
            token = self.key.mint(username, scopes=scopes, ttl_seconds=TOKEN_TTL_SECONDS)
        # RFC 6749 §5.1: token responses are never stored
        return self.json({"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_TTL_SECONDS,
                          "scope": " ".join(scopes)}, cache=NO_STORE)

    def issue_opaque(self, sub: str, scopes: list[str], ttl_seconds: int = TOKEN_TTL_SECONDS) -> str:
        """A random token whose meaning only the IdP knows (ask it by introspection): any replica
        sharing this one's state directory, else this replica alone."""
        now = int(time.time())
        token = secrets.token_urlsafe(32)
        self.opaque_tokens.issue(token, {
            "active": True, "sub": sub, "scope": " ".join(scopes), "client_id": "demo-shop",
            "token_type": "Bearer", "iss": idp.DEMO_ISSUER, "aud": idp.DEMO_AUDIENCE,
            "iat": now, "nbf": now, "exp": now + ttl_seconds, "jti": uuid.uuid4().hex,
        }, now)
        return token

    @property
    def introspection_secret(self) -> str:
        if self._introspection_secret is None:
            self._introspection_secret = introspection_secret(self.state_dir)
        return self._introspection_secret

    def _client_authenticated(self, request: web.Request) -> web.Response | None:
        """RFC 6749 §5.2 invalid_client unless the request carries the sidecar's credentials."""
        creds = _basic_credentials(request)
        if creds is not None and creds[0] == INTROSPECTION_CLIENT_ID and hmac.compare_digest(
                creds[1].encode(), self.introspection_secret.encode()):
            return None
        resp = self.json({"error": "invalid_client"}, status=401, cache=NO_STORE)
        resp.headers["WWW-Authenticate"] = 'Basic realm="demo-idp"'
        return resp

    def _token_claims(self, token: str) -> dict[str, Any] | None:
        """What the IdP knows of a live token it issued (opaque or JWT), else None."""
        now = time.time()
        claims = self.opaque_tokens.get(token)
        if claims is not None:
            return claims if claims.get("active") and claims.get("exp", 0) > now else None
        try:
            decoded = jwt.decode(token, self._verify_key, algorithms=["RS256"], audience=idp.DEMO_AUDIENCE,
                                 issuer=idp.DEMO_ISSUER)
        except jwt.PyJWTError:
            return None
        return {"active": True, "token_type": "Bearer", **decoded}

    async def introspect(self, request: web.Request) -> web.Response:
        """RFC 7662 §2: form `token` (+ optional `token_type_hint`); {"active": false} for
        anything unknown, expired or revoked, never an error that would tell which."""
        denied = self._client_authenticated(request)
        if denied is not None:
            return denied
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not token:
            return self.json({"error": "invalid_request", "error_description": "token is required"},
                             status=400, cache=NO_STORE)
        claims = self._token_claims(token)
        return self.json(claims if claims is not None else {"active": False}, cache=NO_STORE)

    async def revoke(self, request: web.Request) -> web.Response:
        """RFC 7009 §2: deactivate an opaque token; 200 also for tokens it does not know (§2.2)."""
        denied = self._client_authenticated(request)
        if denied is not None:
            return denied
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not token:
            return self.json({"error": "invalid_request", "error_description": "token is required"},
                             status=400, cache=NO_STORE)
        self.opaque_tokens.deactivate(token)
        return web.Response(status=200, headers={"Cache-Control": NO_STORE})

    async def logout(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Cache-Control": NO_STORE})

    async def jwks(self, request: web.Request) -> web.Response:
        # RFC 7517 §5: members a reader does not understand are ignored, so "replica" is safe here
        return self.json(self.published_jwks(), cache=JWKS_CACHE)

    async def health(self, request: web.Request) -> web.Response:
        return self.json({"status": "ok"}, cache=NO_STORE)

    # -- test helpers -----------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        code = _int_param(request.match_info["code"], "code")
        # 1xx are interim responses: sent as the final answer they would hang the client
        if not 200 <= code <= 599:
            raise Reject(400, "status_out_of_range", message="code must be 200..599", code=code)
        if code in NO_CONTENT_STATUSES:
            return web.Response(status=code)
        return self.json({"status": code}, status=code)

    async def delay(self, request: web.Request) -> web.Response:
        ms = _int_param(request.match_info["ms"], "ms")
        if ms < 0:
            raise Reject(400, "invalid_ms", message="ms must be >= 0")
        ms = min(ms, MAX_DELAY_MS)
        await asyncio.sleep(ms / 1000)
        return self.json({"delayed_ms": ms})

    async def echo_headers(self, request: web.Request) -> web.Response:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lname = name.lower()
            sep = "; " if lname == "cookie" else ", "
            headers[lname] = headers[lname] + sep + value if lname in headers else value
        query: dict[str, str | list[str]] = {}
        for name in request.query:
            values = request.query.getall(name)
            query[name] = values[0] if len(values) == 1 else values
        body = await request.read()
        return self.json({"method": request.method, "path": request.path, "query": query,
                          "query_string": request.query_string, "headers": headers,
                          "body": body.decode("utf-8", "replace"), "body_bytes": len(body)},
                         cache=NO_STORE)

    async def echo_cache(self, request: web.Request) -> web.Response:
        """Answers with the headers the query names and a per-URL counter, so a test sees a hit."""
        headers = _headers_from_query(request)
        url = request.path_qs
        counter = self.echo_counts[url] = self.echo_counts.get(url, 0) + 1
        last_modified = None
        if "last-modified" in headers:
            with contextlib.suppress(TypeError, ValueError):
                last_modified = email.utils.parsedate_to_datetime(headers["last-modified"]).timestamp()
        if _not_modified(request, headers.get("etag"), last_modified):
            return web.Response(status=304, headers=headers)
        vary = [v.strip().lower() for h in headers.getall("vary", []) for v in h.split(",") if v.strip()]
        return self.json({"counter": counter, "url": url, "method": request.method,
                          "set": {k.lower(): v for k, v in headers.items()},
                          "vary": {name: request.headers.get(name) for name in vary if name != "*"},
                          # reflected like a naive app building absolute URLs (cache-poisoning tests)
                          "forwarded_host": request.headers.get("x-forwarded-host")},
                         headers=headers)

    async def bytes_(self, request: web.Request) -> web.Response:
        """n bytes of a fixed pattern (for body-size limits), with headers from the query;
        `x-chunked=1` sends them chunked, without Content-Length."""
        n = _int_param(request.match_info["n"], "n")
        if not 0 <= n <= MAX_BYTES:
            raise Reject(400, "size_out_of_range", message=f"n must be 0..{MAX_BYTES}")
        headers = _headers_from_query(request)
        body = (b"0123456789abcdef" * (n // 16 + 1))[:n]
        if headers.pop("x-chunked", None) is not None:
            # no Content-Length: the body goes out chunked, its size unknown until the end
            resp = web.StreamResponse(headers=headers)
            resp.content_type = "application/octet-stream"
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, n, 65536):
                await resp.write(body[i:i + 65536])
            await resp.write_eof()
            return resp
        return web.Response(body=body, content_type="application/octet-stream", headers=headers)

    # -- /_control: observed and steered by tests, never routed by Envoy ---------------------

    async def control_hits(self, request: web.Request) -> web.Response:
        return self.json({"hits": dict(self.hits), "total": sum(self.hits.values())}, cache=NO_STORE)

    async def control_hits_reset(self, request: web.Request) -> web.Response:
        total = sum(self.hits.values())
        self.hits.clear()
        return self.json({"reset": True, "previous_total": total}, cache=NO_STORE)

    async def control_keys(self, request: web.Request) -> web.Response:
        """Key rotation by hand: `rotate` signs new tokens with a fresh key (both published),
        `retire` stops publishing every key but the current one. Test and demo aid."""
        action = request.query.get("action", "")
        if action == "rotate":
            self.retired_keys.append(self.key)
            self.key = idp.generate()
            self._verify_key = jwt.PyJWK(self.key.jwk).key
        elif action == "retire":
            self.retired_keys.clear()
        elif action != "":
            return self.json({"error": "bad_request", "message": "action must be rotate or retire"}, status=400,
                             cache=NO_STORE)
        return self.json({"current": self.key.kid, "published": [k["kid"] for k in self.published_jwks()["keys"]]},
                         cache=NO_STORE)

    def published_jwks(self) -> dict:
        return {"keys": [self.key.jwk, *(k.jwk for k in self.retired_keys)]}

    async def control_fail_list(self, request: web.Request) -> web.Response:
        return self.json({"failures": dict(self.failures)}, cache=NO_STORE)

    async def control_fail(self, request: web.Request) -> web.Response:
        mode = request.query.get("mode", "")
        prefix = request.query.get("prefix")
        if mode not in FAIL_MODES and mode != "off":
            raise Reject(400, "invalid_mode", message="mode must be one of 500, timeout, reset, off",
                         mode=mode)
        if mode == "off":
            if prefix is None:
                self.failures.clear()
            else:
                self.failures.pop(prefix, None)
            self.release_held(prefix)
        else:
            if not prefix or not prefix.startswith("/"):
                raise Reject(400, "invalid_prefix", message="prefix must start with /", prefix=prefix)
            if prefix.startswith(CONTROL_PREFIX):
                raise Reject(400, "invalid_prefix", message="/_control cannot be failed", prefix=prefix)
            if self.failures.get(prefix) == "timeout" and mode != "timeout":
                self.release_held(prefix)
            self.failures[prefix] = mode
        return self.json({"failures": dict(self.failures)}, cache=NO_STORE)


def _int_param(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise Reject(400, f"invalid_{name}", message=f"{name} must be an integer") from None


async def _json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise Reject(400, "invalid_json", message="a JSON object body is required")
    try:
        data = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
        raise Reject(400, "invalid_json", message="the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Reject(400, "invalid_json", message="the body must be a JSON object")
    return data


def _product_fields(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    name = body.get("name")
    if name is not None or not partial:
        if not isinstance(name, str) or not name.strip():
            raise Reject(400, "invalid_product", message="name must be a non-empty string")
        fields["name"] = name
    price = body.get("price")
    if price is not None or not partial:
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise Reject(400, "invalid_product", message="price must be a number >= 0")
        fields["price"] = price
    if "stock" in body:
        stock = body["stock"]
        if isinstance(stock, bool) or not isinstance(stock, int) or stock < 0:
            raise Reject(400, "invalid_product", message="stock must be an integer >= 0")
        fields["stock"] = stock
    for key in ("currency", "description"):
        if key in body:
            if not isinstance(body[key], str):
                raise Reject(400, "invalid_product", message=f"{key} must be a string")
            fields[key] = body[key]
    return fields


UPSTREAM = web.AppKey("upstream", Upstream)


def build_app(replica_id: str, key: idp.SigningKey, state_dir: Path | None = None) -> web.Application:
    """The aiohttp application of one replica; its state is `app[UPSTREAM]`. `state_dir` holds
    the introspection secret (default: $EXTPROC_STATE_DIR or .extproc/, read on first use)."""
    upstream = Upstream(replica_id, key, state_dir)
    app = web.Application(middlewares=[upstream.middleware], client_max_size=MAX_BYTES)
    app[UPSTREAM] = upstream
    app.on_shutdown.append(upstream.on_shutdown)
    r = app.router
    r.add_get("/api/products", upstream.list_products)
    r.add_post("/api/products", upstream.create_product)
    r.add_get(r"/api/products/{id:\d+}", upstream.get_product)
    r.add_put(r"/api/products/{id:\d+}", upstream.update_product)
    r.add_delete(r"/api/products/{id:\d+}", upstream.delete_product)
    r.add_get("/api/users", upstream.list_users)
    r.add_get(r"/api/users/{id:\d+}", upstream.get_user)
    r.add_get("/api/orders", upstream.list_orders)
    r.add_post("/api/orders", upstream.create_order)
    r.add_get(r"/api/orders/{id:\d+}", upstream.get_order)
    r.add_post("/api/payments", upstream.create_payment)
    r.add_get("/api/payments/{id}", upstream.get_payment)
    r.add_post("/api/payments/{id}", upstream.create_payment)
    r.add_post("/api/auth/login", upstream.login)
    r.add_post("/api/auth/logout", upstream.logout)
    r.add_post("/oauth/introspect", upstream.introspect)
    r.add_post("/oauth/revoke", upstream.revoke)
    r.add_get("/public/health", upstream.health)
    r.add_get("/.well-known/jwks.json", upstream.jwks)
    r.add_route("*", "/status/{code}", upstream.status)
    r.add_route("*", "/delay/{ms}", upstream.delay)
    r.add_route("*", "/echo/headers", upstream.echo_headers)
    r.add_route("*", "/api/echo", upstream.echo_headers)   # the same echo behind the protected /api/ routes
    r.add_route("*", "/echo/cache", upstream.echo_cache)
    r.add_get("/bytes/{n}", upstream.bytes_)
    r.add_get("/_control/hits", upstream.control_hits)
    r.add_post("/_control/hits/reset", upstream.control_hits_reset)
    r.add_get("/_control/fail", upstream.control_fail_list)
    r.add_route("*", "/_control/keys", upstream.control_keys)
    r.add_post("/_control/fail", upstream.control_fail)
    return app


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extproc.demo.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=18080, help="port to listen on; 0 picks one (default 18080)")
    parser.add_argument("--replica-id", default="r1", help="name sent in x-upstream-replica (default r1)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the demo IdP key lives (default $EXTPROC_STATE_DIR or .extproc/)")
    parser.add_argument("--access-log", action="store_true", help="log every request (off: benchmark path)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace, key: idp.SigningKey) -> int:
    app = build_app(args.replica_id, key, args.state_dir)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0,
                           access_log=logging.getLogger("extproc.demo.upstream.access") if args.access_log else None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        log.error("demo upstream %s cannot listen on %s:%s: %s", args.replica_id, args.host, args.port, exc)
        await runner.cleanup()
        return 1
    port = runner.addresses[0][1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("demo upstream %s listening on http://%s:%d", args.replica_id, host, port)
    await stop.wait()
    log.info("demo upstream %s stopping", args.replica_id)
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = idp.load_or_create(args.state_dir)
    introspection_secret(args.state_dir)   # now, so a sidecar started next finds the file
    return asyncio.run(_serve(args, key))


if __name__ == "__main__":
    sys.exit(main())
