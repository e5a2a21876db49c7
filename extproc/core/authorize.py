"""Authorization after authentication: requirements, IP lists and named rules.

Theory of operation. A policy authorizes in three independent parts, each compiled once from the
config models (sets built, CIDRs turned into integer tables, regexes compiled) so that a request
only reads, and each returning a `Verdict` (a deny is a value, status 403):

* `Requirements` (policy `auth`): every listed scope held (RFC 6750 §3.1 `insufficient_scope`
  names the missing ones), the role claim holding any one of the roles, each listed claim
  holding one of its accepted values.
* `IpList` (policy `ip`): the deny list wins; with a non-empty allow list the address must be in
  it. An empty or unreadable client address is in no network: with an allow list it is denied
  (fail closed), with only a deny list it passes. Envoy supplies the peer address, the client
  cannot make it unreadable; an empty one means a unix-socket or in-process caller, which a
  blocklist of networks has nothing to say about. `::ffff:a.b.c.d` is the IPv4 address
  a.b.c.d (RFC 4291 §2.5.5.2) and is matched against both the IPv4 and the IPv6 networks.
* `RuleSet` (policy `rules`), as OPA and Authorino: every matching deny rule denies and deny
  rules take precedence, in config order (the first names the verdict); if at least one allow
  rule exists, some allow rule must match (else `no_allow_rule`); no rules at all allow.

Ambiguity is read against the client. The path is the one input the client fully controls, and
the upstream may read it differently from a plain string compare: `/public/../admin`,
`//admin`, `/%61dmin` (RFC 3986 §6.2.2.2: the same as `/admin`), `/admin%2Fx`, `/admin\\x`, or
Tomcat's `/public/..;/admin`. So a path that is not plainly clean is read three ways — as sent
(minus the query), RFC 3986 normalised (unreserved escapes decoded, dot segments removed,
§5.2.4), and loosely (every escape decoded, `\\` as `/`, `;params` cut, slashes merged, dot
segments removed) — and a path condition holds for a deny rule when ANY reading matches, for an
allow rule only when EVERY reading matches. Ordinary paths take a fast path with one reading.
Paths are case-sensitive (RFC 3986 §6.2.2.1: only scheme and host are not): `/API/x` is not
`/api/x`; for a case-insensitive upstream write `path_regex: "(?i)/api/.*"`. Envoy's own
`normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action` are the first line; this
is the second. The same reading applies to headers: Envoy joins repeated headers with ",", so a
deny rule's header value also matches any one comma-separated element, an allow rule's only the
whole value.

Other choices. `path_prefix` is a plain string prefix, as Envoy's route `prefix` (`/admin`
also covers `/administrator` and `/admin`, `/admin/` does not cover `/admin`); `path_regex` must
match the whole path (`re.fullmatch`, as Envoy's `safe_regex`). Python's `re` backtracks: keep
path regexes linear (no nested quantifiers). Claims compare by value AND JSON type: `"1"` is
not `1` and `true` is not `1` (Python's `True == 1` would let a boolean claim pass a numeric
check and vice versa); integers and floats are one JSON number, so `1` equals `1.0`. A
list-valued claim matches when any element does. A claim name is looked up as written first,
then, if it holds dots and is absent, as a path into nested objects (`realm_access.roles`).
An anonymous principal never matches `claims`, `scopes` or `subjects` conditions.

`trace`: pass a list to get one line per check (for `extproc explain`); with None nothing is
formatted. With a trace every rule is evaluated so the explanation is complete; the verdict is
the same either way.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from .reasons import Reason
from .request import Request

if TYPE_CHECKING:  # config imports pydantic and yaml; the core needs only the shape
    from ..config import Conditions, IpRules, PolicyAuth, Rule

EMPTY: Mapping[str, Any] = MappingProxyType({})
_MISSING = object()


# --- principal ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Principal:
    kind: str                               # "jwt" | "introspection" | "api_key" | "anonymous"
    subject: str = ""                       # sub claim, or API key owner
    provider: str = ""                      # provider name, or "api_key"
    claims: Mapping[str, Any] = field(default_factory=lambda: EMPTY)   # verified claims only
    scopes: frozenset[str] = frozenset()

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"

    @classmethod
    def from_claims(cls, kind: str, provider: str, claims: Mapping[str, Any]) -> Principal:
        """A token principal: subject from `sub` (strings only), scopes from `scope`/`scp`."""
        sub = claims.get("sub")
        return cls(kind, sub if isinstance(sub, str) else "", provider, claims, scopes_of(claims))

    @classmethod
    def api_key(cls, owner: str, tier: str, scopes: Iterable[str]) -> Principal:
        held = tuple(dict.fromkeys(scopes))
        claims = MappingProxyType({"sub": owner, "tier": tier, "scope": " ".join(held)})
        return cls("api_key", owner, "api_key", claims, frozenset(held))


ANONYMOUS = Principal("anonymous")


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """The scopes a token grants: the union of `scope` (RFC 8693 §4.2, RFC 9068 §2.2.3: one
    space-separated string) and `scp` (the list form some issuers use). Either is accepted as a
    string or a list of strings; anything else grants nothing."""
    out: set[str] = set()
    for name in ("scope", "scp"):
        v = claims.get(name)
        if isinstance(v, str):
            out.update(v.split())
        elif isinstance(v, list | tuple):
            out.update(s for s in v if isinstance(s, str) and s)
    return frozenset(out)


# --- verdict -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: Reason                          # Reason.OK when allowed
    status: int = 200                       # 403 for every authorization failure
    rule: str = ""                          # the named rule that decided (deny or allow)
    detail: str = ""                        # safe for the client: never claim values or headers
    missing_scopes: tuple[str, ...] = ()    # for WWW-Authenticate error="insufficient_scope"


ALLOWED = Verdict(True, Reason.OK)
_ROLE_MISSING = Verdict(False, Reason.ROLE_MISSING, 403, detail="a required role is missing")
_IP_DENIED = Verdict(False, Reason.IP_DENIED, 403, detail="client address not allowed")
_NO_ALLOW_RULE = Verdict(False, Reason.NO_ALLOW_RULE, 403, detail="no rule allows this request")


# --- claim values, typed -----------------------------------------------------------------------

class _Accepted:
    """The accepted values of one claim, split by JSON type so a lookup never crosses types."""
    __slots__ = ("name", "path", "strs", "nums", "bools", "shown")

    def __init__(self, name: str, values: Sequence[str | int | bool]):
        self.name = name
        self.path = tuple(name.split(".")) if "." in name else ()
        self.strs = frozenset(v for v in values if isinstance(v, str))
        self.bools = frozenset(v for v in values if isinstance(v, bool))
        self.nums = frozenset(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
        self.shown = ", ".join(repr(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool)
                               else str(v) for v in values)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, list):
            for v in value:
                if not isinstance(v, list) and self._one(v):
                    return True
            return False
        return self._one(value)

    def _one(self, v: Any) -> bool:
        # bool before int: isinstance(True, int) holds, and True must never match 1
        if isinstance(v, str):
            return v in self.strs
        if isinstance(v, bool):
            return v in self.bools
        if isinstance(v, int | float):
            return v in self.nums
        return False


def _lookup(claims: Mapping[str, Any], name: str, path: tuple[str, ...]) -> Any:
    v = claims.get(name, _MISSING)
    if v is _MISSING and path:
        v = claims
        for part in path:
            if not isinstance(v, Mapping):
                return _MISSING
            v = v.get(part, _MISSING)
            if v is _MISSING:
                return _MISSING
    return v


def _claims_hold(accepted: tuple[_Accepted, ...], claims: Mapping[str, Any],
                 trace: list[str] | None, prefix: str) -> _Accepted | None:
    """The first claim without an accepted value, or None when all hold."""
    for a in accepted:
        v = _lookup(claims, a.name, a.path)
        if v is _MISSING or not a.accepts(v):
            if trace is not None:
                why = "absent" if v is _MISSING else "has no accepted value"
                trace.append(f"{prefix}claim {a.name} {why} (accepted: {a.shown})")
            return a
        if trace is not None:
            trace.append(f"{prefix}claim {a.name} is one of [{a.shown}]")
    return None


# --- requirements ------------------------------------------------------------------------------

class Requirements:
    """What a policy's `auth` requires of an authenticated principal beyond being one."""
    __slots__ = ("scopes", "_scope_set", "role_claim", "_role_path", "roles", "_role_set", "claims",
                 "_claim_denials", "empty")

    def __init__(self, scopes: tuple[str, ...], role_claim: str, roles: tuple[str, ...],
                 claims: tuple[_Accepted, ...]):
        self.scopes = scopes
        self._scope_set = frozenset(scopes)
        self.role_claim = role_claim
        self._role_path = tuple(role_claim.split(".")) if "." in role_claim else ()
        self.roles = roles
        self._role_set = frozenset(roles)
        self.claims = claims
        self._claim_denials = {a.name: Verdict(False, Reason.CLAIM_MISMATCH, 403,
                                               detail=f"claim {a.name!r} does not have an accepted value")
                               for a in claims}
        self.empty = not (scopes or roles or claims)

    @classmethod
    def compile(cls, auth: PolicyAuth | Literal["none"] | None) -> Requirements:
        """From a policy's `auth`; "none" or None requires nothing."""
        if auth is None or isinstance(auth, str):
            return cls((), "roles", (), ())
        roles = auth.roles
        return cls(tuple(dict.fromkeys(auth.scopes)),
                   roles.claim if roles is not None else "roles",
                   tuple(dict.fromkeys(roles.any_of)) if roles is not None else (),
                   tuple(_Accepted(name, values) for name, values in auth.claims.items()))

    def check(self, principal: Principal, trace: list[str] | None = None) -> Verdict:
        if self.empty:
            if trace is not None:
                trace.append("requirements: none")
            return ALLOWED
        if self.scopes:
            if not self._scope_set <= principal.scopes:
                missing = tuple(s for s in self.scopes if s not in principal.scopes)
                if trace is not None:
                    trace.append(f"requirements: scopes [{', '.join(self.scopes)}] not held "
                                 f"(missing {', '.join(missing)}) -> insufficient_scope")
                return Verdict(False, Reason.INSUFFICIENT_SCOPE, 403,
                               detail="the credential lacks a required scope", missing_scopes=missing)
            if trace is not None:
                trace.append(f"requirements: scopes [{', '.join(self.scopes)}] held")
        if self.roles:
            if not self._has_role(principal.claims):
                if trace is not None:
                    trace.append(f"requirements: claim {self.role_claim} holds none of "
                                 f"[{', '.join(self.roles)}] -> role_missing")
                return _ROLE_MISSING
            if trace is not None:
                trace.append(f"requirements: claim {self.role_claim} holds one of [{', '.join(self.roles)}]")
        if self.claims:
            failed = _claims_hold(self.claims, principal.claims, trace, "requirements: ")
            if failed is not None:
                if trace is not None:
                    trace[-1] += " -> claim_mismatch"
                return self._claim_denials[failed.name]
        return ALLOWED

    def _has_role(self, claims: Mapping[str, Any]) -> bool:
        v = _lookup(claims, self.role_claim, self._role_path)
        if isinstance(v, str):
            # one role, or several space-separated (the `scope` convention some issuers reuse)
            return v in self._role_set or not self._role_set.isdisjoint(v.split())
        if isinstance(v, list):
            for r in v:
                if isinstance(r, str) and r in self._role_set:
                    return True
        return False


# --- IP addresses ------------------------------------------------------------------------------

_V4, _V6 = 4, 6
_MAPPED_PREFIX = 0xFFFF << 32


def _parse_ip(s: str) -> tuple[int, int] | None:
    """(version, integer) of an address, or None. IPv4-mapped IPv6 comes back as IPv4 with the
    flag in the version: (-4, v4 int), so callers can also try it as IPv6."""
    if not s:
        return None
    # inet_pton is a pure conversion (no I/O, no lookup) and ~8x faster than ipaddress
    try:
        return _V4, int.from_bytes(socket.inet_pton(socket.AF_INET, s))
    except (OSError, ValueError):
        pass
    try:
        n = int.from_bytes(socket.inet_pton(socket.AF_INET6, s))
    except (OSError, ValueError):
        try:   # rarer forms inet_pton refuses, e.g. a zone id fe80::1%eth0
            addr = ipaddress.ip_address(s)
        except ValueError:
            return None
        if addr.version == 4:
            return _V4, int(addr)
        n = int(addr)
    if n >> 32 == 0xFFFF:
        return -_V4, n & 0xFFFFFFFF
    return _V6, n


class _NetSet:
    """CIDRs as {prefix length: set of network numbers}: a lookup costs one set probe per
    distinct prefix length, however long the list."""
    __slots__ = ("v4", "v6", "empty")

    def __init__(self, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        for net in nets:
            if net.version == 6 and net.prefixlen >= 96 and int(net.network_address) >> 32 == 0xFFFF:
                # ::ffff:10.0.0.0/104 is 10.0.0.0/8: plain IPv4 clients must match it too
                net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
            bits = 32 if net.version == 4 else 128
            shift = bits - net.prefixlen
            (v4 if net.version == 4 else v6).setdefault(shift, set()).add(int(net.network_address) >> shift)
        self.v4 = tuple((shift, frozenset(s)) for shift, s in sorted(v4.items()))
        self.v6 = tuple((shift, frozenset(s)) for shift, s in sorted(v6.items()))
        self.empty = not (self.v4 or self.v6)

    def contains(self, ip: tuple[int, int] | None) -> bool:
        if ip is None:
            return False
        version, n = ip
        if version == _V6:
            table = self.v6
        else:
            for shift, nets in self.v4:
                if n >> shift in nets:
                    return True
            if version == _V4:
                return False
            n |= _MAPPED_PREFIX      # a mapped address is also that IPv6 address (e.g. ::/0)
            table = self.v6
        for shift, nets in table:
            if n >> shift in nets:
                return True
        return False


class IpList:
    """A policy's `ip` section: the deny list wins; a non-empty allow list must contain the
    address. An empty or unreadable address is in no network (see the module docstring)."""
    __slots__ = ("_allow", "_deny", "empty")

    def __init__(self, allow: _NetSet, deny: _NetSet):
        self._allow = allow
        self._deny = deny
        self.empty = allow.empty and deny.empty

    @classmethod
    def compile(cls, ip: IpRules | None) -> IpList:
        if ip is None:
            return cls(_NetSet(()), _NetSet(()))
        return cls(_NetSet(ip.allow), _NetSet(ip.deny))

    def check(self, client_ip: str, trace: list[str] | None = None) -> Verdict:
        if self.empty:
            if trace is not None:
                trace.append("ip: no allow or deny list")
            return ALLOWED
        ip = _parse_ip(client_ip)
        if not self._deny.empty and self._deny.contains(ip):
            if trace is not None:
                trace.append(f"ip {client_ip}: in the deny list -> ip_denied")
            return _IP_DENIED
        if not self._allow.empty:
            if ip is None:
                if trace is not None:
                    trace.append(f"ip {client_ip!r}: unreadable, and an allow list is set -> ip_denied")
                return _IP_DENIED
            if not self._allow.contains(ip):
                if trace is not None:
                    trace.append(f"ip {client_ip}: not in the allow list -> ip_denied")
                return _IP_DENIED
            if trace is not None:
                trace.append(f"ip {client_ip}: in the allow list")
            return ALLOWED
        if trace is not None:
            trace.append(f"ip {client_ip or repr(client_ip)}: not in the deny list"
                         + (" (unreadable: in no network)" if ip is None else ""))
        return ALLOWED


# --- paths -------------------------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(m: re.Match[str]) -> str:
    c = chr(int(m.group(1), 16))
    return c if c in _UNRESERVED else "%" + m.group(1).upper()


def _remove_dot_segments(path: str, merge_slashes: bool) -> str:
    """RFC 3986 §5.2.4 on an absolute path; keeps a trailing slash (`/x/..` is `/`, not ``,
    `/a/b/..` is `/a/`), which posixpath.normpath would drop, letting `/x/../admin/` dodge a
    prefix `/admin/`."""
    segs = path.split("/")
    last = len(segs) - 1
    out: list[str] = []
    for i in range(1, len(segs)):
        s = segs[i]
        if s == "." or s == "..":
            if s == ".." and out:
                out.pop()
            if i == last:
                out.append("")
        elif s or not merge_slashes or i == last:
            out.append(s)
    return "/" + "/".join(out)


def _loose(path: str) -> str:
    prev = None
    for _ in range(3):      # double-encoding (%252e) as read by upstreams that decode twice
        if "%" not in path or path == prev:
            break
        prev, path = path, unquote(path)
    path = path.replace("\\", "/")
    if ";" in path:         # Tomcat-style path parameters: /..;/admin is /../admin
        path = "/".join(seg.partition(";")[0] for seg in path.split("/"))
    if not path.startswith("/"):
        path = "/" + path
    return _remove_dot_segments(path, merge_slashes=True)


def path_readings(path: str) -> tuple[str, ...]:
    """The ways an upstream may read this request path (query string removed): one for a plain
    path, up to three for one with escapes, dot segments, `//`, `\\`, `;` or no leading `/`."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    if (path[:1] == "/" and "%" not in path and "/." not in path and "//" not in path
            and "\\" not in path and ";" not in path):
        return (path,)
    rooted = path if path.startswith("/") else "/" + path
    strict = _remove_dot_segments(_ESCAPE.sub(_decode_unreserved, rooted), merge_slashes=False)
    return tuple(dict.fromkeys((path, strict, _loose(path))))


# --- rules -------------------------------------------------------------------------------------

class _When:
    """One rule's compiled conditions. `deny` picks how an ambiguous input is read: a deny rule
    matches if any reading does, an allow rule only if every reading does."""
    __slots__ = ("deny", "methods", "method_list", "prefixes", "regex", "headers", "nets", "claims", "scopes",
                 "scope_set", "subjects", "needs_path", "needs_ip", "empty")

    def __init__(self, when: Conditions, deny: bool):
        self.deny = deny
        self.method_list = tuple(dict.fromkeys(m.upper() for m in when.methods))
        self.methods = frozenset(self.method_list)
        self.prefixes = tuple(when.path_prefix)
        self.regex = re.compile(when.path_regex) if when.path_regex is not None else None
        self.headers = tuple((name.lower(), value) for name, value in when.headers.items())
        self.nets = _NetSet(when.client_ip) if when.client_ip else None
        self.claims = tuple(_Accepted(name, values) for name, values in when.claims.items())
        self.scopes = tuple(dict.fromkeys(when.scopes))
        self.scope_set = frozenset(self.scopes)
        self.subjects = frozenset(when.subjects)
        self.needs_path = bool(self.prefixes) or self.regex is not None
        self.needs_ip = self.nets is not None
        self.empty = not (self.methods or self.needs_path or self.headers or self.needs_ip or self.claims
                          or self.scopes or self.subjects)

    def matches(self, req: Request, principal: Principal, paths: tuple[str, ...],
                ip: tuple[int, int] | None, trace: list[str] | None) -> bool:
        """Every condition, cheapest first; stops at the first that fails. With a trace, one
        line per condition checked (nothing is formatted without one)."""
        if self.methods:
            m = req.method
            if m not in self.methods and m.upper() not in self.methods:
                if trace is not None:
                    trace.append(f"method {m} not in [{', '.join(self.method_list)}]")
                return False
            if trace is not None:
                trace.append(f"method {m} matched")
        if self.prefixes:
            # one reading is the common case: no call, no loop
            used = ((paths[0] if paths[0].startswith(self.prefixes) else None) if len(paths) == 1
                    else self._paths(paths, _has_prefix, self.prefixes))
            if trace is not None:
                shown = f"path_prefix [{', '.join(self.prefixes)}]"
                trace.append(f"{shown} not matched{_readings(paths)}" if used is None
                             else f"{shown} matched{_read_as(paths, used, self.deny)}")
            if used is None:
                return False
        if self.regex is not None:
            used = self._paths(paths, _fullmatch, self.regex)
            if trace is not None:
                shown = f"path_regex {self.regex.pattern}"
                trace.append(f"{shown} not matched{_readings(paths)}" if used is None
                             else f"{shown} matched{_read_as(paths, used, self.deny)}")
            if used is None:
                return False
        for name, want in self.headers:
            got = req.headers.get(name)
            if got is None or not (want == "*" or got == want
                                   or (self.deny and "," in got and _in_list(got, want))):
                if trace is not None:
                    trace.append(f"header {name} {'absent' if got is None else 'differs'}")
                return False
            if trace is not None:
                trace.append(f"header {name} {'present' if want == '*' else 'matched'}")
        if self.nets is not None:
            hit = self.nets.contains(ip)
            if trace is not None:
                shown = req.client_ip or repr(req.client_ip)
                trace.append(f"client_ip {shown} matched" if hit else
                             f"client_ip {shown} not in the networks" + ("" if ip else " (unreadable)"))
            if not hit:
                return False
        if self.subjects:
            if principal.anonymous or not principal.subject or principal.subject not in self.subjects:
                if trace is not None:
                    trace.append("subjects not matched" + (" (anonymous)" if principal.anonymous else ""))
                return False
            if trace is not None:
                trace.append("subject matched")
        if self.scopes:
            if principal.anonymous or not self.scope_set <= principal.scopes:
                if trace is not None:
                    trace.append(f"scopes [{', '.join(self.scopes)}] not held"
                                 + (" (anonymous)" if principal.anonymous else ""))
                return False
            if trace is not None:
                trace.append(f"scopes [{', '.join(self.scopes)}] held")
        if self.claims:
            if principal.anonymous:
                if trace is not None:
                    trace.append("claims not matched (anonymous)")
                return False
            if _claims_hold(self.claims, principal.claims, trace, "") is not None:
                return False
        return True

    def _paths(self, paths: tuple[str, ...], test: Any, arg: Any) -> str | None:
        """The reading that decided a holding condition (for a deny rule the first that matched,
        for an allow rule the first one, all having matched), or None when it fails."""
        if self.deny:
            for p in paths:
                if test(p, arg):
                    return p
            return None
        for p in paths:
            if not test(p, arg):
                return None
        return paths[0]


def _readings(paths: tuple[str, ...]) -> str:
    return "" if len(paths) == 1 else f" (readings: {', '.join(paths)})"


def _read_as(paths: tuple[str, ...], used: str, deny: bool) -> str:
    if len(paths) == 1:
        return ""
    if deny:
        return "" if used is paths[0] else f" (read as {used})"
    return f" (every reading: {', '.join(paths)})"


def _has_prefix(path: str, prefixes: tuple[str, ...]) -> bool:
    return path.startswith(prefixes)


def _fullmatch(path: str, regex: re.Pattern[str]) -> bool:
    return regex.fullmatch(path) is not None


def _in_list(joined: str, want: str) -> bool:
    for part in joined.split(","):
        if part.strip() == want:
            return True
    return False


class _Rule:
    __slots__ = ("name", "deny", "when", "unless", "verdict")

    def __init__(self, rule: Rule):
        self.name = rule.name
        self.deny = rule.effect == "deny"
        self.when = _When(rule.when, self.deny)
        # an exemption is read strictly the other way: a path trick cannot earn an exemption
        self.unless = _When(rule.unless, not self.deny) if rule.unless is not None else None
        self.verdict = (Verdict(False, Reason.RULE_DENIED, 403, rule=rule.name,
                                detail="request denied by a policy rule")
                        if self.deny else Verdict(True, Reason.OK, rule=rule.name))

    def matches(self, req: Request, principal: Principal, paths: tuple[str, ...],
                ip: tuple[int, int] | None, trace: list[str] | None) -> bool:
        if trace is None:
            if not (self.when.empty or self.when.matches(req, principal, paths, ip, None)):
                return False
            u = self.unless
            return u is None or not (u.empty or u.matches(req, principal, paths, ip, None))
        lines: list[str] = []
        hit = self.when.empty or self.when.matches(req, principal, paths, ip, lines)
        if hit and self.unless is not None:
            ulines: list[str] = []
            exempt = self.unless.empty or self.unless.matches(req, principal, paths, ip, ulines)
            lines.append(f"unless [{', '.join(ulines) or 'no conditions'}] {'holds' if exempt else 'does not hold'}")
            hit = not exempt
        body = ", ".join(lines) if lines else "no conditions"
        trace.append(f"rule {self.name} ({'deny' if self.deny else 'allow'}): {body} "
                     f"-> {'match' if hit else 'no match'}")
        return hit


class RuleSet:
    """A policy's named rules: deny rules take precedence; with allow rules, one must match."""
    __slots__ = ("_deny", "_allow", "_needs_path", "_needs_ip")

    def __init__(self, rules: Sequence[_Rule]):
        self._deny = tuple(r for r in rules if r.deny)
        self._allow = tuple(r for r in rules if not r.deny)
        self._needs_path = any(r.when.needs_path or (r.unless is not None and r.unless.needs_path) for r in rules)
        self._needs_ip = any(r.when.needs_ip or (r.unless is not None and r.unless.needs_ip) for r in rules)

    @classmethod
    def compile(cls, rules: Sequence[Rule]) -> RuleSet:
        return cls([_Rule(r) for r in rules])

    @property
    def empty(self) -> bool:
        return not (self._deny or self._allow)

    def evaluate(self, req: Request, principal: Principal, trace: list[str] | None = None) -> Verdict:
        if not (self._deny or self._allow):
            if trace is not None:
                trace.append("rules: none configured -> allowed")
            return ALLOWED
        paths = path_readings(req.path) if self._needs_path else ()
        ip = _parse_ip(req.client_ip) if self._needs_ip else None
        if trace is None:
            for r in self._deny:
                if r.matches(req, principal, paths, ip, None):
                    return r.verdict
            if not self._allow:
                return ALLOWED
            for r in self._allow:
                if r.matches(req, principal, paths, ip, None):
                    return r.verdict
            return _NO_ALLOW_RULE
        # explaining: evaluate every rule so the trace is complete; the verdict is the same
        denied = [r for r in self._deny if r.matches(req, principal, paths, ip, trace)]
        allowed = [r for r in self._allow if r.matches(req, principal, paths, ip, trace)]
        if denied:
            trace.append(f"rules: deny rule {denied[0].name} matched -> rule_denied")
            return denied[0].verdict
        if not self._allow:
            trace.append("rules: no deny rule matched, no allow rules -> allowed")
            return ALLOWED
        if allowed:
            trace.append(f"rules: allow rule {allowed[0].name} matched -> allowed")
            return allowed[0].verdict
        trace.append("rules: no allow rule matched -> no_allow_rule")
        return _NO_ALLOW_RULE
