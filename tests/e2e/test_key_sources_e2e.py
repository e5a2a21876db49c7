"""Every JWT key source end to end: client -> the real Envoy -> the real sidecar -> a real HTTP
key server the test switches (500, garbage, unsupported key types, rotation), plus OIDC
discovery, PEM public keys and HMAC secrets.

One stack for the module: the shipped extproc.yaml with one provider and one policy per case
added, and the shipped envoy/envoy.yaml with one route per added policy (`/ks/<policy>`, built
exactly like the shipped protected routes: ext_authz context_extensions {policy} and ext_proc
x-extproc-policy) and everything else kept. Each case has its own provider (own issuer, own key
server paths, own metric labels), so the tests do not depend on each other's order. All keys are
generated here; nothing sleeps for synchronisation (wait_until polls with a deadline).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x448
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import Response, get
from tests.support.keyserver import KeyServer
from tests.support.procs import http_status, wait_until
from tests.support.stack import SHIPPED_ENVOY, Stack, get_json, new_stack

pytestmark = pytest.mark.e2e

AUD = "ks-e2e-api"
HMAC_ENV = "KS_E2E_HMAC_SECRET"
DISCOVERY = "/.well-known/openid-configuration"
UNKNOWN_KID_REFETCH = 1.0      # seconds, ks-rotate's unknown_kid_refetch_seconds


def iss(provider: str) -> str:
    return f"https://{provider}.idp.test"


# ------------------------------------------------------------------------------------- keys ---

@dataclass(frozen=True)
class Signer:
    private: Any
    alg: str
    kid: str

    def jwk(self) -> dict[str, Any]:
        algo = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        return {**algo.to_jwk(self.private.public_key(), as_dict=True), "kid": self.kid, "use": "sig",
                "alg": self.alg}

    def pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, provider: str, *, kid: str | None = "", sub: str = "alice") -> str:
        """A fresh token (new jti: no cache of the sidecar has seen it); kid "" = this key's kid."""
        return mint(self.private, self.alg, provider, kid=self.kid if kid == "" else kid, sub=sub)


def mint(key: Any, alg: str, provider: str, *, kid: str | None = None, sub: str = "alice") -> str:
    now = int(time.time())
    claims = {"iss": iss(provider), "aud": AUD, "sub": sub, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    return pyjwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def jwks(*signers: Signer) -> dict[str, Any]:
    return {"keys": [s.jwk() for s in signers]}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def okp_x448_jwks() -> dict[str, Any]:
    """A key agreement curve (X448): no JWS algorithm verifies with it."""
    raw = x448.X448PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                   serialization.PublicFormat.Raw)
    return {"keys": [{"kty": "OKP", "crv": "X448", "x": _b64(raw), "kid": "x448", "use": "sig"}]}


def oct_jwks() -> dict[str, Any]:
    """A symmetric key: never usable by an RS256 provider (RFC 8725 3.1)."""
    return {"keys": [{"kty": "oct", "k": _b64(secrets.token_bytes(32)), "kid": "shared", "use": "sig"}]}


def rsa_signer(kid: str) -> Signer:
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", kid)


def ec_signer(kid: str) -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()), "ES256", kid)


# ----------------------------------------------------------------------------------- the stack ---

@dataclass
class Env:
    stack: Stack
    keys: KeyServer
    a: Signer            # RS256, the key every JWKS provider publishes first
    b: Signer            # RS256, the key ks-rotate rotates to
    forger: Signer       # RS256, published by nobody
    pem_rsa: Signer
    pem_ec: Signer
    other_ec: Signer
    hmac_file: str
    hmac_env: str

    def call(self, policy: str, token: str | None) -> Response:
        return get(f"{self.stack.external}/ks/{policy}", token)


def _route(policy: str) -> dict[str, Any]:
    """A protected route naming `policy`, written exactly like the shipped ones."""
    return {
        "match": {"path": f"/ks/{policy}"},
        "route": {"cluster": "upstream", "prefix_rewrite": "/echo/headers"},
        "typed_per_filter_config": {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"policy": policy}}},
            "envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "overrides": {"grpc_initial_metadata": [{"key": "x-extproc-policy", "value": policy}]}},
        },
    }


def bootstrap_with_routes(directory: Path, policies: list[str]) -> Path:
    """The shipped envoy.yaml with a route per policy inserted before the catch-all; nothing else
    changes (start_envoy rewrites the ports as it does for the shipped file)."""
    doc = yaml.safe_load(SHIPPED_ENVOY.read_text())
    external = next(x for x in doc["static_resources"]["listeners"] if x["name"] == "external")
    hcm = external["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["match"] == {"prefix": "/"}, "the shipped route table no longer ends with its catch-all"
    routes[-1:-1] = [_route(p) for p in policies]
    path = directory / "key-sources-bootstrap.json"
    path.write_text(json.dumps(doc))       # JSON is YAML: start_envoy loads it like the shipped file
    return path


def _provider(name: str, **kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"issuer": iss(name), "audiences": [AUD], "algorithms": ["RS256"],
                         "required_claims": ["exp", "sub"], "leeway_seconds": 5,
                         "claims_to_headers": {"sub": "x-user-id"}, "retry_interval_seconds": 0.2,
                         "fetch_timeout_ms": 500}
    p.update(kw)
    return p


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    a, b, forger = rsa_signer("key-a"), rsa_signer("key-b"), rsa_signer("key-a")   # the forger reuses a's kid
    pem_rsa, pem_ec, other_ec = rsa_signer("pem"), ec_signer("pem"), ec_signer("pem")
    hmac_file, hmac_env = secrets.token_urlsafe(48), secrets.token_urlsafe(48)

    srv = KeyServer().start()
    s = new_stack(tmp_path_factory.mktemp("key-sources") / "stack")
    try:
        srv.fail("/down/jwks", "http_500")                  # down from the start: keys never load
        srv.publish("/stale/jwks", jwks(a))
        srv.publish("/rotate/jwks", jwks(a))
        srv.publish(f"/disco{DISCOVERY}", {"issuer": iss("ks-disco"), "jwks_uri": srv.url("/disco/certs")})
        srv.publish("/disco/certs", jwks(a))
        srv.publish(f"/evil{DISCOVERY}", {"issuer": "https://evil.idp.test", "jwks_uri": srv.url("/evil/certs")})
        srv.publish("/evil/certs", jwks(a))
        (s.dir / "pem-rs256.pem").write_bytes(pem_rsa.pem())
        (s.dir / "pem-es256.pem").write_bytes(pem_ec.pem())
        (s.dir / "hmac-secret").write_text(hmac_file + "\n")

        providers = {
            "ks-down": _provider("ks-down", jwks_uri=srv.url("/down/jwks")),
            # refreshes every 0.3 s, so each switch of the key server is fetched within a second
            "ks-stale": _provider("ks-stale", jwks_uri=srv.url("/stale/jwks"), refresh_interval_seconds=0.3),
            # no scheduled refresh during the test: only unknown kids cause fetches
            "ks-rotate": _provider("ks-rotate", jwks_uri=srv.url("/rotate/jwks"), refresh_interval_seconds=300,
                                   unknown_kid_refetch_seconds=UNKNOWN_KID_REFETCH),
            "ks-disco": _provider("ks-disco", discovery_uri=srv.url(f"/disco{DISCOVERY}")),
            "ks-disco-evil": _provider("ks-disco-evil", discovery_uri=srv.url(f"/evil{DISCOVERY}")),
            "ks-pem-rs256": _provider("ks-pem-rs256", pem_file=str(s.dir / "pem-rs256.pem")),
            "ks-pem-es256": _provider("ks-pem-es256", pem_file=str(s.dir / "pem-es256.pem"), algorithms=["ES256"]),
            "ks-hmac-file": _provider("ks-hmac-file", secret_file=str(s.dir / "hmac-secret"), algorithms=["HS256"]),
            "ks-hmac-env": _provider("ks-hmac-env", secret_env=HMAC_ENV, algorithms=["HS256"]),
        }
        overrides: dict[str, Any] = {}
        for name, p in providers.items():
            overrides[f"providers.{name}"] = p
            overrides[f"policies.{name}"] = {"auth": {"any_of": [name]}}
        s.start_upstream()
        s.write_sidecar_config(overrides)
        s.start_sidecar(env={HMAC_ENV: hmac_env}, wait_keys=False)   # ks-down never loads: wait for the rest
        wait_until(lambda: {n for n, p in get_json(f"{s.sidecar_admin}/readyz")["providers"].items()
                            if p["loaded"]} >= set(providers) - {"ks-down", "ks-disco-evil"},
                   timeout=10, what="every healthy key source loaded")
        s.start_envoy(bootstrap=bootstrap_with_routes(s.dir, list(providers)))
        yield Env(s, srv, a, b, forger, pem_rsa, pem_ec, other_ec, hmac_file, hmac_env)
    finally:
        s.stop()
        srv.stop()


# --------------------------------------------------------------------------------- helpers ---

def metric(e: Env, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{e.stack.sidecar_admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def fetch_errors(e: Env, provider: str) -> float:
    return metric(e, "extproc_jwks_fetches_total", provider=provider, result="error")


def stale(e: Env, provider: str) -> float:
    return metric(e, "extproc_jwks_stale", provider=provider)


def key_count(e: Env, provider: str) -> float:
    return metric(e, "extproc_jwks_keys", provider=provider)


def allowed(r: Response, sub: str = "alice") -> bool:
    return r.status == 200 and r.json()["headers"].get("x-user-id") == sub


def assert_refused(r: Response, reason: str) -> None:
    assert r.status == 401, (r.status, r.body[:300])
    assert r.json()["reason"] == reason, r.body[:300]
    challenge = r.header("www-authenticate") or ""
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge, challenge


def sidecar_log_lines(e: Env, message: str, provider: str) -> list[dict[str, Any]]:
    out = []
    for line in e.stack.procs["sidecar"].log_text().splitlines():
        if message in line and provider in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("provider") == provider and message in str(rec.get("msg", "")):
                out.append(rec)
    return out


def assert_sidecar_alive(e: Env) -> None:
    sidecar = e.stack.procs["sidecar"]
    assert sidecar.alive(), sidecar.log_tail()
    assert http_status(f"{e.stack.sidecar_admin}/healthz") == 200
    assert "Traceback" not in sidecar.log_text(), sidecar.log_tail()


def switch_and_wait(e: Env, provider: str, path: str, how: str) -> None:
    """Make `path` answer `how` and wait until the sidecar has judged (and refused) at least one
    answer given after the switch: two more error fetches, the first may predate the switch."""
    errors = fetch_errors(e, provider)
    if how in ("http_500", "garbage"):
        e.keys.fail(path, how)
    else:
        e.keys.publish(path, okp_x448_jwks() if how == "okp_x448" else oct_jwks())
    wait_until(lambda: fetch_errors(e, provider) >= errors + 2, timeout=10,
               what=f"{provider}: two failed fetches after switching to {how}")


BROKEN = ["http_500", "garbage", "okp_x448", "oct"]
# what the sidecar logs as the cause of the first failed fetch of a streak
CAUSE = {"http_500": "ValueError: HTTP 500 from", "garbage": "JSONDecodeError",
         "okp_x448": "ValueError: JWKS holds no usable signing key",
         "oct": "ValueError: JWKS holds no usable signing key"}


# --------------------------------------------------------------------------- jwks_uri down ---

def test_jwks_never_loaded_is_401_keys_unavailable_until_the_endpoint_recovers(env: Env):
    """The JWKS endpoint answered 500 at startup, then garbage, then only unusable key types: the
    provider never had keys, so every token gets the documented 401 keys_unavailable (never a
    5xx, never the upstream); once the endpoint serves the good JWKS the same token gets 200."""
    token = env.a.token("ks-down")
    detail = get_json(f"{env.stack.sidecar_admin}/readyz")
    assert detail["ready"] is True and detail["providers"]["ks-down"] == {"keys": 0, "loaded": False}
    assert_refused(env.call("ks-down", token), "keys_unavailable")
    assert key_count(env, "ks-down") == 0 and stale(env, "ks-down") == 0   # nothing was ever in force

    for how in BROKEN[1:]:
        switch_and_wait(env, "ks-down", "/down/jwks", how)
        assert_refused(env.call("ks-down", token), "keys_unavailable")
        assert key_count(env, "ks-down") == 0

    warned = sidecar_log_lines(env, "jwks fetch failed", "ks-down")
    assert len(warned) == 1, warned            # one failure streak, logged once
    assert "keys unavailable until a fetch succeeds" in warned[0]["msg"]
    assert warned[0]["error"].startswith(CAUSE["http_500"]), warned[0]

    env.keys.publish("/down/jwks", jwks(env.a))
    wait_until(lambda: allowed(env.call("ks-down", token)), timeout=10,
               what="the same token accepted once the JWKS endpoint recovered")
    assert key_count(env, "ks-down") == 1 and stale(env, "ks-down") == 0
    assert len(sidecar_log_lines(env, "jwks fetch recovered", "ks-down")) == 1
    assert_sidecar_alive(env)


# ----------------------------------------------------------------------- jwks_uri goes bad ---

@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_refresh_keeps_the_last_good_keys_and_says_stale(env: Env, how: str):
    """The provider had keys; its JWKS endpoint now answers 500 / garbage / only an unsupported
    key type. The last good keys keep verifying (fresh tokens, so no cache answers), the
    extproc_jwks_stale gauge says so, and recovery clears it."""
    assert allowed(env.call("ks-stale", env.a.token("ks-stale")))
    streaks = len(sidecar_log_lines(env, "jwks fetch failed", "ks-stale"))

    switch_and_wait(env, "ks-stale", "/stale/jwks", how)
    assert stale(env, "ks-stale") == 1
    assert key_count(env, "ks-stale") == 1
    fresh = env.a.token("ks-stale", sub=f"stale-{how}")
    r = env.call("ks-stale", fresh)
    assert allowed(r, f"stale-{how}"), (r.status, r.body[:300])
    assert_refused(env.call("ks-stale", env.forger.token("ks-stale")), "jwt_bad_signature")
    warned = sidecar_log_lines(env, "jwks fetch failed", "ks-stale")
    assert len(warned) == streaks + 1 and "keeping last good keys" in warned[-1]["msg"]
    assert warned[-1]["error"].startswith(CAUSE[how]), warned[-1]

    env.keys.publish("/stale/jwks", jwks(env.a))
    wait_until(lambda: stale(env, "ks-stale") == 0, timeout=10, what="stale cleared after recovery")
    assert allowed(env.call("ks-stale", env.a.token("ks-stale")))
    assert_sidecar_alive(env)


# ------------------------------------------------------------------------------- discovery ---

def test_oidc_discovery_names_the_jwks_uri(env: Env):
    r = env.call("ks-disco", env.a.token("ks-disco", sub="disco-user"))
    assert allowed(r, "disco-user"), (r.status, r.body[:300])
    assert "authorization" not in r.json()["headers"]
    assert env.keys.hits(f"/disco{DISCOVERY}") >= 1 and env.keys.hits("/disco/certs") >= 1
    assert_refused(env.call("ks-disco", env.forger.token("ks-disco")), "jwt_bad_signature")
    assert_refused(env.call("ks-disco", env.b.token("ks-disco")), "jwt_unknown_kid")


def test_a_discovery_document_naming_another_issuer_never_loads_keys(env: Env):
    """OpenID Connect Discovery 4.3: the document's issuer must be the provider's. A document
    naming another issuer is refused on every retry, and the keys it names are never fetched."""
    wait_until(lambda: env.keys.hits(f"/evil{DISCOVERY}") >= 2, timeout=10, what="discovery retried")
    assert_refused(env.call("ks-disco-evil", env.a.token("ks-disco-evil")), "keys_unavailable")
    assert env.keys.hits("/evil/certs") == 0
    assert_sidecar_alive(env)


# ------------------------------------------------------------------------------ PEM, HMAC ---

@pytest.mark.parametrize("provider", ["ks-pem-rs256", "ks-pem-es256"])
def test_pem_public_key(env: Env, provider: str):
    signer, other = (env.pem_rsa, env.forger) if provider == "ks-pem-rs256" else (env.pem_ec, env.other_ec)
    assert allowed(env.call(provider, signer.token(provider)))
    # a PEM key has no kid of its own: tokens naming any kid, or none, are checked against it
    assert allowed(env.call(provider, signer.token(provider, kid=None)))
    assert allowed(env.call(provider, signer.token(provider, kid="whatever-the-issuer-calls-it")))
    assert_refused(env.call(provider, other.token(provider)), "jwt_bad_signature")
    assert_refused(env.call(provider, other.token(provider, kid=None)), "jwt_bad_signature")


@pytest.mark.parametrize("provider", ["ks-hmac-file", "ks-hmac-env"])
def test_hmac_shared_secret(env: Env, provider: str):
    secret = (env.hmac_file if provider == "ks-hmac-file" else env.hmac_env).encode()
    assert allowed(env.call(provider, mint(secret, "HS256", provider)))
    assert allowed(env.call(provider, mint(secret, "HS256", provider, kid="v1")))
    assert_refused(env.call(provider, mint(secrets.token_bytes(48), "HS256", provider)), "jwt_bad_signature")
    # the other provider's secret is "another key" too
    crossed = (env.hmac_env if provider == "ks-hmac-file" else env.hmac_file).encode()
    assert_refused(env.call(provider, mint(crossed, "HS256", provider)), "jwt_bad_signature")
    # an asymmetric token never reaches an HMAC key (RFC 8725 3.1)
    assert_refused(env.call(provider, env.a.token(provider)), "jwt_alg_not_allowed")


# -------------------------------------------------------------------------------- rotation ---

def test_rotation_unknown_kid_triggers_a_bounded_refetch(env: Env):
    """ks-rotate refreshes only every 300 s: a token signed with a key published after the last
    fetch is accepted only because its unknown kid triggered an early refetch, at most one per
    unknown_kid_refetch_seconds, so a flood of forged kids cannot storm the JWKS endpoint."""
    path = "/rotate/jwks"
    assert allowed(env.call("ks-rotate", env.a.token("ks-rotate")))
    env.keys.publish(path, jwks(env.a, env.b))            # the IdP publishes its next key
    before, t0 = env.keys.hits(path), time.monotonic()

    token_b = env.b.token("ks-rotate", sub="rotated")
    first = env.call("ks-rotate", token_b)
    if first.status != 200:                               # only if the last fetch was under 1 s ago
        assert_refused(first, "jwt_unknown_kid")
    wait_until(lambda: allowed(env.call("ks-rotate", token_b), "rotated"), timeout=10,
               what="the rotated key accepted after the unknown-kid refetch")
    elapsed = time.monotonic() - t0
    refetches = env.keys.hits(path) - before
    assert 1 <= refetches <= int(elapsed / UNKNOWN_KID_REFETCH) + 1, (refetches, elapsed)
    assert allowed(env.call("ks-rotate", env.a.token("ks-rotate")))      # both keys published

    before, t0 = env.keys.hits(path), time.monotonic()
    for i in range(40):
        r = env.call("ks-rotate", env.forger.token("ks-rotate", kid=f"forged-{i}"))
        assert_refused(r, "jwt_unknown_kid")
    elapsed = time.monotonic() - t0
    refetches = env.keys.hits(path) - before
    assert refetches <= int(elapsed / UNKNOWN_KID_REFETCH) + 1, (refetches, elapsed)
    assert_sidecar_alive(env)
