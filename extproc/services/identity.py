"""The identity decision for one request: drives core.policy's pure steps and does the I/O
(token introspection, store-managed API keys, revoking on logout) they need.

The common case — a repeat JWT on a policy it already passed — is answered from the decision
cache after three O(1) checks (expiry, signing key still published, not revoked) and the
request-dependent rules; no signature is checked and no header is rebuilt. See core/policy.py
for the order of checks and what each failure answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from ..core import jwt
from ..core.authorize import Principal, scopes_of
from ..core.credentials import extract
from ..core.decision import Decision
from ..core.policy import (
    ANONYMOUS,
    CompiledPolicy,
    DecisionCache,
    PolicySet,
    allow_granted,
    allow_public,
    forbidden,
    grant,
    shadowed,
    unauthenticated,
)
from ..core.reasons import Reason
from ..core.request import Request
from ..store import StoreError
from ..telemetry import metrics
from .jwks import UNKNOWN_KID_WAIT, KeySource

log = logging.getLogger("extproc.identity")
audit = logging.getLogger("extproc.audit")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Identity:
    def __init__(self, policies: PolicySet, keys: dict[str, tuple[jwt.ProviderRules, jwt.KeySet]],
                 sources: Mapping[str, KeySource], *, introspectors: Mapping[str, Any] | None = None,
                 api_keys: Any = None, revocations: Any = None,
                 token_cache: jwt.TokenCache | None = None, decision_cache: DecisionCache | None = None):
        self.policies = policies
        self.keys = keys
        self.sources = sources
        self.introspectors = introspectors or {}
        self.api_keys = api_keys
        self.revocations = revocations
        self.token_cache = token_cache if token_cache is not None else jwt.TokenCache()
        self.decisions = decision_cache if decision_cache is not None else DecisionCache()

    # -- the decision -----------------------------------------------------------------------------
    async def decide(self, req: Request, policy: CompiledPolicy, now: float,
                     trace: list[str] | None = None) -> Decision:
        d = await self._decide(req, policy, now, trace)
        if not d.allowed:
            audit.info("deny", extra={"event": "deny", "policy": policy.name, "rule": d.rule,
                                      "reason": d.reason.value, "status": d.status, "request_id": req.request_id,
                                      "client_ip": req.client_ip, "method": req.method,
                                      "path": req.path.partition("?")[0][:256], "shadow": policy.shadow})
        return shadowed(policy, self.policies, d)

    async def _decide(self, req: Request, policy: CompiledPolicy, now: float, trace: list[str] | None) -> Decision:
        if policy.ip is not None:
            v = policy.ip.check(req.client_ip, trace)
            if not v.allowed:
                return forbidden(policy, v.reason, v.detail or "client address not allowed", rule="ip")
        if policy.public:
            if trace is not None:
                trace.append(f"policy {policy.name}: no credentials required")
            return self._rules(req, policy, ANONYMOUS, trace) or allow_public(policy, self.policies)

        granted, failure, credential = await self._authenticate(req, policy, now, trace)
        if failure is not None:
            return failure
        assert granted is not None
        denied = self._rules(req, policy, granted.principal, trace)
        if denied is not None:
            return denied
        if policy.revoke_presented and self.revocations is not None and credential:
            await self._revoke_presented(granted, credential, now)
        # a credential sent as a query parameter never reaches the upstream (or its access logs)
        names = self.policies.credential_query_params
        remove_query = tuple(n for n in names if n in req.path) if names and "?" in req.path else ()
        return allow_granted(policy, granted, remove_query=remove_query)

    def _rules(self, req: Request, policy: CompiledPolicy, principal: Principal,
               trace: list[str] | None) -> Decision | None:
        if policy.rules is None:
            return None
        v = policy.rules.evaluate(req, principal, trace)
        if v.allowed:
            return None
        return forbidden(policy, v.reason, v.detail or "denied by policy", rule=v.rule or "rules")

    # -- authentication ---------------------------------------------------------------------------
    async def _authenticate(self, req: Request, policy: CompiledPolicy, now: float, trace: list[str] | None):
        """Returns (granted, failure decision, credential)."""
        plans = self.policies.providers
        errors: list[jwt.Verified] = []
        seen_credential = False
        granted_all = []
        for name in policy.providers:
            plan = plans[name]
            token, ambiguous = extract(req, plan.sources)
            if ambiguous:
                return None, unauthenticated(policy, Reason.TOKEN_AMBIGUOUS,
                                             "several different credentials were presented"), ""
            if token is None:
                if policy.all_of:
                    return None, unauthenticated(policy, Reason.TOKEN_MISSING, ""), ""
                continue
            seen_credential = True
            cached = self.decisions.get(policy.name, token, now)
            if cached is not None and cached.principal.provider == name and self._still_valid(cached, name):
                revoked = self._revoked(cached.principal, cached.jti, cached.digest, cached.iat, now, policy)
                if revoked is not None:
                    return None, revoked, token
                metrics.child(metrics.AUTH_CACHE, "hit").inc()
                if trace is not None:
                    trace.append(f"provider {name}: credential found in the decision cache (verified earlier)")
                if not policy.all_of:
                    return cached, None, token
                granted_all.append(cached)
                continue
            if cached is not None and not policy.all_of and self._later_grant(req, policy, name, cached, token):
                # a later provider of this any-of policy granted this very credential (so this one
                # refused it): no failed signature check per repeat, that provider's turn hits
                if trace is not None:
                    trace.append(f"provider {name}: skipped, the credential is cached as granted by "
                                 f"{cached.principal.provider}")
                continue
            metrics.child(metrics.AUTH_CACHE, "miss").inc()
            if plan.kind == "introspection" and errors and token.count(".") == 2:
                # a JWT that a JWT provider of this policy already judged is not sent to an
                # introspection endpoint: its own error (expired, bad signature...) is the answer
                continue
            if plan.kind == "introspection":
                g, failure = await self._introspect(req, policy, name, token, now, trace)
            else:
                g, failure = await self._verify_jwt(policy, name, token, now, trace, errors)
            if failure is not None:
                return None, failure, token
            if g is None:
                if policy.all_of:
                    break
                continue
            self.decisions.put(policy.name, token, g)
            if not policy.all_of:
                return g, None, token
            granted_all.append(g)
        if policy.all_of and len(granted_all) == len(policy.all_of):
            return granted_all[0], None, ""
        if not seen_credential and policy.api_keys and self.api_keys is not None:
            return await self._api_key(req, policy, now, trace)
        if not seen_credential:
            if trace is not None:
                trace.append("no credential in any source of the policy's providers")
            return None, unauthenticated(policy, Reason.TOKEN_MISSING, ""), ""
        # the most telling error: anything beats "wrong issuer" when several providers were tried
        best = next((e for e in errors if e.reason is not Reason.JWT_BAD_ISSUER), errors[0] if errors else None)
        if best is None:
            return None, unauthenticated(policy, Reason.TOKEN_MALFORMED, "credential not accepted"), ""
        return None, unauthenticated(policy, best.reason, best.detail), ""

    def _later_grant(self, req: Request, policy: CompiledPolicy, name: str, cached, token: str) -> bool:
        """Whether `cached`, the decision-cache entry for `token` under this any-of policy, is a
        still-valid grant of a provider after `name` that reads the same credential in this
        request. `name` refused that credential (or did not see it) when the grant was made, and a
        grant of any provider of the policy authenticates: `name`'s turn is skipped."""
        other = cached.principal.provider
        order = policy.providers
        if other not in order or order.index(other) <= order.index(name):
            return False
        plan = self.policies.providers.get(other)
        return (plan is not None and extract(req, plan.sources) == (token, False)
                and self._still_valid(cached, other))

    def still_granted(self, g, provider: str, policy: CompiledPolicy, now: float) -> bool:
        """What a decision-cache hit checks besides expiry: granted by this provider, signing key
        still published, not revoked (nor revocations unknown on a fail-closed provider)."""
        return (g.principal.provider == provider and self._still_valid(g, provider)
                and self._revoked(g.principal, g.jti, g.digest, g.iat, now, policy) is None)

    def _still_valid(self, g, provider: str) -> bool:
        if not g.kid:
            return True
        entry = self.keys.get(provider)
        return entry is not None and g.kid in entry[1].keys

    def _revoked(self, principal: Principal, jti: str, digest: str, iat: float | None, now: float,
                 policy: CompiledPolicy) -> Decision | None:
        rl = self.revocations
        if rl is None or principal.kind == "api_key":
            return None
        if rl.is_revoked(jti or None, digest, principal.subject or None, iat, now):
            return unauthenticated(policy, Reason.TOKEN_REVOKED, "token revoked")
        if not rl.known_complete:
            plan = self.policies.providers.get(principal.provider)
            if plan is not None and plan.revocation_fail_closed:
                return unauthenticated(policy, Reason.REVOCATION_UNKNOWN, "")
        return None

    async def _verify_jwt(self, policy: CompiledPolicy, name: str, token: str, now: float,
                          trace: list[str] | None, errors: list[jwt.Verified]):
        entry = self.keys.get(name)
        if entry is None:
            errors.append(jwt.Verified(None, Reason.KEYS_UNAVAILABLE, "keys unavailable"))
            return None, None
        _, v = jwt.verify(token, {name: entry}, now, self.token_cache)
        if v.reason is Reason.JWT_UNKNOWN_KID:
            # maybe a rotated key: one early refetch per interval, waited for briefly
            src = self.sources.get(name)
            waiter = src.refetch_for_unknown_kid() if src is not None else None
            if waiter is not None:
                try:
                    await asyncio.wait_for(waiter.wait(), UNKNOWN_KID_WAIT)
                except TimeoutError:
                    pass
                _, v = jwt.verify(token, {name: self.keys[name]}, now, self.token_cache)
        if not v.ok:
            metrics.child(metrics.JWT_ERRORS, name, v.reason.value).inc()
            if trace is not None:
                trace.append(f"provider {name}: token rejected: {v.reason.value} ({v.detail})")
            errors.append(v)
            return None, None
        metrics.child(metrics.JWT_OK, name).inc()
        claims = v.claims or {}
        sub = claims.get("sub")
        principal = Principal(kind="jwt", subject=sub if isinstance(sub, str) else "", provider=name,
                              claims=claims, scopes=scopes_of(claims))
        jti = claims.get("jti") if isinstance(claims.get("jti"), str) else ""
        digest = token_digest(token)     # once per grant: an admin may revoke by digest too
        iat = claims.get("iat") if isinstance(claims.get("iat"), int | float) else None
        revoked = self._revoked(principal, jti, digest, iat, now, policy)
        if revoked is not None:
            return None, revoked
        if trace is not None:
            trace.append(f"provider {name}: token verified (sub={principal.subject!r}, kid={v.kid!r})")
        failure = self._requirements(policy, principal, trace)
        if failure is not None:
            return None, failure
        exp = claims.get("exp")
        rules = entry[0]
        expires = exp + rules.leeway if isinstance(exp, int | float) else now + 60.0
        return grant(policy, self.policies, principal, expires, kid=v.kid, jti=jti, digest=digest, iat=iat), None

    def _requirements(self, policy: CompiledPolicy, principal: Principal, trace: list[str] | None) -> Decision | None:
        if policy.requirements is None:
            return None
        v = policy.requirements.check(principal, trace)
        if v.allowed:
            return None
        return forbidden(policy, v.reason, v.detail or "insufficient rights", rule="requirements",
                         missing_scopes=v.missing_scopes)

    async def _introspect(self, req: Request, policy: CompiledPolicy, name: str, token: str, now: float,
                          trace: list[str] | None):
        introspector = self.introspectors.get(name)
        if introspector is None:
            return None, unauthenticated(policy, Reason.INTROSPECTION_UNAVAILABLE, "")
        result = await introspector.introspect(token, now)
        if not result.active:
            if trace is not None:
                trace.append(f"provider {name}: introspection says {result.reason.value}")
            metrics.child(metrics.JWT_ERRORS, name, result.reason.value).inc()
            return None, unauthenticated(policy, result.reason, "token not active")
        claims = result.claims
        sub = claims.get("sub")
        principal = Principal(kind="introspection", subject=sub if isinstance(sub, str) else "", provider=name,
                              claims=claims, scopes=scopes_of(claims))
        metrics.child(metrics.JWT_OK, name).inc()
        jti = claims.get("jti") if isinstance(claims.get("jti"), str) else ""
        digest = token_digest(token)
        revoked = self._revoked(principal, jti, digest, None, now, policy)
        if revoked is not None:
            return None, revoked
        failure = self._requirements(policy, principal, trace)
        if failure is not None:
            return None, failure
        exp = claims.get("exp")
        # introspection results are cached by the introspector itself (bounded, never past exp);
        # the decision cache keeps them no longer than that, so an IdP-side revocation takes
        # effect within the introspection cache TTL
        ttl = introspector.cfg.cache_ttl_seconds
        ttl_end = min(exp, now + ttl) if isinstance(exp, int | float) else now + ttl
        return grant(policy, self.policies, principal, ttl_end, jti=jti, digest=digest), None

    async def _api_key(self, req: Request, policy: CompiledPolicy, now: float, trace: list[str] | None):
        raw, ambiguous = extract(req, self.policies.api_key_sources)
        if ambiguous:
            return None, unauthenticated(policy, Reason.TOKEN_AMBIGUOUS, "several different API keys"), ""
        if raw is None:
            if trace is not None:
                trace.append("no bearer token and no API key")
            return None, unauthenticated(policy, Reason.TOKEN_MISSING, ""), ""
        # the registry caches lookups itself (bounded, `cache_seconds`): no second cache here, so a
        # revoked key stops within that one bound, and raw keys are never held as cache keys
        try:
            record, reason = await self.api_keys.lookup(raw, now)
        except StoreError as exc:
            return None, unauthenticated(policy, Reason.STORE_TIMEOUT if exc.timeout else Reason.STORE_ERROR, ""), ""
        if record is None:
            if trace is not None:
                trace.append(f"API key rejected: {reason.value}")
            return None, unauthenticated(policy, reason, "API key not accepted"), ""
        claims = {"sub": record.owner, "tier": record.tier, "scope": " ".join(record.scopes), "key_id": record.id}
        principal = Principal(kind="api_key", subject=record.owner, provider="api_key", claims=claims,
                              scopes=frozenset(record.scopes))
        if trace is not None:
            trace.append(f"API key {record.id} of {record.owner} accepted")
        failure = self._requirements(policy, principal, trace)
        if failure is not None:
            return None, failure, ""
        expires = record.expires_at if record.expires_at is not None else now + 3600.0
        return grant(policy, self.policies, principal, expires), None, ""

    async def _revoke_presented(self, g, credential: str, now: float) -> None:
        exp = g.expires_at
        try:
            if g.jti:
                await self.revocations.revoke_token(g.jti, exp)
            else:
                await self.revocations.revoke_token(g.digest or token_digest(credential), exp)
        except StoreError as exc:
            log.error("logout could not be shared with other replicas", extra={"error": str(exc)})
        audit.info("token revoked at logout", extra={"event": "revoke", "action": "revoke.logout",
                                                     "sub": g.principal.subject, "jti": g.jti})
