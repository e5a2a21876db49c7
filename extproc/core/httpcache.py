"""HTTP caching rules (RFC 9111, with RFC 5861's stale extensions and RFC 9211's Cache-Status)
for a shared cache: pure functions, no I/O, the servicer in services/cache.py drives them.

What a shared cache must do, as this module decides it:

* **May the request use the cache?** Only GET and HEAD (HEAD is answered from the GET entry);
  never a Range request, an upgrade (WebSocket), an event stream, gRPC, or a request whose
  Cache-Control says no-store. `Cache-Control: no-cache` or `max-age=0` on the request makes a
  stored entry unusable without revalidation (the request goes upstream and may refresh it).
* **May the response be stored (§3)?** Its status is one the rule lists; no `no-store`, no
  `private` (this is a shared cache); no `Set-Cookie`; no `Vary: *`; a Content-Length within the
  body limit (a response without one is not stored: its size is unknown before it is read).
  A response to an *authenticated* request (authenticated is what the identity decision said,
  never the presence of a header: ext_authz strips Authorization before ext_proc runs) is stored
  only when the response allows it (`public`, `s-maxage`, `must-revalidate`, §3.5) or the rule
  keys entries by user. It must have a freshness lifetime: explicit (`s-maxage`, `max-age`,
  `Expires`) or the rule's default TTL when the response says nothing; `no-cache` responses
  are stored only with a validator (ETag or Last-Modified) since every use revalidates.
* **Freshness (§4.2):** lifetime = s-maxage, else max-age, else Expires - Date, else the
  rule's default; capped by the rule's max TTL. Age = the upstream's Age header (plus the
  time the response took, corrected_initial_age of §4.2.3) plus the time since it was stored.
* **Stale (§4.2.4, RFC 5861):** never served when `must-revalidate`, `proxy-revalidate` or
  `s-maxage` (which implies proxy-revalidate) is present; otherwise within
  `stale-while-revalidate` (from the response, else the rule) while one request revalidates,
  and within `stale-if-error` in place of a 5xx.
* **Conditional requests (RFC 9110 §13):** If-None-Match (weak comparison, `*`) decides when
  present, else If-Modified-Since against Last-Modified; a match is answered 304.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from .._proto.cache_entry_pb2 import CacheEntry, Header

FORMAT_VERSION = 1

# RFC 9110 §15.1: heuristically cacheable statuses (a default for rules)
DEFAULT_STATUSES = (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501)

# hop-by-hop and per-response fields never stored (RFC 9111 §3.1); Age is recomputed on every hit
_UNSTORED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
                       "trailer", "proxy-authenticate", "proxy-authorization", "age", "date",
                       "x-cache-status", "cache-status", "server-timing", "x-envoy-upstream-service-time",
                       "content-length"})
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')
_DIRECTIVE = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?\s*(?:,|$)')


# -- parsing ------------------------------------------------------------------------------------

def cache_control(value: str | None) -> dict[str, str]:
    """Directives by lower-cased name, values unquoted ("" when absent). Unparsable text is
    skipped; a repeated directive keeps its first value."""
    out: dict[str, str] = {}
    if not value:
        return out
    pos, n = 0, len(value)
    while pos < n:
        m = _DIRECTIVE.match(value, pos)
        if m is None or m.end() == pos:
            nxt = value.find(",", pos)        # skip garbage up to the next comma
            if nxt < 0:
                break
            pos = nxt + 1
            continue
        name, raw = m.group(1).lower(), m.group(2)
        if raw and raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out.setdefault(name, raw or "")
        pos = m.end()
    return out


def seconds(directives: Mapping[str, str], name: str) -> int | None:
    """A delta-seconds directive (§1.2.2); invalid values count as absent, huge ones are capped."""
    raw = directives.get(name)
    if raw is None or not raw.isdigit():
        return None
    return min(int(raw), 2**31 - 1)


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return dt.timestamp() if dt.tzinfo is not None else None


def header_list(value: str | None) -> list[str]:
    return [v.strip().lower() for v in (value or "").split(",") if v.strip()]


# -- the request side ---------------------------------------------------------------------------

def request_bypass(method: str, headers: Mapping[str, str], methods: Iterable[str]) -> str | None:
    """Why this request cannot use the cache (a Cache-Status / metric reason), or None."""
    if method not in methods:
        return "method"
    if "range" in headers:
        return "range"
    if "upgrade" in headers or "upgrade" in header_list(headers.get("connection")):
        return "upgrade"
    if "text/event-stream" in headers.get("accept", ""):
        return "event_stream"
    if headers.get("content-type", "").startswith("application/grpc"):
        return "grpc"
    if "no-store" in cache_control(headers.get("cache-control")):
        return "no_store"
    return None


def request_wants_revalidation(headers: Mapping[str, str]) -> bool:
    """`no-cache` or `max-age=0` on the request (or Pragma: no-cache without Cache-Control)."""
    if "cache-control" not in headers:
        return "no-cache" in headers.get("pragma", "").lower()
    cc = cache_control(headers.get("cache-control"))
    return "no-cache" in cc or cc.get("max-age") == "0"


def normalise_query(query: str, mode: str, ignore: Iterable[str] = (), only: Iterable[str] | None = None) -> str:
    """The query as the key sees it. `sorted`: parameters sorted (values kept in their order),
    `as_is`: unchanged, `ignore`: dropped entirely. `ignore` drops named parameters (a trailing
    `*` matches a prefix, e.g. `utm_*`); `only`, when given, keeps just those."""
    if mode == "ignore" or not query:
        return ""
    if mode == "as_is" and not ignore and only is None:
        return query
    exact = {p for p in ignore if not p.endswith("*")}
    prefixes = tuple(p[:-1] for p in ignore if p.endswith("*"))
    keep = None if only is None else set(only)
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
             if k not in exact and not (prefixes and k.startswith(prefixes)) and (keep is None or k in keep)]
    if mode == "sorted":
        pairs.sort(key=lambda kv: kv[0])
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


def digest(*parts: str) -> str:
    """A fixed-length key from its parts (separated so that no two lists of parts collide)."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        b = p.encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return h.hexdigest()


def variant_key(primary: str, vary: Iterable[str], headers: Mapping[str, str]) -> str:
    """The key of the variant this request selects (§4.1): the primary key plus the request's
    values of the Vary fields, whitespace-normalised."""
    parts = [primary]
    for name in vary:
        parts.append(name)
        parts.append(" ".join(headers.get(name, "").split()))
    return digest(*parts)


def not_modified(headers: Mapping[str, str], etag: str, last_modified: str) -> bool:
    """RFC 9110 §13.2.2: If-None-Match decides when present, else If-Modified-Since."""
    inm = headers.get("if-none-match")
    if inm is not None:
        if not etag:
            return False
        if inm.strip() == "*":
            return True
        wanted = etag.removeprefix("W/")
        return any(t.removeprefix("W/") == wanted for t in _ENTITY_TAG.findall(inm))
    ims = http_date(headers.get("if-modified-since"))
    lm = http_date(last_modified)
    return ims is not None and lm is not None and lm <= ims


def has_conditionals(headers: Mapping[str, str]) -> bool:
    return "if-none-match" in headers or "if-modified-since" in headers


# -- the response side --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StorePolicy:
    """A rule's storage settings, as the functions below need them."""
    statuses: frozenset[int]
    default_ttl: float | None            # seconds when the response gives no freshness
    max_ttl: float
    max_body_bytes: int
    per_user: bool
    stale_while_revalidate: float = 0.0  # when the response does not say
    stale_if_error: float = 0.0


@dataclass(frozen=True, slots=True)
class Storable:
    """The verdict on a response: `reason` says why not, else the lifetimes to store with."""
    reason: str = ""
    lifetime: float = 0.0                # freshness lifetime, seconds
    initial_age: float = 0.0
    swr: float = 0.0
    sie: float = 0.0
    must_revalidate: bool = False
    no_cache: bool = False
    vary: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reason


def storable(status: int, headers: Mapping[str, str], policy: StorePolicy, *, authenticated: bool,
             request_time: float, response_time: float) -> Storable:
    """§3: whether a response to a GET may be stored, and for how long it is fresh."""
    if status not in policy.statuses:
        return Storable("status")
    cc = cache_control(headers.get("cache-control"))
    if "no-store" in cc:
        return Storable("no_store")
    if "private" in cc and not policy.per_user:
        # qualified private="field" would allow storing without the field; not worth the risk
        return Storable("private")
    if "set-cookie" in headers:
        return Storable("set_cookie")
    ctype = headers.get("content-type", "")
    if ctype.startswith(("text/event-stream", "application/grpc")):
        return Storable("streaming")
    vary = tuple(sorted(set(header_list(headers.get("vary")))))
    if "*" in vary:
        return Storable("vary_star")
    length = headers.get("content-length")
    if length is None or not length.isdigit():
        return Storable("no_content_length")
    if int(length) > policy.max_body_bytes:
        return Storable("too_large")
    s_maxage = seconds(cc, "s-maxage")
    must_revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc or s_maxage is not None
    if authenticated and not policy.per_user and not ("public" in cc or s_maxage is not None
                                                       or "must-revalidate" in cc):
        return Storable("authenticated")
    no_cache = "no-cache" in cc and cc["no-cache"] == ""     # qualified no-cache="f" treated as storable
    if no_cache and not (headers.get("etag") or headers.get("last-modified")):
        return Storable("no_cache_without_validator")
    lifetime = _lifetime(cc, s_maxage, headers, policy.default_ttl)
    if lifetime is None:
        return Storable("no_freshness")
    lifetime = min(lifetime, policy.max_ttl)
    # §4.2.3 corrected_initial_age: the upstream's Age plus the time the response took
    age_value = headers.get("age", "")
    initial_age = (int(age_value) if age_value.isdigit() else 0) + max(0.0, response_time - request_time)
    if lifetime <= initial_age and not no_cache and not must_revalidate:
        swr = _stale_window(cc, "stale-while-revalidate", policy.stale_while_revalidate)
        sie = _stale_window(cc, "stale-if-error", policy.stale_if_error)
        if swr <= 0 and sie <= 0 and not (headers.get("etag") or headers.get("last-modified")):
            return Storable("already_stale")
    stale_ok = not must_revalidate
    return Storable(lifetime=lifetime, initial_age=initial_age,
                    swr=_stale_window(cc, "stale-while-revalidate", policy.stale_while_revalidate) if stale_ok else 0.0,
                    sie=_stale_window(cc, "stale-if-error", policy.stale_if_error) if stale_ok else 0.0,
                    must_revalidate=must_revalidate, no_cache=no_cache, vary=vary)


def _lifetime(cc: Mapping[str, str], s_maxage: int | None, headers: Mapping[str, str],
              default_ttl: float | None) -> float | None:
    if s_maxage is not None:
        return float(s_maxage)
    max_age = seconds(cc, "max-age")
    if max_age is not None:
        return float(max_age)
    if "expires" in headers:
        expires = http_date(headers["expires"])
        if expires is None:
            return 0.0                      # §5.3: an invalid Expires means already expired
        date = http_date(headers.get("date"))
        return max(0.0, expires - date) if date is not None else 0.0
    if "no-cache" in cc:
        return 0.0
    return default_ttl


def _stale_window(cc: Mapping[str, str], name: str, default: float) -> float:
    value = seconds(cc, name)
    return float(value) if value is not None else default


def tags_of(headers: Mapping[str, str], names: Iterable[str] = ("cache-tag", "surrogate-key")) -> list[str]:
    """Purge tags: Cache-Tag is comma-separated, Surrogate-Key space-separated."""
    out: list[str] = []
    for name in names:
        value = headers.get(name)
        if value:
            out.extend(t for t in re.split(r"[,\s]+", value) if t)
    return sorted(set(out))


# -- entries ------------------------------------------------------------------------------------

def build_entry(status: int, headers: Iterable[tuple[str, bytes]], body: bytes, verdict: Storable, *,
                url: str, tags: Iterable[str], request_time: float, response_time: float,
                etag: str, last_modified: str) -> CacheEntry:
    stored = [Header(name=k, value=v) for k, v in headers if k not in _UNSTORED and not k.startswith(":")]
    return CacheEntry(
        format_version=FORMAT_VERSION, status=status, headers=stored, body=body,
        stored_at_ms=int(response_time * 1000), request_time_ms=int(request_time * 1000),
        expires_at_ms=int((response_time + verdict.lifetime - verdict.initial_age) * 1000),
        etag=etag, last_modified=last_modified, vary=list(verdict.vary), url=url, tags=list(tags),
        stale_while_revalidate_ms=int(verdict.swr * 1000), stale_if_error_ms=int(verdict.sie * 1000),
        must_revalidate=verdict.must_revalidate, no_cache=verdict.no_cache,
        initial_age_ms=int(verdict.initial_age * 1000))


def vary_stub(vary: Iterable[str], url: str, request_time: float, keep_until: float) -> CacheEntry:
    return CacheEntry(format_version=FORMAT_VERSION, vary=list(vary), vary_stub=True, url=url,
                      request_time_ms=int(request_time * 1000), expires_at_ms=int(keep_until * 1000))


def decode(raw: bytes) -> CacheEntry | None:
    """An entry from its stored bytes; None (a miss) for garbage or an unknown format version."""
    entry = CacheEntry()
    try:
        entry.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - DecodeError, or worse for truncated bytes
        return None
    if entry.format_version != FORMAT_VERSION:
        return None
    return entry


def refreshed(entry: CacheEntry, headers: Iterable[tuple[str, bytes]], verdict: Storable, *,
              request_time: float, response_time: float) -> CacheEntry:
    """§4.3.4: a 304 refreshes the stored entry: its header fields replace the stored ones
    (except Content-Length and the like), and the freshness starts again."""
    fresh = CacheEntry()
    fresh.CopyFrom(entry)
    updates = {k: v for k, v in headers if k not in _UNSTORED and not k.startswith(":")}
    kept = [h for h in entry.headers if h.name not in updates]
    del fresh.headers[:]
    fresh.headers.extend(kept)
    fresh.headers.extend(Header(name=k, value=v) for k, v in updates.items())
    fresh.stored_at_ms = int(response_time * 1000)
    fresh.request_time_ms = int(request_time * 1000)
    fresh.expires_at_ms = int((response_time + verdict.lifetime - verdict.initial_age) * 1000)
    fresh.stale_while_revalidate_ms = int(verdict.swr * 1000)
    fresh.stale_if_error_ms = int(verdict.sie * 1000)
    fresh.must_revalidate = verdict.must_revalidate
    fresh.no_cache = verdict.no_cache
    fresh.initial_age_ms = int(verdict.initial_age * 1000)
    if "etag" in updates:
        fresh.etag = updates["etag"].decode("latin-1")
    if "last-modified" in updates:
        fresh.last_modified = updates["last-modified"].decode("latin-1")
    return fresh


def age(entry: CacheEntry, now: float) -> int:
    """Current age in whole seconds (§4.2.3: corrected initial age + resident time), as Age carries it."""
    return max(0, int((entry.initial_age_ms + now * 1000 - entry.stored_at_ms) / 1000))


def state(entry: CacheEntry, now: float, request_revalidates: bool = False) -> str:
    """`fresh`, `stale_revalidate` (servable while one request revalidates), `stale_if_error`
    (servable only in place of an error), or `stale` (revalidate or fetch)."""
    now_ms = now * 1000
    if now_ms < entry.expires_at_ms and not entry.no_cache and not request_revalidates:
        return "fresh"
    if entry.must_revalidate or entry.no_cache or request_revalidates:
        return "stale"
    past = now_ms - entry.expires_at_ms
    if past < entry.stale_while_revalidate_ms:
        return "stale_revalidate"
    if past < entry.stale_if_error_ms:
        return "stale_if_error"
    return "stale"


def may_stand_in(entry: CacheEntry, now: float) -> bool:
    """RFC 5861 stale-if-error: a stale entry may answer in place of a 5xx within its window."""
    if entry.must_revalidate or entry.no_cache:
        return False
    past = now * 1000 - entry.expires_at_ms
    return past < entry.stale_if_error_ms


def keep_ms(entry: CacheEntry, now: float) -> int:
    """How long the store should keep the entry: until no rule could use it any more (stale
    windows; validators make even an expired entry worth a revalidation for a while)."""
    horizon = entry.expires_at_ms + max(entry.stale_while_revalidate_ms, entry.stale_if_error_ms)
    if entry.etag or entry.last_modified:
        horizon = max(horizon, entry.expires_at_ms + 3_600_000)
    return max(1000, int(horizon - now * 1000))
