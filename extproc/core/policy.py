"""Policies compiled for the hot path, and the pure steps of an identity decision.

A route names its policy in envoy.yaml (ext_authz `context_extensions: {policy: NAME}`, ext_proc
`grpc_initial_metadata x-extproc-policy: NAME`); extproc.yaml defines the policies. A request
naming no policy gets `default_policy`; one naming an undefined policy gets the configured
`unknown_policy` answer (deny 403 by default), counted under reason `policy_unknown`.

Order of checks (services/identity.py drives it; each step here is pure):
1. IP allow/deny lists on the client address Envoy computed (403 `ip_denied`).
2. Authentication: a credential from the policy's providers (any_of, or every one of all_of) or
   an API key; none at all is 401 with a bare `WWW-Authenticate: Bearer realm=...` challenge
   (RFC 6750 §3), a bad one 401 with `error="invalid_token"`.
3. Revocation (local O(1) lookup of the fleet-wide deny-list).
4. Requirements: scopes, roles, claim values (403 with `error="insufficient_scope"`).
5. Named allow/deny rules, deny first (403; the rule's name is the `rule` label).
Then the allowed request gets the configured claim headers (client copies of every identity
header removed first), loses `Authorization` unless the route keeps it, and carries the claims
as dynamic metadata. `mode: shadow` decides in full, then allows, marking the would-be deny.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .authorize import EMPTY, IpList, Principal, Requirements, RuleSet
from .credentials import Source
from .decision import Decision, deny
from .reasons import Reason

REALM = "extproc"


@dataclass(frozen=True, slots=True)
class ProviderPlan:
    name: str
    kind: str                                    # "jwt" | "introspection"
    sources: tuple[Source, ...]
    claims_to_headers: tuple[tuple[str, str], ...] = ()
    metadata_claims: tuple[str, ...] = ()
    revocation_fail_closed: bool = False


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    shadow: bool = False
    public: bool = True                          # auth: none
    any_of: tuple[str, ...] = ()
    all_of: tuple[str, ...] = ()
    api_keys: bool = False
    requirements: Requirements | None = None
    ip: IpList | None = None
    rules: RuleSet | None = None
    keep_authorization: bool = False
    revoke_presented: bool = False

    @property
    def providers(self) -> tuple[str, ...]:
        return self.all_of or self.any_of

    @property
    def public_metadata(self) -> dict[str, str]:
        """What an allowed anonymous request tells the access log (its policy)."""
        return {"policy": self.name}


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: Mapping[str, CompiledPolicy]
    default: str | None = None
    unknown_allows: bool = False
    providers: Mapping[str, ProviderPlan] = field(default_factory=dict)
    api_key_sources: tuple[Source, ...] = ()
    api_key_headers: tuple[tuple[str, str], ...] = ()   # ("owner"|"tier", header)
    # identity headers the upstream trusts: a client's copy never passes unverified
    strip_headers: tuple[str, ...] = ()
    credential_query_params: frozenset[str] = frozenset()

    def select(self, name: str | None) -> CompiledPolicy | None:
        if not name:
            name = self.default
            if name is None:
                return None
        return self.policies.get(name)


def challenge(error: str | None = None, description: str = "", scope: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """RFC 6750 §3 WWW-Authenticate for a Bearer realm."""
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
        if description:
            value += ', error_description="' + description.replace('"', "'").replace("\\", "") + '"'
        if scope:
            value += f', scope="{" ".join(scope)}"'
    return (("www-authenticate", value),)


def unknown_policy(name: str, policies: PolicySet) -> Decision:
    if policies.unknown_allows:
        return Decision(True, Reason.POLICY_UNKNOWN, remove_headers=policies.strip_headers, policy=name)
    return deny(403, Reason.POLICY_UNKNOWN, "this route names no known policy", policy=name)


def unauthenticated(policy: CompiledPolicy, reason: Reason, detail: str) -> Decision:
    if reason is Reason.TOKEN_MISSING:
        wanted = ("a bearer token or an API key" if policy.providers and policy.api_keys
                  else "a bearer token" if policy.providers else "an API key")
        return deny(401, reason, f"{wanted} is required", policy=policy.name, rule="authn",
                    headers=challenge() if policy.providers else ())
    if reason in (Reason.INTROSPECTION_UNAVAILABLE, Reason.REVOCATION_UNKNOWN, Reason.STORE_ERROR,
                  Reason.STORE_TIMEOUT):
        # the client did nothing wrong: an honest 503 it may retry
        return deny(503, reason, "the credential cannot be checked right now", policy=policy.name,
                    rule="authn", headers=(("retry-after", "1"),))
    return deny(401, reason, detail, policy=policy.name, rule="authn",
                headers=challenge("invalid_token", detail) if policy.providers else ())


def forbidden(policy: CompiledPolicy, reason: Reason, detail: str, rule: str,
              missing_scopes: tuple[str, ...] = ()) -> Decision:
    headers = challenge("insufficient_scope", detail, missing_scopes) if reason is Reason.INSUFFICIENT_SCOPE else ()
    return deny(403, reason, detail, policy=policy.name, rule=rule, headers=headers)


def identity_headers(principal: Principal, plans: Mapping[str, ProviderPlan],
                     api_key_headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Headers carrying verified identity to the upstream."""
    if principal.kind == "api_key":
        out = []
        for what, header in api_key_headers:
            value = principal.subject if what == "owner" else str(principal.claims.get(what, ""))
            if value:
                out.append((header, value))
        return tuple(out)
    plan = plans.get(principal.provider)
    if plan is None:
        return ()
    out = []
    for claim, header in plan.claims_to_headers:
        value = principal.claims.get(claim)
        if value is None or isinstance(value, bool | dict) or (claim == "sub" and not isinstance(value, str)):
            continue   # sub is a StringOrURI (RFC 7519 4.1.2); objects are never flattened into a header
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        text = str(value)
        if text and all(32 <= ord(c) < 127 for c in text):   # never inject control or non-ASCII bytes
            out.append((header, text))
    return tuple(out)


def identity_metadata(principal: Principal, plans: Mapping[str, ProviderPlan], policy: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"policy": policy, "auth": principal.kind, "sub": principal.subject,
                            "provider": principal.provider}
    plan = plans.get(principal.provider)
    if plan is not None:
        for claim in plan.metadata_claims:
            if claim == "sub":
                continue   # the verified subject string, set above
            value = principal.claims.get(claim)
            if isinstance(value, str | int | float | bool):
                meta[claim] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                meta[claim] = " ".join(value)
    elif principal.kind == "api_key":
        meta["tier"] = str(principal.claims.get("tier", ""))
    return meta


@dataclass(frozen=True, slots=True)
class Granted:
    """What an allowed principal gets on a policy: cached per (policy, credential)."""
    principal: Principal
    headers: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]
    metadata: dict[str, Any]
    expires_at: float                  # never used at or after this time (token exp + leeway)
    kid: str = ""                      # the signing key; the entry dies when the key leaves the JWKS
    jti: str = ""
    digest: str = ""
    iat: float | None = None


def grant(policy: CompiledPolicy, policies: PolicySet, principal: Principal, expires_at: float, *,
          kid: str = "", jti: str = "", digest: str = "", iat: float | None = None) -> Granted:
    headers = identity_headers(principal, policies.providers, policies.api_key_headers)
    set_names = {h for h, _ in headers}
    remove = [h for h in policies.strip_headers if h not in set_names]
    if not policy.keep_authorization:
        remove.append("authorization")
    return Granted(principal, headers, tuple(remove), identity_metadata(principal, policies.providers, policy.name),
                   expires_at, kid, jti, digest, iat)


def allow_granted(policy: CompiledPolicy, g: Granted, rule: str = "",
                  remove_query: tuple[str, ...] = ()) -> Decision:
    return Decision(True, Reason.OK, headers=g.headers, remove_headers=g.remove, remove_query=remove_query,
                    metadata=g.metadata, policy=policy.name, rule=rule or "authn", principal=g.principal)


def allow_public(policy: CompiledPolicy, policies: PolicySet, rule: str = "") -> Decision:
    return Decision(True, Reason.PUBLIC, remove_headers=policies.strip_headers, policy=policy.name, rule=rule,
                    principal=ANONYMOUS, metadata=policy.public_metadata)


def shadowed(policy: CompiledPolicy, policies: PolicySet, d: Decision) -> Decision:
    """Shadow mode: the would-be deny is recorded, the request goes on without identity headers."""
    if d.allowed or not policy.shadow:
        return d
    return Decision(True, d.reason, remove_headers=policies.strip_headers, policy=policy.name, rule=d.rule,
                    would_deny=True)


class DecisionCache:
    """Bounded LRU of granted (policy, credential) pairs: a repeat credential costs no signature
    check, no requirement evaluation and no header building. Entries are never used at or past
    their expiry, after their signing key left the JWKS, or after a revocation (the caller
    checks the local revocation list on every hit)."""

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Granted] = OrderedDict()

    def get(self, policy: str, credential: str, now: float) -> Granted | None:
        key = (policy, credential)
        g = self._entries.get(key)
        if g is None:
            return None
        if now >= g.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return g

    def peek(self, policy: str, credential: str) -> Granted | None:
        """The entry as it is: no expiry check, no LRU move (the caller checks what it needs)."""
        return self._entries.get((policy, credential))

    def put(self, policy: str, credential: str, g: Granted) -> None:
        key = (policy, credential)
        self._entries[key] = g
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


ANONYMOUS = Principal(kind="anonymous", claims=EMPTY)
