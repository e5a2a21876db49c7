"""The project's own protos: committed modules match a fresh compile, and the check can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extproc import protos_build
from extproc._proto import cache_entry_pb2


def test_committed_modules_are_fresh():
    assert protos_build.stale() == []


def test_check_command_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "extproc.protos_build", "--check"],
                          capture_output=True, text=True, timeout=120, cwd=protos_build.ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_edited_proto_is_reported_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    edited = tmp_path / "protos"
    shutil.copytree(protos_build.PROTO_DIR, edited)
    proto = edited / "cache_entry.proto"
    text = proto.read_text()
    assert "repeated string vary = 10;" in text
    proto.write_text(text.replace("repeated string vary = 10;",
                                  "repeated string vary = 10;\n  string content_encoding = 99;"))
    monkeypatch.setattr(protos_build, "PROTO_DIR", edited)
    assert set(protos_build.stale()) >= {"cache_entry_pb2.py", "cache_entry_pb2.pyi"}
    assert protos_build.main(["--check"]) == 1


def test_a_missing_module_is_reported_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "_proto"
    out.mkdir()
    shutil.copy(protos_build.OUT_DIR / "cache_entry_pb2.py", out)
    monkeypatch.setattr(protos_build, "OUT_DIR", out)
    assert protos_build.stale() == ["cache_entry_pb2.pyi"]


def test_cache_entry_round_trip():
    entry = cache_entry_pb2.CacheEntry(
        format_version=1, status=200,
        headers=[cache_entry_pb2.Header(name="content-type", value=b"application/json"),
                 cache_entry_pb2.Header(name="x-bin", value=b"\x00\xff")],
        body=b'{"ok":true}', stored_at_ms=1_700_000_000_123, request_time_ms=1_700_000_000_100,
        expires_at_ms=1_700_000_060_123, etag='"v1"', last_modified="Tue, 14 Nov 2023 22:13:20 GMT",
        vary=["accept-encoding", "authorization"])
    wire = entry.SerializeToString()
    back = cache_entry_pb2.CacheEntry.FromString(wire)
    assert back == entry
    assert [(h.name, h.value) for h in back.headers] == [("content-type", b"application/json"),
                                                        ("x-bin", b"\x00\xff")]
    assert list(back.vary) == ["accept-encoding", "authorization"]
    assert back.expires_at_ms - back.stored_at_ms == 60_000
    assert cache_entry_pb2.CacheEntry.DESCRIPTOR.full_name == "extproc.v1.CacheEntry"


def test_cache_entry_defaults_and_unknown_fields():
    empty = cache_entry_pb2.CacheEntry.FromString(b"")
    assert empty.format_version == 0 and empty.status == 0 and not empty.body
    # a newer writer's extra field (number 99) is kept, not an error, for an older reader
    newer = cache_entry_pb2.CacheEntry(format_version=2).SerializeToString() + b"\x98\x06\x01"
    parsed = cache_entry_pb2.CacheEntry.FromString(newer)
    assert parsed.format_version == 2
    assert parsed.SerializeToString() == newer
