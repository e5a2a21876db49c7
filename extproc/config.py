"""extproc.yaml: one closed, typed model; load, validate, compile.

Unknown keys are errors (a typo must never be silently dropped), every error names the file,
the line and key path, and what was expected. Loading also compiles what the hot path needs
(providers' settings, policy lookups) so requests only read. `extproc check-config` and
`serve` use this same loader; a reload that fails keeps the previous config.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A config that cannot be used; the message is for the operator, one problem per line."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLS(_Closed):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None   # set: clients must present a certificate (mTLS)


class Server(_Closed):
    listen: str = "127.0.0.1:50051"       # host:port, or unix:/path/to.sock
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = 512
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=300)] = 10.0
    # after SIGTERM, keep serving while health says NOT_SERVING so Envoy's health checks move
    # traffic away before the server stops accepting (interval 1 s x unhealthy_threshold 2)
    drain_delay_seconds: Annotated[float, Field(ge=0, le=120)] = 2.5
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536
    # bounds each of the verified-token cache, the decision cache and the express table (LRU, per
    # worker): about 3 KB an entry in each of the first two, 1-1.5 KB in the express table
    token_cache_entries: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    tls: TLS | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/extproc.sock")
            return v
        host, port = _split_host_port(v)
        if not 0 < port < 65536 - 64:
            raise ValueError("port must be between 1 and 65471 (workers take port + i)")
        return v

    @model_validator(mode="after")
    def _beyond_loopback_needs_tls(self) -> Server:
        if not self.listen.startswith("unix:") and self.tls is None:
            host, _ = _split_host_port(self.listen)
            if not _is_loopback(host):
                raise ValueError(
                    f"listen {self.listen} is beyond loopback: set server.tls (cert_file, key_file, "
                    "optionally client_ca_file) or listen on 127.0.0.1 / a unix socket")
        return self

    def worker_listen(self, index: int) -> str:
        """Worker i listens on base port + i, or on `<path>.<i>` for a unix socket."""
        if self.listen.startswith("unix:"):
            return self.listen if self.workers == 1 else f"{self.listen}.{index}"
        host, port = _split_host_port(self.listen)
        return f"{host}:{port + index}" if ":" not in host else f"[{host}]:{port + index}"


class Admin(_Closed):
    listen: str = "127.0.0.1:9902"
    token_file: Path | None = None
    token_env: str | None = "EXTPROC_ADMIN_TOKEN"
    allow_remote: bool = False

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _split_host_port(v)
        return v

    @model_validator(mode="after")
    def _loopback(self) -> Admin:
        host, _ = _split_host_port(self.listen)
        if not _is_loopback(host) and not self.allow_remote:
            raise ValueError(f"admin.listen {self.listen} is beyond loopback: set admin.allow_remote: true "
                             "to mean it (mutating endpoints still need the bearer token)")
        return self


class MemoryStoreConfig(_Closed):
    max_keys: Annotated[int, Field(ge=1, le=50_000_000)] = 100_000


class RedisStoreConfig(_Closed):
    url: str
    cluster: bool = False
    password_file: Path | None = None
    password_env: str | None = None
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 50
    connect_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 500
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:port/db, rediss://… or unix://path")
        if "@" in v.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("no credentials inline in the url: use password_file or password_env")
        return v


class StoreConfig(_Closed):
    memory: MemoryStoreConfig | None = None
    redis: RedisStoreConfig | None = None

    @model_validator(mode="after")
    def _one(self) -> StoreConfig:
        if self.memory is not None and self.redis is not None:
            raise ValueError("choose one store: memory or redis, not both")
        return self

    @property
    def kind(self) -> str:
        return "redis" if self.redis is not None else "memory"


ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
HMAC_ALGS = ("HS256", "HS384", "HS512")
Algorithm = Literal[ASYMMETRIC_ALGS + HMAC_ALGS]  # type: ignore[valid-type]
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class TokenSource(_Closed):
    """Where a credential is read from: exactly one of header (with an optional scheme prefix),
    cookie or query parameter. Sources are tried in the order listed; when several carry a
    credential they must all carry the same one (no bypass by sending two)."""
    header: str | None = None
    prefix: str | None = None
    cookie: str | None = None
    query: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TokenSource:
        if sum(x is not None for x in (self.header, self.cookie, self.query)) != 1:
            raise ValueError("set exactly one of header, cookie or query")
        if self.prefix is not None and self.header is None:
            raise ValueError("prefix applies to a header source only")
        if self.header is not None and self.header != self.header.lower():
            raise ValueError("header names are lower-case (Envoy lower-cases them)")
        return self


def _bearer() -> list[TokenSource]:
    return [TokenSource(header="authorization", prefix="Bearer ")]


class Introspection(_Closed):
    """OAuth 2.0 token introspection (RFC 7662) for opaque tokens."""
    endpoint: str
    client_id: str | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    timeout_ms: Annotated[int, Field(ge=10, le=5_000)] = 250
    cache_ttl_seconds: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    negative_cache_seconds: Annotated[float, Field(ge=0, le=3_600)] = 5.0
    max_entries: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http(s) URL")
        return v


class Provider(_Closed):
    issuer: str | None = None
    audiences: list[str] = Field(default_factory=list)
    algorithms: Annotated[list[Algorithm], Field(min_length=1)] = ["RS256"]  # type: ignore[valid-type]
    # keys: exactly one of these (introspection providers take opaque tokens instead)
    jwks_uri: str | None = None
    discovery_uri: str | None = None          # OpenID discovery document naming jwks_uri
    jwks_file: Path | None = None
    jwks: dict[str, Any] | None = None        # inline JWKS (public keys only)
    pem_file: Path | None = None              # one public key in PEM
    secret_file: Path | None = None           # HS256/384/512 shared secret
    secret_env: str | None = None
    introspection: Introspection | None = None
    token_sources: Annotated[list[TokenSource], Field(min_length=1)] = Field(default_factory=_bearer)
    leeway_seconds: Annotated[float, Field(ge=0, le=600)] = 30.0
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    fetch_timeout_ms: Annotated[int, Field(ge=10, le=30_000)] = 1000
    refresh_interval_seconds: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    retry_interval_seconds: Annotated[float, Field(gt=0, le=3_600)] = 5.0
    unknown_kid_refetch_seconds: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    claims_to_headers: dict[str, str] = Field(default_factory=dict)   # claim -> upstream request header
    metadata_claims: list[str] = Field(default_factory=lambda: ["sub", "iss", "scope"])
    revocation_fail: Literal["open", "closed"] = "open"   # store down, revocation unknown locally

    @model_validator(mode="after")
    def _keys(self) -> Provider:
        sources = {"jwks_uri": self.jwks_uri, "discovery_uri": self.discovery_uri, "jwks_file": self.jwks_file,
                   "jwks": self.jwks, "pem_file": self.pem_file, "introspection": self.introspection,
                   "secret": self.secret_file or self.secret_env}
        given = [k for k, v in sources.items() if v is not None]
        if len(given) != 1:
            raise ValueError("set exactly one key source: jwks_uri, discovery_uri, jwks_file, jwks, pem_file, "
                             f"secret_file/secret_env, or introspection (got {', '.join(given) or 'none'})")
        for name in ("jwks_uri", "discovery_uri"):
            v = getattr(self, name)
            if v is not None and not v.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        hmac = [a for a in self.algorithms if a in HMAC_ALGS]
        if given[0] == "secret":
            if len(hmac) != len(self.algorithms):
                raise ValueError("a shared secret verifies HS256/384/512 only: list only those algorithms")
        elif hmac:
            raise ValueError(f"{', '.join(hmac)} need a shared secret (secret_file or secret_env); with public "
                             "keys they would allow algorithm confusion (RFC 8725 3.1)")
        if self.introspection is None and self.issuer is None:
            raise ValueError("issuer is required for JWT providers")
        for claim, header in self.claims_to_headers.items():
            if header != header.lower() or not header:
                raise ValueError(f"claims_to_headers.{claim}: header names are lower-case")
        return self


class ApiKey(_Closed):
    id: Annotated[str, Field(pattern=_NAME)]
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    owner: str
    scopes: list[str] = Field(default_factory=list)
    tier: str = "default"
    expires_at: datetime | None = None


class ApiKeys(_Closed):
    """API keys, stored only as SHA-256 digests (here, or in the store with `from_store`)."""
    sources: Annotated[list[TokenSource], Field(min_length=1)] = Field(
        default_factory=lambda: [TokenSource(header="x-api-key")])
    keys: list[ApiKey] = Field(default_factory=list)
    from_store: bool = False
    cache_seconds: Annotated[float, Field(ge=0, le=300)] = 5.0   # store keys: revocation bound per replica
    owner_header: str | None = "x-api-key-owner"     # set upstream on success (client copies removed)
    tier_header: str | None = "x-api-key-tier"

    @model_validator(mode="after")
    def _unique(self) -> ApiKeys:
        seen: set[str] = set()
        digests: set[str] = set()
        for k in self.keys:
            if k.id in seen:
                raise ValueError(f"api key id {k.id!r} appears twice")
            if k.digest in digests:
                raise ValueError(f"api key {k.id!r} has the same digest as another key")
            seen.add(k.id)
            digests.add(k.digest)
        return self


class RoleRequirement(_Closed):
    claim: str = "roles"
    any_of: Annotated[list[str], Field(min_length=1)]


class PolicyAuth(_Closed):
    """Who may pass: a credential from any_of (or every one of all_of) the providers, or an API
    key when api_keys is true; then the scopes, roles and claim values required."""
    any_of: list[str] = Field(default_factory=list)
    all_of: list[str] = Field(default_factory=list)
    providers: list[str] = Field(default_factory=list)   # same as any_of
    api_keys: bool = False
    scopes: list[str] = Field(default_factory=list)       # all required ("scope" string or "scp" list)
    roles: RoleRequirement | None = None
    claims: dict[str, list[str | int | bool]] = Field(default_factory=dict)   # claim must be one of
    keep_authorization: bool = False                      # default: Authorization stripped before upstream

    @model_validator(mode="after")
    def _some(self) -> PolicyAuth:
        if self.providers and self.any_of:
            raise ValueError("use any_of or providers, not both")
        if not (self.providers or self.any_of or self.all_of or self.api_keys):
            raise ValueError("name providers (any_of / all_of) or set api_keys: true")
        if self.all_of and (self.any_of or self.providers):
            raise ValueError("use any_of or all_of, not both")
        return self

    @property
    def providers_any(self) -> list[str]:
        return self.any_of or self.providers


class Conditions(_Closed):
    """All listed conditions must hold (an empty Conditions always holds)."""
    methods: list[str] = Field(default_factory=list)
    path_prefix: list[str] = Field(default_factory=list)
    path_regex: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)     # exact value; "*" means present
    client_ip: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    claims: dict[str, list[str | int | bool]] = Field(default_factory=dict)
    scopes: list[str] = Field(default_factory=list)
    subjects: list[str] = Field(default_factory=list)

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]

    @field_validator("path_prefix")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"path prefix {p!r} must start with /")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name != name.lower():
                raise ValueError(f"header name {name!r}: header names are lower-case (Envoy lower-cases them)")
        return v

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("an empty subject never matches")
        return v


class Rule(_Closed):
    """A named allow or deny rule: it applies when `when` holds and `unless` (if given) does not."""
    name: Annotated[str, Field(pattern=_NAME)]
    effect: Literal["allow", "deny"]
    when: Conditions = Field(default_factory=Conditions)
    unless: Conditions | None = None


class IpRules(_Closed):
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    deny: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)


class Policy(_Closed):
    mode: Literal["enforce", "shadow"] = "enforce"
    auth: Literal["none"] | PolicyAuth = "none"
    ip: IpRules | None = None
    rules: list[Rule] = Field(default_factory=list)       # deny rules win; with allow rules, one must match
    revoke_presented_token: bool = False                  # logout route: revoke the token, then allow

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_shape(cls, v: Any) -> Any:
        if v == "none" or isinstance(v, dict | PolicyAuth):
            return v
        raise ValueError("expected 'none' or a mapping such as {any_of: [demo]}")

    @model_validator(mode="after")
    def _unique_rules(self) -> Policy:
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"rule names must be unique: {', '.join(sorted(dup))}")
        return self


CountBy = Annotated[str, Field(pattern=r"^(user|org|api_key|ip|route|policy|method|global|"
                                       r"header:[a-z0-9-]+|claim:[A-Za-z0-9_.:/-]+)$")]


class TierLimit(_Closed):
    limit: Annotated[int, Field(ge=1)]
    burst: Annotated[int, Field(ge=1)] | None = None


class RateSync(_Closed):
    """How a rate rule's counter meets the store: `per_request` (the default: every request is
    checked and charged in the store, exact) or `batched` for very hot keys: decided against the
    last known store state and charged every `interval_ms` in one batch. Between two syncs a
    replica can admit past the limit at most what it admits locally in that time (never more than
    the remaining it last saw): docs/ratelimit-batched.md has the bound and the measured figure."""
    mode: Literal["per_request", "batched"] = "per_request"
    interval_ms: Annotated[int, Field(ge=1, le=1000)] | None = None    # batched: default 5

    @model_validator(mode="after")
    def _interval(self) -> RateSync:
        if self.mode == "per_request" and self.interval_ms is not None:
            raise ValueError("interval_ms applies to mode: batched only")
        return self

    @property
    def batch_ms(self) -> int:
        """The flush interval of a batched rule; 0 for per_request."""
        if self.mode != "batched":
            return 0
        return 5 if self.interval_ms is None else self.interval_ms


class RateRule(_Closed):
    """One rate limit: which requests it counts (`policies` + `when`), what it counts them by
    (`count_by`, e.g. [user] or [org, route]), and the algorithm, limit and period. All rules that
    match a request must pass; a rejected request is charged against none of them."""
    name: Annotated[str, Field(pattern=_NAME)]
    policies: list[str] = Field(default_factory=list)          # empty: every policy
    when: Conditions = Field(default_factory=Conditions)
    api_key_tiers: list[str] = Field(default_factory=list)      # only requests with an API key of these tiers
    count_by: Annotated[list[CountBy], Field(min_length=1)]
    algorithm: Literal["token_bucket", "sliding_window", "fixed_window"] = "sliding_window"
    limit: Annotated[int, Field(ge=1)]
    period: str | int = "minute"
    burst: Annotated[int, Field(ge=1)] | None = None            # token bucket capacity (default: limit)
    cost: Annotated[int, Field(ge=1)] = 1
    tiers: dict[str, TierLimit] = Field(default_factory=dict)   # by API key tier, or the `tier` claim
    mode: Literal["enforce", "shadow"] = "enforce"
    fail: Literal["open", "closed"] = "open"                    # when the store cannot answer in time
    missing: Literal["skip", "ip"] = "skip"                     # a count_by part absent: skip the rule, or count by IP
    sync: RateSync = Field(default_factory=RateSync)            # per_request, or batched for very hot keys

    @field_validator("period")
    @classmethod
    def _period(cls, v: str | int) -> str | int:
        from .core.ratelimit import Period

        try:
            Period.parse(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _rule(self) -> RateRule:
        if self.algorithm == "token_bucket" and str(self.period) == "month":
            raise ValueError("a token bucket refills at a rate: use a fixed or sliding window for monthly quotas")
        if self.burst is not None and self.algorithm != "token_bucket":
            raise ValueError("burst applies to token_bucket only")
        if self.sync.mode == "batched" and self.fail == "closed":
            # fail: closed promises nothing is admitted that the store has not counted; a batched
            # rule admits between syncs by design
            raise ValueError("sync mode batched admits between store syncs, which fail: closed forbids: "
                             "use fail: open with batched, or sync mode per_request")
        return self


class RateLimits(_Closed):
    rules: list[RateRule] = Field(default_factory=list)
    deny_status: Literal[429] = 429
    store_timeout_ms: Annotated[int, Field(ge=1, le=1000)] = 20   # never wait longer for the store
    local_fallback: bool = True      # fail-open rules keep limiting per replica while the store is down
    headers: bool = True             # X-RateLimit-* and RateLimit / RateLimit-Policy on responses

    @model_validator(mode="after")
    def _unique(self) -> RateLimits:
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"rate limit rule names must be unique: {', '.join(sorted(dup))}")
        return self


class RlsLimit(_Closed):
    """envoyproxy/ratelimit's `rate_limit`, plus the algorithm (its own service has fixed windows only)."""
    unit: Literal["second", "minute", "hour", "day", "month"] = "second"
    requests_per_unit: Annotated[int, Field(ge=0)] = 0
    unlimited: bool = False
    algorithm: Literal["fixed_window", "sliding_window", "token_bucket"] = "fixed_window"

    @model_validator(mode="after")
    def _limit(self) -> RlsLimit:
        if not self.unlimited and self.requests_per_unit < 1:
            raise ValueError("requests_per_unit must be at least 1 (or set unlimited: true)")
        if self.algorithm == "token_bucket" and self.unit == "month":
            raise ValueError("a token bucket refills at a rate: use a window for monthly quotas")
        return self


class RlsDescriptor(_Closed):
    """One level of envoyproxy/ratelimit's descriptor tree: key, optional value, a limit, children."""
    key: Annotated[str, Field(min_length=1)]
    value: str | None = None
    rate_limit: RlsLimit | None = None
    descriptors: list[RlsDescriptor] = Field(default_factory=list)
    shadow_mode: bool = False
    name: Annotated[str, Field(pattern=_NAME)] | None = None     # metric label; default derived from keys


class RlsDomain(_Closed):
    domain: Annotated[str, Field(min_length=1)]
    descriptors: list[RlsDescriptor] = Field(default_factory=list)


class RateLimitService(_Closed):
    """envoy.service.ratelimit.v3.RateLimitService: a drop-in for envoyproxy/ratelimit."""
    domains: list[RlsDomain] = Field(default_factory=list)
    failure_mode: Literal["open", "closed"] = "open"     # store down: OK (open) or gRPC UNAVAILABLE (closed)
    store_timeout_ms: Annotated[int, Field(ge=1, le=1000)] = 20

    @model_validator(mode="after")
    def _unique(self) -> RateLimitService:
        names = [d.domain for d in self.domains]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"domains must be unique: {', '.join(sorted(dup))}")
        return self


class Concurrency(_Closed):
    """In-flight caps enforced by ext_proc, per replica: a permit is taken at request headers and
    given back when the stream ends for any reason."""
    global_limit: Annotated[int, Field(ge=1)] | None = None      # the dual-port gateway's 100
    default_route_limit: Annotated[int, Field(ge=1)] | None = None   # its 10, per route (policy name)
    routes: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)   # policy -> cap
    exclude_policies: list[str] = Field(default_factory=list)    # long-lived streams (SSE, WebSocket)
    over_limit_status: Literal[429, 503] = 503
    # wait this long for a permit; must stay below ext_proc's message_timeout (500 ms in envoy.yaml),
    # or Envoy answers 504 first
    queue_timeout_ms: Annotated[int, Field(ge=0, le=450)] = 0
    mode: Literal["enforce", "shadow"] = "enforce"


def _cache_seconds(v: str | int | None) -> str | int | None:
    if v is None:
        return v
    from .core.ratelimit import Period

    if Period.parse(v).is_month:
        raise ValueError("a cache lifetime is <N>s, <N>m, <N>h, <N>d or seconds, not a calendar month")
    return v


def seconds_of(v: str | int) -> int:
    """Seconds of a duration written like a rate-limit period (`30s`, `5m`, `hour`, 3600)."""
    from .core.ratelimit import Period

    return Period.parse(v).seconds


class CacheKey(_Closed):
    """What joins a cached entry's key besides method, host and path. Per-user caching of private
    data is an explicit choice (`per_user`), never an accident."""
    headers: list[str] = Field(default_factory=list)      # request headers (lower-cased) that select the entry
    claims: list[str] = Field(default_factory=list)       # identity metadata fields from ext_authz (e.g. org)
    per_user: bool = False                                # the verified subject joins the key
    query: Literal["sorted", "as_is", "ignore"] = "sorted"
    query_ignore: list[str] = Field(default_factory=list)   # dropped parameters; `utm_*` matches a prefix
    query_only: list[str] | None = None                     # keep only these parameters

    @field_validator("headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.lower() for h in v]


class CacheRule(_Closed):
    """One cached route: requests whose ext_proc policy and path match (first matching rule wins)."""
    name: Annotated[str, Field(pattern=_NAME)]
    policies: list[str] = Field(default_factory=list)       # empty: every policy
    path_prefix: list[str] = Field(default_factory=list)    # empty: every path
    path_regex: str | None = None
    store: bool = True                 # false: matching reads are never stored (BYPASS), writes still invalidate
    methods: list[Literal["GET", "HEAD"]] = Field(default_factory=lambda: ["GET", "HEAD"])
    statuses: list[Annotated[int, Field(ge=200, le=599)]] = Field(
        default_factory=lambda: [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
    ttl: str | int | None = None       # when the response gives no freshness; none: such responses are not stored
    max_ttl: str | int = "1d"
    max_body_bytes: Annotated[int, Field(ge=0)] | None = None   # default: cache.max_body_bytes
    stale_while_revalidate: str | int | None = None            # when the response does not say
    stale_if_error: str | int | None = None
    key: CacheKey = Field(default_factory=CacheKey)
    invalidate_prefixes: list[str] = Field(default_factory=list)   # a successful write here also purges these
    mode: Literal["enforce", "shadow"] = "enforce"

    @field_validator("ttl", "max_ttl", "stale_while_revalidate", "stale_if_error")
    @classmethod
    def _durations(cls, v: str | int | None) -> str | int | None:
        return _cache_seconds(v)

    _regex = field_validator("path_regex")(Conditions._regex.__func__)
    _prefixes = field_validator("path_prefix", "invalidate_prefixes")(Conditions._prefixes.__func__)


class Cache(_Closed):
    """Response caching in ext_proc: an in-process LRU (by bytes) in front of the shared store."""
    rules: list[CacheRule] = Field(default_factory=list)
    memory_max_bytes: Annotated[int, Field(ge=0)] = 64 * 1024 * 1024     # the in-process tier; 0: none
    # Envoy buffers a stored body (mode override to BUFFERED); its default buffer limit is 1 MiB and a
    # larger body can hang the response (ENVOY-NOTES), so a larger value needs Envoy's limit raised
    max_body_bytes: Annotated[int, Field(ge=0, le=3 * 1024 * 1024)] = 1024 * 1024
    shared: bool = True                # use the store (Redis) as the second tier, shared by every replica
    store_timeout_ms: Annotated[int, Field(ge=1, le=1000)] = 20
    # concurrent misses for one key wait this long for the first one's answer; stays below ext_proc's
    # message_timeout (500 ms in envoy.yaml) so a waiter can still go upstream itself
    collapse_timeout_ms: Annotated[int, Field(ge=0, le=400)] = 250
    max_purge_records: Annotated[int, Field(ge=16)] = 10_000


class FailureRate(_Closed):
    """Open when at least `percent` % of the calls in the last `window_seconds` failed, once
    `min_calls` were seen (evaluated per replica over its own calls, then shared by a trip)."""
    percent: Annotated[float, Field(gt=0, le=100)]
    window_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    min_calls: Annotated[int, Field(ge=1)] = 20


class Fallback(_Closed):
    """A static answer while the breaker is open (instead of 503 + JSON)."""
    status: Annotated[int, Field(ge=200, le=599)] = 200
    content_type: str = "application/json"
    body: str = ""
    headers: dict[str, str] = Field(default_factory=dict)


class Breaker(_Closed):
    """A circuit breaker for one upstream cluster (Envoy's cluster name, which ext_proc learns from
    the `xds.cluster_name` attribute). Defaults are the webshop plan's: 5 consecutive failures,
    30 s open, 3 half-open probes."""
    consecutive_failures: Annotated[int, Field(ge=0)] = 5        # 0: off
    failures_in_window: Annotated[int, Field(ge=0, le=1000)] = 0  # the dual-port gateway's 3 (0: off)
    window_seconds: Annotated[float, Field(gt=0, le=86_400)] = 10.5
    failure_rate: FailureRate | None = None
    slow_call_ms: Annotated[int, Field(ge=1)] | None = None      # slower responses count as failures
    failure_statuses: list[int | str] = Field(default_factory=lambda: ["5xx"])   # codes or classes; 4xx never count
    open_seconds: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    half_open_probes: Annotated[int, Field(ge=1, le=1000)] = 3
    close_after: Annotated[int, Field(ge=1)] | None = None        # probe successes that close it (default: probes)
    mode: Literal["enforce", "shadow"] = "enforce"
    fallback: Fallback | None = None
    stale_from_cache: bool = True      # while open, answer with a cached copy (even stale) when one exists
    # ext_proc: checked and fed in the ext_proc stream (exact, needs ext_proc on the route). lean: checked
    # in the ext_authz call the route already pays for (its `policies`), outcomes fed by Envoy's access-log
    # stream (batched, off the request path: failures counted with the flush interval's lag)
    # gRPC upstreams answer errors with HTTP 200 and a grpc-status trailer: the breaker reads the status
    # from the trailers (the route must send them: ExtProcPerRoute processing_mode response_trailer_mode SEND)
    grpc: bool = False
    grpc_failure_codes: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default_factory=lambda: [2, 4, 13, 14])      # UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE
    wiring: Literal["ext_proc", "lean"] = "ext_proc"
    policies: list[str] = Field(default_factory=list)    # lean: the ext_authz policies of its routes

    @field_validator("failure_statuses")
    @classmethod
    def _statuses(cls, v: list[int | str]) -> list[int | str]:
        for item in v:
            if isinstance(item, int) and not isinstance(item, bool):
                if not 500 <= item <= 599:
                    raise ValueError(f"{item}: only 5xx statuses can count as failures (client errors never do)")
            elif item != "5xx":
                raise ValueError(f"{item!r}: use status codes (500-599) or \"5xx\"")
        return v

    def failure_codes(self) -> frozenset[int]:
        out: set[int] = set()
        for item in self.failure_statuses:
            out.update(range(500, 600) if item == "5xx" else (item,))
        return frozenset(out)

    @model_validator(mode="after")
    def _some_trigger(self) -> Breaker:
        if not (self.consecutive_failures or self.failures_in_window or self.failure_rate):
            raise ValueError("a breaker needs a trigger: consecutive_failures, failures_in_window or failure_rate")
        if self.wiring == "lean" and not self.policies:
            raise ValueError("wiring: lean needs `policies`: the ext_authz policies of the routes to this upstream")
        return self


class CircuitBreakers(_Closed):
    upstreams: dict[str, Breaker] = Field(default_factory=dict)   # Envoy cluster name -> breaker
    store_timeout_ms: Annotated[int, Field(ge=1, le=1000)] = 50   # past it, this replica breaks on its own state


class Tracing(_Closed):
    """OpenTelemetry spans per decision, continuing Envoy's trace (see telemetry/tracing.py)."""
    enabled: bool = False
    otlp_endpoint: str = "127.0.0.1:4317"      # OTLP/gRPC collector (host:port)
    insecure: bool = True                      # plaintext to the collector (loopback / in-pod)
    sampling_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0   # for calls without Envoy's trace context
    service_name: str = "extproc"
    export_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = 1000


class Telemetry(_Closed):
    tracing: Tracing = Field(default_factory=Tracing)
    decision_logs: bool = False                # one JSON line per decision (request id, trace id, reason)


class Config(_Closed):
    server: Server = Field(default_factory=Server)
    admin: Admin = Field(default_factory=Admin)
    store: StoreConfig = Field(default_factory=StoreConfig)
    providers: dict[str, Provider] = Field(default_factory=dict)
    api_keys: ApiKeys | None = None
    policies: dict[str, Policy] = Field(default_factory=dict)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    ratelimit_service: RateLimitService = Field(default_factory=RateLimitService)
    concurrency: Concurrency = Field(default_factory=Concurrency)
    cache: Cache = Field(default_factory=Cache)
    circuit_breakers: CircuitBreakers = Field(default_factory=CircuitBreakers)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    default_policy: str | None = None
    unknown_policy: Literal["deny", "allow"] = "deny"

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Checks across sections, as (key path, message): run after the field checks so each
        message can still name its line."""
        out: list[tuple[tuple[str, ...], str]] = []
        for name, pol in self.policies.items():
            if isinstance(pol.auth, PolicyAuth):
                for field in ("any_of", "all_of", "providers"):
                    for i, p in enumerate(getattr(pol.auth, field)):
                        if p not in self.providers:
                            out.append((("policies", name, "auth", field, str(i)),
                                        f"unknown provider {p!r} (defined: {sorted(self.providers) or 'none'})"))
                if pol.auth.api_keys and self.api_keys is None:
                    out.append((("policies", name, "auth", "api_keys"),
                                "api_keys: true needs a top-level api_keys section"))
        for i, rule in enumerate(self.rate_limits.rules):
            for j, pol in enumerate(rule.policies):
                if pol not in self.policies:
                    out.append((("rate_limits", "rules", str(i), "policies", str(j)),
                                f"unknown policy {pol!r} (defined: {sorted(self.policies) or 'none'})"))
        for field in ("routes", "exclude_policies"):
            for name in getattr(self.concurrency, field):
                if name not in self.policies:
                    out.append((("concurrency", field, name) if field == "routes" else ("concurrency", field),
                                f"unknown policy {name!r}: routes are the policy names the Envoy routes pass "
                                f"(defined: {sorted(self.policies) or 'none'})"))
        names: set[str] = set()
        for i, crule in enumerate(self.cache.rules):
            if crule.name in names:
                out.append((("cache", "rules", str(i), "name"), f"duplicate cache rule name {crule.name!r}"))
            names.add(crule.name)
            for j, pol in enumerate(crule.policies):
                if pol not in self.policies:
                    out.append((("cache", "rules", str(i), "policies", str(j)),
                                f"unknown policy {pol!r} (defined: {sorted(self.policies) or 'none'})"))
            if crule.max_body_bytes is not None and crule.max_body_bytes > self.cache.max_body_bytes:
                out.append((("cache", "rules", str(i), "max_body_bytes"),
                            f"{crule.max_body_bytes} is above cache.max_body_bytes ({self.cache.max_body_bytes})"))
            if crule.ttl is not None and seconds_of(crule.ttl) > seconds_of(crule.max_ttl):
                out.append((("cache", "rules", str(i), "ttl"), "ttl is above max_ttl"))
        lean_policies: dict[str, str] = {}
        for name, b in self.circuit_breakers.upstreams.items():
            for j, pol in enumerate(b.policies):
                if pol not in self.policies:
                    out.append((("circuit_breakers", "upstreams", name, "policies", str(j)),
                                f"unknown policy {pol!r} (defined: {sorted(self.policies) or 'none'})"))
                elif pol in lean_policies:
                    out.append((("circuit_breakers", "upstreams", name, "policies", str(j)),
                                f"policy {pol!r} already guards upstream {lean_policies[pol]!r}"))
                lean_policies.setdefault(pol, name)
        from .core.descriptors import problems as rls_problems

        out.extend(rls_problems(self.ratelimit_service))
        if self.default_policy is not None and self.default_policy not in self.policies:
            out.append((("default_policy",), f"{self.default_policy!r} is not a defined policy "
                                             f"(defined: {sorted(self.policies) or 'none'})"))
        if self.server.workers > 1 and self.store.kind == "memory":
            out.append((("server", "workers"),
                        f"{self.server.workers} workers need a shared store, but the store is in-memory, which "
                        "is per process: limits and breaker state would split across workers. Configure "
                        "store.redis, or run one worker"))
        return out


# ---------------------------------------------------------------------------------------------

def _split_host_port(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {v!r}")
    host = host.strip("[]")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, str(k.value))
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = (*path, str(i))
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return lines


def _format_errors(source: str, err: ValidationError, lines: dict[tuple[str, ...], int]) -> str:
    out = []
    for e in err.errors():
        # pydantic names union branches in loc ("AuthJwt", "literal['none']"): keep real keys only
        loc = tuple(str(p) for p in e["loc"] if not _is_branch_name(str(p)))
        path = ".".join(loc) or "(top level)"
        line = None
        for i in range(len(loc), 0, -1):
            line = lines.get(loc[:i])
            if line:
                break
        where = f"{source}:{line}" if line else source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of extproc.yaml; check the spelling)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append(f"{where}: {path}: {msg}")
    return "\n".join(dict.fromkeys(out))


def _is_branch_name(part: str) -> bool:
    return part[:1].isupper() or "[" in part or part.startswith("function-")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check(cfg: Config, source: str, lines: dict[tuple[str, ...], int]) -> Config:
    problems = cfg.problems()
    if problems:
        out = []
        for loc, msg in problems:
            line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
            out.append(f"{source}:{line}: {'.'.join(loc)}: {msg}" if line else f"{source}: {'.'.join(loc)}: {msg}")
        raise ConfigError("\n".join(out))
    return cfg


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    lines = _line_index(text)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err, lines)) from None
    return _check(cfg, source, lines)


def override_workers(cfg: Config, workers: int, source: str) -> Config:
    """`serve --workers N`: the same validation as the file (e.g. N > 1 needs Redis)."""
    data = cfg.model_dump()
    data["server"]["workers"] = workers
    where = f"{source} with --workers {workers}"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(where, err, {})) from None
    return _check(cfg, where, {})


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    cfg = parse(text, str(p))
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Relative file paths in the config are relative to the config file."""
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    def fix_provider(pr: Provider) -> Provider:
        update: dict[str, Any] = {"jwks_file": fix(pr.jwks_file), "pem_file": fix(pr.pem_file),
                                  "secret_file": fix(pr.secret_file)}
        if pr.introspection is not None:
            update["introspection"] = pr.introspection.model_copy(
                update={"client_secret_file": fix(pr.introspection.client_secret_file)})
        return pr.model_copy(update=update)

    providers = {n: fix_provider(pr) for n, pr in cfg.providers.items()}
    server = cfg.server
    if server.tls is not None:
        server = server.model_copy(update={"tls": server.tls.model_copy(update={
            "cert_file": fix(server.tls.cert_file), "key_file": fix(server.tls.key_file),
            "client_ca_file": fix(server.tls.client_ca_file)})})
    admin = cfg.admin.model_copy(update={"token_file": fix(cfg.admin.token_file)})
    store = cfg.store
    if store.redis is not None:
        store = store.model_copy(update={"redis": store.redis.model_copy(
            update={"password_file": fix(store.redis.password_file)})})
    return cfg.model_copy(update={"providers": providers, "server": server, "admin": admin, "store": store})


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file apart: inode, mtime and size. stat follows symlinks, so a
    Kubernetes ConfigMap `..data` swap, or a file replaced within one timestamp tick, changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read_secret(file: Path | None, env: str | None, what: str) -> str | None:
    """A secret from a file (first line, stripped) or an environment variable; never inline."""
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {file}: {exc.strerror or exc}") from None
    if env:
        return os.environ.get(env) or None
    return None


_SECRET_KEYS = {"password_file", "password_env", "token_file", "token_env", "key_file", "secret_file",
                "secret_env", "client_secret_file", "client_secret_env"}


def redacted(cfg: Config) -> dict[str, Any]:
    """The config as served by the admin API: where secrets come from is hidden too."""
    def scrub(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: ("<redacted>" if k in _SECRET_KEYS and v is not None else scrub(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [scrub(v) for v in obj]
        return obj
    return scrub(cfg.model_dump(mode="json"))
