"""The plain view of one HTTP request that every policy decides on.

services/ builds it from Envoy's CheckRequest or ext_proc headers; core/ never sees protobuf.
Header names are lower-case (HTTP/2 and Envoy already normalise them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    policy: str | None = None             # policy name chosen per route in envoy.yaml
    client_ip: str = ""
    request_id: str = ""                  # Envoy's x-request-id, read never rewritten
    route: str = ""
    extras: dict[str, str] = field(default_factory=dict)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)
