"""The /apikeys admin routes on a real aiohttp server (free port), guarded by the admin server's
own bearer check, driven by an aiohttp client and by `extproc apikey` (run in a thread, as a
blocking CLI), with the registry on a MemoryStore: create -> list -> lookup -> revoke."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web

from extproc import apikey_cli
from extproc import config as cfgmod
from extproc.admin.apikeys import add_routes
from extproc.admin.server import AdminServer
from extproc.core import apikeys as core
from extproc.core.reasons import Reason
from extproc.services.apikeys import ApiKeyRegistry
from extproc.store.keys import KeySpace
from extproc.store.memory import MemoryStore
from tests.support.procs import free_port

T = TypeVar("T")
TOKEN_ENV = "EXTPROC_TEST_APIKEY_ADMIN_TOKEN"
TOKEN = "test-admin-token-4f1c"
CONFIG_KEY = core.generate(b"\x07" * 32)


class Audit(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def actions(self) -> list[tuple[str, str]]:
        return [(r.action, r.key_id) for r in self.records]


@dataclass
class Admin:
    url: str
    registry: ApiKeyRegistry
    audit: Audit
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, token: str | None = TOKEN, **kw) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if resp.content_type == "application/json" else text)

    async def cli(self, *argv: str) -> int:
        """`extproc apikey ...` against this server, blocking in a worker thread."""
        command, *rest = argv
        extra = ["--admin", self.url] if command in ("create", "list", "revoke") else []
        return await asyncio.to_thread(apikey_cli.main, [command, *extra, *rest])


@asynccontextmanager
async def admin_app(from_store: bool = True) -> AsyncIterator[Admin]:
    config_keys = [cfgmod.ApiKey(id="cfg-ci", digest=core.digest(CONFIG_KEY), owner="ci-bot", scopes=["deploy"])]
    registry = ApiKeyRegistry(config_keys, MemoryStore() if from_store else None,
                              keyspace=KeySpace("t-apikeys-admin"))
    server = AdminServer(cfgmod.Admin(listen="127.0.0.1:0", token_env=TOKEN_ENV), target=None)  # type: ignore[arg-type]
    audit_log = logging.getLogger("extproc.test.audit")
    handler = Audit()
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)        # audit lines are kept whatever the log level
    app = web.Application()
    add_routes(app, registry, server._authorized, audit_log)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            yield Admin(f"http://127.0.0.1:{port}", registry, handler, http)
    finally:
        audit_log.removeHandler(handler)
        audit_log.setLevel(logging.NOTSET)
        await runner.cleanup()


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv(apikey_cli.DEFAULT_TOKEN_ENV, TOKEN)
    monkeypatch.delenv("EXTPROC_ADMIN_URL", raising=False)


# ------------------------------------------------------------------------------ HTTP client ---

def test_http_create_list_lookup_revoke():
    async def body() -> None:
        async with admin_app() as a:
            status, created = await a.call("POST", "/apikeys", json={"owner": "team-a", "scopes": ["read"],
                                                                     "tier": "gold", "expires_in_seconds": 3600})
            assert status == 201, created
            raw, key_id = created["key"], created["id"]
            assert re.fullmatch(r"xp_[A-Za-z0-9_-]{43}", raw)
            assert created["owner"] == "team-a" and created["scopes"] == ["read"] and created["tier"] == "gold"
            assert created["expires_at"] == pytest.approx(time.time() + 3600, abs=60)
            assert created["digest"] == core.digest(raw)

            status, listed = await a.call("GET", "/apikeys")
            assert status == 200
            assert [(k["id"], k["source"]) for k in listed["keys"]] == [("cfg-ci", "config"), (key_id, "store")]
            assert raw not in json.dumps(listed) and "key" not in listed["keys"][1]

            record, reason = await a.registry.lookup(raw, time.time())
            assert reason is Reason.OK and record.id == key_id and record.owner == "team-a"
            assert (await a.registry.lookup(raw, created["expires_at"]))[1] is Reason.API_KEY_EXPIRED

            assert (await a.call("DELETE", f"/apikeys/{key_id}"))[0] == 204
            assert await a.registry.lookup(raw, time.time()) == (None, Reason.API_KEY_INVALID)
            status, err = await a.call("DELETE", f"/apikeys/{key_id}")
            assert status == 404 and key_id in err["error"]

            assert a.audit.actions() == [("apikey.create", key_id), ("apikey.revoke", key_id)]
            assert all(r.owner == "team-a" for r in a.audit.records)
            for r in a.audit.records:
                assert raw not in json.dumps(r.__dict__, default=str)
    run(body)


def test_http_every_route_needs_the_token():
    async def body() -> None:
        async with admin_app() as a:
            for method, path, kw in (("GET", "/apikeys", {}), ("POST", "/apikeys", {"json": {"owner": "x"}}),
                                     ("DELETE", "/apikeys/cfg-ci", {})):
                for token in (None, "wrong-token"):
                    status, _ = await a.call(method, path, token=token, **kw)
                    assert status == 401, (method, path, token)
            assert len(await a.registry.list()) == 1 and a.audit.records == []
    run(body)


def test_http_without_a_configured_token_is_403(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(TOKEN_ENV)

    async def body() -> None:
        async with admin_app() as a:
            status, err = await a.call("GET", "/apikeys")
            assert status == 403 and "admin token not configured" in err["error"]
    run(body)


def test_http_refusals():
    async def body() -> None:
        async with admin_app() as a:
            status, err = await a.call("DELETE", "/apikeys/cfg-ci")
            assert status == 409 and "extproc.yaml" in err["error"]
            for payload, fragment in ((["x"], "JSON object"), ({"scopes": []}, "owner is required"),
                                      ({"owner": "o", "scope": ["x"]}, "unknown field(s) scope"),
                                      ({"owner": "o", "scopes": "read"}, "list of strings"),
                                      ({"owner": "o", "expires_in_seconds": 0}, "expires_in_seconds"),
                                      ({"owner": "o", "expires_in_seconds": True}, "expires_in_seconds"),
                                      ({"owner": "o", "id": "Not Valid"}, "key id")):
                status, err = await a.call("POST", "/apikeys", json=payload)
                assert status == 400 and fragment in err["error"], (payload, err)
            status, err = await a.call("POST", "/apikeys", data=b"{not json")
            assert status == 400
            status, err = await a.call("POST", "/apikeys", json={"owner": "o", "id": "cfg-ci"})
            assert status == 409 and "config key" in err["error"]
            assert a.audit.records == []
    run(body)


def test_http_create_without_from_store_is_409():
    async def body() -> None:
        async with admin_app(from_store=False) as a:
            status, err = await a.call("POST", "/apikeys", json={"owner": "o"})
            assert status == 409 and "apikey digest" in err["error"]
            status, listed = await a.call("GET", "/apikeys")
            assert status == 200 and [k["id"] for k in listed["keys"]] == ["cfg-ci"]
    run(body)


# ---------------------------------------------------------------------------------------- CLI ---

def test_cli_create_list_lookup_revoke(capsys: pytest.CaptureFixture[str]):
    async def body() -> None:
        async with admin_app() as a:
            assert await a.cli("create", "--owner", "team-b", "--scope", "read", "--scope", "write",
                               "--tier", "silver", "--expires", "30d", "--id", "team-b-1") == 0
            out, err = capsys.readouterr()
            fields = dict(line.split(":", 1) for line in out.splitlines())
            raw = fields["key"].strip()
            assert fields["id"].strip() == "team-b-1" and fields["scopes"].strip() == "read write"
            assert out.count(raw) == 1 and "shown only this once" in err

            assert await a.cli("list") == 0
            out, _ = capsys.readouterr()
            lines = out.splitlines()
            assert lines[0].split() == ["ID", "SOURCE", "OWNER", "TIER", "SCOPES", "EXPIRES"]
            assert lines[1].split()[:5] == ["cfg-ci", "config", "ci-bot", "default", "deploy"]
            assert lines[2].split()[:5] == ["team-b-1", "store", "team-b", "silver", "read,write"]
            assert raw not in out

            record, reason = await a.registry.lookup(raw, time.time())
            assert reason is Reason.OK and record.scopes == ("read", "write")
            assert record.expires_at == pytest.approx(time.time() + 30 * 86400, abs=60)

            assert await a.cli("revoke", "team-b-1") == 0
            assert "revoked team-b-1" in capsys.readouterr().out
            assert await a.registry.lookup(raw, time.time()) == (None, Reason.API_KEY_INVALID)
            assert await a.cli("revoke", "team-b-1") == 1
            assert "no store-managed api key with id 'team-b-1'" in capsys.readouterr().err
            assert await a.cli("revoke", "cfg-ci") == 1
            assert "409" in (err := capsys.readouterr().err) and "extproc.yaml" in err

            assert await a.cli("list", "--json") == 0
            assert [k["id"] for k in json.loads(capsys.readouterr().out)] == ["cfg-ci"]
    run(body)


def test_cli_token_problems(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path):
    async def body() -> None:
        async with admin_app() as a:
            monkeypatch.setenv("WRONG_TOKEN", "nope")
            assert await a.cli("list", "--token-env", "WRONG_TOKEN") == 1
            assert "refused the token (401): $WRONG_TOKEN" in capsys.readouterr().err

            monkeypatch.delenv(apikey_cli.DEFAULT_TOKEN_ENV)
            assert await a.cli("create", "--owner", "o") == 1
            assert "no admin token: $EXTPROC_ADMIN_TOKEN is empty or unset" in capsys.readouterr().err

            token_file = tmp_path / "admin-token"
            token_file.write_text(TOKEN + "\n")
            assert await a.cli("list", "--token-file", str(token_file)) == 0
            capsys.readouterr()
            assert await a.cli("list", "--token-file", str(tmp_path / "missing")) == 1
            assert "cannot read" in capsys.readouterr().err

            monkeypatch.delenv(TOKEN_ENV)          # the sidecar has no admin token configured
            assert await a.cli("list", "--token-file", str(token_file)) == 1
            assert "(403): admin token not configured" in capsys.readouterr().err
            assert a.audit.records == []
    run(body)


def test_cli_admin_unreachable(capsys: pytest.CaptureFixture[str]):
    url = f"http://127.0.0.1:{free_port()}"
    assert apikey_cli.main(["list", "--admin", url]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the admin API at {url}" in err and "Is the sidecar running?" in err
    assert apikey_cli.main(["list", "--admin", "ftp://x"]) == 1
    assert "--admin must be an http(s) URL" in capsys.readouterr().err


def test_cli_usage_errors_return_2(capsys: pytest.CaptureFixture[str]):
    assert apikey_cli.main([]) == 2
    assert apikey_cli.main(["create"]) == 2                        # --owner is required
    assert apikey_cli.main(["create", "--owner", "o", "--expires", "soon"]) == 2
    assert "bad duration 'soon'" in capsys.readouterr().err
    assert apikey_cli.main(["--help"]) == 0


def test_cli_digest_makes_a_config_entry_the_loader_accepts(capsys: pytest.CaptureFixture[str]):
    assert apikey_cli.main(["digest", "--owner", "partner@example.com", "--scope", "read", "--tier", "gold",
                            "--id", "partner-1", "--expires", "1d"]) == 0
    out = capsys.readouterr().out
    raw = re.search(r"^key: (xp_\S+)$", out, re.M).group(1)
    entry = next(line for line in out.splitlines() if line.startswith("- {"))
    assert "digest: sha256:" in entry and raw not in entry
    cfg = cfgmod.parse(yaml.safe_dump({"api_keys": {"keys": yaml.safe_load(entry)}}))
    (key,) = cfg.api_keys.keys
    assert (key.id, key.owner, key.scopes, key.tier) == ("partner-1", "partner@example.com", ["read"], "gold")
    table = core.KeyTable.from_config(cfg.api_keys.keys)
    record, reason = table.lookup(raw, time.time())
    assert reason is Reason.OK
    assert record.expires_at == pytest.approx(time.time() + 86400, abs=120)


def test_cli_digest_of_an_existing_key_from_stdin(capsys, monkeypatch: pytest.MonkeyPatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("legacy-key-0123456789\n"))
    assert apikey_cli.main(["digest", "--stdin", "--owner", "123", "--id", "legacy"]) == 0
    out = capsys.readouterr().out
    assert "legacy-key-0123456789" not in out
    entry = yaml.safe_load(next(line for line in out.splitlines() if line.startswith("- {")))
    assert entry == [{"id": "legacy", "digest": core.digest("legacy-key-0123456789"), "owner": "123",
                      "scopes": [], "tier": "default"}]
    monkeypatch.setattr("sys.stdin", io.StringIO("bad key with spaces\n"))
    assert apikey_cli.main(["digest", "--owner", "o", "--stdin"]) == 1
