from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class CacheEntry(_message.Message):
    __slots__ = ("format_version", "status", "headers", "body", "stored_at_ms", "request_time_ms", "expires_at_ms", "etag", "last_modified", "vary", "url", "tags", "stale_while_revalidate_ms", "stale_if_error_ms", "must_revalidate", "no_cache", "vary_stub", "initial_age_ms")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    STORED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    LAST_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    VARY_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    STALE_WHILE_REVALIDATE_MS_FIELD_NUMBER: _ClassVar[int]
    STALE_IF_ERROR_MS_FIELD_NUMBER: _ClassVar[int]
    MUST_REVALIDATE_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    VARY_STUB_FIELD_NUMBER: _ClassVar[int]
    INITIAL_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    stored_at_ms: int
    request_time_ms: int
    expires_at_ms: int
    etag: str
    last_modified: str
    vary: _containers.RepeatedScalarFieldContainer[str]
    url: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    stale_while_revalidate_ms: int
    stale_if_error_ms: int
    must_revalidate: bool
    no_cache: bool
    vary_stub: bool
    initial_age_ms: int
    def __init__(self, format_version: _Optional[int] = ..., status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., stored_at_ms: _Optional[int] = ..., request_time_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., etag: _Optional[str] = ..., last_modified: _Optional[str] = ..., vary: _Optional[_Iterable[str]] = ..., url: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., stale_while_revalidate_ms: _Optional[int] = ..., stale_if_error_ms: _Optional[int] = ..., must_revalidate: _Optional[bool] = ..., no_cache: _Optional[bool] = ..., vary_stub: _Optional[bool] = ..., initial_age_ms: _Optional[int] = ...) -> None: ...
