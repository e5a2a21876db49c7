"""The closed set of reason codes.

One value names why a decision came out as it did; it is the same string in the
decision, the log line and the `reason` metric label, so it must stay bounded.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    OK = "ok"
    PUBLIC = "public"                      # policy needs no identity
    TOKEN_MISSING = "token_missing"
    TOKEN_MALFORMED = "token_malformed"
    JWT_BAD_SIGNATURE = "jwt_bad_signature"
    JWT_EXPIRED = "jwt_expired"
    JWT_NOT_YET_VALID = "jwt_not_yet_valid"
    JWT_BAD_ISSUER = "jwt_bad_issuer"
    JWT_BAD_AUDIENCE = "jwt_bad_audience"
    JWT_ALG_NOT_ALLOWED = "jwt_alg_not_allowed"
    JWT_UNKNOWN_KID = "jwt_unknown_kid"
    JWT_MISSING_CLAIM = "jwt_missing_claim"
    KEYS_UNAVAILABLE = "keys_unavailable"
    TOKEN_AMBIGUOUS = "token_ambiguous"            # several sources carry different credentials
    TOKEN_REVOKED = "token_revoked"
    REVOCATION_UNKNOWN = "revocation_unknown"      # store down, provider set to fail closed
    INTROSPECTION_INACTIVE = "introspection_inactive"
    INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
    API_KEY_INVALID = "api_key_invalid"
    API_KEY_EXPIRED = "api_key_expired"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    ROLE_MISSING = "role_missing"
    CLAIM_MISMATCH = "claim_mismatch"
    RULE_DENIED = "rule_denied"                    # a named deny rule matched (the rule label names it)
    NO_ALLOW_RULE = "no_allow_rule"                # allow rules exist and none matched
    IP_DENIED = "ip_denied"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMIT = "concurrency_limit"
    RATELIMIT_UNAVAILABLE = "ratelimit_unavailable"   # a fail-closed rule could not be checked: 503
    CIRCUIT_OPEN = "circuit_open"                     # the upstream's breaker is open (lean wiring): 503
    POLICY_UNKNOWN = "policy_unknown"
    HEADERS_TOO_LARGE = "headers_too_large"
    STORE_ERROR = "store_error"
    STORE_TIMEOUT = "store_timeout"
    SHADOW = "shadow"                      # would have denied, shadow mode allowed it
    INTERNAL = "internal"
