"""Envoy's rate-limit descriptors against extproc.yaml's `ratelimit_service` tree: which limit a
descriptor hits, and which counter it charges.

Theory of operation
-------------------
Envoy's native ratelimit filter sends, per request, a domain and a list of descriptors; each
descriptor is an ordered list of (key, value) entries built by a route's `rate_limits` actions,
e.g. [("remote_address", "203.0.113.7")] or [("plan", "gold"), ("user", "alice")]. The
configured domain is a tree of nodes (`key`, optional `value`, optional limit, children), as in
envoyproxy/ratelimit, and a descriptor is matched by walking the tree one entry per level,
exactly as envoyproxy/ratelimit's `GetLimit` does, so that its configs keep their meaning:

* At each level the entry (k, v) takes the most specific node: the node with key k and value
  v; else a node with key k whose value ends in `*` and is a prefix of v (the first such node in
  config order); else the value-less node with key k (it matches any value).
* The limit applies only when the node matched by the LAST entry has one. A descriptor with
  more entries than the tree is deep, or that ends on a node without a limit, has no limit.
* There is no backtracking: when the most specific node at a level has no child for the next
  entry, the walk ends without a limit even if a less specific sibling had one (as upstream).

The counter is per descriptor VALUE, not per node: a value-less `user` node gives every user
its own counter. A counter is identified by the domain and the request's entries (all of
them, with their values), and the matched node's name and algorithm/period (so a node whose
algorithm or period changes starts from fresh state). Two descriptors with the same entries
share one counter, as in envoyproxy/ratelimit. The domain and entries also form the Redis
Cluster hash tag (`counter_tag`): each counter's scripts run on one slot, and the counters of
different clients spread over the cluster.

Names. A node's `name` (or one derived from its path, e.g. `plan_gold.user`) is the metric
label `descriptor`, the rule named in `RateLimit-Policy`, and part of the store key. Derived
names are made unique within their domain.

Costs. A descriptor's cost is its own `hits_addend` when Envoy sends one, else the request's
`hits_addend`, else 1; 0 counts as 1 (the store has no read-only check; envoyproxy/ratelimit
also treats a request-level 0 as 1). A cost above the limit can never pass, so it is capped at
limit + 1: the answer is the same and the store can count it exactly.

Overrides. A descriptor may carry its own limit (`RateLimitOverride`, from Envoy's `limit`
action field); as upstream, it replaces the tree's answer for that descriptor (fixed window,
never shadow), but only in a configured domain. Units the windows cannot express (YEAR,
UNKNOWN) leave the override unused and the tree decides.

Everything here is pure: no protobuf, no store, no clock.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import quote

from .ratelimit import Algorithm, Limit

if TYPE_CHECKING:
    from ..config import RateLimitService, RlsDescriptor

Entry = tuple[str, str]

#: Envoy's RateLimit.Unit names for the configured units (the service maps them to the enum).
UNITS = ("second", "minute", "hour", "day", "month")
_OVERRIDE_PERIODS = {"second": "second", "minute": "minute", "hour": "hour", "day": "day", "week": "7d",
                     "month": "month"}
OVERRIDE_NAME = "override"
_NAME_MAX = 63
_TAG_MAX = 200
# characters kept as they are in a hash tag: printable, never `%` (the escape), `{` `}` (they
# would move the tag), `|` and `=` (the separators) or space
_TAG_SAFE = "!$&'()*+,-./:;<>?@[]^_`~"


class DescriptorConfigError(ValueError):
    """One problem of the `ratelimit_service` tree, with its key path in extproc.yaml."""

    def __init__(self, path: tuple[str, ...], message: str):
        super().__init__(f"{'.'.join(path)}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class DescriptorRule:
    """The limit of one configured node (or of a request's override).

    `limit` is None exactly when `unlimited`. `unit` and `requests_per_unit` are what the
    service reports as the descriptor's `current_limit`.
    """

    name: str
    path: str               # the node's place in the tree, e.g. `webshop.plan_gold.user`
    limit: Limit | None
    unit: str
    requests_per_unit: int
    unlimited: bool = False
    shadow: bool = False

    def cost(self, hits: int) -> int:
        """The units to charge for `hits` (>= 1, see `descriptor_hits`), capped where it cannot
        change the answer (see the module docstring)."""
        if self.limit is None:
            return hits
        return min(hits, self.limit.limit + 1)


@dataclass(frozen=True, slots=True)
class Hit:
    """What one descriptor of a request does: `rule` None means no limit applies."""

    rule: DescriptorRule | None
    tag: str                 # the counter's partition (its Redis Cluster hash tag)
    cost: int


@dataclass(slots=True)
class _Level:
    exact: dict[Entry, _Node] = field(default_factory=dict)
    prefixes: list[tuple[str, str, _Node]] = field(default_factory=list)   # (key, value prefix, node)
    any_value: dict[str, _Node] = field(default_factory=dict)

    def find(self, key: str, value: str) -> _Node | None:
        node = self.exact.get((key, value))
        if node is not None:
            return node
        for k, prefix, candidate in self.prefixes:
            if k == key and value.startswith(prefix):
                return candidate
        return self.any_value.get(key)

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes or self.any_value)


@dataclass(slots=True)
class _Node:
    rule: DescriptorRule | None
    children: _Level


@dataclass(frozen=True, slots=True)
class Domain:
    """One configured domain's tree, compiled."""

    name: str
    root: _Level = field(repr=False)
    rules: tuple[DescriptorRule, ...] = ()

    def match(self, entries: Sequence[Entry]) -> DescriptorRule | None:
        """The rule for a descriptor's entries, following envoyproxy/ratelimit (module docstring)."""
        level = self.root
        last = len(entries) - 1
        for i, (key, value) in enumerate(entries):
            node = level.find(key, value)
            if node is None:
                return None
            if i == last:
                return node.rule
            if not node.children:
                return None
            level = node.children
        return None

    def hit(self, entries: Sequence[Entry], *, hits: int = 1, override: tuple[int, str] | None = None) -> Hit:
        """One descriptor of a request: its rule (the override's when usable), counter tag and
        cost. `hits` is the descriptor's own hits_addend or the request's (`descriptor_hits`)."""
        rule = None
        if override is not None:
            rule = override_rule(*override)
        if rule is None:
            rule = self.match(entries)
        return Hit(rule, counter_tag(self.name, entries), hits if rule is None else rule.cost(hits))


def descriptor_hits(request_hits: int, own: int | None) -> int:
    """The descriptor's hits: its own hits_addend when sent, else the request's; at least 1."""
    n = request_hits if own is None else own
    return n if n >= 1 else 1


@dataclass(frozen=True, slots=True)
class Descriptors:
    """Every configured domain, compiled once per config; `problems` lists what the config
    loader should refuse (duplicate nodes, limits that cannot be counted exactly)."""

    domains: Mapping[str, Domain]
    problems: tuple[DescriptorConfigError, ...] = ()

    def domain(self, name: str) -> Domain | None:
        return self.domains.get(name)

    @classmethod
    def compile(cls, rls: RateLimitService) -> Descriptors:
        """Build the trees. Never raises: a duplicate node keeps the first (later ones are
        reported in `problems`), a limit that cannot be built is left out and reported."""
        problems: list[DescriptorConfigError] = []
        domains: dict[str, Domain] = {}
        for i, d in enumerate(rls.domains):
            base = ("ratelimit_service", "domains", str(i))
            names: set[str] = {n.name for n in _walk(d.descriptors) if n.name}
            rules: list[DescriptorRule] = []
            root = _compile_level(d.descriptors, base, (d.domain,), names, rules, problems)
            domains.setdefault(d.domain, Domain(d.domain, root, tuple(rules)))
        return cls(domains, tuple(problems))


def problems(rls: RateLimitService) -> list[tuple[tuple[str, ...], str]]:
    """The tree's problems as `Config.problems()` reports them: (key path, message)."""
    return [(p.path, p.message) for p in Descriptors.compile(rls).problems]


def _walk(nodes: Iterable[RlsDescriptor]) -> Iterable[RlsDescriptor]:
    for n in nodes:
        yield n
        yield from _walk(n.descriptors)


def _part(key: str, value: str | None) -> str:
    return key if not value else f"{key}_{value}"


def _derived_name(parts: Sequence[str], taken: set[str]) -> str:
    raw = ".".join(parts).lower()
    name = re.sub(r"_{2,}", "_", re.sub(r"[^a-z0-9_.-]", "_", raw))
    name = re.sub(r"^[^a-z0-9]+", "", name)[:_NAME_MAX].rstrip("_") or "descriptor"
    if name not in taken:
        return name
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = name[:_NAME_MAX - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def _compile_level(nodes: Sequence[RlsDescriptor], base: tuple[str, ...], path: tuple[str, ...],
                   names: set[str], rules: list[DescriptorRule],
                   problems: list[DescriptorConfigError]) -> _Level:
    level = _Level()
    seen: dict[tuple[str, str], int] = {}
    for j, node in enumerate(nodes):
        where = (*base, "descriptors", str(j))
        value = node.value or None            # "" means value-less, as upstream
        ident = (node.key, value or "")
        if ident in seen:
            shown = f"{node.key}={value}" if value else f"{node.key} (no value)"
            problems.append(DescriptorConfigError(
                where, f"duplicate descriptor {shown}: descriptors.{seen[ident]} at this level already "
                       "matches it; merge the two"))
            continue
        seen[ident] = j
        node_path = (*path, _part(node.key, value))
        rule = None
        if node.rate_limit is not None:
            rule = _rule(node, node_path, where, names, problems)
            if rule is not None:
                rules.append(rule)
        compiled = _Node(rule, _compile_level(node.descriptors, where, node_path, names, rules, problems))
        if value is None:
            level.any_value[node.key] = compiled
        elif value.endswith("*"):
            level.prefixes.append((node.key, value[:-1], compiled))
        else:
            level.exact[(node.key, value)] = compiled
    return level


def _rule(node: RlsDescriptor, node_path: tuple[str, ...], where: tuple[str, ...], names: set[str],
          problems: list[DescriptorConfigError]) -> DescriptorRule | None:
    rl = node.rate_limit
    assert rl is not None
    if node.name:
        name = node.name
    else:
        name = _derived_name(node_path[1:], names)
        names.add(name)
    full = ".".join(node_path)
    if rl.unlimited:
        return DescriptorRule(name, full, None, rl.unit, rl.requests_per_unit, unlimited=True, shadow=node.shadow_mode)
    try:
        limit = Limit.from_rule(name, Algorithm(rl.algorithm), rl.requests_per_unit, rl.unit)
    except ValueError as exc:
        problems.append(DescriptorConfigError((*where, "rate_limit"), str(exc)))
        return None
    return DescriptorRule(name, full, limit, rl.unit, rl.requests_per_unit, shadow=node.shadow_mode)


@lru_cache(maxsize=256)
def override_rule(requests_per_unit: int, unit: str) -> DescriptorRule | None:
    """A request's own limit (`RateLimitOverride`): a fixed window of `requests_per_unit` per
    `unit` (second, minute, hour, day, week, month); None for a unit the windows cannot
    express. Cached: Envoy sends the same few overrides again and again."""
    period = _OVERRIDE_PERIODS.get(unit)
    if period is None:
        return None
    try:
        limit = Limit.from_rule(OVERRIDE_NAME, Algorithm.FIXED_WINDOW, requests_per_unit, period)
    except ValueError:
        return None
    return DescriptorRule(OVERRIDE_NAME, OVERRIDE_NAME, limit, unit, requests_per_unit)


def _escape(text: str) -> str:
    return quote(text, safe=_TAG_SAFE)


def counter_tag(domain: str, entries: Sequence[Entry]) -> str:
    """The counter's partition for a descriptor: its domain and every entry with its value,
    escaped so that no value can end the Redis hash tag or forge another descriptor's tag
    (`webshop|user=alice`). Longer than 200 characters: a 128-bit digest of that text
    (`#` + hex; `#` never starts an escaped tag)."""
    text = "|".join((_escape(domain), *(f"{_escape(k)}={_escape(v)}" for k, v in entries)))
    if len(text) > _TAG_MAX:
        return "#" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return text
