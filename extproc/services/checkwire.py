"""CheckResponse fragments written as protobuf bytes, to append to a serialised reply.

Protobuf merges concatenated messages (a singular message field merges, repeated fields append),
so a serialised CheckResponse followed by one carrying only `ok_response.response_headers_to_add`
parses as the first with those headers added. The ext_authz replies are assembled that way: the
grant's part kept serialised, then the per-request rate-limit headers and Server-Timing. Writing
the few fields by hand costs no message objects per request.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(128)]


def _length(n: int) -> bytes:
    return _SMALL[n] if n < 128 else _varint(n)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _length(len(payload)) + payload


# HeaderValueOption.append_action (field 3, a varint)
OVERWRITE = _varint(3 << 3) + _varint(base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
APPEND = b""         # APPEND_IF_EXISTS_OR_ADD is the enum's 0: proto3 writes no field for it
_KEY_FIELDS: dict[str, bytes] = {}          # HeaderValue.key, serialised, per header name


def response_headers_bytes(headers: tuple[tuple[str, str], ...], action: bytes = OVERWRITE) -> bytes:
    """A serialised CheckResponse carrying only `ok_response.response_headers_to_add`, each with
    `action` (OVERWRITE or APPEND), each name's field serialised once."""
    parts = []
    for k, v in headers:
        key = _KEY_FIELDS.get(k)
        if key is None:
            key = _field(1, k.encode())
            if len(_KEY_FIELDS) < 1024:
                _KEY_FIELDS[k] = key
        value = v.encode()
        header = key + b"\x12" + _length(len(value)) + value                    # HeaderValue{key, value}
        option = b"\x0a" + _length(len(header)) + header + action               # HeaderValueOption
        parts.append(b"\x32" + _length(len(option)) + option)                   # response_headers_to_add
    ok = b"".join(parts)
    return b"\x1a" + _length(len(ok)) + ok                                     # CheckResponse.ok_response
