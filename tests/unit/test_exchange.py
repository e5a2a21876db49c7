"""core/exchange.py: the ext_proc stream's phase table, end kinds and Server-Timing format."""

from __future__ import annotations

import re

import pytest

from extproc.core.exchange import TABLE, Action, Exchange, Phase, server_timing

KINDS = ("request_headers", "request_body", "request_trailers",
         "response_headers", "response_body", "response_trailers")


def test_normal_sequence():
    ex = Exchange()
    assert ex.phase is Phase.AWAIT_REQUEST_HEADERS
    assert ex.step("request_headers") is Action.CONTINUE
    assert ex.phase is Phase.AWAIT_RESPONSE_HEADERS
    assert ex.step("response_headers") is Action.CONTINUE_WITH_TIMING
    assert ex.phase is Phase.AWAIT_RESPONSE_END
    assert ex.end_kind() == "complete"


def test_bodies_and_trailers_between_headers_change_nothing():
    ex = Exchange()
    assert [ex.step(k) for k in ("request_headers", "request_body", "request_body", "request_trailers",
                                 "response_headers", "response_body", "response_trailers")] == [
        Action.CONTINUE, Action.CONTINUE, Action.CONTINUE, Action.CONTINUE,
        Action.CONTINUE_WITH_TIMING, Action.CONTINUE, Action.CONTINUE]
    assert ex.phase is Phase.AWAIT_RESPONSE_END


UNLISTED = [(p, k) for p in Phase for k in (*KINDS, "", "something_new") if (p, k) not in TABLE]


@pytest.mark.parametrize(("phase", "kind"), UNLISTED)
def test_unlisted_kinds_continue_without_phase_change(phase, kind):
    ex = Exchange(phase=phase)
    assert ex.step(kind) is Action.CONTINUE
    assert ex.phase is phase


def test_table_names_the_header_steps_and_the_stored_body():
    assert TABLE == {
        (Phase.AWAIT_REQUEST_HEADERS, "request_headers"): (Action.CONTINUE, Phase.AWAIT_RESPONSE_HEADERS),
        (Phase.AWAIT_RESPONSE_HEADERS, "response_headers"): (Action.CONTINUE_WITH_TIMING, Phase.AWAIT_RESPONSE_END),
        (Phase.AWAIT_RESPONSE_BODY, "response_body"): (Action.CONTINUE, Phase.AWAIT_RESPONSE_END),
    }


def test_a_cache_answer_ends_the_exchange_and_a_lost_body_is_counted():
    ex = Exchange()
    ex.step("request_headers")
    ex.answer()
    assert ex.end_kind() == "answered"
    ex = Exchange()
    ex.step("request_headers")
    ex.step("response_headers")
    ex.expect_body()
    assert ex.end_kind() == "body_lost"
    assert ex.step("response_body") is Action.CONTINUE
    assert ex.end_kind() == "complete"


def test_response_headers_before_request_headers_get_no_timing():
    ex = Exchange()
    assert ex.step("response_headers") is Action.CONTINUE
    assert ex.phase is Phase.AWAIT_REQUEST_HEADERS


def test_second_response_headers_get_no_second_timing():
    ex = Exchange()
    ex.step("request_headers")
    ex.step("response_headers")
    assert ex.step("response_headers") is Action.CONTINUE
    assert ex.end_kind() == "complete"


@pytest.mark.parametrize(("steps", "end"), [
    ((), "empty"),
    (("request_body",), "empty"),
    (("request_headers",), "client_gone"),
    (("request_headers", "request_body", "request_trailers"), "client_gone"),
    (("request_headers", "response_headers"), "complete"),
    (("request_headers", "response_headers", "response_body"), "complete"),
])
def test_end_kind(steps, end):
    ex = Exchange()
    for k in steps:
        ex.step(k)
    assert ex.end_kind() == end


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "extproc;dur=0.000"),
    (0.0012345, "extproc;dur=1.234"),
    (0.25, "extproc;dur=250.000"),
    (1.5, "extproc;dur=1500.000"),
])
def test_server_timing_format(seconds, text):
    assert server_timing(seconds) == text
    # RFC: server-timing-metric = metric-name *( OWS ";" OWS server-timing-param ), dur in ms
    assert re.fullmatch(r"extproc;dur=\d+\.\d{3}", text)
