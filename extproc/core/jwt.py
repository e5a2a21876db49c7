"""JWT verification: signature, algorithm, issuer, audience and time claims.

Theory of operation. A token is split and its header read without trust; the algorithm must be
on the provider's explicit allow-list (RFC 8725 §3.1: never let the token pick `none` or an
HMAC algorithm against a public key), the `kid` must name a loaded key (no key-guessing loop),
and only then is the signature checked. Time claims are checked against the `now` passed in,
with the provider's leeway (RFC 7519 §4.1.4/§4.1.5, RFC 8725 §3.10). Issuer and audience are
exact matches (RFC 8725 §3.8, §3.9).

A verified token's claims are cached (bounded LRU keyed by the token itself): a repeat token
skips the RSA check but still has its time claims checked against `now`, so expiry is exact.
Nothing here reads the clock or does I/O.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt as pyjwt
from jwt.api_jwk import PyJWK

from .reasons import Reason

MAX_TOKEN_BYTES = 8192
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}   # JWS alg prefix -> JWK kty


@dataclass(frozen=True, slots=True)
class ProviderRules:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: frozenset[str]
    leeway: float
    required_claims: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys one provider currently trusts, by kid. `loaded` is false until the first success."""
    keys: Mapping[str, PyJWK]
    loaded: bool

    @property
    def unnamed(self) -> bool:
        """Keys configured without kids (PEM, secret): tokens may name any kid."""
        return bool(self.keys) and all(k.startswith("#") for k in self.keys)

    @staticmethod
    def from_public_pem(pem: bytes) -> KeySet:
        """One public key in PEM (RSA, EC or Ed25519/Ed448), published under kid "#pem"."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
        from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise ValueError(f"not a PEM public key: {exc}") from None
        if isinstance(key, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(key, as_dict=True)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
        else:
            raise ValueError(f"unsupported public key type {type(key).__name__}")
        return KeySet({"#pem": PyJWK(jwk)}, True)

    @staticmethod
    def from_secret(secret: bytes) -> KeySet:
        """A shared secret for HS256/384/512, under kid "#secret" (also used for tokens without kid)."""
        import base64

        if len(secret) < 32:
            raise ValueError("an HMAC secret needs at least 32 bytes (RFC 7518 3.2)")
        k = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
        return KeySet({"#secret": PyJWK({"kty": "oct", "k": k})}, True)

    @staticmethod
    def from_jwks(doc: Any, algorithms: frozenset[str] | None = None) -> KeySet:
        """Parse a JWKS document; raises ValueError when it holds no usable signing key (for
        `algorithms`, when given: a key no allowed algorithm can use never replaces good keys)."""
        kinds = {_KEY_TYPE.get(a[:2]) for a in algorithms} if algorithms else None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("JWKS must be an object with a 'keys' array")
        keys: dict[str, PyJWK] = {}
        for i, jwk in enumerate(doc["keys"]):
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                key = PyJWK(jwk)
            except (pyjwt.PyJWKError, pyjwt.InvalidKeyError, ValueError, TypeError):
                continue  # one bad key must not hide the good ones
            if kinds is not None and (key.key_type not in kinds
                                      or (jwk.get("alg") is not None and jwk.get("alg") not in algorithms)):
                continue
            keys[jwk.get("kid") or f"#{i}"] = key
        if not keys:
            raise ValueError("JWKS holds no usable signing key")
        return KeySet(keys, True)


NO_KEYS = KeySet({}, False)


@dataclass(frozen=True, slots=True)
class Verified:
    claims: dict[str, Any] | None
    reason: Reason
    detail: str = ""
    kid: str = ""                       # the key that verified the signature

    @property
    def ok(self) -> bool:
        return self.claims is not None


class TokenCache:
    """Bounded LRU of verified tokens: token -> (provider name, claims, kid of the verifying key).

    A hit counts only while that key is still published: a key removed by rotation or because
    it leaked stops its cached tokens at the next request, not at their expiry."""

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, dict[str, Any], str]] = OrderedDict()

    def get(self, token: str) -> tuple[str, dict[str, Any], str] | None:
        hit = self._entries.get(token)
        if hit is not None:
            self._entries.move_to_end(token)
        return hit

    def put(self, token: str, provider: str, claims: dict[str, Any], kid: str) -> None:
        self._entries[token] = (provider, claims, kid)
        self._entries.move_to_end(token)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _fail(reason: Reason, detail: str) -> Verified:
    return Verified(None, reason, detail)


def unverified_issuer(token: str) -> str | None:
    """The `iss` claim read without trust, only to pick which provider verifies the token."""
    try:
        claims = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None


def check_signature(token: str, rules: ProviderRules, keyset: KeySet) -> Verified:
    if len(token) > MAX_TOKEN_BYTES:
        return _fail(Reason.TOKEN_MALFORMED, "token too large")
    if token.count(".") != 2:
        return _fail(Reason.TOKEN_MALFORMED, "not a JWS compact token")
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError:
        return _fail(Reason.TOKEN_MALFORMED, "unreadable token header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in rules.algorithms:
        return _fail(Reason.JWT_ALG_NOT_ALLOWED, f"algorithm {alg!r} not allowed")
    if not keyset.loaded:
        return _fail(Reason.KEYS_UNAVAILABLE, "signing keys not loaded yet")
    kid = header.get("kid")
    key = keyset.keys.get(kid) if isinstance(kid, str) else None
    if key is not None:
        candidates = [(kid, key)]
    elif kid is None or keyset.unnamed:
        # no kid, or a provider configured with one key (PEM, secret) whose tokens name it freely
        candidates = list(keyset.keys.items())
    else:
        return _fail(Reason.JWT_UNKNOWN_KID, "unknown key id")
    for key_id, key in candidates:
        if key._jwk_data.get("alg", alg) != alg or key.key_type != _KEY_TYPE.get(alg[:2]):
            continue  # a key published for another algorithm or key type is never used (RFC 8725 §3.1)
        try:
            payload = pyjwt.api_jws.decode_complete(token, key=key.key, algorithms=[alg])["payload"]
        except (pyjwt.InvalidSignatureError, pyjwt.InvalidKeyError, TypeError, ValueError):
            continue
        except pyjwt.PyJWTError:
            return _fail(Reason.TOKEN_MALFORMED, "token cannot be decoded")
        try:
            claims = json.loads(payload)
        except ValueError:
            return _fail(Reason.TOKEN_MALFORMED, "claims are not JSON")
        if not isinstance(claims, dict):
            return _fail(Reason.TOKEN_MALFORMED, "claims are not an object")
        return Verified(claims, Reason.OK, kid=key_id)
    return _fail(Reason.JWT_BAD_SIGNATURE, "signature does not verify")


def check_claims(claims: dict[str, Any], rules: ProviderRules, now: float) -> Verified:
    for name in rules.required_claims:
        if name not in claims:
            return _fail(Reason.JWT_MISSING_CLAIM, f"claim {name!r} is required")
    exp = claims.get("exp")
    if exp is not None:
        if not _is_number(exp):
            return _fail(Reason.TOKEN_MALFORMED, "exp is not a number")
        if now >= exp + rules.leeway:
            return _fail(Reason.JWT_EXPIRED, "token expired")
    nbf = claims.get("nbf")
    if nbf is not None:
        if not _is_number(nbf):
            return _fail(Reason.TOKEN_MALFORMED, "nbf is not a number")
        if now + rules.leeway < nbf:
            return _fail(Reason.JWT_NOT_YET_VALID, "token not yet valid")
    iat = claims.get("iat")
    if iat is not None:
        if not _is_number(iat):
            return _fail(Reason.TOKEN_MALFORMED, "iat is not a number")
        if now + rules.leeway < iat:
            return _fail(Reason.JWT_NOT_YET_VALID, "token issued in the future")
    if claims.get("iss") != rules.issuer:
        return _fail(Reason.JWT_BAD_ISSUER, "issuer not accepted")
    if rules.audiences:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in rules.audiences for a in auds if isinstance(a, str)):
            return _fail(Reason.JWT_BAD_AUDIENCE, "audience not accepted")
    return Verified(claims, Reason.OK)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _with_kid(v: Verified, kid: str) -> Verified:
    return Verified(v.claims, v.reason, v.detail, kid) if v.ok else v


def verify(token: str, providers: Mapping[str, tuple[ProviderRules, KeySet]], now: float,
           cache: TokenCache | None = None) -> tuple[str | None, Verified]:
    """Verify `token` against one of `providers` (picked by issuer). Returns (provider, result)."""
    if len(token) > MAX_TOKEN_BYTES:
        return None, _fail(Reason.TOKEN_MALFORMED, "token too large")
    if cache is not None:
        hit = cache.get(token)
        if hit is not None:
            name, claims, kid = hit
            entry = providers.get(name)
            if entry is not None and kid in entry[1].keys:
                return name, _with_kid(check_claims(claims, entry[0], now), kid)
    iss = unverified_issuer(token)
    if iss is None:
        return None, _fail(Reason.TOKEN_MALFORMED, "token cannot be decoded")
    for name, (rules, keyset) in providers.items():
        if rules.issuer != iss:
            continue
        sig = check_signature(token, rules, keyset)
        if not sig.ok:
            return name, sig
        assert sig.claims is not None
        result = _with_kid(check_claims(sig.claims, rules, now), sig.kid)
        if result.ok and cache is not None:
            cache.put(token, name, sig.claims, sig.kid)
        return name, result
    return None, _fail(Reason.JWT_BAD_ISSUER, "no provider of this route accepts the token's issuer")
