"""The demo upstream: its webshop API, the demo IdP, the test helpers and failure injection.

Most tests run the aiohttp app in-process (TestServer on a free port, driven by asyncio.run);
one starts the real `python -m extproc.demo.upstream` and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.demo import idp, upstream
from tests.support.procs import Proc, free_port, http_status

T = TypeVar("T")
REPLICA = "t1"


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[idp.SigningKey]:
    # one RSA key per module: generating it is the slow part, and it lives in a temp state dir
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXTPROC_STATE_DIR", str(state))
        key = idp.load_or_create()
        assert (state / "demo-idp-key.pem").exists()
        yield key


@pytest.fixture
def run(signing_key: idp.SigningKey) -> Callable[[Callable[[TestClient], Awaitable[T]]], T]:
    """Run one scenario against a fresh replica; returns what the scenario returns."""
    def runner(scenario: Callable[[TestClient], Awaitable[T]]) -> T:
        async def main() -> T:
            app = upstream.build_app(REPLICA, signing_key)
            async with TestClient(TestServer(app)) as client:
                return await scenario(client)
        return asyncio.run(main())
    return runner


async def _json(resp: aiohttp.ClientResponse) -> Any:
    assert resp.headers["x-upstream-replica"] == REPLICA
    return await resp.json()


# -- the demo identity provider ---------------------------------------------------------------

def test_login_token_verifies_against_served_jwks(run):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/api/auth/login", json={"username": "alice", "password": "alice-password"})
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        body = await _json(resp)
        assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
        assert body["replica"] == REPLICA

        jwks_resp = await client.get("/.well-known/jwks.json")
        assert jwks_resp.status == 200
        assert jwks_resp.headers["Cache-Control"] == "public, max-age=300"
        jwks = await _json(jwks_resp)
        kid = jwt.get_unverified_header(body["access_token"])["kid"]
        (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
        claims = jwt.decode(body["access_token"], jwt.PyJWK(jwk).key, algorithms=["RS256"],
                            audience=idp.DEMO_AUDIENCE, issuer=idp.DEMO_ISSUER)
        assert claims["sub"] == "alice"
        assert claims["scope"].split() == ["read", "write"]
        assert claims["exp"] - claims["iat"] == 3600
    run(scenario)


def test_login_admin_by_form_gets_admin_scope(run):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/api/auth/login", data={"username": "admin", "password": "admin-password"})
        assert resp.status == 200
        token = (await _json(resp))["access_token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "admin"
        assert set(claims["scope"].split()) == {"read", "write", "admin"}
    run(scenario)


@pytest.mark.parametrize("payload", [
    {"username": "alice", "password": "wrong"},
    {"username": "mallory", "password": "alice-password"},
])
def test_login_bad_credentials_is_401(run, payload):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/api/auth/login", json=payload)
        assert resp.status == 401
        body = await _json(resp)
        assert body["error"] == "invalid_credentials"
        assert "access_token" not in body
    run(scenario)


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"", b'{"username": "alice"}'])
def test_login_malformed_is_400(run, raw):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/api/auth/login", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400
        assert "error" in await _json(resp)
    run(scenario)


def test_logout_is_204(run):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/api/auth/logout")
        assert resp.status == 204
        assert resp.headers["x-upstream-replica"] == REPLICA
    run(scenario)


# -- the webshop: products, users, orders, payments -----------------------------------------

def test_products_crud(run):
    async def scenario(client: TestClient) -> None:
        listing = await client.get("/api/products")
        assert listing.status == 200
        assert listing.headers["Cache-Control"] == "public, max-age=3600"
        seeded = (await _json(listing))["count"]
        assert seeded >= 3

        created = await client.post("/api/products", json={"name": "Milk jug", "price": 12.5, "stock": 4})
        assert created.status == 201
        product = (await _json(created))["product"]
        assert created.headers["Location"] == f"/api/products/{product['id']}"
        assert product["name"] == "Milk jug" and product["price"] == 12.5

        got = await client.get(f"/api/products/{product['id']}")
        assert got.status == 200 and (await _json(got))["product"] == product

        updated = await client.put(f"/api/products/{product['id']}", json={"price": 10})
        assert updated.status == 200
        assert (await _json(updated))["product"]["price"] == 10
        assert (await _json(await client.get(f"/api/products/{product['id']}")))["product"]["price"] == 10

        deleted = await client.delete(f"/api/products/{product['id']}")
        assert deleted.status == 204
        missing = await client.get(f"/api/products/{product['id']}")
        assert missing.status == 404
        assert (await _json(missing))["error"] == "product_not_found"
        assert (await _json(await client.get("/api/products")))["count"] == seeded
        assert (await client.put("/api/products/999", json={"price": 1})).status == 404
        assert (await client.delete("/api/products/999")).status == 404
    run(scenario)


@pytest.mark.parametrize("raw", [b"{oops", b'"a string"', b'{"name": "x"}', b'{"name": "", "price": 1}',
                                 b'{"name": "x", "price": -1}'])
def test_products_create_rejects_bad_bodies(run, raw):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/api/products", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400
        assert resp.headers["Content-Type"].startswith("application/json")
        assert (await _json(resp))["error"] in ("invalid_json", "invalid_product")
    run(scenario)


def test_products_etag_gives_304_and_changes_on_update(run):
    async def scenario(client: TestClient) -> None:
        first = await client.get("/api/products/1")
        etag = first.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"')          # strong
        assert "Last-Modified" in first.headers

        again = await client.get("/api/products/1")
        assert again.headers["ETag"] == etag                          # stable for the same content

        not_modified = await client.get("/api/products/1", headers={"If-None-Match": etag})
        assert not_modified.status == 304
        assert not_modified.headers["ETag"] == etag
        assert not_modified.headers["Cache-Control"] == "public, max-age=3600"
        assert not_modified.headers["x-upstream-replica"] == REPLICA
        assert await not_modified.read() == b""

        since = await client.get("/api/products/1", headers={"If-Modified-Since": first.headers["Last-Modified"]})
        assert since.status == 304                                     # no If-None-Match: the date decides

        in_list = await client.get("/api/products/1", headers={"If-None-Match": f'"other", W/{etag}'})
        assert in_list.status == 304                                  # weak comparison, RFC 9110 §13.1.2
        assert (await client.get("/api/products/1", headers={"If-None-Match": '"other"'})).status == 200

        listing = await client.get("/api/products")
        list_etag = listing.headers["ETag"]
        assert (await client.get("/api/products", headers={"If-None-Match": list_etag})).status == 304

        await client.put("/api/products/1", json={"stock": 7})
        changed = await client.get("/api/products/1", headers={"If-None-Match": etag})
        assert changed.status == 200
        assert changed.headers["ETag"] != etag
        assert (await client.get("/api/products", headers={"If-None-Match": list_etag})).status == 200
    run(scenario)


def test_users_orders_payments_cache_headers(run):
    async def scenario(client: TestClient) -> None:
        user = await client.get("/api/users/1")
        assert user.status == 200
        assert user.headers["Cache-Control"] == "private, max-age=300"
        assert (await _json(user))["user"]["id"] == 1
        assert (await client.get("/api/users/999")).status == 404

        orders = await client.get("/api/orders")
        assert orders.status == 200 and orders.headers["Cache-Control"] == "no-store"
        created = await client.post("/api/orders", json={"items": [{"product_id": 1, "quantity": 1}]})
        assert created.status == 201 and created.headers["Cache-Control"] == "no-store"
        order = (await _json(created))["order"]
        assert (await _json(await client.get(f"/api/orders/{order['id']}")))["order"] == order

        payment = await client.get("/api/payments/pay_1")
        assert payment.status == 200 and payment.headers["Cache-Control"] == "no-store"
        made = await client.post("/api/payments/pay_9", json={"order_id": order["id"], "amount": 8.5})
        assert made.status == 201 and made.headers["Cache-Control"] == "no-store"
        assert (await _json(await client.get("/api/payments/pay_9")))["payment"]["amount"] == 8.5
        assert (await client.get("/api/payments/nope")).status == 404
    run(scenario)


def test_health_unknown_path_and_replica_header(run):
    async def scenario(client: TestClient) -> None:
        health = await client.get("/public/health")
        assert health.status == 200
        assert await _json(health) == {"status": "ok", "replica": REPLICA}

        unknown = await client.get("/no/such/thing")
        assert unknown.status == 404
        assert unknown.headers["Content-Type"].startswith("application/json")
        assert (await _json(unknown))["replica"] == REPLICA

        wrong_method = await client.patch("/api/products")
        assert wrong_method.status == 405
        assert "GET" in wrong_method.headers["Allow"]
        assert (await _json(wrong_method))["error"] == "method_not_allowed"
    run(scenario)


# -- test helpers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "code"), [("GET", 200), ("POST", 201), ("GET", 418), ("PUT", 503),
                                              ("DELETE", 599)])
def test_status_answers_that_status_with_json(run, method, code):
    async def scenario(client: TestClient) -> None:
        resp = await client.request(method, f"/status/{code}")
        assert resp.status == code
        assert (await _json(resp))["status"] == code
    run(scenario)


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_content(run, code):
    async def scenario(client: TestClient) -> None:
        resp = await client.get(f"/status/{code}")
        assert resp.status == code
        assert resp.headers["x-upstream-replica"] == REPLICA
        assert await resp.read() == b""
    run(scenario)


@pytest.mark.parametrize("code", ["100", "150", "600", "42", "abc"])
def test_status_out_of_range_is_400(run, code):
    async def scenario(client: TestClient) -> None:
        resp = await client.get(f"/status/{code}")
        assert resp.status == 400
        assert "error" in await _json(resp)
    run(scenario)


def test_delay(run):
    async def scenario(client: TestClient) -> None:
        resp = await client.get("/delay/20")
        assert resp.status == 200
        assert (await _json(resp))["delayed_ms"] == 20
        assert (await client.get("/delay/-1")).status == 400
    run(scenario)


def test_echo_headers(run):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/echo/headers?a=1&b=2&b=3", data=b"hello",
                                 headers={"X-Request-Id": "abc", "Authorization": "Bearer t"})
        body = await _json(resp)
        assert body["method"] == "POST"
        assert body["path"] == "/echo/headers"
        assert body["query"] == {"a": "1", "b": ["2", "3"]}
        assert body["headers"]["x-request-id"] == "abc"
        assert body["headers"]["authorization"] == "Bearer t"
        assert body["body"] == "hello" and body["body_bytes"] == 5
    run(scenario)


def test_echo_cache_sets_headers_and_counts(run):
    async def scenario(client: TestClient) -> None:
        url = "/echo/cache?cache-control=max-age%3D60&etag=%22v1%22&vary=accept-language"
        first = await client.get(url, headers={"Accept-Language": "de"})
        assert first.status == 200
        assert first.headers["Cache-Control"] == "max-age=60"
        assert first.headers["ETag"] == '"v1"'
        assert first.headers["Vary"] == "accept-language"
        body = await _json(first)
        assert body["counter"] == 1
        assert body["vary"] == {"accept-language": "de"}

        second = await _json(await client.get(url))
        assert second["counter"] == 2                                  # every hit is visible
        other = await _json(await client.get("/echo/cache?cache-control=no-store"))
        assert other["counter"] == 1                                   # counted per URL

        revalidated = await client.get(url, headers={"If-None-Match": '"v1"'})
        assert revalidated.status == 304
        assert revalidated.headers["ETag"] == '"v1"'

        typed = await client.get("/echo/cache?content-type=text%2Fplain&age=5")
        assert typed.status == 200
        assert typed.headers["Content-Type"] == "text/plain" and typed.headers["Age"] == "5"

        refused = await client.get("/echo/cache?content-length=5")
        assert refused.status == 400
    run(scenario)


def test_bytes(run):
    async def scenario(client: TestClient) -> None:
        resp = await client.get("/bytes/100000?cache-control=max-age%3D5")
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "max-age=5"
        assert len(await resp.read()) == 100000
        assert (await client.get(f"/bytes/{upstream.MAX_BYTES + 1}")).status == 400
    run(scenario)


# -- /_control: hits and failure injection ---------------------------------------------------

def test_hits_count_every_path_except_control(run):
    async def scenario(client: TestClient) -> None:
        for _ in range(3):
            await client.get("/api/products")
        await client.get("/public/health")
        await client.get("/missing")
        await client.get("/_control/hits")
        await client.get("/_control/fail")
        hits = await _json(await client.get("/_control/hits"))
        assert hits == {"replica": REPLICA, "total": 5,
                        "hits": {"/api/products": 3, "/public/health": 1, "/missing": 1}}

        reset = await client.post("/_control/hits/reset")
        assert reset.status == 200
        assert (await _json(await client.get("/_control/hits")))["total"] == 0
    run(scenario)


def test_fail_500_then_off(run):
    async def scenario(client: TestClient) -> None:
        on = await client.post("/_control/fail", params={"prefix": "/api/payments", "mode": "500"})
        assert on.status == 200
        assert (await _json(on))["failures"] == {"/api/payments": "500"}

        failed = await client.get("/api/payments/pay_1")
        assert failed.status == 500
        assert (await _json(failed))["error"] == "injected_failure"
        assert (await client.get("/api/products")).status == 200     # other prefixes untouched

        await client.post("/_control/fail", params={"prefix": "/api/orders", "mode": "500"})
        listed = await _json(await client.get("/_control/fail"))
        assert listed["failures"] == {"/api/payments": "500", "/api/orders": "500"}

        await client.post("/_control/fail", params={"prefix": "/api/payments", "mode": "off"})
        assert (await client.get("/api/payments/pay_1")).status == 200
        assert (await client.get("/api/orders")).status == 500
        assert (await _json(await client.get("/_control/fail")))["failures"] == {"/api/orders": "500"}

        hits = (await _json(await client.get("/_control/hits")))["hits"]
        assert hits["/api/payments/pay_1"] == 2                       # injected failures still count
    run(scenario)


@pytest.mark.parametrize("params", [{"prefix": "/api", "mode": "explode"}, {"prefix": "/api"},
                                    {"prefix": "api", "mode": "500"}, {"prefix": "/_control", "mode": "500"}])
def test_fail_rejects_bad_requests(run, params):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/_control/fail", params=params)
        assert resp.status == 400
        assert "error" in await _json(resp)
        assert (await _json(await client.get("/_control/fail")))["failures"] == {}
    run(scenario)


def test_fail_reset_gives_connection_error_not_response(run):
    async def scenario(client: TestClient) -> None:
        await client.post("/_control/fail", params={"prefix": "/api/payments", "mode": "reset"})
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get("/api/payments/pay_1")

        # on the wire: not one byte of a response, the connection is reset
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /api/payments/pay_1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        with pytest.raises(ConnectionResetError):
            await reader.read(65536)
        writer.close()

        assert (await client.get("/api/products")).status == 200     # the server itself is fine
        hits = (await _json(await client.get("/_control/hits")))["hits"]
        assert hits["/api/payments/pay_1"] == 2
    run(scenario)


def test_fail_timeout_holds_until_client_gives_up_or_off(run):
    async def scenario(client: TestClient) -> None:
        await client.post("/_control/fail", params={"prefix": "/api/payments", "mode": "timeout"})
        with pytest.raises(TimeoutError):
            await client.get("/api/payments/pay_1", timeout=aiohttp.ClientTimeout(total=0.3))

        # a held request is let go (504) when the failure is switched off
        held = asyncio.create_task(client.get("/api/payments/pay_1"))
        for _ in range(200):
            if (await _json(await client.get("/_control/hits")))["hits"]["/api/payments/pay_1"] == 2:
                break
            await asyncio.sleep(0.01)
        assert not held.done()
        await client.post("/_control/fail", params={"prefix": "/api/payments", "mode": "off"})
        released = await asyncio.wait_for(held, 5)
        assert released.status == 504
        assert (await _json(released))["error"] == "injected_timeout_ended"
        assert (await client.get("/api/payments/pay_1")).status == 200
    run(scenario)


# -- the real process ------------------------------------------------------------------------

def test_process_serves_and_exits_0_on_sigterm(tmp_path: Path):
    port = free_port()
    state = tmp_path / "state"
    proc = Proc("upstream", [sys.executable, "-m", "extproc.demo.upstream", "--port", str(port),
                             "--replica-id", "p1", "--state-dir", str(state)], log_dir=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        proc.wait_ready(lambda: http_status(f"{base}/public/health") == 200)
        with urllib.request.urlopen(f"{base}/.well-known/jwks.json", timeout=5) as resp:
            assert resp.headers["x-upstream-replica"] == "p1"
            jwks = json.load(resp)
        assert jwks["keys"][0]["kid"] == idp.load_or_create(state).kid   # the key from --state-dir
        assert f"demo upstream p1 listening on {base}" in proc.log_text()

        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(timeout=15) == 0
    finally:
        proc.stop()
