"""core/jwt.py and core/policy.py with real keys: every rule at its exact boundary.

Keys come from the demo identity provider's generator (RSA) and `cryptography` (EC); time is
always passed in as `now`, so nothing here sleeps or patches the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extproc import config as cfgmod
from extproc.app import compile_policies
from extproc.core import jwt, policy
from extproc.core.policy import PolicySet
from extproc.core.reasons import Reason
from extproc.core.request import Request
from extproc.demo import idp

ISS, AUD = idp.DEMO_ISSUER, idp.DEMO_AUDIENCE
T = 1_700_000_000   # "now" of every test


@pytest.fixture(scope="module")
def key() -> idp.SigningKey:
    return idp.generate()


@pytest.fixture(scope="module")
def other_key() -> idp.SigningKey:
    return idp.generate()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def keyset(key: idp.SigningKey) -> jwt.KeySet:
    return jwt.KeySet.from_jwks(key.jwks())


def rules(*, leeway: float = 30.0, required: tuple[str, ...] = ("exp",), algs: tuple[str, ...] = ("RS256",),
          audiences: tuple[str, ...] = (AUD,), issuer: str = ISS, name: str = "demo") -> jwt.ProviderRules:
    return jwt.ProviderRules(name=name, issuer=issuer, audiences=audiences, algorithms=frozenset(algs),
                             leeway=leeway, required_claims=required)


def provs(keyset: jwt.KeySet, r: jwt.ProviderRules | None = None) -> dict[str, tuple[jwt.ProviderRules, jwt.KeySet]]:
    r = r or rules()
    return {r.name: (r, keyset)}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)))


def claims(**over: Any) -> dict[str, Any]:
    base = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": T, "nbf": T, "exp": T + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def rs256(key: idp.SigningKey, body: Mapping[str, Any], kid: str | None = "default") -> str:
    headers = {"kid": key.kid if kid == "default" else kid} if kid is not None else None
    return pyjwt.encode(dict(body), key.private_pem, algorithm="RS256", headers=headers)


# --------------------------------------------------------------------------------- verify ---

def test_valid_token(key, keyset):
    name, v = jwt.verify(key.mint("alice", now=T), provs(keyset), T)
    assert name == "demo"
    assert v.ok and v.reason is Reason.OK
    assert v.claims is not None and v.claims["sub"] == "alice"


def test_token_without_kid_is_tried_against_the_keys(key, keyset):
    _, v = jwt.verify(rs256(key, claims(), kid=None), provs(keyset), T)
    assert v.ok


@pytest.mark.parametrize("leeway", [0.0, 30.0])
def test_expiry_is_exact_with_leeway(key, keyset, leeway):
    token = key.mint("alice", now=T, ttl_seconds=60)
    p = provs(keyset, rules(leeway=leeway))
    exp = T + 60
    assert jwt.verify(token, p, exp + leeway - 0.001)[1].ok
    expired = jwt.verify(token, p, exp + leeway)[1]
    assert not expired.ok and expired.reason is Reason.JWT_EXPIRED


@pytest.mark.parametrize("leeway", [0.0, 30.0])
def test_not_before_is_exact_with_leeway(key, keyset, leeway):
    nbf = T + 100
    token = rs256(key, claims(nbf=nbf, iat=None))
    p = provs(keyset, rules(leeway=leeway))
    early = jwt.verify(token, p, nbf - leeway - 0.001)[1]
    assert early.reason is Reason.JWT_NOT_YET_VALID
    assert jwt.verify(token, p, nbf - leeway)[1].ok


def test_issued_in_the_future_is_not_yet_valid(key, keyset):
    token = rs256(key, claims(iat=T + 100, nbf=None))
    assert jwt.verify(token, provs(keyset, rules(leeway=0)), T)[1].reason is Reason.JWT_NOT_YET_VALID


def test_bad_issuer(key, keyset):
    name, v = jwt.verify(key.mint("alice", now=T, issuer="someone-else"), provs(keyset), T)
    assert name is None and v.reason is Reason.JWT_BAD_ISSUER


def test_token_issuer_must_match_exactly(key, keyset):
    # the provider is picked by issuer, then the signed claims are checked again
    r = rules(issuer=ISS + "/")
    _, v = jwt.verify(key.mint("alice", now=T), provs(keyset, r), T)
    assert v.reason is Reason.JWT_BAD_ISSUER


def test_bad_audience(key, keyset):
    _, v = jwt.verify(key.mint("alice", now=T, audience="another-api"), provs(keyset), T)
    assert v.reason is Reason.JWT_BAD_AUDIENCE


def test_audience_list_and_no_audience_rule(key, keyset):
    token = rs256(key, claims(aud=["x", AUD]))
    assert jwt.verify(token, provs(keyset), T)[1].ok
    no_aud = rs256(key, claims(aud=None))
    assert jwt.verify(no_aud, provs(keyset), T)[1].reason is Reason.JWT_BAD_AUDIENCE
    assert jwt.verify(no_aud, provs(keyset, rules(audiences=())), T)[1].ok


def test_unknown_kid(keyset, other_key):
    _, v = jwt.verify(other_key.mint("alice", now=T), provs(keyset), T)
    assert v.reason is Reason.JWT_UNKNOWN_KID


def test_kid_that_is_not_a_string_is_unknown(key, keyset):
    token = rs256(key, claims(), kid=None)
    h, rest = token.split(".", 1)
    forged = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": 7}).encode()) + "." + rest
    v = jwt.verify(forged, provs(keyset), T)[1]
    assert not v.ok and v.reason in (Reason.JWT_UNKNOWN_KID, Reason.TOKEN_MALFORMED)


def test_signature_by_another_key_under_our_kid(key, keyset, other_key):
    forged = rs256(other_key, claims(), kid=key.kid)
    _, v = jwt.verify(forged, provs(keyset), T)
    assert v.reason is Reason.JWT_BAD_SIGNATURE


def test_tampered_claims_fail_the_signature(key, keyset):
    h, _, s = key.mint("alice", now=T).split(".")
    tampered = f"{h}.{b64(json.dumps(claims(sub='admin')).encode())}.{s}"
    assert jwt.verify(tampered, provs(keyset), T)[1].reason is Reason.JWT_BAD_SIGNATURE


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(key, keyset, alg):
    token = compact({"alg": alg, "typ": "JWT", "kid": key.kid}, claims())
    _, v = jwt.verify(token, provs(keyset), T)
    assert v.reason is Reason.JWT_ALG_NOT_ALLOWED


def test_alg_confusion_hs256_with_the_public_key_as_secret(key, keyset):
    # RFC 8725 §2.1: the attacker signs with HMAC, using the public RSA key as the secret
    public_pem = serialization.load_pem_private_key(key.private_pem, None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64(json.dumps(claims(sub="admin")).encode())
    sig = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64(sig)}"
    _, v = jwt.verify(token, provs(keyset, rules(algs=("RS256", "ES256"))), T)
    assert v.reason is Reason.JWT_ALG_NOT_ALLOWED
    assert not v.ok


def test_algorithm_not_on_the_providers_list(keyset, ec_key):
    token = pyjwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    _, v = jwt.verify(token, provs(keyset), T)
    assert v.reason is Reason.JWT_ALG_NOT_ALLOWED


def test_key_published_for_another_algorithm_is_never_used(key, keyset, ec_key):
    # ES256 is allowed, but the only key under this kid is published for RS256
    token = pyjwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": key.kid})
    _, v = jwt.verify(token, provs(keyset, rules(algs=("RS256", "ES256"))), T)
    assert v.reason is Reason.JWT_BAD_SIGNATURE


def test_es256_token_verifies_against_its_ec_key(ec_key):
    jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    jwk.update(kid="ec-1", alg="ES256", use="sig")
    ks = jwt.KeySet.from_jwks({"keys": [jwk]})
    token = pyjwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert jwt.verify(token, provs(ks, rules(algs=("ES256",))), T)[1].ok


def test_jwks_mixing_key_types_without_alg_never_raises(key, ec_key):
    # Many IdPs publish keys without `alg`. A token naming the EC key's kid with RS256 (or one
    # without kid, tried against every key) must be a bad signature, not an exception.
    rsa_jwk = {k: v for k, v in key.jwk.items() if k != "alg"}
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    ec_jwk.update(kid="ec-1")
    ks = jwt.KeySet.from_jwks({"keys": [ec_jwk, rsa_jwk]})
    forged = rs256(key, claims(), kid="ec-1")
    assert jwt.verify(forged, provs(ks), T)[1].reason is Reason.JWT_BAD_SIGNATURE


@pytest.mark.parametrize("token", [
    "not-a-token",
    "two.parts",
    "a.b.c.d",
    "!!!.@@@.###",
    "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",        # claims are not JSON
    b64(b"[1]") + "." + b64(b'{"iss":"x"}') + ".c2ln",  # header is not an object
    "",
])
def test_malformed_tokens(keyset, token):
    name, v = jwt.verify(token, provs(keyset), T)
    assert name is None
    assert v.reason is Reason.TOKEN_MALFORMED


def test_signature_check_rejects_non_compact_tokens(keyset):
    assert jwt.check_signature("a.b", rules(), keyset).detail == "not a JWS compact token"
    assert jwt.check_signature("a.b.c.d", rules(), keyset).reason is Reason.TOKEN_MALFORMED


def test_huge_token_is_malformed(key, keyset):
    token = key.mint("alice", now=T, extra={"pad": "x" * jwt.MAX_TOKEN_BYTES})
    assert len(token) > jwt.MAX_TOKEN_BYTES
    _, v = jwt.verify(token, provs(keyset), T)
    assert v.reason is Reason.TOKEN_MALFORMED and v.detail == "token too large"


def test_missing_exp_when_required(key, keyset):
    token = rs256(key, claims(exp=None))
    _, v = jwt.verify(token, provs(keyset), T)
    assert v.reason is Reason.JWT_MISSING_CLAIM
    assert "exp" in v.detail
    assert jwt.verify(token, provs(keyset, rules(required=())), T)[1].ok


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claims_must_be_numbers(key, keyset, claim):
    token = rs256(key, claims(**{claim: "tomorrow"}))
    assert jwt.verify(token, provs(keyset), T)[1].reason is Reason.TOKEN_MALFORMED


def test_keys_not_loaded(key):
    _, v = jwt.verify(key.mint("alice", now=T), provs(jwt.NO_KEYS), T)
    assert v.reason is Reason.KEYS_UNAVAILABLE


# ----------------------------------------------------------------------------- TokenCache ---

def test_cached_token_still_expires_exactly(key, keyset):
    cache = jwt.TokenCache()
    token = key.mint("alice", now=T, ttl_seconds=60)
    p = provs(keyset, rules(leeway=5))
    assert jwt.verify(token, p, T, cache)[1].ok
    assert len(cache) == 1
    # the hit skips the signature but not the time claims
    cached_only = provs(keyset, rules(leeway=5))
    assert jwt.verify(token, cached_only, T + 65 - 0.001, cache)[1].ok
    assert jwt.verify(token, cached_only, T + 65, cache)[1].reason is Reason.JWT_EXPIRED


def test_cached_token_is_not_accepted_after_its_key_is_removed(key, keyset, other_key):
    # a key taken out of the JWKS (rotation, compromise) must stop verifying its tokens at once
    cache = jwt.TokenCache()
    token = key.mint("alice", now=T)
    assert jwt.verify(token, provs(keyset), T, cache)[1].ok
    rotated = jwt.KeySet.from_jwks(other_key.jwks())
    _, v = jwt.verify(token, provs(rotated), T, cache)
    assert v.reason is Reason.JWT_UNKNOWN_KID


def test_failed_tokens_are_not_cached(key, keyset):
    cache = jwt.TokenCache()
    jwt.verify(key.mint("alice", now=T, audience="other"), provs(keyset), T, cache)
    jwt.verify(key.mint("alice", now=T - 3600, ttl_seconds=60), provs(keyset), T, cache)
    assert len(cache) == 0


def test_cache_hit_is_only_used_by_policies_trusting_that_provider(key, keyset):
    cache = jwt.TokenCache()
    token = key.mint("alice", now=T)
    assert jwt.verify(token, provs(keyset), T, cache)[1].ok
    other = provs(keyset, rules(name="other", issuer="other-issuer"))
    name, v = jwt.verify(token, other, T, cache)
    assert name is None and v.reason is Reason.JWT_BAD_ISSUER


def test_cache_is_a_bounded_lru():
    cache = jwt.TokenCache(max_entries=2)
    cache.put("a", "demo", {"n": 1}, "k1")
    cache.put("b", "demo", {"n": 2}, "k1")
    assert cache.get("a") is not None       # "a" is now the most recent
    cache.put("c", "demo", {"n": 3}, "k1")
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") == ("demo", {"n": 1}, "k1")
    assert cache.get("c") == ("demo", {"n": 3}, "k1")
    cache.clear()
    assert len(cache) == 0


# -------------------------------------------------------------------------------- KeySet ---

@pytest.mark.parametrize("doc", [None, [], "keys", {}, {"keys": "x"}, {"keys": []},
                                 {"keys": [{"kty": "RSA", "kid": "no-modulus"}]},
                                 {"keys": [42, "x", None]},
                                 {"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}])
def test_from_jwks_rejects_documents_without_a_usable_key(doc):
    with pytest.raises(ValueError):
        jwt.KeySet.from_jwks(doc)


def test_from_jwks_skips_bad_keys_and_keeps_good_ones(key):
    enc = dict(key.jwk, kid="encryption", use="enc")
    no_kid = {k: v for k, v in key.jwk.items() if k != "kid"}
    doc = {"keys": [{"kty": "RSA", "kid": "broken"}, {"kty": "nope", "kid": "weird"}, enc, key.jwk, no_kid]}
    ks = jwt.KeySet.from_jwks(doc)
    assert ks.loaded
    assert set(ks.keys) == {key.kid, "#4"}


def test_unverified_issuer():
    assert jwt.unverified_issuer(compact({"alg": "none"}, {"iss": "x"})) == "x"
    assert jwt.unverified_issuer(compact({"alg": "none"}, {"iss": 5})) is None
    assert jwt.unverified_issuer("garbage") is None


# -------------------------------------------------------------------------------- policy ---

FORWARD = "x-jwt-sub"
POLICIES_YAML = f"""
providers:
  demo:
    issuer: {ISS}
    audiences: [{AUD}]
    jwks_file: /nonexistent/jwks.json
    claims_to_headers: {{sub: x-jwt-sub}}
policies:
  public: {{auth: none}}
  api: {{auth: {{providers: [demo]}}}}
  api-shadow: {{mode: shadow, auth: {{providers: [demo]}}}}
"""


def policies(*, default: str | None = "api", unknown_allows: bool = False) -> PolicySet:
    """The PolicySet the worker compiles from extproc.yaml."""
    text = POLICIES_YAML + (f"default_policy: {default}\n" if default else "")
    text += f"unknown_policy: {'allow' if unknown_allows else 'deny'}\n"
    return compile_policies(cfgmod.parse(text))


def req(authorization: str | None = None, policy_name: str | None = "api", **headers: str) -> Request:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if authorization is not None:
        h["authorization"] = authorization
    return Request(method="GET", path="/api/products", headers=h, policy=policy_name)


def decide(r: Request, keyset: jwt.KeySet, ps: PolicySet | None = None, now: float = T,
           cache: jwt.TokenCache | None = None):
    """The servicer's path: select the policy, then services.identity decides."""
    import asyncio

    from extproc.services.identity import Identity

    ps = ps or policies()
    pol = ps.select(r.policy)
    if pol is None:
        return policy.unknown_policy(r.policy or "", ps)
    ident = Identity(ps, dict(provs(keyset)), {}, token_cache=cache)
    return asyncio.run(ident.decide(r, pol, now))


def body(d) -> dict:
    return json.loads(d.body)


def test_missing_token_is_401_with_a_bare_challenge(keyset):
    d = decide(req(), keyset)
    assert not d.allowed and d.status == 401
    assert d.reason is Reason.TOKEN_MISSING
    assert ("www-authenticate", 'Bearer realm="extproc"') in d.headers
    assert ("content-type", "application/json") in d.headers
    assert body(d) == {"error": "unauthorized", "reason": "token_missing", "message": "a bearer token is required"}
    assert d.policy == "api" and d.rule == "authn"


def test_invalid_token_is_401_invalid_token(key, keyset):
    d = decide(req(f"Bearer {key.mint('alice', now=T - 7200)}"), keyset)
    assert not d.allowed and d.status == 401
    assert d.reason is Reason.JWT_EXPIRED
    challenge = dict(d.headers)["www-authenticate"]
    assert challenge == 'Bearer realm="extproc", error="invalid_token", error_description="token expired"'
    assert body(d)["reason"] == "jwt_expired"


def test_challenge_description_cannot_break_the_quoting(keyset):
    d = decide(req("Bearer a.b"), keyset)
    challenge = dict(d.headers)["www-authenticate"]
    assert challenge.count('"') == 6


def test_valid_token_allowed_with_subject_forwarded(key, keyset):
    d = decide(req(f"Bearer {key.mint('alice', now=T)}", x_jwt_sub="mallory"), keyset)
    assert d.allowed and d.reason is Reason.OK
    assert d.headers == ((FORWARD, "alice"),)
    assert d.metadata == {"sub": "alice", "provider": "demo", "policy": "api", "auth": "jwt",
                          "iss": "extproc-demo"}
    assert "authorization" in d.remove_headers          # stripped unless the route keeps it


def test_forward_header_removed_when_token_has_no_subject(key, keyset):
    token = rs256(key, claims(sub=None))
    d = decide(req(f"Bearer {token}", x_jwt_sub="mallory"), keyset)
    assert d.allowed
    assert d.headers == ()
    assert d.remove_headers == (FORWARD, "authorization")
    assert d.metadata["sub"] == ""


def test_non_string_subject_is_not_forwarded(key, keyset):
    d = decide(req(f"Bearer {rs256(key, claims(sub=12345))}"), keyset)
    assert d.allowed and d.headers == () and d.remove_headers == (FORWARD, "authorization")


def test_public_policy_allows_without_token(keyset):
    d = decide(req(policy_name="public"), keyset)
    assert d.allowed and d.reason is Reason.PUBLIC and d.policy == "public"


def test_public_policy_strips_a_client_sent_subject_header(keyset):
    d = decide(req(policy_name="public", x_jwt_sub="mallory"), keyset)
    assert d.allowed and d.headers == ()
    assert FORWARD in d.remove_headers


def test_unknown_policy_is_403(keyset):
    d = decide(req(policy_name="no-such-policy"), keyset)
    assert not d.allowed and d.status == 403
    assert d.reason is Reason.POLICY_UNKNOWN and d.policy == "no-such-policy"
    assert body(d) == {"error": "forbidden", "reason": "policy_unknown",
                       "message": "this route names no known policy"}


def test_unknown_policy_allowed_when_configured(keyset):
    d = decide(req(policy_name="no-such-policy"), keyset, policies(unknown_allows=True))
    assert d.allowed and d.reason is Reason.POLICY_UNKNOWN
    assert FORWARD in d.remove_headers


@pytest.mark.parametrize("name", [None, ""])
def test_default_policy_when_the_route_names_none(key, keyset, name):
    d = decide(req(policy_name=name), keyset)
    assert d.status == 401 and d.policy == "api"
    ok = decide(req(f"Bearer {key.mint('alice', now=T)}", policy_name=name), keyset)
    assert ok.allowed and ok.policy == "api"


def test_no_policy_and_no_default_is_policy_unknown(keyset):
    d = decide(req(policy_name=None), keyset, policies(default=None))
    assert not d.allowed and d.status == 403 and d.reason is Reason.POLICY_UNKNOWN


def test_shadow_mode_allows_and_keeps_the_real_reason(key, keyset):
    d = decide(req(f"Bearer {key.mint('alice', now=T, audience='other')}", policy_name="api-shadow"), keyset)
    assert d.allowed and d.would_deny
    assert d.reason is Reason.JWT_BAD_AUDIENCE
    assert d.policy == "api-shadow" and d.rule == "authn"
    assert d.headers == () and FORWARD in d.remove_headers   # nothing verified: nothing forwarded
    missing = decide(req(policy_name="api-shadow"), keyset)
    assert missing.allowed and missing.would_deny and missing.reason is Reason.TOKEN_MISSING


def test_shadow_mode_with_a_good_token_is_a_plain_allow(key, keyset):
    d = decide(req(f"Bearer {key.mint('alice', now=T)}", policy_name="api-shadow"), keyset)
    assert d.allowed and not d.would_deny and d.reason is Reason.OK


def test_keys_not_loaded_is_401_keys_unavailable(key):
    d = decide(req(f"Bearer {key.mint('alice', now=T)}"), jwt.NO_KEYS)
    assert not d.allowed and d.status == 401 and d.reason is Reason.KEYS_UNAVAILABLE


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(key, keyset, scheme):
    assert decide(req(f"{scheme} {key.mint('alice', now=T)}"), keyset).allowed


@pytest.mark.parametrize("value", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer   ", "", "Token abc"])
def test_other_schemes_are_token_missing(keyset, value):
    d = decide(req(value), keyset)
    assert d.reason is Reason.TOKEN_MISSING and d.status == 401


def test_policy_uses_the_token_cache(key, keyset):
    cache = jwt.TokenCache()
    token = key.mint("alice", now=T, ttl_seconds=60)
    assert decide(req(f"Bearer {token}"), keyset, cache=cache).allowed
    assert len(cache) == 1
    later = decide(req(f"Bearer {token}"), keyset, now=T + 60 + 30, cache=cache)
    assert later.reason is Reason.JWT_EXPIRED
