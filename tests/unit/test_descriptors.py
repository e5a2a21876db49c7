"""The descriptor tree: envoyproxy/ratelimit's matching rules, per-value counters, names, costs,
overrides and the config problems the loader should refuse. Pure: no store, no gRPC, no clock."""

from __future__ import annotations

import pytest

from extproc import config as cfgmod
from extproc.core.descriptors import (
    OVERRIDE_NAME,
    Descriptors,
    counter_tag,
    descriptor_hits,
    override_rule,
    problems,
)
from extproc.core.ratelimit import Algorithm, Period
from extproc.store.keys import KeySpace, hash_tag

TREE = """
ratelimit_service:
  domains:
  - domain: webshop
    descriptors:
    - key: remote_address
      rate_limit: {unit: second, requests_per_unit: 5}
    - key: remote_address
      value: 10.0.0.1
      rate_limit: {unit: second, requests_per_unit: 50}
    - key: user
      rate_limit: {unit: minute, requests_per_unit: 20, algorithm: sliding_window}
    - key: plan
      value: gold
      descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 1000}
    - key: plan
      rate_limit: {unit: hour, requests_per_unit: 7}
      descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 100}
      - key: user
        value: vip
        rate_limit: {unlimited: true}
    - key: path
      value: /reports/*
      rate_limit: {unit: day, requests_per_unit: 3}
    - key: path
      value: /reports/annual*
      rate_limit: {unit: day, requests_per_unit: 1}
    - key: path
      rate_limit: {unit: day, requests_per_unit: 300}
    - key: generic_key
      value: reports
      name: monthly-reports
      rate_limit: {unit: month, requests_per_unit: 1000}
    - key: generic_key
      value: beta
      shadow_mode: true
      rate_limit: {unit: minute, requests_per_unit: 1, algorithm: token_bucket}
  - domain: internal
    descriptors:
    - key: remote_address
      rate_limit: {unit: second, requests_per_unit: 500}
"""


def compile_tree(text: str = TREE) -> Descriptors:
    return Descriptors.compile(cfgmod.parse(text, "<test>").ratelimit_service)


@pytest.fixture(scope="module")
def tree() -> Descriptors:
    return compile_tree()


def rule_of(tree: Descriptors, *entries: tuple[str, str], domain: str = "webshop"):
    d = tree.domain(domain)
    assert d is not None
    return d.match(list(entries))


# -- matching ---------------------------------------------------------------------------------

def test_value_less_key_matches_any_value(tree):
    for ip in ("203.0.113.7", "2001:db8::1", ""):
        rule = rule_of(tree, ("remote_address", ip))
        assert rule is not None and rule.requests_per_unit == 5 and rule.unit == "second"


def test_exact_value_is_more_specific_than_value_less(tree):
    assert rule_of(tree, ("remote_address", "10.0.0.1")).requests_per_unit == 50
    assert rule_of(tree, ("remote_address", "10.0.0.10")).requests_per_unit == 5


def test_nested_descriptors_follow_each_entry(tree):
    gold = rule_of(tree, ("plan", "gold"), ("user", "alice"))
    assert gold.requests_per_unit == 1000 and gold.unit == "hour"
    # value-less `plan` at level one, then value-less `user`
    assert rule_of(tree, ("plan", "silver"), ("user", "alice")).requests_per_unit == 100
    # exact value at level two wins over the value-less sibling
    vip = rule_of(tree, ("plan", "silver"), ("user", "vip"))
    assert vip.unlimited and vip.limit is None


def test_a_node_limit_applies_only_to_the_last_entry(tree):
    # `plan` alone has its own limit; `plan=gold` alone has none (only its child does)
    assert rule_of(tree, ("plan", "silver")).requests_per_unit == 7
    assert rule_of(tree, ("plan", "gold")) is None


def test_more_entries_than_the_tree_is_deep_is_no_limit(tree):
    assert rule_of(tree, ("remote_address", "203.0.113.7"), ("user", "alice")) is None
    assert rule_of(tree, ("plan", "gold"), ("user", "alice"), ("x", "y")) is None


def test_no_backtracking_to_a_less_specific_sibling(tree):
    # plan=gold has only a `user` child: the walk stops there, even though the value-less
    # `plan` node would have matched a `user` child too (envoyproxy/ratelimit does the same)
    assert rule_of(tree, ("plan", "gold"), ("tier", "x")) is None


def test_unknown_keys_and_order_matter(tree):
    assert rule_of(tree, ("nope", "x")) is None
    assert rule_of(tree, ("user", "alice"), ("plan", "gold")) is None   # entries are ordered
    assert rule_of(tree) is None


def test_wildcard_values_match_by_prefix_after_exact_and_before_value_less(tree):
    # the first wildcard in config order wins, as upstream
    assert rule_of(tree, ("path", "/reports/annual/2025")).requests_per_unit == 3
    assert rule_of(tree, ("path", "/reports/x")).requests_per_unit == 3
    assert rule_of(tree, ("path", "/orders")).requests_per_unit == 300


def test_domains_are_separate(tree):
    assert rule_of(tree, ("remote_address", "1.2.3.4"), domain="internal").requests_per_unit == 500
    assert tree.domain("nope") is None
    assert tree.domain("internal").match([("user", "alice")]) is None


def test_rules_carry_algorithm_period_and_modes(tree):
    user = rule_of(tree, ("user", "u"))
    assert user.limit.algorithm is Algorithm.SLIDING_WINDOW and user.limit.period == Period(60)
    monthly = rule_of(tree, ("generic_key", "reports"))
    assert monthly.limit.period.is_month and monthly.name == "monthly-reports"
    beta = rule_of(tree, ("generic_key", "beta"))
    assert beta.shadow and beta.limit.algorithm is Algorithm.TOKEN_BUCKET
    assert not user.shadow


# -- names ------------------------------------------------------------------------------------

def test_names_derive_from_the_path_and_are_unique_per_domain(tree):
    names = [r.name for r in tree.domain("webshop").rules]
    assert len(names) == len(set(names))
    assert rule_of(tree, ("remote_address", "x")).name == "remote_address"
    assert rule_of(tree, ("remote_address", "10.0.0.1")).name == "remote_address_10.0.0.1"
    assert rule_of(tree, ("plan", "gold"), ("user", "a")).name == "plan_gold.user"
    assert rule_of(tree, ("plan", "x"), ("user", "a")).name == "plan.user"
    assert rule_of(tree, ("path", "/reports/x")).name == "path_reports"       # sanitised
    assert rule_of(tree, ("path", "/reports/x")).path == "webshop.path_/reports/*"


def test_sanitised_names_that_collide_get_a_suffix():
    tree = compile_tree("""
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: "a b", rate_limit: {requests_per_unit: 1}}
    - {key: "a_b", rate_limit: {requests_per_unit: 2}}
    - {key: "a!b", rate_limit: {requests_per_unit: 3}}
""")
    d = tree.domain("d")
    assert [d.match([(k, "v")]).name for k in ("a b", "a_b", "a!b")] == ["a_b", "a_b-2", "a_b-3"]


def test_derived_names_avoid_explicit_ones():
    tree = compile_tree("""
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: user, rate_limit: {requests_per_unit: 1}}
    - {key: ip, name: user, rate_limit: {requests_per_unit: 2}}
""")
    d = tree.domain("d")
    assert d.match([("user", "x")]).name == "user-2"
    assert d.match([("ip", "x")]).name == "user"


# -- counters ---------------------------------------------------------------------------------

def test_each_value_has_its_own_counter(tree):
    d = tree.domain("webshop")
    a = d.hit([("user", "alice")])
    b = d.hit([("user", "bob")])
    assert a.rule is b.rule and a.tag != b.tag
    ks = KeySpace("t")
    assert ks.rate_limit(a.tag, a.rule.limit) != ks.rate_limit(b.tag, b.rule.limit)
    assert d.hit([("user", "alice")]).tag == a.tag


def test_counter_tags_separate_domains_and_paths():
    assert counter_tag("a", [("k", "v")]) != counter_tag("b", [("k", "v")])
    assert counter_tag("a", [("k", "v"), ("x", "y")]) != counter_tag("a", [("k", "v|x=y")])
    assert counter_tag("a", [("k", "v=x")]) != counter_tag("a", [("k=v", "x")])
    assert counter_tag("webshop", [("user", "alice")]) == "webshop|user=alice"


@pytest.mark.parametrize("value", ["}", "{x}", "a}b{c", "%7D", "a b", "ü", "\n", "#x"])
def test_no_value_can_move_the_hash_tag(value):
    tag = counter_tag("webshop", [("user", value)])
    assert "}" not in tag and "{" not in tag and " " not in tag and not tag.startswith("#")
    key = KeySpace("p").rate_limit(tag, compile_tree().domain("webshop").match([("user", "x")]).limit)
    assert hash_tag(key) == tag
    assert tag.isascii() and tag.isprintable()


def test_long_values_hash_to_a_bounded_tag():
    long_a = counter_tag("webshop", [("ua", "x" * 1000)])
    long_b = counter_tag("webshop", [("ua", "x" * 999 + "y")])
    assert long_a.startswith("#") and len(long_a) == 33 and long_a != long_b
    assert counter_tag("webshop", [("ua", "x" * 1000)]) == long_a


def test_the_same_entries_in_a_changed_tree_keep_their_counter_unless_the_rule_changed():
    """Reload: a counter's key depends on the node's name, algorithm and period only."""
    base = """
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: user, rate_limit: {unit: minute, requests_per_unit: %d, algorithm: %s}}
"""
    ks = KeySpace("t")

    def key(n: int, alg: str) -> str:
        hit = compile_tree(base % (n, alg)).domain("d").hit([("user", "alice")])
        return ks.rate_limit(hit.tag, hit.rule.limit)

    assert key(10, "fixed_window") == key(20, "fixed_window")
    assert key(10, "fixed_window") != key(10, "sliding_window")


# -- costs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("request_hits", "own", "expected"), [
    (0, None, 1), (1, None, 1), (4, None, 4), (4, 2, 2), (4, 0, 1), (0, 7, 7)])
def test_hits_addend_precedence(request_hits, own, expected):
    assert descriptor_hits(request_hits, own) == expected


def test_cost_is_capped_where_it_cannot_change_the_answer(tree):
    d = tree.domain("webshop")
    assert d.hit([("remote_address", "x")], hits=3).cost == 3
    assert d.hit([("remote_address", "x")], hits=2**64 - 1).cost == 6      # limit 5 + 1
    assert d.hit([("nope", "x")], hits=9).cost == 9 and d.hit([("nope", "x")]).rule is None
    vip = d.hit([("plan", "p"), ("user", "vip")], hits=2**40)
    assert vip.rule.unlimited and vip.cost == 2**40


# -- overrides --------------------------------------------------------------------------------

def test_override_replaces_the_tree_answer(tree):
    d = tree.domain("webshop")
    hit = d.hit([("user", "alice")], override=(42, "hour"))
    assert hit.rule.name == OVERRIDE_NAME and hit.rule.requests_per_unit == 42
    assert hit.rule.limit.algorithm is Algorithm.FIXED_WINDOW and hit.rule.limit.period == Period(3600)
    assert hit.tag == d.hit([("user", "alice")]).tag
    # overrides apply also where the tree has no limit
    assert d.hit([("nope", "x")], override=(1, "week")).rule.limit.period == Period(7 * 86_400)


def test_unusable_override_units_leave_the_tree_deciding(tree):
    d = tree.domain("webshop")
    assert override_rule(5, "year") is None
    assert d.hit([("user", "alice")], override=(5, "year")).rule.requests_per_unit == 20


def test_override_of_zero_rejects_everything():
    rule = override_rule(0, "second")
    assert rule is not None and rule.limit.limit == 0 and rule.cost(10) == 1


# -- problems ---------------------------------------------------------------------------------

def unchecked(text: str, source: str = "") -> cfgmod.Config:
    """The model without the cross-section checks (check-config refuses these configs; the compiled
    tree still defends itself)."""
    import yaml

    return cfgmod.Config.model_validate(yaml.safe_load(text))


def test_check_config_refuses_duplicate_nodes():
    with pytest.raises(cfgmod.ConfigError, match="duplicate descriptor user"):
        cfgmod.parse("""
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: user, rate_limit: {requests_per_unit: 1}}
    - {key: user, rate_limit: {requests_per_unit: 2}}
""", "<test>")


def test_duplicate_nodes_are_reported_with_their_path_and_the_first_wins():
    cfg = unchecked("""
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: user, rate_limit: {requests_per_unit: 1}}
    - key: plan
      descriptors:
      - {key: user, value: a, rate_limit: {requests_per_unit: 1}}
      - {key: user, value: a, rate_limit: {requests_per_unit: 2}}
    - {key: user, value: "", rate_limit: {requests_per_unit: 3}}
""", "<test>")
    assert problems(cfg.ratelimit_service) == [
        (("ratelimit_service", "domains", "0", "descriptors", "1", "descriptors", "1"),
         "duplicate descriptor user=a: descriptors.0 at this level already matches it; merge the two"),
        (("ratelimit_service", "domains", "0", "descriptors", "2"),
         "duplicate descriptor user (no value): descriptors.0 at this level already matches it; merge the two"),
    ]
    tree = Descriptors.compile(cfg.ratelimit_service)
    assert tree.domain("d").match([("user", "x")]).requests_per_unit == 1
    assert tree.domain("d").match([("plan", "p"), ("user", "a")]).requests_per_unit == 1


def test_limits_that_cannot_be_counted_exactly_are_reported():
    cfg = unchecked("""
ratelimit_service:
  domains:
  - domain: d
    descriptors:
    - {key: k, rate_limit: {requests_per_unit: 99999999999}}
""", "<test>")
    [(path, message)] = problems(cfg.ratelimit_service)
    assert path == ("ratelimit_service", "domains", "0", "descriptors", "0", "rate_limit")
    assert "must be below" in message
    assert Descriptors.compile(cfg.ratelimit_service).domain("d").match([("k", "v")]) is None


def test_the_shipped_example_has_no_problems():
    from tests.support.procs import ROOT

    cfg = cfgmod.load(ROOT / "envoy" / "examples" / "ratelimit-service.extproc.yaml")
    assert problems(cfg.ratelimit_service) == []
    assert compile_tree(TREE).problems == ()
