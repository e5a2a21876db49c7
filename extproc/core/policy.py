"""Which policy judges a request, and what it decides.

A route names its policy in envoy.yaml (ext_authz `context_extensions: {policy: NAME}`, ext_proc
`grpc_initial_metadata x-extproc-policy: NAME`); extproc.yaml defines the policies. A request
naming no policy gets `default_policy`; one naming an undefined policy gets the configured
`unknown_policy` answer (deny 403 by default), counted under reason `policy_unknown`.

Authentication today is JWT bearer tokens (RFC 6750): a missing token is 401 with a bare
`WWW-Authenticate: Bearer` challenge, a bad one 401 with `error="invalid_token"`.
Shadow mode (`mode: shadow`) decides in full and then allows, marking the would-be deny.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import jwt
from .decision import Decision, deny
from .reasons import Reason
from .request import Request

REALM = "extproc"


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    shadow: bool
    providers: tuple[str, ...]          # empty: no identity needed


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: Mapping[str, CompiledPolicy]
    default: str | None
    unknown_allows: bool
    forward_headers: Mapping[str, str]  # provider -> request header carrying the subject upstream
    # identity headers the upstream trusts: a client's copy never passes unverified
    strip_headers: tuple[str, ...] = ()

    def select(self, name: str | None) -> CompiledPolicy | None:
        if not name:
            name = self.default
            if name is None:
                return None
        return self.policies.get(name)


def bearer_token(req: Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 6750 §2.1)."""
    value = req.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _challenge(detail: str | None) -> tuple[tuple[str, str], ...]:
    if detail is None:
        return (("www-authenticate", f'Bearer realm="{REALM}"'),)
    safe = detail.replace('"', "'")
    return (("www-authenticate", f'Bearer realm="{REALM}", error="invalid_token", error_description="{safe}"'),)


def decide(req: Request, policies: PolicySet,
           keys: Mapping[str, tuple[jwt.ProviderRules, jwt.KeySet]],
           now: float, cache: jwt.TokenCache | None = None) -> Decision:
    policy = policies.select(req.policy)
    if policy is None:
        name = req.policy or ""
        if policies.unknown_allows:
            return Decision(True, Reason.POLICY_UNKNOWN, remove_headers=policies.strip_headers, policy=name)
        return deny(403, Reason.POLICY_UNKNOWN, "this route names no known policy", policy=name)
    decision = _authenticate(req, policy, keys, now, cache, policies.forward_headers, policies.strip_headers)
    if policy.shadow and not decision.allowed:
        return Decision(True, decision.reason, remove_headers=policies.strip_headers, policy=policy.name,
                        rule=decision.rule, would_deny=True)
    return decision


def _authenticate(req: Request, policy: CompiledPolicy,
                  keys: Mapping[str, tuple[jwt.ProviderRules, jwt.KeySet]], now: float,
                  cache: jwt.TokenCache | None, forward: Mapping[str, str],
                  strip: tuple[str, ...]) -> Decision:
    if not policy.providers:
        return Decision(True, Reason.PUBLIC, remove_headers=strip, policy=policy.name)
    token = bearer_token(req)
    if token is None:
        return deny(401, Reason.TOKEN_MISSING, "a bearer token is required", policy=policy.name,
                    rule="jwt", headers=_challenge(None))
    mine = {p: keys[p] for p in policy.providers if p in keys}
    provider, result = jwt.verify(token, mine, now, cache)
    if not result.ok:
        return deny(401, result.reason, result.detail, policy=policy.name, rule="jwt",
                    headers=_challenge(result.detail))
    claims = result.claims or {}
    sub = claims.get("sub")
    sub = sub if isinstance(sub, str) else ""
    meta = {"sub": sub, "provider": provider or "", "policy": policy.name}
    header = forward.get(provider or "")
    # a client-sent copy of an identity header never reaches the upstream as if we had set it;
    # the one we set (overwrite) replaces any copy
    headers = ((header, sub),) if header and sub else ()
    remove = tuple(h for h in strip if not (headers and h == header))
    return Decision(True, Reason.OK, headers=headers, remove_headers=remove, metadata=meta,
                    policy=policy.name, rule="jwt")
