"""The ext_proc stream as phases: what to do with each message Envoy sends.

Envoy sends, per HTTP exchange, request headers, then (optionally) bodies and trailers, then
response headers for the upstream's reply or Envoy's own local reply (503/504). The servicer
asks `Exchange.step(kind)` and performs the action it names; fixed rules live in the table
below. A stream that ends before response headers means the client went away (or a filter
before us answered): a normal end, counted, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    AWAIT_REQUEST_HEADERS = "await_request_headers"
    AWAIT_RESPONSE_HEADERS = "await_response_headers"
    AWAIT_RESPONSE_END = "await_response_end"


class Action(Enum):
    CONTINUE = "continue"                # reply CONTINUE, change nothing
    CONTINUE_WITH_TIMING = "timing"      # reply CONTINUE, add Server-Timing to the response


# (phase, message kind) -> (action, next phase); a kind not listed for a phase is answered
# CONTINUE and leaves the phase unchanged (Envoy config sent more than we asked for).
TABLE: dict[tuple[Phase, str], tuple[Action, Phase]] = {
    (Phase.AWAIT_REQUEST_HEADERS, "request_headers"): (Action.CONTINUE, Phase.AWAIT_RESPONSE_HEADERS),
    (Phase.AWAIT_RESPONSE_HEADERS, "response_headers"): (Action.CONTINUE_WITH_TIMING, Phase.AWAIT_RESPONSE_END),
}


@dataclass(slots=True)
class Exchange:
    phase: Phase = Phase.AWAIT_REQUEST_HEADERS
    decision_seconds: float = 0.0        # the sidecar's own time on this exchange

    def step(self, kind: str) -> Action:
        action, nxt = TABLE.get((self.phase, kind), (Action.CONTINUE, self.phase))
        self.phase = nxt
        return action

    def end_kind(self) -> str:
        """How a stream that ends now is counted."""
        if self.phase is Phase.AWAIT_RESPONSE_END:
            return "complete"
        if self.phase is Phase.AWAIT_RESPONSE_HEADERS:
            return "client_gone"         # no response headers: the client aborted or a filter replied
        return "empty"


def server_timing(seconds: float) -> str:
    return f"extproc;dur={seconds * 1000:.3f}"
