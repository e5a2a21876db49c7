"""Every JWT key source for real: a JWKS URI, an OpenID discovery document, a JWKS file, an
inline JWKS, a PEM public key and an HMAC secret, against a local HTTP server the test controls
(it serves documents, changes them, answers 500 or garbage, hangs, goes away, counts hits).

Decisions are driven through `Runtime.build(cfg)` + `rt.identity.decide(...)` (the code the
servicers call), and through the real Worker's gRPC Check where the worker's own life matters
(first Check after start, reload). Metrics are process-global: each test uses its own provider
name and asserts on deltas. Nothing sleeps for synchronisation: `eventually` polls.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from extproc import config as cfgmod
from extproc.app import Runtime
from extproc.core.decision import Decision
from extproc.core.jwt import KeySet
from extproc.core.reasons import Reason
from extproc.core.request import Request
from extproc.demo import idp
from extproc.services import identity as identitymod
from extproc.services import jwks as jwksmod
from tests.service.conftest import Sidecar, check_request, denied_body, eventually, run, sample, write_atomic
from tests.support.procs import free_port

ISS_A = "https://a.idp.test"
ISS_B = "https://b.idp.test"
ISS_C = "https://c.idp.test"
AUD = "orders-api"
OK_CODE = 0
DISCOVERY = "/.well-known/openid-configuration"


# ------------------------------------------------------------------------------ signing keys ---

@dataclass(frozen=True)
class Signer:
    """A private key that mints tokens, and its public half as a JWK or PEM."""
    private: Any
    alg: str
    kid: str

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        algo = {"RS": RSAAlgorithm, "ES": ECAlgorithm, "Ed": OKPAlgorithm}[self.alg[:2]]
        return {**algo.to_jwk(self.public, as_dict=True), "kid": self.kid, "use": "sig", "alg": self.alg}

    def pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, iss: str = ISS_A, *, kid: str | None = "", sub: str = "alice", aud: str = AUD) -> str:
        """A fresh token (new jti, so no cache answers it); kid "" means this key's kid, None none."""
        return mint(self.private, self.alg, iss, kid=self.kid if kid == "" else kid, sub=sub, aud=aud)


def mint(key: Any, alg: str, iss: str, *, kid: str | None = None, sub: str = "alice", aud: str = AUD) -> str:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def jwks(*signers: Signer) -> dict[str, Any]:
    return {"keys": [s.jwk() for s in signers]}


@dataclass(frozen=True)
class Keys:
    a: Signer          # RS256, the provider's current key
    b: Signer          # RS256, the key it rotates to
    forger: Signer     # RS256, a key nobody published


@pytest.fixture(scope="session")
def keys() -> Keys:
    def rsa_signer(kid: str) -> Signer:
        return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", kid)
    return Keys(rsa_signer("key-a"), rsa_signer("key-b"), rsa_signer("key-forged"))


# ----------------------------------------------------------------------------- key server ---

class KeyServer:
    """A JWKS / discovery endpoint on 127.0.0.1 that the test controls and counts.

    Each path answers according to its behaviour: a JSON document (optionally with a
    Cache-Control header), `http_500`, `garbage` (truncated JSON), `slow` (never answers until
    the server stops) or 404 when nothing is set. `stop()` and `start()` make it unreachable and
    bring it back on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.behaviour: dict[str, tuple[str, bytes, str | None]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def publish(self, path: str, doc: Any, cache_control: str | None = None) -> None:
        self.behaviour[path] = ("json", json.dumps(doc).encode(), cache_control)

    def fail(self, path: str, how: str) -> None:
        self.behaviour[path] = (how, b"", None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        kind, body, cache_control = self.behaviour.get(request.path, ("missing", b"", None))
        if kind == "slow":
            await self._release.wait()
            return web.Response(status=503)
        if kind == "http_500":
            return web.Response(status=500, text="internal error")
        if kind == "garbage":
            return web.Response(body=b'{"keys": [{"kty": "RSA", "n": ', content_type="application/json")
        if kind == "missing":
            return web.Response(status=404)
        headers = {"Cache-Control": cache_control} if cache_control else None
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KeyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# -------------------------------------------------------------------------------- runtime ---

def unique(prefix: str = "idp") -> str:
    """A provider name of this test alone: the gauges it sets are not another test's."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def provider(**kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"issuer": ISS_A, "audiences": [AUD], "algorithms": ["RS256"],
                         "retry_interval_seconds": 0.05, "leeway_seconds": 5}
    p.update(kw)
    return p


def make_config(providers: dict[str, dict[str, Any]], policies: dict[str, Any] | None = None) -> cfgmod.Config:
    policies = policies or {"api": {"auth": {"any_of": list(providers)}}}
    return cfgmod.parse(yaml.safe_dump({"providers": providers, "policies": policies, "default_policy": "api"}),
                        "<test>")


@contextlib.asynccontextmanager
async def started(cfg: cfgmod.Config) -> AsyncIterator[Runtime]:
    rt = Runtime.build(cfg)
    try:
        await rt.start()
        yield rt
    finally:
        await rt.close()


async def decide(rt: Runtime, token: str | None = None, *, policy: str = "api",
                 headers: dict[str, str] | None = None) -> Decision:
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    compiled = rt.policies.select(policy)
    assert compiled is not None
    req = Request("GET", "/orders", h, policy=policy, client_ip="203.0.113.7", request_id=str(uuid.uuid4()))
    return await rt.identity.decide(req, compiled, time.time())


async def allows(rt: Runtime, token: str, **kw: Any) -> bool:
    return (await decide(rt, token, **kw)).allowed


def assert_denied(d: Decision, reason: Reason, status: int = 401) -> None:
    assert (d.allowed, d.reason, d.status) == (False, reason, status), d


def stale(name: str) -> float:
    return sample("extproc_jwks_stale", provider=name)


def fetches(name: str, result: str) -> float:
    return sample("extproc_jwks_fetches_total", provider=name, result=result)


def key_count(name: str) -> float:
    return sample("extproc_jwks_keys", provider=name)


def logs(caplog: pytest.LogCaptureFixture, name: str, level: int, starts: str = "") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "extproc.jwks" and r.levelno == level
            and getattr(r, "provider", None) == name and r.getMessage().startswith(starts)]


@pytest.fixture
def jwks_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="extproc.jwks")
    return caplog


@pytest.fixture
def patient_unknown_kid(monkeypatch: pytest.MonkeyPatch) -> None:
    # the bound a request waits for an unknown-kid refetch; generous so a loaded machine's
    # local fetch always lands inside it (the wait ends when the fetch does, not at the bound)
    monkeypatch.setattr(identitymod, "UNKNOWN_KID_WAIT", 5.0)


# ------------------------------------------------------------------------------- jwks_uri ---

def test_jwks_uri_keys_load_before_start_returns(keys: Keys):
    async def body():
        name = unique()
        ok_before = fetches(name, "ok")
        async with KeyServer() as srv:
            srv.publish("/jwks", jwks(keys.a, keys.b))
            async with started(make_config({name: provider(jwks_uri=srv.url("/jwks"))})) as rt:
                # no polling: the keys are in force the moment start() returns
                assert srv.hits["/jwks"] == 1
                assert key_count(name) == 2
                assert fetches(name, "ok") == ok_before + 1
                assert stale(name) == 0
                assert await allows(rt, keys.a.token())
                assert await allows(rt, keys.b.token())
                assert_denied(await decide(rt, keys.forger.token()), Reason.JWT_UNKNOWN_KID)
                assert_denied(await decide(rt, keys.a.token(aud="another-api")), Reason.JWT_BAD_AUDIENCE)
                assert_denied(await decide(rt), Reason.TOKEN_MISSING)
    run(body)


def test_worker_answers_its_first_check_with_keys_fetched_before_serving(sidecar: Sidecar):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", sidecar.key.jwks())
            cfg = sidecar.config()
            cfg["providers"] = {name: {"issuer": idp.DEMO_ISSUER, "audiences": [idp.DEMO_AUDIENCE],
                                       "jwks_uri": srv.url("/jwks")}}
            cfg["policies"] = {"api": {"auth": {"any_of": [name]}}}
            async with sidecar.run(cfg) as running:
                assert srv.hits["/jwks"] == 1
                resp = await running.check(check_request(policy="api", token=sidecar.token("alice")))
                assert resp.status.code == OK_CODE
                forged = await running.check(check_request(policy="api", token=mint(
                    rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", idp.DEMO_ISSUER,
                    kid=sidecar.key.kid, aud=idp.DEMO_AUDIENCE)))
                assert forged.denied_response.status.code == 401
                assert denied_body(forged)["reason"] == "jwt_bad_signature"
                assert srv.hits["/jwks"] == 1       # a request never triggers a scheduled fetch
    run(body)


def test_refresh_interval_follows_cache_control_max_age(keys: Keys):
    """fetch_once returns the delay until the next refresh: 90% of max-age, never below
    MIN_REFRESH_SECONDS, never above refresh_interval_seconds."""
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", jwks(keys.a))
            cfg = make_config({name: provider(jwks_uri=srv.url("/jwks"), refresh_interval_seconds=300)})
            async with started(cfg) as rt:
                src = rt.sources[name]
                cases = [(None, 300.0), ("public, max-age=100", 90.0), ("max-age=1", jwksmod.MIN_REFRESH_SECONDS),
                         ("max-age=0, must-revalidate", jwksmod.MIN_REFRESH_SECONDS),
                         ("public, max-age=100000", 300.0), ("no-cache", 300.0)]
                for cache_control, expected in cases:
                    srv.publish("/jwks", jwks(keys.a), cache_control)
                    assert await src.fetch_once() == pytest.approx(expected), cache_control
    run(body)


def test_short_max_age_drives_refreshes_and_rotation(keys: Keys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(jwksmod, "MIN_REFRESH_SECONDS", 0.05)

    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", jwks(keys.a), "public, max-age=0")
            # refresh_interval is long and unknown kids never refetch early: only max-age drives this
            cfg = make_config({name: provider(jwks_uri=srv.url("/jwks"), refresh_interval_seconds=300,
                                              unknown_kid_refetch_seconds=86_400)})
            async with started(cfg) as rt:
                token_a = keys.a.token()
                assert await allows(rt, token_a)           # now in the token and decision caches
                await eventually(lambda: srv.hits["/jwks"] >= 4, what="refreshes at the max-age floor")

                srv.publish("/jwks", jwks(keys.b), "public, max-age=0")
                await eventually(lambda: allows(rt, keys.b.token()), what="rotated key in force")
                # a removed key stops at once, its cached tokens included
                assert_denied(await decide(rt, token_a), Reason.JWT_UNKNOWN_KID)
                assert_denied(await decide(rt, keys.a.token()), Reason.JWT_UNKNOWN_KID)
                assert key_count(name) == 1
    run(body)


def _oct_jwks() -> dict[str, Any]:
    k = base64.urlsafe_b64encode(b"0123456789abcdef0123456789abcdef").rstrip(b"=").decode()
    return {"keys": [{"kty": "oct", "kid": "shared", "k": k}]}


def _break(srv: KeyServer, how: str) -> Any:
    """Make /jwks fail in the named way; returns an awaitable for the ways that need one."""
    if how == "unsupported_kty":
        srv.publish("/jwks", _oct_jwks())           # a symmetric key cannot verify RS256
    elif how == "unknown_kty":
        srv.publish("/jwks", {"keys": [{"kty": "XYZ", "kid": "x", "use": "sig"}]})
    elif how == "unreachable":
        return srv.stop()
    else:
        srv.fail("/jwks", how)
    return None


FAILURES = [
    "http_500",
    "garbage",
    "unsupported_kty",
    "unknown_kty",
    "unreachable",
    "slow",
]


@pytest.mark.parametrize("how", FAILURES)
def test_failed_refresh_keeps_last_good_keys_and_logs_once_per_streak(keys: Keys, jwks_logs, how: str):
    async def body():
        name = unique()
        srv = KeyServer()
        await srv.start()
        try:
            srv.publish("/jwks", jwks(keys.a))
            cfg = make_config({name: provider(jwks_uri=srv.url("/jwks"), refresh_interval_seconds=0.05,
                                              retry_interval_seconds=0.05, fetch_timeout_ms=300)})
            async with started(cfg) as rt:
                assert await allows(rt, keys.a.token())
                errors, oks = fetches(name, "error"), fetches(name, "ok")
                assert stale(name) == 0

                for streak in (1, 2):
                    pending = _break(srv, how)
                    if pending is not None:
                        await pending

                    def failed_twice_or_loaded(errors: float = errors, oks: float = oks) -> bool:
                        return fetches(name, "error") >= errors + 2 or fetches(name, "ok") > oks
                    await eventually(failed_twice_or_loaded, what="two failed refreshes")
                    assert fetches(name, "ok") == oks, "the broken document was installed"
                    assert stale(name) == 1
                    assert key_count(name) == 1
                    assert await allows(rt, keys.a.token())      # the last good key still verifies
                    warned = logs(jwks_logs, name, logging.WARNING, "jwks fetch failed")
                    assert len(warned) == streak                  # one per failure streak
                    assert "keeping last good keys" in warned[-1].getMessage()

                    if how == "unreachable":
                        await srv.start()
                    srv.publish("/jwks", jwks(keys.a))
                    await eventually(lambda: stale(name) == 0, what="stale cleared after recovery")
                    assert len(logs(jwks_logs, name, logging.INFO, "jwks fetch recovered")) == streak
                    assert await allows(rt, keys.a.token())
                    errors, oks = fetches(name, "error"), fetches(name, "ok")
        finally:
            await srv.stop()
    run(body)


@pytest.mark.parametrize("how", ["unreachable", "http_500", "slow"])
def test_provider_down_from_the_start_answers_keys_unavailable_until_it_recovers(keys: Keys, jwks_logs, how: str):
    async def body():
        name = unique()
        errors = fetches(name, "error")
        srv = KeyServer()
        if how != "unreachable":
            await srv.start()
            srv.fail("/jwks", how)
        try:
            cfg = make_config({name: provider(jwks_uri=srv.url("/jwks"), fetch_timeout_ms=200)})
            async with started(cfg) as rt:     # returns: a dead IdP never blocks the worker's start
                assert fetches(name, "error") >= errors + 1
                d = await decide(rt, keys.a.token())
                assert_denied(d, Reason.KEYS_UNAVAILABLE)
                assert json.loads(d.body)["reason"] == "keys_unavailable"
                assert key_count(name) == 0
                assert stale(name) == 0               # nothing is stale: no keys were ever in force
                await eventually(lambda: fetches(name, "error") >= errors + 3, what="retries")
                warned = logs(jwks_logs, name, logging.WARNING, "jwks fetch failed")
                assert len(warned) == 1 and "keys unavailable until a fetch succeeds" in warned[0].getMessage()

                if how == "unreachable":
                    await srv.start()
                srv.publish("/jwks", jwks(keys.a))
                await eventually(lambda: allows(rt, keys.a.token()), what="keys loaded once the IdP is back")
                assert key_count(name) == 1 and stale(name) == 0
        finally:
            await srv.stop()
    run(body)



def test_a_large_jwks_document_is_read_whole(keys: Keys):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            # under MAX_DOCUMENT_BYTES (512 KiB), bigger than what aiohttp buffers for one read
            srv.publish("/jwks", {**jwks(keys.a), "x-padding": "p" * 450_000})
            async with started(make_config({name: provider(jwks_uri=srv.url("/jwks"))})) as rt:
                assert await allows(rt, keys.a.token())
    run(body)


def test_a_document_over_the_size_limit_is_refused(keys: Keys):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", {**jwks(keys.a), "x-padding": "p" * (jwksmod.MAX_DOCUMENT_BYTES + 10)})
            async with started(make_config({name: provider(jwks_uri=srv.url("/jwks"))})) as rt:
                assert_denied(await decide(rt, keys.a.token()), Reason.KEYS_UNAVAILABLE)
    run(body)


# ---------------------------------------------------------------------------- discovery_uri ---

def test_discovery_document_names_the_jwks_uri(keys: Keys):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish(DISCOVERY, {"issuer": ISS_A, "jwks_uri": srv.url("/certs"),
                                    "authorization_endpoint": srv.url("/authorize")})
            srv.publish("/certs", jwks(keys.a))
            async with started(make_config({name: provider(discovery_uri=srv.url(DISCOVERY))})) as rt:
                assert (srv.hits[DISCOVERY], srv.hits["/certs"]) == (1, 1)
                assert await allows(rt, keys.a.token())
                assert key_count(name) == 1
    run(body)


@pytest.mark.parametrize("doc", [
    pytest.param({"issuer": "https://evil.test", "jwks_uri": "/certs"}, id="issuer-mismatch"),
    pytest.param({"issuer": ISS_A + "/", "jwks_uri": "/certs"}, id="issuer-trailing-slash"),
    pytest.param({"jwks_uri": "/certs"}, id="no-issuer"),
    pytest.param({"issuer": ISS_A}, id="no-jwks-uri"),
    pytest.param({"issuer": ISS_A, "jwks_uri": "file:///etc/passwd"}, id="jwks-uri-not-http"),
])
def test_a_refused_discovery_document_never_loads_keys(keys: Keys, jwks_logs, doc: dict[str, Any]):
    async def body():
        name = unique()
        errors = fetches(name, "error")
        async with KeyServer() as srv:
            if doc.get("jwks_uri") == "/certs":
                doc["jwks_uri"] = srv.url("/certs")
            srv.publish(DISCOVERY, doc)
            srv.publish("/certs", jwks(keys.a))
            async with started(make_config({name: provider(discovery_uri=srv.url(DISCOVERY))})) as rt:
                # the server counts a hit before the sidecar has judged the answer: wait for both
                await eventually(lambda: srv.hits[DISCOVERY] >= 3 and fetches(name, "error") >= errors + 3,
                                 what="discovery retried and refused")
                assert srv.hits["/certs"] == 0          # the keys it names are never fetched
                assert_denied(await decide(rt, keys.a.token()), Reason.KEYS_UNAVAILABLE)
                assert key_count(name) == 0
                warned = logs(jwks_logs, name, logging.WARNING, "jwks fetch failed")
                assert len(warned) == 1
    run(body)


def test_discovery_is_read_again_after_a_failed_fetch(keys: Keys):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish(DISCOVERY, {"issuer": ISS_A, "jwks_uri": srv.url("/certs-1")})
            srv.publish("/certs-1", jwks(keys.a))
            cfg = make_config({name: provider(discovery_uri=srv.url(DISCOVERY), refresh_interval_seconds=0.05)})
            async with started(cfg) as rt:
                assert await allows(rt, keys.a.token())
                await eventually(lambda: srv.hits["/certs-1"] >= 3, what="refreshes")
                assert srv.hits[DISCOVERY] == 1         # while the keys load, discovery is not re-read

                # the IdP moves its keys: the old URI fails, the discovery document names the new one
                srv.publish("/certs-2", jwks(keys.b))
                srv.publish(DISCOVERY, {"issuer": ISS_A, "jwks_uri": srv.url("/certs-2")})
                srv.fail("/certs-1", "http_500")
                await eventually(lambda: allows(rt, keys.b.token()), what="keys from the re-read discovery")
                assert srv.hits[DISCOVERY] >= 2
                assert stale(name) == 0
    run(body)


# ------------------------------------------------------------------------------ unknown kid ---

class FakeClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def test_unknown_kid_refetch_serves_the_same_request(keys: Keys, patient_unknown_kid: None):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", jwks(keys.a))
            cfg = make_config({name: provider(jwks_uri=srv.url("/jwks"), refresh_interval_seconds=300,
                                              unknown_kid_refetch_seconds=30)})
            async with started(cfg) as rt:
                clock = FakeClock()
                rt.sources[name].clock = clock
                assert srv.hits["/jwks"] == 1
                srv.publish("/jwks", jwks(keys.a, keys.b))     # the IdP publishes its next key

                # the last fetch is recent: an unknown kid does not refetch yet
                assert_denied(await decide(rt, keys.b.token()), Reason.JWT_UNKNOWN_KID)
                assert srv.hits["/jwks"] == 1

                clock.now += 31
                assert await allows(rt, keys.b.token())        # this very request waited for the refetch
                assert srv.hits["/jwks"] == 2
                assert key_count(name) == 2
                assert await allows(rt, keys.a.token())
    run(body)


def test_a_flood_of_forged_kids_refetches_at_most_once_per_interval(keys: Keys, patient_unknown_kid: None):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", jwks(keys.a))
            cfg = make_config({name: provider(jwks_uri=srv.url("/jwks"), refresh_interval_seconds=300,
                                              unknown_kid_refetch_seconds=30)})
            async with started(cfg) as rt:
                clock = FakeClock()
                rt.sources[name].clock = clock
                clock.now += 31

                async def flood() -> list[Decision]:
                    return await asyncio.gather(*(decide(rt, keys.forger.token(kid=f"forged-{i}"))
                                                  for i in range(50)))

                for d in await flood():
                    assert_denied(d, Reason.JWT_UNKNOWN_KID)
                await eventually(lambda: srv.hits["/jwks"] == 2, what="one refetch")
                for d in await flood():                      # same interval: no refetch at all
                    assert_denied(d, Reason.JWT_UNKNOWN_KID)

                # a rotated key after the interval takes exactly one more fetch: had the second
                # flood triggered one, the count would be past 3 by the time this is accepted
                srv.publish("/jwks", jwks(keys.a, keys.b))
                clock.now += 31
                assert await allows(rt, keys.b.token())
                assert srv.hits["/jwks"] == 3
                assert await allows(rt, keys.a.token())
    run(body)


# ------------------------------------------------------------------------------- jwks_file ---

def rewrite(path: Path, text: str) -> None:
    """Replace the file atomically with a modification time the watcher can tell apart (two
    writes inside one timestamp tick would share it; that case has its own test)."""
    before = path.stat().st_mtime_ns if path.exists() else None
    write_atomic(path, text)
    st = path.stat()
    if st.st_mtime_ns == before:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture
def fast_file_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwksmod, "MIN_REFRESH_SECONDS", 0.02)


def test_jwks_file_rewrite_is_picked_up(keys: Keys, tmp_path: Path, fast_file_watch: None):
    async def body():
        name = unique()
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(jwks(keys.a)))
        async with started(make_config({name: provider(jwks_file=str(path))})) as rt:
            token_a = keys.a.token()
            assert await allows(rt, token_a)
            assert_denied(await decide(rt, keys.b.token()), Reason.JWT_UNKNOWN_KID)

            rewrite(path, json.dumps(jwks(keys.b)))
            await eventually(lambda: allows(rt, keys.b.token()), what="rewritten file in force")
            assert_denied(await decide(rt, token_a), Reason.JWT_UNKNOWN_KID)
            assert key_count(name) == 1 and stale(name) == 0
    run(body)


@pytest.mark.parametrize("how", ["not-json", "no-usable-key", "deleted"])
def test_a_broken_jwks_file_keeps_the_old_keys(keys: Keys, tmp_path: Path, fast_file_watch: None, jwks_logs,
                                               how: str):
    async def body():
        name = unique()
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(jwks(keys.a)))
        errors = fetches(name, "error")
        async with started(make_config({name: provider(jwks_file=str(path))})) as rt:
            assert await allows(rt, keys.a.token())
            if how == "deleted":
                path.unlink()
            else:
                rewrite(path, '{"keys": [' if how == "not-json" else json.dumps({"keys": [{"kty": "XYZ"}]}))
            await eventually(lambda: fetches(name, "error") == errors + 1, what="broken file noticed")
            assert stale(name) == 1 and key_count(name) == 1
            assert await allows(rt, keys.a.token())
            assert len(logs(jwks_logs, name, logging.ERROR, "keys unusable")) == 1

            rewrite(path, json.dumps(jwks(keys.a, keys.b)))
            await eventually(lambda: stale(name) == 0, what="fixed file in force")
            assert await allows(rt, keys.b.token())
            assert key_count(name) == 2
            assert fetches(name, "error") == errors + 1     # the watcher re-reads only a changed file
    run(body)



def test_jwks_file_replaced_within_one_timestamp_tick_is_picked_up(keys: Keys, tmp_path: Path,
                                                                  fast_file_watch: None):
    async def body():
        name = unique()
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(jwks(keys.a)))
        async with started(make_config({name: provider(jwks_file=str(path))})) as rt:
            assert await allows(rt, keys.a.token())
            old = path.stat()
            write_atomic(path, json.dumps(jwks(keys.b)))          # a new inode...
            os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # ...with the same timestamp
            await eventually(lambda: allows(rt, keys.b.token()), within=0.5, what="replaced file in force")
    run(body)


# ---------------------------------------------------------------------- inline, PEM, secret ---

def test_inline_jwks(keys: Keys):
    async def body():
        name = unique()
        ec_signer = Signer(ec.generate_private_key(ec.SECP256R1()), "ES256", "ec-1")
        cfg = make_config({name: provider(jwks=jwks(keys.a, ec_signer), algorithms=["RS256", "ES256"])})
        async with started(cfg) as rt:
            assert key_count(name) == 2
            assert await allows(rt, keys.a.token())
            assert await allows(rt, ec_signer.token())
            assert_denied(await decide(rt, keys.b.token()), Reason.JWT_UNKNOWN_KID)
            # no kid: every published key of the token's type is tried, none verifies a forgery
            assert await allows(rt, keys.a.token(kid=None))
            assert_denied(await decide(rt, keys.forger.token(kid=None)), Reason.JWT_BAD_SIGNATURE)
    run(body)


PEM_KEYS = {
    "rsa": (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    "ec-p256": (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    "ed25519": (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
}


@pytest.mark.parametrize("kind", list(PEM_KEYS))
def test_pem_file_public_key(tmp_path: Path, kind: str):
    async def body():
        make, alg = PEM_KEYS[kind]
        signer, other = Signer(make(), alg, "any-name"), Signer(make(), alg, "any-name")
        path = tmp_path / "key.pem"
        path.write_bytes(signer.pem())
        name = unique()
        async with started(make_config({name: provider(pem_file=str(path), algorithms=[alg])})) as rt:
            assert key_count(name) == 1
            # a PEM key has no kid of its own: tokens with any kid, or none, are checked against it
            assert await allows(rt, signer.token(kid=None))
            assert await allows(rt, signer.token(kid="whatever-the-issuer-calls-it"))
            assert_denied(await decide(rt, other.token(kid=None)), Reason.JWT_BAD_SIGNATURE)
            assert_denied(await decide(rt, other.token()), Reason.JWT_BAD_SIGNATURE)
            assert_denied(await decide(rt, signer.token(iss=ISS_B)), Reason.JWT_BAD_ISSUER)
    run(body)


SECRET = "s3cr3t-" + "x" * 33        # 40 bytes


def _secret_provider(how: str, secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    if how == "secret_env":
        var = f"EXTPROC_TEST_SECRET_{uuid.uuid4().hex[:8].upper()}"
        monkeypatch.setenv(var, secret)
        return provider(secret_env=var, algorithms=["HS256"])
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    return provider(secret_file=str(path), algorithms=["HS256"])


@pytest.mark.parametrize("how", ["secret_env", "secret_file"])
def test_hmac_secret(keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str):
    async def body():
        name = unique()
        async with started(make_config({name: _secret_provider(how, SECRET, tmp_path, monkeypatch)})) as rt:
            assert key_count(name) == 1
            assert await allows(rt, mint(SECRET.encode(), "HS256", ISS_A))
            assert await allows(rt, mint(SECRET.encode(), "HS256", ISS_A, kid="v1"))
            wrong = mint(b"another-secret-of-enough-length-0123456789", "HS256", ISS_A)
            assert_denied(await decide(rt, wrong), Reason.JWT_BAD_SIGNATURE)
            # an asymmetric token never reaches an HMAC key (RFC 8725 3.1)
            assert_denied(await decide(rt, keys.a.token()), Reason.JWT_ALG_NOT_ALLOWED)
            assert_denied(await decide(rt, mint(SECRET.encode() * 2, "HS512", ISS_A)), Reason.JWT_ALG_NOT_ALLOWED)
    run(body)


@pytest.mark.parametrize("how", ["secret_env", "secret_file"])
def test_a_short_hmac_secret_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jwks_logs, how: str):
    async def body():
        name = unique()
        short = "only-16-bytes!!!"
        errors = fetches(name, "error")
        async with started(make_config({name: _secret_provider(how, short, tmp_path, monkeypatch)})) as rt:
            assert fetches(name, "error") == errors + 1
            assert key_count(name) == 0
            assert_denied(await decide(rt, mint(SECRET.encode(), "HS256", ISS_A)), Reason.KEYS_UNAVAILABLE)
        (record,) = logs(jwks_logs, name, logging.ERROR, "keys unusable")
        assert "at least 32 bytes" in record.error
        assert short not in record.getMessage() and short not in record.error     # never the secret itself
    run(body)


def test_an_unset_secret_variable_is_refused(monkeypatch: pytest.MonkeyPatch, jwks_logs):
    async def body():
        name = unique()
        var = f"EXTPROC_TEST_UNSET_{uuid.uuid4().hex[:8].upper()}"
        monkeypatch.delenv(var, raising=False)
        async with started(make_config({name: provider(secret_env=var, algorithms=["HS256"])})) as rt:
            assert_denied(await decide(rt, mint(SECRET.encode(), "HS256", ISS_A)), Reason.KEYS_UNAVAILABLE)
        (record,) = logs(jwks_logs, name, logging.ERROR, "keys unusable")
        assert "empty or its variable is unset" in record.error
    run(body)


@pytest.mark.parametrize("how", ["pem-garbage", "pem-private-key", "inline-unknown-kty"])
def test_an_unusable_local_key_source_answers_keys_unavailable(keys: Keys, tmp_path: Path, jwks_logs, how: str):
    async def body():
        name = unique()
        path = tmp_path / "key.pem"
        if how == "pem-garbage":
            path.write_text("-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
            p = provider(pem_file=str(path))
        elif how == "pem-private-key":
            path.write_bytes(keys.a.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
            p = provider(pem_file=str(path))
        else:
            p = provider(jwks={"keys": [{"kty": "XYZ", "kid": "x"}]})
        async with started(make_config({name: p})) as rt:
            assert_denied(await decide(rt, keys.a.token()), Reason.KEYS_UNAVAILABLE)
            assert key_count(name) == 0
        assert len(logs(jwks_logs, name, logging.ERROR, "keys unusable")) == 1
    run(body)


# --------------------------------------------------------------------------------- policies ---

def test_any_of_two_providers_of_different_issuers(keys: Keys):
    async def body():
        a, b = unique("a"), unique("b")
        cfg = make_config({a: provider(jwks=jwks(keys.a)), b: provider(issuer=ISS_B, jwks=jwks(keys.b))},
                          {"api": {"auth": {"any_of": [a, b]}}})
        async with started(cfg) as rt:
            assert await allows(rt, keys.a.token(ISS_A))
            assert await allows(rt, keys.b.token(ISS_B))
            assert_denied(await decide(rt, keys.a.token(ISS_C)), Reason.JWT_BAD_ISSUER)
            # the issuer picks the provider: a's key does not speak for b
            assert_denied(await decide(rt, keys.a.token(ISS_B)), Reason.JWT_UNKNOWN_KID)
            assert_denied(await decide(rt), Reason.TOKEN_MISSING)
    run(body)


def test_any_of_a_repeat_token_of_the_second_provider_costs_no_failed_check_by_the_first(keys: Keys):
    async def body():
        a, b = unique("a"), unique("b")
        cfg = make_config({a: provider(jwks=jwks(keys.a)), b: provider(issuer=ISS_B, jwks=jwks(keys.b))},
                          {"api": {"auth": {"any_of": [a, b]}}})

        def a_errors() -> float:
            return sum(sample("gateway_jwt_validation_errors_total", provider=a, reason=r.value) for r in Reason)

        async with started(cfg) as rt:
            tb = keys.b.token(ISS_B)
            assert await allows(rt, tb)
            refused = a_errors()
            assert refused >= 1       # the first time, a judged b's token and refused it
            hits = sample("extproc_auth_cache_total", result="hit")
            trace: list[str] = []
            for _ in range(3):
                d = await decide(rt, tb)
                assert d.allowed and d.principal.provider == b
            assert a_errors() == refused, "a repeat of b's token was verified by a again"
            assert sample("extproc_auth_cache_total", result="hit") == hits + 3
            compiled = rt.policies.select("api")
            req = Request("GET", "/", {"authorization": f"Bearer {tb}"}, policy="api")
            assert (await rt.identity.decide(req, compiled, time.time(), trace)).allowed
            assert any(f"provider {a}: skipped" in line for line in trace), trace
            # a's own tokens still go to a first, and b's key leaving the JWKS ends the skip
            assert await allows(rt, keys.a.token(ISS_A))
            rt.identity.keys[b] = (rt.identity.keys[b][0], KeySet({}, loaded=True))     # b's key rotated out
            assert not await allows(rt, tb)
            assert a_errors() > refused
    run(body)


def _all_of_config(a: str, b: str, pa: dict[str, Any], pb: dict[str, Any]) -> cfgmod.Config:
    pb = {**pb, "token_sources": [{"header": "x-partner-token"}]}
    return make_config({a: pa, b: pb}, {"api": {"auth": {"all_of": [a, b]}}})


def test_all_of_needs_a_valid_token_from_each_provider(keys: Keys):
    async def body():
        a, b = unique("a"), unique("b")
        cfg = _all_of_config(a, b, provider(jwks=jwks(keys.a)), provider(issuer=ISS_B, jwks=jwks(keys.b)))
        async with started(cfg) as rt:
            def partner(token: str) -> dict[str, str]:
                return {"x-partner-token": token}

            assert await allows(rt, keys.a.token(ISS_A), headers=partner(keys.b.token(ISS_B)))
            assert_denied(await decide(rt, keys.a.token(ISS_A)), Reason.TOKEN_MISSING)
            assert_denied(await decide(rt, headers=partner(keys.b.token(ISS_B))), Reason.TOKEN_MISSING)
            assert_denied(await decide(rt), Reason.TOKEN_MISSING)
            # each provider judges its own source
            assert_denied(await decide(rt, keys.b.token(ISS_B), headers=partner(keys.a.token(ISS_A))),
                          Reason.JWT_BAD_ISSUER)
            assert not await allows(rt, keys.a.token(ISS_A), headers=partner(keys.forger.token(ISS_B)))
            same = keys.a.token(ISS_A)
            assert not await allows(rt, same, headers=partner(same))
            # the repeat of a passing pair is answered from the decision cache, still allowed
            ta, tb = keys.a.token(ISS_A), keys.b.token(ISS_B)
            assert await allows(rt, ta, headers=partner(tb))
            assert await allows(rt, ta, headers=partner(tb))
            assert_denied(await decide(rt, ta), Reason.TOKEN_MISSING)
    run(body)



def test_all_of_the_same_token_in_both_sources_is_refused_with_unnamed_keys(tmp_path: Path, keys: Keys):
    async def body():
        a, b = unique("a"), unique("b")
        (tmp_path / "a.pem").write_bytes(keys.a.pem())
        (tmp_path / "b.pem").write_bytes(keys.b.pem())
        cfg = _all_of_config(a, b, provider(pem_file=str(tmp_path / "a.pem")),
                             provider(issuer=ISS_B, pem_file=str(tmp_path / "b.pem")))
        async with started(cfg) as rt:
            assert await allows(rt, keys.a.token(ISS_A), headers={"x-partner-token": keys.b.token(ISS_B)})
            same = keys.a.token(ISS_A)
            assert not await allows(rt, same, headers={"x-partner-token": same})
    run(body)


# ----------------------------------------------------------------------- reload (the worker) ---

def _worker_config(sidecar: Sidecar, name: str, srv: KeyServer) -> dict[str, Any]:
    cfg = sidecar.config()
    # refreshes often; after a failure waits long, so the stale state holds while the test acts
    cfg["providers"] = {name: {"issuer": idp.DEMO_ISSUER, "audiences": [idp.DEMO_AUDIENCE],
                               "jwks_uri": srv.url("/jwks"), "refresh_interval_seconds": 0.05,
                               "retry_interval_seconds": 300}}
    cfg["policies"] = {"api": {"auth": {"any_of": [name]}}}
    return cfg



def test_a_reload_during_an_idp_outage_keeps_the_last_good_keys(sidecar: Sidecar):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", sidecar.key.jwks())
            async with sidecar.run(_worker_config(sidecar, name, srv), config_file=True) as running:
                assert (await running.check(check_request(token=sidecar.token()))).status.code == OK_CODE
                srv.fail("/jwks", "http_500")
                await eventually(lambda: stale(name) == 1, what="keys stale")
                assert (await running.check(check_request(token=sidecar.token()))).status.code == OK_CODE

                assert (await running.worker.reload("SIGHUP"))[0] is True
                resp = await running.check(check_request(token=sidecar.token()))
                assert resp.status.code == OK_CODE, denied_body(resp)
    run(body)



def test_the_stale_gauge_is_reset_when_a_reloaded_provider_loads_its_keys(sidecar: Sidecar):
    async def body():
        name = unique()
        async with KeyServer() as srv:
            srv.publish("/jwks", sidecar.key.jwks())
            cfg = _worker_config(sidecar, name, srv)
            async with sidecar.run(cfg, config_file=True) as running:
                srv.fail("/jwks", "http_500")
                await eventually(lambda: stale(name) == 1, what="keys stale")
                srv.publish("/jwks", sidecar.key.jwks())      # the IdP is back

                cfg["providers"][name]["leeway_seconds"] = 10   # a changed provider: a new key source
                assert running.config_path is not None
                write_atomic(running.config_path, yaml.safe_dump(cfg, sort_keys=False))
                assert (await running.worker.reload("SIGHUP"))[0] is True
                assert (await running.check(check_request(token=sidecar.token()))).status.code == OK_CODE
                assert stale(name) == 0
    run(body)
