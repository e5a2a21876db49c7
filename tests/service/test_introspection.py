"""RFC 7662 introspection: the demo IdP's endpoints and the sidecar's Introspector against them.

The demo upstream app runs in-process on a free port (aiohttp TestServer, real HTTP); requests
it served are counted through its /_control/hits, failures are injected through /_control/fail
(500, a held request for timeouts). A tiny local app serves the malformed answers the IdP
never gives. The introspector's cache runs on a fake clock (`now_epoch` is an argument), so
cache lifetimes are stepped, not slept.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.config import Introspection
from extproc.core.reasons import Reason
from extproc.demo import idp, upstream
from extproc.services.introspection import Introspector, basic_auth
from tests.support.procs import Proc, free_port, http_status

ENDPOINT = "/oauth/introspect"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Idp:
    """The demo upstream on a free port, with the handles a test needs."""

    def __init__(self, client: TestClient, state_dir: Path):
        self.client = client
        self.state_dir = state_dir
        self.app_state: upstream.Upstream = client.app[upstream.UPSTREAM]

    @property
    def endpoint(self) -> str:
        return str(self.client.make_url(ENDPOINT))

    @property
    def secret(self) -> str:
        return upstream.introspection_secret(self.state_dir)

    async def login(self, user: str = "alice", token_type: str = "opaque") -> str:
        resp = await self.client.post("/api/auth/login", json={"username": user, "password": f"{user}-password",
                                                               "token_type": token_type})
        assert resp.status == 200
        return (await resp.json())["access_token"]

    async def hits(self) -> int:
        resp = await self.client.get("/_control/hits")
        return (await resp.json())["hits"].get(ENDPOINT, 0)

    async def fail(self, mode: str) -> None:
        resp = await self.client.post("/_control/fail", params={"prefix": ENDPOINT, "mode": mode})
        assert resp.status == 200

    def introspector(self, clock: Callable[[], float] | None = None, secret: str | None = None,
                     endpoint: str | None = None, **cfg: Any) -> Introspector:
        settings = {"endpoint": endpoint or self.endpoint, "client_id": "extproc", **cfg}
        return Introspector(Introspection(**settings), self.secret if secret is None else secret,
                            clock=clock or FakeClock())


@pytest.fixture
def scenario(signing_key: idp.SigningKey, tmp_path: Path) -> Callable[[Callable[[Idp], Awaitable[Any]]], Any]:
    """Run `body(idp)` against a fresh demo upstream in its own event loop."""
    def runner(body: Callable[[Idp], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            app = upstream.build_app("idp-1", signing_key, tmp_path)
            async with TestClient(TestServer(app)) as client:
                return await body(Idp(client, tmp_path))
        return asyncio.run(main())
    return runner


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": basic_auth(client_id, secret)}


# -- the demo IdP's endpoints -----------------------------------------------------------------------

def test_opaque_login_token_introspects_active_with_its_claims(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login("alice")
        assert token.count(".") != 2                      # not a JWT
        resp = await idp_.client.post(ENDPOINT, data={"token": token, "token_type_hint": "access_token"},
                                      headers=basic("extproc", idp_.secret))
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        claims = await resp.json()
        assert claims["active"] is True and claims["sub"] == "alice"
        assert claims["scope"] == "read write" and claims["client_id"] == "demo-shop"
        assert claims["exp"] - claims["iat"] == upstream.TOKEN_TTL_SECONDS
        admin = await idp_.login("admin")
        resp = await idp_.client.post(ENDPOINT, data={"token": admin}, headers=basic("extproc", idp_.secret))
        assert (await resp.json())["scope"] == "read write admin"
    scenario(body)


def test_jwts_it_minted_introspect_too_and_unknown_tokens_are_inactive(scenario) -> None:
    async def body(idp_: Idp) -> None:
        jwt_token = await idp_.login("bob", token_type="jwt")
        auth = basic("extproc", idp_.secret)
        resp = await idp_.client.post(ENDPOINT, data={"token": jwt_token}, headers=auth)
        claims = await resp.json()
        assert claims["active"] is True and claims["sub"] == "bob" and claims["iss"] == idp.DEMO_ISSUER
        for unknown in ("nope", jwt_token[:-4] + "AAAA", idp_.app_state.key.mint("x", ttl_seconds=-10)):
            resp = await idp_.client.post(ENDPOINT, data={"token": unknown}, headers=auth)
            assert resp.status == 200
            assert (await resp.json())["active"] is False
    scenario(body)


def test_form_login_can_ask_for_an_opaque_token(scenario) -> None:
    async def body(idp_: Idp) -> None:
        resp = await idp_.client.post("/api/auth/login", data={"username": "alice", "password": "alice-password",
                                                                "token_type": "opaque"})
        assert resp.status == 200
        token = (await resp.json())["access_token"]
        assert token in idp_.app_state.opaque_tokens
        bad = await idp_.client.post("/api/auth/login", json={"username": "alice", "password": "alice-password",
                                                               "token_type": "saml"})
        assert bad.status == 400
    scenario(body)


def test_replicas_sharing_a_state_directory_share_opaque_tokens(signing_key: idp.SigningKey, tmp_path: Path) -> None:
    """compose and scripts/stack run two upstream replicas on one state directory, and Envoy
    balances logins over both: a token of r1 must introspect at r2, a revocation at r2 hold at r1.
    Replicas without a shared directory know only their own tokens."""
    async def introspect(client: TestClient, token: str) -> bool:
        state = client.app[upstream.UPSTREAM].state_dir
        resp = await client.post(ENDPOINT, data={"token": token},
                                 headers=basic("extproc", upstream.introspection_secret(state)))
        assert resp.status == 200
        return (await resp.json())["active"]

    async def login(client: TestClient) -> str:
        resp = await client.post("/api/auth/login", json={"username": "bob", "password": "bob-password",
                                                           "token_type": "opaque"})
        return (await resp.json())["access_token"]

    secret = upstream.introspection_secret(tmp_path)

    async def main() -> None:
        async with (TestClient(TestServer(upstream.build_app("r1", signing_key, tmp_path))) as r1,
                    TestClient(TestServer(upstream.build_app("r2", signing_key, tmp_path))) as r2):
            token = await login(r1)
            assert await introspect(r2, token) and await introspect(r1, token)
            assert token not in "".join(p.name for p in (tmp_path / "opaque-tokens").iterdir())  # digests only
            revoked = await r2.post("/oauth/revoke", data={"token": token}, headers=basic("extproc", secret))
            assert revoked.status == 200
            assert not await introspect(r1, token) and not await introspect(r2, token)
            assert await introspect(r1, await login(r2))
        async with (TestClient(TestServer(upstream.build_app("m1", signing_key, None))) as m1,
                    TestClient(TestServer(upstream.build_app("m2", signing_key, None))) as m2):
            token = await login(m1)
            assert await introspect(m1, token) and not await introspect(m2, token)
    asyncio.run(main())


def test_the_shared_opaque_tokens_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.demo import opaque

    monkeypatch.setattr(opaque, "SWEEP_EVERY", 5)
    tokens = opaque.OpaqueTokens(tmp_path, max_tokens=10)
    now = 1_000_000.0
    for i in range(40):           # every other one already expired
        tokens.issue(f"t{i}", {"active": True, "exp": now + (-1 if i % 2 else 3600 + i)}, now)
    files = list((tmp_path / "opaque-tokens").iterdir())
    assert len(files) <= 10 + 5
    # the expired ones go at each sweep: only those issued since the last one remain
    assert len([f for f in files if f.stat().st_mtime <= now]) < 5
    assert "t38" in tokens and tokens["t38"]["exp"] == now + 3638
    assert "t0" not in tokens         # the bound took those expiring first
    assert tokens.deactivate("t38") and tokens["t38"]["active"] is False
    assert not tokens.deactivate("never")


def test_introspection_needs_the_client_credentials(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        for headers in ({}, basic("extproc", "wrong"), basic("someone", idp_.secret),
                        {"Authorization": "Basic !!!"}, {"Authorization": f"Bearer {idp_.secret}"}):
            resp = await idp_.client.post(ENDPOINT, data={"token": token}, headers=headers)
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
            assert (await resp.json())["error"] == "invalid_client"
        missing = await idp_.client.post(ENDPOINT, data={}, headers=basic("extproc", idp_.secret))
        assert missing.status == 400 and (await missing.json())["error"] == "invalid_request"
    scenario(body)


def test_revoke_deactivates_an_opaque_token(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token, other = await idp_.login(), await idp_.login()
        auth = basic("extproc", idp_.secret)
        assert (await idp_.client.post("/oauth/revoke", data={"token": token})).status == 401
        resp = await idp_.client.post("/oauth/revoke", data={"token": token, "token_type_hint": "access_token"},
                                      headers=auth)
        assert resp.status == 200
        assert (await (await idp_.client.post(ENDPOINT, data={"token": token}, headers=auth)).json()) == {
            "active": False, "replica": "idp-1"}
        assert (await (await idp_.client.post(ENDPOINT, data={"token": other}, headers=auth)).json())["active"]
        # RFC 7009 §2.2: an unknown token is not an error
        assert (await idp_.client.post("/oauth/revoke", data={"token": "never-issued"}, headers=auth)).status == 200
    scenario(body)


def test_the_secret_file_is_created_once_and_private(tmp_path: Path) -> None:
    first = upstream.introspection_secret(tmp_path / "state")
    path = tmp_path / "state" / "introspection-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert upstream.introspection_secret(tmp_path / "state") == first


# -- the introspector -------------------------------------------------------------------------------

def test_active_token_gives_its_claims_and_is_cached(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login("alice")
        intro = idp_.introspector()
        try:
            result = await intro.introspect(token, time.time())
            assert result.active and result.reason is Reason.OK
            assert result.claims["sub"] == "alice" and result.claims["scope"] == "read write"
            again = await intro.introspect(token, time.time())
            assert again == result
            assert await idp_.hits() == 1 and intro.requests == 1    # the second came from the cache
        finally:
            await intro.close()
    scenario(body)


def test_inactive_token_is_inactive_and_cached_briefly(scenario) -> None:
    async def body(idp_: Idp) -> None:
        clock = FakeClock()
        intro = idp_.introspector(clock, negative_cache_seconds=5)
        try:
            result = await intro.introspect("not-a-token", time.time())
            assert not result.active and result.reason is Reason.INTROSPECTION_INACTIVE
            assert result.claims == {}
            await intro.introspect("not-a-token", time.time())
            assert await idp_.hits() == 1
            clock.advance(5)
            await intro.introspect("not-a-token", time.time())
            assert await idp_.hits() == 2
        finally:
            await intro.close()
    scenario(body)


def test_a_revocation_at_the_idp_shows_after_the_cache_ttl(scenario) -> None:
    async def body(idp_: Idp) -> None:
        clock = FakeClock()
        token = await idp_.login()
        intro = idp_.introspector(clock, cache_ttl_seconds=30)
        try:
            assert (await intro.introspect(token, time.time())).active
            await idp_.client.post("/oauth/revoke", data={"token": token}, headers=basic("extproc", idp_.secret))
            clock.advance(29.9)
            assert (await intro.introspect(token, time.time())).active      # cached: the bound is the TTL
            clock.advance(0.1)
            result = await intro.introspect(token, time.time())
            assert result.reason is Reason.INTROSPECTION_INACTIVE
        finally:
            await intro.close()
    scenario(body)


def test_the_cache_never_outlives_the_token(scenario) -> None:
    async def body(idp_: Idp) -> None:
        clock = FakeClock()
        token = await idp_.login()
        exp = idp_.app_state.opaque_tokens[token]["exp"]
        intro = idp_.introspector(clock, cache_ttl_seconds=3600)
        try:
            assert (await intro.introspect(token, exp - 2)).active        # cached for 2 s, not 3600
            clock.advance(1.9)
            assert (await intro.introspect(token, exp - 0.1)).active and intro.requests == 1
            clock.advance(0.2)
            # the cache entry ended with the token; asked again, the answer's exp has passed
            assert (await intro.introspect(token, exp + 0.1)).reason is Reason.INTROSPECTION_INACTIVE
            assert intro.requests == 2
            fresh = await idp_.login()
            exp = idp_.app_state.opaque_tokens[fresh]["exp"]
            assert (await intro.introspect(fresh, exp - 100)).active
            # even with the cache clock standing still, a caller past exp is never served it
            assert not (await intro.introspect(fresh, exp + 1)).active
        finally:
            await intro.close()
    scenario(body)


def test_concurrent_lookups_of_one_token_share_one_request(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        intro = idp_.introspector()
        try:
            results = await asyncio.gather(*(intro.introspect(token, time.time()) for _ in range(25)))
            assert all(r.active and r == results[0] for r in results)
            assert await idp_.hits() == 1 and intro.requests == 1
            others = [await idp_.login() for _ in range(3)]
            await asyncio.gather(*(intro.introspect(t, time.time()) for t in others for _ in range(5)))
            assert await idp_.hits() == 4                                    # one per distinct token
        finally:
            await intro.close()
    scenario(body)


def test_a_caller_giving_up_does_not_fail_the_others(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        intro = idp_.introspector()
        try:
            impatient = asyncio.create_task(intro.introspect(token, time.time()))
            patient = asyncio.create_task(intro.introspect(token, time.time()))
            await asyncio.sleep(0)
            impatient.cancel()
            assert (await patient).active
            assert intro.requests == 1
        finally:
            await intro.close()
    scenario(body)


def test_the_cache_is_a_bounded_lru(scenario) -> None:
    async def body(idp_: Idp) -> None:
        a, b, c = [await idp_.login() for _ in range(3)]
        intro = idp_.introspector(max_entries=2)
        try:
            for t in (a, b, a, c):        # c evicts b, the least recently used
                await intro.introspect(t, time.time())
            assert len(intro) == 2 and intro.requests == 3
            await intro.introspect(a, time.time())
            assert intro.requests == 3
            await intro.introspect(b, time.time())
            assert intro.requests == 4
        finally:
            await intro.close()
    scenario(body)


def test_client_credentials_are_form_encoded_before_basic(signing_key: idp.SigningKey, tmp_path: Path) -> None:
    (tmp_path / "introspection-secret").write_text("s:e+c r%t/=\n")

    async def main() -> None:
        app = upstream.build_app("idp-1", signing_key, tmp_path)
        async with TestClient(TestServer(app)) as client:
            idp_ = Idp(client, tmp_path)
            assert idp_.secret == "s:e+c r%t/="
            token = await idp_.login()
            intro = idp_.introspector()
            try:
                assert (await intro.introspect(token, time.time())).active
            finally:
                await intro.close()
    asyncio.run(main())


# -- when the endpoint cannot answer ------------------------------------------------------------------

def test_endpoint_down_is_unavailable_quickly_never_cached_and_logged_once(scenario, caplog) -> None:
    caplog.set_level(logging.INFO, "extproc.introspection")

    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        down = idp_.introspector(endpoint=f"http://127.0.0.1:{free_port()}{ENDPOINT}")
        try:
            for _ in range(3):
                started = time.monotonic()
                result = await down.introspect(token, time.time())
                assert time.monotonic() - started < 1.0
                assert not result.active and result.reason is Reason.INTROSPECTION_UNAVAILABLE
            assert down.requests == 3 and len(down) == 0                    # failures are not cached
        finally:
            await down.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "extproc.introspection"]
        assert messages == ["introspection endpoint unavailable: tokens it must judge are refused"]
        assert all(token not in str(r.__dict__) for r in caplog.records)
    scenario(body)


def test_5xx_and_wrong_credentials_are_unavailable_then_it_recovers(scenario, caplog) -> None:
    caplog.set_level(logging.INFO, "extproc.introspection")

    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        intro = idp_.introspector()
        wrong = idp_.introspector(secret="not-the-secret")
        try:
            await idp_.fail("500")
            assert (await intro.introspect(token, time.time())).reason is Reason.INTROSPECTION_UNAVAILABLE
            await idp_.fail("off")
            assert (await intro.introspect(token, time.time())).active
            assert (await wrong.introspect(token, time.time())).reason is Reason.INTROSPECTION_UNAVAILABLE
        finally:
            await intro.close()
            await wrong.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "extproc.introspection"]
        assert messages == ["introspection endpoint unavailable: tokens it must judge are refused",
                            "introspection endpoint reachable again",
                            "introspection endpoint unavailable: tokens it must judge are refused"]
        assert all(token not in str(r.__dict__) for r in caplog.records)
    scenario(body)


def test_a_slow_endpoint_times_out_quickly(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        intro = idp_.introspector(timeout_ms=100)
        try:
            await idp_.fail("timeout")                # the IdP holds the request
            started = time.monotonic()
            result = await intro.introspect(token, time.time())
            elapsed = time.monotonic() - started
            assert result.reason is Reason.INTROSPECTION_UNAVAILABLE
            assert 0.09 <= elapsed < 0.6
            await idp_.fail("off")
            assert (await intro.introspect(token, time.time())).active
        finally:
            await intro.close()
    scenario(body)


@asynccontextmanager
async def odd_server() -> AsyncIterator[TestServer]:
    """Answers the IdP never gives: not JSON, not an object, a string `active`, a bad `exp`,
    too large, a redirect."""
    async def text(_: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", content_type="text/html")

    def fixed(payload: Any) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            return web.json_response(payload)
        return handler

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_post("/text", text)
    app.router.add_post("/list", fixed([{"active": True}]))
    app.router.add_post("/string", fixed({"active": "true", "sub": "alice"}))
    app.router.add_post("/missing", fixed({"sub": "alice"}))
    app.router.add_post("/bad-exp", fixed({"active": True, "exp": "tomorrow"}))
    app.router.add_post("/huge", fixed({"active": True, "padding": "x" * 100_000}))
    app.router.add_post("/redirect", redirect)
    async with TestServer(app) as server:
        yield server


@pytest.mark.parametrize("path", ["/text", "/list", "/string", "/missing", "/bad-exp", "/huge", "/redirect"])
def test_garbage_answers_are_unavailable_and_not_cached(path: str) -> None:
    async def main() -> None:
        async with odd_server() as server:
            intro = Introspector(Introspection(endpoint=str(server.make_url(path)), client_id="extproc"), "s",
                                 clock=FakeClock())
            try:
                for _ in range(2):
                    result = await intro.introspect("some-token", time.time())
                    assert not result.active and result.reason is Reason.INTROSPECTION_UNAVAILABLE
                assert intro.requests == 2
            finally:
                await intro.close()
    asyncio.run(main())


def test_close_cancels_what_is_in_flight_and_leaves_no_task(scenario) -> None:
    async def body(idp_: Idp) -> None:
        token = await idp_.login()
        intro = idp_.introspector(timeout_ms=5000)
        await idp_.fail("timeout")
        waiting = asyncio.create_task(intro.introspect(token, time.time()))
        await eventually(idp_.hits, "the request is held at the IdP")
        started = time.monotonic()
        await intro.close()
        assert time.monotonic() - started < 1.0
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await idp_.fail("off")
        mine = {t for t in asyncio.all_tasks() if t.get_name() == "introspection"}
        assert mine == set()
    scenario(body)


def test_no_client_id_sends_no_authorization() -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        form = await request.post()
        assert form["token"] == "t" and form["token_type_hint"] == "access_token"
        return web.json_response({"active": False})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/i", handler)
        async with TestServer(app) as server:
            for client_id, secret in ((None, None), ("extproc", "pw")):
                intro = Introspector(Introspection(endpoint=str(server.make_url("/i")), client_id=client_id), secret)
                try:
                    await intro.introspect("t", time.time())
                finally:
                    await intro.close()
    asyncio.run(main())
    assert seen == [None, "Basic " + base64.b64encode(b"extproc:pw").decode()]


def test_session_factory_is_used_lazily_in_the_loop() -> None:
    made: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        session = aiohttp.ClientSession()
        made.append(session)
        return session

    intro = Introspector(Introspection(endpoint=f"http://127.0.0.1:{free_port()}/x"), None,
                         session_factory=factory)   # built outside any loop, as at config load
    assert made == []

    async def main() -> None:
        assert (await intro.introspect("t", time.time())).reason is Reason.INTROSPECTION_UNAVAILABLE
        await intro.close()
    asyncio.run(main())
    assert len(made) == 1 and made[0].closed


def test_the_real_upstream_process_creates_the_secret_and_answers_introspection(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    proc = Proc("upstream-introspection", [sys.executable, "-m", "extproc.demo.upstream", "--port", str(port),
                                           "--replica-id", "p1", "--state-dir", str(state)], log_dir=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        proc.wait_ready(lambda: http_status(f"{base}/public/health") == 200)
        secret_file = state / "introspection-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600      # there before anyone asked

        async def main() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/api/auth/login", json={
                        "username": "alice", "password": "alice-password", "token_type": "opaque"}) as resp:
                    token = (await resp.json())["access_token"]
            intro = Introspector(Introspection(endpoint=f"{base}{ENDPOINT}", client_id="extproc",
                                               client_secret_file=secret_file),
                                 secret_file.read_text().strip())
            try:
                result = await intro.introspect(token, time.time())
                assert result.active and result.claims["sub"] == "alice"
            finally:
                await intro.close()
        asyncio.run(main())
    finally:
        proc.stop()
