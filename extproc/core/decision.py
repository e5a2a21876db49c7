"""What a policy returns: allow, or deny with what the client should see.

A deny is a value, never an exception. services/ turns it into Envoy's reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .reasons import Reason


@dataclass(slots=True, frozen=True)
class Decision:
    allowed: bool
    reason: Reason
    status: int = 200                                   # HTTP status when denied
    headers: tuple[tuple[str, str], ...] = ()           # to add (to the request if allowed, the reply if denied)
    remove_headers: tuple[str, ...] = ()                # request headers to strip when allowed
    remove_query: tuple[str, ...] = ()                  # query parameters to strip when allowed
    body: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)   # dynamic metadata for later filters
    policy: str = ""
    rule: str = ""
    would_deny: bool = False                            # shadow mode: decided deny, allowed anyway
    response_headers: tuple[tuple[str, str], ...] = ()  # allowed: added to the client's response
    principal: Any = None                               # who was authenticated (core.authorize.Principal)


def allow(reason: Reason = Reason.OK, *, policy: str = "", rule: str = "",
          metadata: dict[str, str] | None = None, headers: tuple[tuple[str, str], ...] = (),
          would_deny: bool = False) -> Decision:
    return Decision(True, reason, headers=headers, metadata=metadata or {}, policy=policy,
                    rule=rule, would_deny=would_deny)


def json_body(status: int, reason: Reason, message: str, rule: str = "") -> bytes:
    body = {"error": _STATUS_WORDS.get(status, "error"), "reason": reason.value, "message": message}
    if rule and reason is Reason.RULE_DENIED:
        body["rule"] = rule             # the operator's rule name is the stable code for this deny
    return json.dumps(body, separators=(",", ":")).encode()


def deny(status: int, reason: Reason, message: str, *, policy: str = "", rule: str = "",
         headers: tuple[tuple[str, str], ...] = ()) -> Decision:
    return Decision(False, reason, status=status,
                    headers=(("content-type", "application/json"), *headers),
                    body=json_body(status, reason, message, rule), policy=policy, rule=rule)


_STATUS_WORDS = {401: "unauthorized", 403: "forbidden", 429: "too_many_requests", 404: "not_found",
                 431: "request_header_fields_too_large", 503: "unavailable"}
