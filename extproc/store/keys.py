"""How store keys are named, and why every key carries a `{hash tag}`.

Redis Cluster places a key in one of 16384 slots by hashing the key, except that when the
key contains `{...}` with something inside, only that part is hashed. A Lua script (and any
multi-key command) may only touch keys of one slot, or the cluster answers CROSSSLOT. So
every key is built as

    <prefix>:<namespace>:{<tag>}:<part>:<part>...

and the keys that one script touches share the same `tag` (for example the rate-limit
counter and its companion keys for one client and rule). The tag is the *first* `{` in the
key, which is why the prefix and the namespace may not contain braces, and it must be
non-empty and free of `}` or Redis would hash the whole key instead. On standalone Redis and
in memory the tag is merely part of the name, so one key layout serves every backend.

Pub/sub channels are not keys: a classic PUBLISH on Redis Cluster is broadcast to every
node over the cluster bus and the channel name is never hashed, so `channel()` names carry
no tag — only the prefix, which keeps two deployments sharing one Redis from hearing each
other. (Sharded pub/sub, SPUBLISH, would hash the name; it is not used.)

The prefix is configurable (extproc.yaml `store.key_prefix`) so that several deployments
can share one Redis, and tests isolate themselves by giving each test its own prefix instead
of flushing a shared server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc.core.ratelimit import Limit

DEFAULT_PREFIX = "extproc"

# Namespaces in use; one place so two features never collide.
RATE_LIMIT = "rl"
CONCURRENCY = "cc"
CACHE = "cache"
BREAKER = "br"
REVOKED = "revoked"


def _check_plain(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"store key {what} must not be empty")
    if "{" in value or "}" in value:
        raise ValueError(f"store key {what} must not contain '{{' or '}}' (it would move the hash tag): {value!r}")


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds keys under one prefix; `KeySpace("t-1234").key("rl", "api-7", "minute")`."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        _check_plain("prefix", self.prefix)

    def key(self, namespace: str, tag: str, *parts: str) -> str:
        """`<prefix>:<namespace>:{<tag>}[:<part>...]`; keys with equal tags share a slot."""
        _check_plain("namespace", namespace)
        if not tag or "}" in tag:
            raise ValueError(f"store key hash tag must be non-empty and without '}}': {tag!r}")
        head = f"{self.prefix}:{namespace}:{{{tag}}}"
        return ":".join((head, *parts)) if parts else head

    def rate_limit(self, tag: str, limit: Limit) -> str:
        """`<prefix>:rl:{<tag>}:<rule>:<state>`, one rule's counter state for one partition.

        `tag` is the partition the rule counts by (a user id, an org, an API key, an IP, or
        the rule name for a global limit). Rules of one request whose tags are equal land in
        one slot and are decided in one atomic script, so pick the tag as the coarsest
        partition the request's rules share (e.g. the user id for "per user" and "per user
        and route"); rules with other tags (an org's quota) cost a second slot's script and
        a refund when rejected. `<state>` names the algorithm and period (`fw.60s`, `sw.1mo`,
        `tb`): a rule whose algorithm or period changes starts from fresh state instead of
        misreading the old one.
        """
        return self.key(RATE_LIMIT, tag, limit.name, limit.state_suffix)

    def channel(self, namespace: str, name: str) -> str:
        """`<prefix>:<namespace>:<name>`, a pub/sub channel (no hash tag: see the module docstring)."""
        _check_plain("namespace", namespace)
        if not name:
            raise ValueError("channel name must not be empty")
        return f"{self.prefix}:{namespace}:{name}"


_default = KeySpace()


def configure_prefix(prefix: str) -> None:
    """Set the process-wide prefix (done once by the config loader)."""
    global _default
    _default = KeySpace(prefix)


def current() -> KeySpace:
    return _default


def key(namespace: str, tag: str, *parts: str) -> str:
    """A key under the process-wide prefix; see the module docstring for the layout."""
    return _default.key(namespace, tag, *parts)


def rate_limit(tag: str, limit: Limit) -> str:
    """A rate-limit state key under the process-wide prefix; see `KeySpace.rate_limit`."""
    return _default.rate_limit(tag, limit)


def channel(namespace: str, name: str) -> str:
    """A pub/sub channel under the process-wide prefix."""
    return _default.channel(namespace, name)


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes (the whole key when it has no usable tag)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key
