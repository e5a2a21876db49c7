"""services/authz.py writes allowed replies as bytes: the part from the grant serialised once per
grant, the per-request rate-limit headers written field by field, Server-Timing appended. Each
must parse to exactly the message the protobuf builder makes (to_check_response)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb

from extproc.core.decision import Decision, deny
from extproc.core.reasons import Reason
from extproc.services import authz

IDENTITY = (("x-user-id", "alice"), ("x-user-scopes", "orders:read orders:write"))
LIMITS = (("x-ratelimit-limit", "1000"), ("x-ratelimit-remaining", "998"), ("x-ratelimit-reset", "60"),
          ("ratelimit-policy", '"per-user";q=1000;w=60'), ("ratelimit", '"per-user";r=998;t=60'))


def reference(d: Decision, elapsed: float) -> pb.CheckResponse:
    """The builder's message, with the Server-Timing reply_bytes adds (whole microseconds)."""
    resp = pb.CheckResponse()
    resp.CopyFrom(authz.to_check_response(d))
    if d.allowed:
        resp.ok_response.response_headers_to_add.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="server-timing", value=f"authz;dur={int(elapsed * 1e6) / 1000:.3f}"),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD))
    return resp


def test_allowed_replies_parse_to_the_builders_message():
    meta = {"sub": "alice", "policy": "api", "scopes": ["a", "b"], "n": 3}
    cases = [
        Decision(True, Reason.OK, headers=IDENTITY, remove_headers=("authorization", "x-user-id"), metadata=meta),
        Decision(True, Reason.OK, headers=IDENTITY, metadata=meta, response_headers=LIMITS),
        Decision(True, Reason.OK, remove_query=("api_key",), metadata={"sub": "bob"}, response_headers=LIMITS[:1]),
        Decision(True, Reason.PUBLIC, remove_headers=("x-user-id",)),
        Decision(True, Reason.OK, headers=(("x-name", "Zoë 東京 " + "é" * 200),), metadata={"sub": "z"},
                 response_headers=(("x-long", "v" * 300),)),      # multi-byte varint lengths
        Decision(True, Reason.OK),
    ]
    for d in cases:
        for elapsed in (0.0, 0.000123, 0.0421):
            got = pb.CheckResponse.FromString(authz.reply_bytes(d, elapsed))
            assert got == reference(d, elapsed), d


def test_denied_replies_are_the_builders():
    d = deny(401, Reason.JWT_EXPIRED, "token expired", policy="api")
    assert authz.reply_bytes(d, 0.001) == authz.to_check_response(d).SerializeToString()


def test_the_grants_part_is_kept_per_grant_and_never_mixed_up():
    meta = {"sub": "alice"}
    first = Decision(True, Reason.OK, headers=IDENTITY, metadata=meta)
    assert authz.ok_reply_bytes(first) == authz.ok_reply_bytes(first)
    # the same metadata dict with other headers (another grant reusing it) is not answered from the
    # first one's bytes; nor are other removals
    other = Decision(True, Reason.OK, headers=(("x-user-id", "mallory"),), metadata=meta)
    assert pb.CheckResponse.FromString(authz.ok_reply_bytes(other)) == authz.to_check_response(other)
    removing = Decision(True, Reason.OK, headers=IDENTITY, remove_headers=("cookie",), metadata=meta)
    assert pb.CheckResponse.FromString(authz.ok_reply_bytes(removing)) == authz.to_check_response(removing)
    # per-request headers are never part of what is kept
    limited = Decision(True, Reason.OK, headers=IDENTITY, metadata=meta, response_headers=LIMITS)
    again = Decision(True, Reason.OK, headers=IDENTITY, metadata=meta, response_headers=LIMITS[1:2])
    authz.ok_reply_bytes(limited)
    assert pb.CheckResponse.FromString(authz.ok_reply_bytes(again)) == authz.to_check_response(again)


def test_the_kept_parts_are_bounded():
    for i in range(authz._IDENTITY_PARTS_MAX + 10):
        authz.ok_reply_bytes(Decision(True, Reason.OK, headers=IDENTITY, metadata={"sub": f"u{i}"}))
    assert len(authz._IDENTITY_PARTS) <= authz._IDENTITY_PARTS_MAX


def test_the_timing_fragment_is_the_builders_bytes():
    """express.timing_bytes writes Server-Timing with checkwire, APPEND_IF_EXISTS_OR_ADD (the
    enum's default, so no field): byte for byte what the protobuf builder serialises."""
    from extproc.services.express import timing_bytes

    for seconds in (0.0, 0.000123, 0.0421, 7.5):
        built = pb.CheckResponse(ok_response=pb.OkHttpResponse(response_headers_to_add=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="server-timing", value=f"authz;dur={int(seconds * 1e6) / 1000:.3f}"),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)]))
        assert timing_bytes(seconds) == built.SerializeToString()
