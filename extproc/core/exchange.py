"""The ext_proc stream as phases: what to do with each message Envoy sends.

Envoy sends, per HTTP exchange, request headers, then (optionally) bodies and trailers, then
response headers for the upstream's reply or Envoy's own local reply (503/504). The servicer
asks `Exchange.step(kind)` and performs the action it names; fixed rules live in the tables
below. A stream that ends before response headers means the client went away (or a filter
before us answered): a normal end, counted, never an error.

The message that `opens` the exchange (request headers) is where the concurrency permit is
taken (core/concurrency.py). Over the cap, `step(kind, over_limit=True)` follows `OVER_LIMIT`
instead: REJECT (an ImmediateResponse) and the exchange is over; Envoy sends nothing more for
it (no response headers for its own immediate response), then ends the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    AWAIT_REQUEST_HEADERS = "await_request_headers"
    AWAIT_RESPONSE_HEADERS = "await_response_headers"
    AWAIT_RESPONSE_BODY = "await_response_body"   # a response to store: its body was asked for (BUFFERED)
    AWAIT_RESPONSE_END = "await_response_end"
    REJECTED = "rejected"                # answered at request headers; nothing more is expected
    ANSWERED = "answered"                # answered from the cache (an ImmediateResponse); nothing more comes


class Action(Enum):
    CONTINUE = "continue"                # reply CONTINUE, change nothing
    CONTINUE_WITH_TIMING = "timing"      # reply CONTINUE, add Server-Timing to the response
    REJECT = "reject"                    # reply with an ImmediateResponse (over the concurrency cap)


# (phase, message kind) -> (action, next phase); a kind not listed for a phase is answered
# CONTINUE and leaves the phase unchanged (Envoy config sent more than we asked for).
TABLE: dict[tuple[Phase, str], tuple[Action, Phase]] = {
    (Phase.AWAIT_REQUEST_HEADERS, "request_headers"): (Action.CONTINUE, Phase.AWAIT_RESPONSE_HEADERS),
    (Phase.AWAIT_RESPONSE_HEADERS, "response_headers"): (Action.CONTINUE_WITH_TIMING, Phase.AWAIT_RESPONSE_END),
    (Phase.AWAIT_RESPONSE_BODY, "response_body"): (Action.CONTINUE, Phase.AWAIT_RESPONSE_END),
}

# The same steps when the concurrency cap is full: only the opening message can be rejected.
OVER_LIMIT: dict[tuple[Phase, str], tuple[Action, Phase]] = {
    (Phase.AWAIT_REQUEST_HEADERS, "request_headers"): (Action.REJECT, Phase.REJECTED),
}


@dataclass(slots=True)
class Exchange:
    phase: Phase = Phase.AWAIT_REQUEST_HEADERS
    decision_seconds: float = 0.0        # the sidecar's own time on this exchange

    def opens(self, kind: str) -> bool:
        """`kind` starts the exchange now: the message a concurrency permit is taken at."""
        return (self.phase, kind) in OVER_LIMIT

    def step(self, kind: str, over_limit: bool = False) -> Action:
        key = (self.phase, kind)
        action, nxt = (over_limit and OVER_LIMIT.get(key)) or TABLE.get(key, (Action.CONTINUE, self.phase))
        self.phase = nxt
        return action

    def answer(self) -> None:
        """The cache answered (an ImmediateResponse): Envoy sends nothing more for this exchange."""
        self.phase = Phase.ANSWERED

    def expect_body(self) -> None:
        """The response is to be stored: its body comes next (mode override to BUFFERED)."""
        self.phase = Phase.AWAIT_RESPONSE_BODY

    def end_kind(self) -> str:
        """How a stream that ends now is counted."""
        if self.phase is Phase.AWAIT_RESPONSE_END:
            return "complete"
        if self.phase is Phase.AWAIT_RESPONSE_HEADERS:
            return "client_gone"         # no response headers: the client aborted or a filter replied
        if self.phase is Phase.REJECTED:
            return "rejected"            # over the concurrency cap, answered by us
        if self.phase is Phase.ANSWERED:
            return "answered"            # a cache hit (or a stale entry standing in for an error)
        if self.phase is Phase.AWAIT_RESPONSE_BODY:
            return "body_lost"           # the client went away (or Envoy gave up) before the body was read
        return "empty"


def server_timing(seconds: float) -> str:
    return f"extproc;dur={seconds * 1000:.3f}"
