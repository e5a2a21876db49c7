"""core/authorize.py: requirements, IP lists and named rules, each rule at its edge.

Config pieces come from `extproc.config.parse`, so what is tested is what an operator writes.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from extproc import config as cfgmod
from extproc.config import Conditions, IpRules, PolicyAuth, Rule
from extproc.core.authorize import (
    ALLOWED,
    ANONYMOUS,
    IpList,
    Principal,
    Requirements,
    RuleSet,
    Verdict,
    path_readings,
    scopes_of,
)
from extproc.core.reasons import Reason
from extproc.core.request import Request

PROVIDERS = """
providers:
  demo: {issuer: "https://idp.example", jwks_uri: "https://idp.example/jwks"}
api_keys: {}
"""


def policy(body: str) -> cfgmod.Policy:
    """One policy named `p` from YAML (indented under `p:` by the caller's text)."""
    text = PROVIDERS + "policies:\n  p:\n" + "\n".join("    " + line for line in body.strip("\n").splitlines())
    return cfgmod.parse(text).policies["p"]


def rules(body: str) -> RuleSet:
    return RuleSet.compile(policy("rules:\n" + body).rules)


def requirements(body: str) -> Requirements:
    auth = policy("auth:\n" + "\n".join("  " + line for line in body.splitlines())).auth
    assert isinstance(auth, PolicyAuth)
    return Requirements.compile(auth)


def iplist(allow: list[str] = (), deny: list[str] = ()) -> IpList:  # type: ignore[assignment]
    return IpList.compile(IpRules(allow=list(allow), deny=list(deny)))


def req(path: str = "/", method: str = "GET", headers: dict[str, str] | None = None,
        client_ip: str = "203.0.113.7") -> Request:
    return Request(method=method, path=path, headers=headers or {}, client_ip=client_ip)


def jwt_user(sub: str = "alice", **claims: Any) -> Principal:
    return Principal.from_claims("jwt", "demo", {"sub": sub, **claims})


# --- scopes_of and Principal -------------------------------------------------------------------

@pytest.mark.parametrize(("claims", "want"), [
    ({"scope": "read write"}, {"read", "write"}),
    ({"scope": "  read   write "}, {"read", "write"}),
    ({"scp": ["read", "admin"]}, {"read", "admin"}),
    ({"scp": "read write"}, {"read", "write"}),
    ({"scope": "read", "scp": ["write"]}, {"read", "write"}),          # union of both forms
    ({"scope": ["read", "write"]}, {"read", "write"}),                 # list form under `scope` too
    ({"scp": ["read", 7, None, "", {"x": 1}]}, {"read"}),              # non-strings grant nothing
    ({"scope": 7}, set()),
    ({"scope": ""}, set()),
    ({}, set()),
])
def test_scopes_of(claims: dict[str, Any], want: set[str]) -> None:
    assert scopes_of(claims) == frozenset(want)


def test_principal_from_claims_takes_sub_and_scopes() -> None:
    p = Principal.from_claims("jwt", "demo", {"sub": "alice", "scope": "a b", "scp": ["c"]})
    assert (p.kind, p.subject, p.provider, p.scopes) == ("jwt", "alice", "demo", frozenset({"a", "b", "c"}))
    assert Principal.from_claims("jwt", "demo", {"sub": 42}).subject == ""    # only a string is a subject


def test_principal_for_an_api_key_has_the_documented_claims() -> None:
    p = Principal.api_key("team-a", "gold", ["read", "write", "read"])
    assert (p.kind, p.subject, p.provider) == ("api_key", "team-a", "api_key")
    assert dict(p.claims) == {"sub": "team-a", "tier": "gold", "scope": "read write"}
    assert p.scopes == frozenset({"read", "write"}) == scopes_of(p.claims)


# --- Requirements ------------------------------------------------------------------------------

def test_no_requirements_allow_anyone() -> None:
    for auth in ("none", None):
        assert Requirements.compile(auth).check(ANONYMOUS) is ALLOWED
    assert requirements("any_of: [demo]").check(jwt_user()) is ALLOWED


def test_every_scope_is_required_and_the_missing_ones_are_named_in_config_order() -> None:
    r = requirements("any_of: [demo]\nscopes: [write, read, admin]")
    assert r.check(jwt_user(scope="read write admin")).allowed
    assert r.check(jwt_user(scp=["admin"], scope="read write")).allowed
    v = r.check(jwt_user(scope="read"))
    assert v == Verdict(False, Reason.INSUFFICIENT_SCOPE, 403, detail=v.detail,
                        missing_scopes=("write", "admin"))
    assert v.detail and "read" not in v.detail


def test_anonymous_meets_no_requirement() -> None:
    for body in ("scopes: [read]", "roles: {any_of: [admin]}", "claims: {tenant: [acme]}"):
        assert not requirements("any_of: [demo]\n" + body).check(ANONYMOUS).allowed


@pytest.mark.parametrize(("value", "ok"), [
    (["viewer", "admin"], True),
    ("admin", True),                     # a single role as a string
    ("viewer admin", True),              # space-separated
    (["viewer"], False),
    ("administrator", False),            # no substring matching
    ([["admin"]], False),                # nested lists are not roles
    ({"admin": True}, False),
    (None, False),
])
def test_roles_any_of_from_a_list_or_a_string(value: Any, ok: bool) -> None:
    r = requirements("any_of: [demo]\nroles: {any_of: [admin, editor]}")
    v = r.check(jwt_user(roles=value))
    assert v.allowed is ok
    if not ok:
        assert (v.reason, v.status) == (Reason.ROLE_MISSING, 403)


def test_roles_claim_is_configurable_and_may_be_a_nested_path() -> None:
    r = requirements("any_of: [demo]\nroles: {claim: realm_access.roles, any_of: [admin]}")
    assert r.check(jwt_user(realm_access={"roles": ["admin"]})).allowed
    assert not r.check(jwt_user(realm_access={"roles": ["user"]})).allowed
    assert not r.check(jwt_user(realm_access=["admin"])).allowed
    # a claim literally named with dots (Auth0-style namespaced claims) is read as written first
    r = requirements("any_of: [demo]\nroles: {claim: 'https://example.com/roles', any_of: [admin]}")
    assert r.check(jwt_user(**{"https://example.com/roles": ["admin"]})).allowed


@pytest.mark.parametrize(("accepted", "claim", "ok"), [
    ('["1"]', "1", True),
    ('["1"]', 1, False),                 # never "1" == 1
    ("[1]", "1", False),
    ("[1]", 1, True),
    ("[1]", 1.0, True),                  # one JSON number type
    ("[1]", True, False),                # True == 1 in Python, not in JSON
    ("[true]", 1, False),
    ("[true]", True, True),
    ("[true]", "true", False),
    ("[false]", 0, False),
    ("[false]", False, True),
    ("[acme, 7]", ["x", "acme"], True),  # list-valued claim: any element
    ("[acme, 7]", ["x", 7], True),
    ("[acme]", [["acme"]], False),       # only one level
    ("[acme]", {"acme": 1}, False),
    ("[acme]", None, False),
])
def test_claims_compare_by_value_and_json_type(accepted: str, claim: Any, ok: bool) -> None:
    r = requirements(f"any_of: [demo]\nclaims: {{tenant: {accepted}}}")
    v = r.check(jwt_user(tenant=claim))
    assert v.allowed is ok
    if not ok:
        assert (v.reason, v.status) == (Reason.CLAIM_MISMATCH, 403)
        assert "tenant" in v.detail and repr(claim) not in v.detail


def test_every_listed_claim_must_hold_and_an_absent_one_fails() -> None:
    r = requirements("any_of: [demo]\nclaims: {tenant: [acme], tier: [gold, silver]}")
    assert r.check(jwt_user(tenant="acme", tier="gold")).allowed
    assert r.check(jwt_user(tenant="acme")).reason is Reason.CLAIM_MISMATCH
    assert r.check(jwt_user(tier="gold")).reason is Reason.CLAIM_MISMATCH


def test_requirements_apply_to_api_key_principals() -> None:
    r = requirements("api_keys: true\nscopes: [read]\nclaims: {tier: [gold]}")
    assert r.check(Principal.api_key("team-a", "gold", ["read"])).allowed
    assert r.check(Principal.api_key("team-a", "free", ["read"])).reason is Reason.CLAIM_MISMATCH
    assert r.check(Principal.api_key("team-a", "gold", [])).missing_scopes == ("read",)


def test_requirements_trace() -> None:
    r = requirements("any_of: [demo]\nscopes: [read]\nroles: {any_of: [admin]}\nclaims: {tenant: [acme]}")
    trace: list[str] = []
    assert r.check(jwt_user(scope="read", roles=["admin"], tenant="other"), trace).reason is Reason.CLAIM_MISMATCH
    assert trace == ["requirements: scopes [read] held",
                     "requirements: claim roles holds one of [admin]",
                     "requirements: claim tenant has no accepted value (accepted: 'acme') -> claim_mismatch"]
    trace = []
    r.check(jwt_user(scope="write"), trace)
    assert trace == ["requirements: scopes [read] not held (missing read) -> insufficient_scope"]


# --- IpList ------------------------------------------------------------------------------------

def test_no_ip_section_allows_everything() -> None:
    for ip in (IpList.compile(None), iplist()):
        for addr in ("10.0.0.1", "::1", "", "garbage"):
            assert ip.check(addr) is ALLOWED


@pytest.mark.parametrize(("addr", "ok"), [
    ("10.1.2.3", True),
    ("192.168.7.7", True),
    ("10.9.9.9", False),                 # in the allow list, but the deny list wins
    ("11.0.0.1", False),
    ("2001:db8::1", True),
    ("2001:db9::1", False),
    ("::ffff:10.1.2.3", True),           # IPv4-mapped IPv6 is the IPv4 address
    ("::ffff:10.9.0.1", False),
    ("::ffff:11.0.0.1", False),
    ("fe80::1%eth0", False),             # a zone id parses (and is not in the list)
    ("", False),                         # unreadable with an allow list: denied
    ("garbage", False),
    ("10.1.2.3:443", False),
    ("010.1.2.3", False),                # leading zeros are not an address (no octal surprises)
])
def test_allow_list_with_deny_list(addr: str, ok: bool) -> None:
    ip = iplist(allow=["10.0.0.0/8", "192.168.7.0/24", "2001:db8::/32"], deny=["10.9.0.0/16"])
    v = ip.check(addr)
    assert v.allowed is ok
    if not ok:
        assert v == Verdict(False, Reason.IP_DENIED, 403, detail=v.detail)


@pytest.mark.parametrize(("addr", "ok"), [
    ("198.51.100.9", False),
    ("::ffff:198.51.100.9", False),
    ("2001:db8:dead::1", False),
    ("198.51.101.1", True),
    ("2001:db9::1", True),
    ("", True),                          # in no network: a blocklist has nothing to say
    ("garbage", True),
])
def test_deny_list_only(addr: str, ok: bool) -> None:
    assert iplist(deny=["198.51.100.0/24", "2001:db8:dead::/48"]).check(addr).allowed is ok


def test_mapped_networks_in_config_also_match_plain_ipv4_and_wide_v6_networks_match_mapped() -> None:
    ip = iplist(deny=["::ffff:10.0.0.0/104"])
    assert not ip.check("10.2.3.4").allowed
    assert not ip.check("::ffff:10.2.3.4").allowed
    assert ip.check("11.2.3.4").allowed
    ip = iplist(allow=["::/0"])
    assert ip.check("::ffff:1.2.3.4").allowed        # a mapped address is also that IPv6 address
    assert not ip.check("1.2.3.4").allowed           # a plain IPv4 client is not in an IPv6 network


def test_host_and_catch_all_networks() -> None:
    ip = iplist(allow=["0.0.0.0/0"], deny=["203.0.113.7/32", "2001:db8::7/128"])
    assert not ip.check("203.0.113.7").allowed
    assert ip.check("203.0.113.8").allowed
    assert not iplist(allow=["0.0.0.0/0", "::/0"], deny=["2001:db8::7/128"]).check("2001:db8::7").allowed


def test_ip_trace() -> None:
    ip = iplist(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    trace: list[str] = []
    for addr in ("10.9.0.1", "11.0.0.1", "10.0.0.1", ""):
        ip.check(addr, trace)
    assert trace == ["ip 10.9.0.1: in the deny list -> ip_denied",
                     "ip 11.0.0.1: not in the allow list -> ip_denied",
                     "ip 10.0.0.1: in the allow list",
                     "ip '': unreadable, and an allow list is set -> ip_denied"]


# --- RuleSet: precedence -----------------------------------------------------------------------

def test_no_rules_allow() -> None:
    rs = RuleSet.compile([])
    assert rs.empty and rs.evaluate(req(), ANONYMOUS) is ALLOWED


def test_deny_rules_take_precedence_over_allow_rules_wherever_they_are_listed() -> None:
    rs = rules("""
- {name: everyone, effect: allow}
- {name: no-delete, effect: deny, when: {methods: [DELETE]}}
- {name: no-admin, effect: deny, when: {path_prefix: [/admin]}}
""")
    assert rs.evaluate(req("/x"), ANONYMOUS) == Verdict(True, Reason.OK, rule="everyone")
    v = rs.evaluate(req("/admin", "DELETE"), ANONYMOUS)
    assert v == Verdict(False, Reason.RULE_DENIED, 403, rule="no-delete", detail=v.detail)   # first deny, in order
    assert rs.evaluate(req("/admin", "GET"), ANONYMOUS).rule == "no-admin"


def test_with_allow_rules_one_must_match() -> None:
    rs = rules("""
- {name: reads, effect: allow, when: {methods: [GET, HEAD]}}
- {name: writers, effect: allow, when: {scopes: [write]}}
""")
    assert rs.evaluate(req(method="GET"), ANONYMOUS).rule == "reads"
    assert rs.evaluate(req(method="POST"), jwt_user(scope="write")).rule == "writers"
    v = rs.evaluate(req(method="POST"), jwt_user(scope="read"))
    assert v == Verdict(False, Reason.NO_ALLOW_RULE, 403, detail=v.detail)


def test_only_deny_rules_allow_what_they_do_not_match() -> None:
    rs = rules("- {name: no-delete, effect: deny, when: {methods: [DELETE]}}")
    assert rs.evaluate(req(method="GET"), ANONYMOUS) is ALLOWED
    assert rs.evaluate(req(method="DELETE"), ANONYMOUS).reason is Reason.RULE_DENIED


def test_a_rule_without_conditions_always_matches() -> None:
    assert rules("- {name: nobody, effect: deny}").evaluate(req(), jwt_user()).rule == "nobody"
    assert rules("- {name: all, effect: allow, when: {}}").evaluate(req(), ANONYMOUS).allowed


# --- RuleSet: each condition -------------------------------------------------------------------

def deny_when(when: str) -> RuleSet:
    return rules(f"- {{name: r, effect: deny, when: {when}}}")


def allow_when(when: str) -> RuleSet:
    return rules(f"- {{name: r, effect: allow, when: {when}}}")


def denied(rs: RuleSet, r: Request, p: Principal = ANONYMOUS) -> bool:
    return not rs.evaluate(r, p).allowed


def test_methods_compare_upper_case() -> None:
    rs = deny_when("{methods: [delete, Put]}")
    assert denied(rs, req(method="DELETE")) and denied(rs, req(method="PUT"))
    assert denied(rs, req(method="delete"))
    assert not denied(rs, req(method="GET"))


def test_path_prefix_ignores_the_query_and_is_a_plain_string_prefix() -> None:
    rs = deny_when("{path_prefix: [/admin, /internal/]}")
    assert denied(rs, req("/admin")) and denied(rs, req("/admin/users?x=1"))
    assert denied(rs, req("/administrator"))               # a string prefix, as Envoy's route `prefix`
    assert denied(rs, req("/internal/x"))
    assert not denied(rs, req("/internal"))                # `/internal/` does not cover `/internal`
    assert not denied(rs, req("/public?next=/admin"))      # the query is not the path
    assert not denied(rs, req("/public?x=/../admin"))


def test_paths_are_case_sensitive_use_a_regex_flag_for_a_case_insensitive_upstream() -> None:
    assert not denied(deny_when("{path_prefix: [/api/admin]}"), req("/api/Admin"))
    assert not denied(deny_when("{path_prefix: [/api/admin]}"), req("/API/admin"))
    assert denied(deny_when("{path_regex: '(?i)/api/admin(/.*)?'}"), req("/API/Admin/x"))


def test_path_regex_must_match_the_whole_path_without_the_query() -> None:
    rs = deny_when(r"{path_regex: '/users/[0-9]+/delete'}")
    assert denied(rs, req("/users/42/delete")) and denied(rs, req("/users/42/delete?confirm=1"))
    assert not denied(rs, req("/users/42/delete/x"))       # fullmatch, not search
    assert not denied(rs, req("/v2/users/42/delete"))
    assert denied(deny_when(r"{path_regex: '.*/delete'}"), req("/v2/users/42/delete"))


def test_headers_exact_value_or_present_and_names_lower_cased() -> None:
    rs = deny_when("{headers: {x-debug: '1', x-canary: '*'}}")
    assert denied(rs, req(headers={"x-debug": "1", "x-canary": ""}))      # "*": present, even empty
    assert not denied(rs, req(headers={"x-debug": "1"}))
    assert not denied(rs, req(headers={"x-debug": "true", "x-canary": "a"}))
    assert not denied(rs, req(headers={"x-debug": "1 ", "x-canary": "a"}))   # exact


def test_a_repeated_header_cannot_dodge_a_deny_rule_nor_pass_an_allow_rule() -> None:
    # Envoy joins repeated headers with ","; the upstream may read either copy
    joined = {"x-debug": "0,1"}
    assert denied(deny_when("{headers: {x-debug: '1'}}"), req(headers=joined))
    assert denied(allow_when("{headers: {x-debug: '0'}}"), req(headers=joined))
    assert not denied(allow_when("{headers: {x-debug: '0'}}"), req(headers={"x-debug": "0"}))


def test_client_ip_any_network_and_an_unreadable_address_in_none() -> None:
    rs = deny_when("{client_ip: [198.51.100.0/24, '2001:db8::/32']}")
    for addr in ("198.51.100.1", "2001:db8::5", "::ffff:198.51.100.1"):
        assert denied(rs, req(client_ip=addr)), addr
    for addr in ("198.51.101.1", "", "nonsense"):
        assert not denied(rs, req(client_ip=addr)), addr
    assert denied(allow_when("{client_ip: [10.0.0.0/8]}"), req(client_ip=""))


def test_claims_condition_is_typed_like_requirements() -> None:
    rs = deny_when("{claims: {banned: [true], tenant: [acme]}}")
    assert denied(rs, req(), jwt_user(banned=True, tenant="acme"))
    assert not denied(rs, req(), jwt_user(banned=1, tenant="acme"))
    assert not denied(rs, req(), jwt_user(banned="true", tenant="acme"))
    assert denied(rs, req(), jwt_user(banned=True, tenant=["other", "acme"]))
    assert not denied(rs, req(), jwt_user(banned=True))


def test_scopes_condition_needs_every_scope() -> None:
    rs = allow_when("{scopes: [read, write]}")
    assert not denied(rs, req(), jwt_user(scope="read write extra"))
    assert not denied(rs, req(), jwt_user(scope="read", scp=["write"]))
    assert denied(rs, req(), jwt_user(scope="read"))


def test_subjects_condition() -> None:
    rs = allow_when("{subjects: [alice, team-a]}")
    assert not denied(rs, req(), jwt_user("alice"))
    assert not denied(rs, req(), Principal.api_key("team-a", "gold", []))
    assert denied(rs, req(), jwt_user("bob"))


def test_anonymous_never_matches_claims_scopes_or_subjects() -> None:
    anonymous_like = Principal("anonymous", subject="", claims={"tenant": "acme"}, scopes=frozenset({"read"}))
    for when in ("{claims: {tenant: [acme]}}", "{scopes: [read]}"):
        assert denied(allow_when(when), req(), anonymous_like), when
        assert not denied(deny_when(when), req(), anonymous_like), when


def test_all_conditions_of_a_rule_must_hold() -> None:
    rs = deny_when("{methods: [DELETE], path_prefix: [/admin], scopes: [admin]}")
    admin = jwt_user(scope="admin")
    assert denied(rs, req("/admin/x", "DELETE"), admin)
    assert not denied(rs, req("/admin/x", "GET"), admin)
    assert not denied(rs, req("/other", "DELETE"), admin)
    assert not denied(rs, req("/admin/x", "DELETE"), jwt_user(scope="read"))


# --- path tricks -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/admin/x",
    "/admin/../admin/x",
    "/public/../admin/x",
    "/public/./../admin/x",
    "//admin/x",
    "/public//../admin/x",            # a non-merging upstream reads /public/admin/x ... a merging one /admin/x
    "/%61dmin/x",                     # RFC 3986 §6.2.2.2: %61 is "a"
    "/%61%64%6D%69%6E/x",
    "/public/%2e%2e/admin/x",
    "/public/%2E%2E/admin/x",
    "/public/..%2fadmin/x",
    "/public/..%2Fadmin/x",
    "/public/..%5cadmin/x",
    "/public\\..\\admin\\x",
    "/public/..;/admin/x",            # Tomcat path parameters
    "/admin;jsessionid=1/x",
    "/public/%252e%252e/admin/x",     # double-encoded, for upstreams that decode twice
    "admin/x",                        # no leading slash
    "/./admin/x",
])
def test_path_tricks_cannot_dodge_a_deny_rule(path: str) -> None:
    rs = deny_when("{path_prefix: [/admin/]}")
    assert denied(rs, req(path)), path_readings(path)
    assert denied(deny_when("{path_regex: '/admin/.*'}"), req(path)), path_readings(path)


@pytest.mark.parametrize("path", ["/admin%2fx", "/admin%2Fx", "/admin%5Cx", "/admin\\x"])
def test_an_encoded_or_back_slash_is_read_as_a_slash_by_a_deny_rule(path: str) -> None:
    assert denied(deny_when("{path_prefix: [/admin/]}"), req(path))


def test_a_trailing_dot_segment_keeps_its_slash() -> None:
    # posixpath.normpath("/x/../admin/") is "/admin", which would dodge the prefix "/admin/"
    assert denied(deny_when("{path_prefix: [/admin/]}"), req("/x/../admin/"))
    assert denied(deny_when("{path_prefix: [/admin/]}"), req("/admin/x/.."))


@pytest.mark.parametrize("path", [
    "/api/../admin",
    "/api/%2e%2e/admin",
    "/api/..%2Fadmin",
    "/api/..;/admin",
    "/api\\..\\admin",
    "//api/x",
])
def test_path_tricks_cannot_slip_into_an_allow_rule(path: str) -> None:
    v = allow_when("{path_prefix: [/api/]}").evaluate(req(path), ANONYMOUS)
    assert v.reason is Reason.NO_ALLOW_RULE, path_readings(path)


@pytest.mark.parametrize("path", ["/api/x", "/api/a%2Fb", "/api/a%20b", "/api/x?next=../../admin",
                                  "/api/x;v=1", "/api/.well-known/x"])
def test_ordinary_paths_still_pass_an_allow_rule(path: str) -> None:
    assert allow_when("{path_prefix: [/api/]}").evaluate(req(path), ANONYMOUS).allowed


def test_path_readings() -> None:
    assert path_readings("/api/x?y=1") == ("/api/x",)
    assert path_readings("/api/x") == ("/api/x",)
    assert path_readings("/public/../%61dmin/") == ("/public/../%61dmin/", "/admin/")
    assert path_readings("/a//b/../c") == ("/a//b/../c", "/a//c", "/a/c")
    assert path_readings("/a%2fb") == ("/a%2fb", "/a%2Fb", "/a/b")
    assert path_readings("") == ("", "/")


# --- trace -------------------------------------------------------------------------------------

def test_rule_trace_names_each_check_and_the_outcome() -> None:
    rs = rules("""
- {name: admin-only-delete, effect: deny, when: {methods: [DELETE], scopes: [admin]}}
- {name: no-admin-path, effect: deny, when: {path_prefix: [/admin/]}}
- {name: readers, effect: allow, when: {scopes: [read]}}
""")
    trace: list[str] = []
    v = rs.evaluate(req("/public/../admin/x", "DELETE"), jwt_user(scope="read"), trace)
    assert v.rule == "no-admin-path" and v.reason is Reason.RULE_DENIED
    assert trace == [
        "rule admin-only-delete (deny): method DELETE matched, scopes [admin] not held -> no match",
        "rule no-admin-path (deny): path_prefix [/admin/] matched (read as /admin/x) -> match",
        "rule readers (allow): scopes [read] held -> match",
        "rules: deny rule no-admin-path matched -> rule_denied",
    ]


def test_trace_of_allow_outcomes() -> None:
    rs = rules("- {name: api, effect: allow, when: {path_prefix: [/api/], claims: {tenant: [acme]}}}")
    trace: list[str] = []
    rs.evaluate(req("/api/x"), jwt_user(tenant="acme"), trace)
    assert trace == ["rule api (allow): path_prefix [/api/] matched, claim tenant is one of ['acme'] -> match",
                     "rules: allow rule api matched -> allowed"]
    trace = []
    rs.evaluate(req("/api/../x"), ANONYMOUS, trace)
    assert trace == ["rule api (allow): path_prefix [/api/] not matched (readings: /api/../x, /x) -> no match",
                     "rules: no allow rule matched -> no_allow_rule"]
    trace = []
    rules("- {name: open, effect: allow}").evaluate(req(), ANONYMOUS, trace)
    assert trace == ["rule open (allow): no conditions -> match", "rules: allow rule open matched -> allowed"]


class _Unformattable(str):
    """A string that fails if anything formats it: the hot path must not."""

    def __format__(self, spec: str) -> str:
        raise AssertionError("formatted without a trace")

    def __repr__(self) -> str:
        raise AssertionError("formatted without a trace")


def test_without_a_trace_nothing_is_formatted() -> None:
    rs = rules("""
- {name: d, effect: deny, when: {methods: [DELETE], client_ip: [10.0.0.0/8]}}
- {name: a, effect: allow, when: {methods: [POST]}}
""")
    r = req("/x", _Unformattable("GET"), client_ip=_Unformattable("203.0.113.1"))
    assert rs.evaluate(r, ANONYMOUS).reason is Reason.NO_ALLOW_RULE
    assert iplist(allow=["10.0.0.0/8"]).check(_Unformattable("1.2.3.4")).reason is Reason.IP_DENIED
    assert iplist(deny=["10.0.0.0/8"]).check(_Unformattable("")).allowed


@pytest.mark.parametrize("path", ["/admin/x", "/api/x", "/api/../admin", "/other"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_tracing_never_changes_the_verdict(path: str, method: str) -> None:
    rs = rules("""
- {name: a, effect: allow, when: {path_prefix: [/api/]}}
- {name: b, effect: allow, when: {methods: [GET]}}
- {name: d1, effect: deny, when: {path_prefix: [/admin]}}
- {name: d2, effect: deny, when: {methods: [DELETE]}}
""")
    assert rs.evaluate(req(path, method), ANONYMOUS, []) == rs.evaluate(req(path, method), ANONYMOUS)


# --- compile accepts everything the config accepts ---------------------------------------------

def test_compile_accepts_every_condition_and_shape() -> None:
    pol = policy("""
auth:
  any_of: [demo]
  scopes: [read]
  roles: {claim: groups, any_of: [admins]}
  claims: {tenant: [acme, 7, true], "https://example.com/x": [a]}
ip:
  allow: [10.0.0.0/8, 192.0.2.1/32, "2001:db8::/32", "::ffff:198.51.100.0/120", "::/0", 0.0.0.0/0]
  deny: [10.9.0.0/16, "fe80::/10"]
rules:
  - name: every-field
    effect: deny
    when:
      methods: [get, Post]
      path_prefix: [/]
      path_regex: '(?i)^/(a|b)+\\.json$'
      headers: {x-mixed-case: '*', ":authority": api.example}
      client_ip: [10.0.0.0/8, "::1/128"]
      claims: {a.b.c: [1], flag: [false]}
      scopes: [x, x]
      subjects: [alice]
  - {name: empty, effect: allow, when: {}}
  - {name: bare, effect: allow}
""")
    assert isinstance(pol.auth, PolicyAuth)
    Requirements.compile(pol.auth)
    IpList.compile(pol.ip)
    RuleSet.compile(pol.rules)
    # models built directly, as the lead's compile step may
    RuleSet.compile([Rule(name="r", effect="allow", when=Conditions(
        client_ip=[ipaddress.ip_network("10.0.0.0/8")]))])


def test_compile_accepts_the_shipped_config() -> None:
    cfg = cfgmod.load(Path(__file__).resolve().parents[2] / "extproc.yaml")
    for pol in cfg.policies.values():
        Requirements.compile(pol.auth)
        IpList.compile(pol.ip)
        RuleSet.compile(pol.rules)


# --- unless: exemptions ---------------------------------------------------------------------------

def test_deny_unless_exempts_only_when_the_exemption_holds() -> None:
    rs = rules("- {name: catalog-writes-need-admin, effect: deny, when: {methods: [DELETE], "
               "path_prefix: [/api/products]}, unless: {scopes: [admin]}}")
    delete = req("/api/products/1", method="DELETE")
    assert denied(rs, delete, jwt_user("bob", scope="read write"))
    assert not denied(rs, delete, jwt_user("root", scope="read admin"))
    assert not denied(rs, req("/api/products/1"), jwt_user("bob", scope="read"))   # GET: rule not in force
    assert denied(rs, delete, ANONYMOUS)                                            # anonymous holds no scope
    assert rs.evaluate(delete, jwt_user("bob")).rule == "catalog-writes-need-admin"


def test_unless_paths_are_read_strictly() -> None:
    # a path trick must not earn an exemption: /public/../admin is not "under /public/"
    rs = rules("- {name: admin-area, effect: deny, when: {path_prefix: [/]}, unless: {path_prefix: [/public/]}}")
    assert not denied(rs, req("/public/x"))
    assert denied(rs, req("/public/../admin"))
    assert denied(rs, req("/public%2f..%2fadmin"))


def test_unless_shows_in_the_trace() -> None:
    rs = rules("- {name: r, effect: deny, when: {methods: [DELETE]}, unless: {subjects: [root]}}")
    trace: list[str] = []
    rs.evaluate(req(method="DELETE"), jwt_user("root"), trace)
    assert any("unless" in line and "holds" in line for line in trace)
