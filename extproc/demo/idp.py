"""The demo identity provider's key: generated at first use, kept outside git.

`extproc token` and the demo upstream's /api/auth/login mint RS256 tokens with it, and the
upstream publishes its public half at /.well-known/jwks.json, which the sidecar's demo
provider fetches. The key lives in $EXTPROC_STATE_DIR (default `.extproc/` at the project
root) and is never committed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEMO_ISSUER = "extproc-demo"
DEMO_AUDIENCE = "extproc-demo-api"
DEMO_USERS = {"alice": "alice-password", "bob": "bob-password", "admin": "admin-password"}
_ROOT = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    return Path(os.environ.get("EXTPROC_STATE_DIR") or _ROOT / ".extproc")


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    private_pem: bytes
    kid: str
    jwk: dict

    def mint(self, sub: str, *, scopes: list[str] | tuple[str, ...] = (), ttl_seconds: int = 3600,
             issuer: str = DEMO_ISSUER, audience: str = DEMO_AUDIENCE, now: float | None = None,
             extra: dict | None = None) -> str:
        iat = int(time.time() if now is None else now)
        claims = {"iss": issuer, "aud": audience, "sub": sub, "iat": iat, "nbf": iat,
                  "exp": iat + ttl_seconds, "jti": uuid.uuid4().hex}
        if scopes:
            claims["scope"] = " ".join(scopes)
        if extra:
            claims.update(extra)
        return jwt.encode(claims, self.private_pem, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict:
        return {"keys": [self.jwk]}


def _from_pem(pem: bytes) -> SigningKey:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    pub = key.public_key().public_numbers()
    e, n = _b64(pub.e), _b64(pub.n)
    # RFC 7638 thumbprint as the kid: stable for one key, new for a rotated one
    thumb = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
    kid = base64.urlsafe_b64encode(hashlib.sha256(thumb.encode()).digest()).rstrip(b"=").decode()[:16]
    return SigningKey(pem, kid, {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": n, "e": e})


def generate() -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return _from_pem(pem)


def load_or_create(directory: Path | None = None) -> SigningKey:
    directory = directory or state_dir()
    path = directory / "demo-idp-key.pem"
    if path.exists():
        return _from_pem(path.read_bytes())
    directory.mkdir(parents=True, exist_ok=True)
    key = generate()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_pem)
    try:
        os.link(tmp, path)           # first writer wins when two processes race
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _from_pem(path.read_bytes())
