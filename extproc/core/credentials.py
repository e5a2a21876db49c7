"""Where a credential comes from, and when it is refused before anyone checks it.

A provider (or the API-key section) lists its token sources in order: a header with an optional
scheme prefix (`Authorization: Bearer ...`), a cookie or a query parameter. Precedence is the
order listed, but there is no "first one wins": when several sources carry a credential they
must all carry the same one, else the request is refused as `token_ambiguous` — otherwise a
client could present a good token where one check looks and a forged one where another looks.
The same holds inside one source: two Authorization headers (Envoy joins them with a comma),
two cookies or two query parameters of that name are ambiguous. RFC 6750 tokens never contain
a comma, so a comma always means two values.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from .request import Request

MAX_CREDENTIAL_BYTES = 16384


@dataclass(frozen=True, slots=True)
class Source:
    kind: str                   # "header" | "cookie" | "query"
    name: str
    prefix: str = ""            # lower-cased scheme prefix for headers, e.g. "bearer "

    @staticmethod
    def header(name: str, prefix: str | None = None) -> Source:
        return Source("header", name.lower(), (prefix or "").lower())

    def describe(self) -> str:
        if self.kind == "header":
            return f"header {self.name}" + (f" ({self.prefix.strip()})" if self.prefix else "")
        return f"{self.kind} {self.name}"


AMBIGUOUS = object()   # sentinel: the source holds two different credentials


def _from_header(req: Request, src: Source) -> str | object | None:
    value = req.headers.get(src.name)
    if value is None:
        return None
    return header_value(value, src)


def header_value(value: str, src: Source) -> str | object | None:
    """The credential in one header's value (its scheme prefix removed), AMBIGUOUS or None."""
    if src.prefix:
        if value[:len(src.prefix)].lower() != src.prefix:
            return None
        value = value[len(src.prefix):]
    value = value.strip()
    if not value:
        return None
    if "," in value:
        return AMBIGUOUS
    return value


def extract_header(value: str, src: Source) -> str | None:
    """The credential in a header value, None when absent or ambiguous."""
    got = header_value(value, src)
    return got if isinstance(got, str) else None


def _from_cookie(req: Request, src: Source) -> str | object | None:
    header = req.headers.get("cookie")
    if not header:
        return None
    found: str | None = None
    for part in header.replace(",", ";").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == src.name:
            value = value.strip().strip('"')
            if found is not None and value != found:
                return AMBIGUOUS
            found = value
    return found or None


def _from_query(req: Request, src: Source) -> str | object | None:
    _, sep, query = req.path.partition("?")
    if not sep or src.name not in query:
        return None
    values = {v for k, v in parse_qsl(query, keep_blank_values=False) if k == src.name}
    if len(values) > 1:
        return AMBIGUOUS
    return values.pop() if values else None


_READERS = {"header": _from_header, "cookie": _from_cookie, "query": _from_query}


def extract(req: Request, sources: tuple[Source, ...]) -> tuple[str | None, bool]:
    """(credential, ambiguous). A credential over MAX_CREDENTIAL_BYTES counts as ambiguous."""
    found: str | None = None
    for src in sources:
        value = _READERS[src.kind](req, src)
        if value is None:
            continue
        if value is AMBIGUOUS or len(value) > MAX_CREDENTIAL_BYTES:  # type: ignore[arg-type]
            return None, True
        if found is not None and value != found:
            return None, True
        found = value  # type: ignore[assignment]
    return found, False


def strip_query_credentials(path: str, names: frozenset[str]) -> str | None:
    """The path without credential query parameters (so they never reach the upstream's logs),
    or None when there were none."""
    base, sep, query = path.partition("?")
    if not sep or not any(n in query for n in names):
        return None
    kept = [p for p in query.split("&") if p.partition("=")[0] not in names]
    return base + ("?" + "&".join(kept) if kept else "")
