"""extproc.yaml loading: one bad-config fixture per error, each with its exact message.

Every file in tests/fixtures/bad_configs/ opens with `# expect: <text>` (a substring of the
error message) and, where the error has a place in the file, `# line: N`. The loader must name
the file, the line (`file:N:`), the key path and the expected text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from extproc import cli
from extproc import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "fixtures" / "bad_configs"
BAD_FILES = sorted(BAD.glob("*.yaml"))

def _header(path: Path) -> tuple[str, int | None]:
    expect, line = None, None
    for text in path.read_text().splitlines():
        if not text.startswith("#"):
            break
        if m := re.fullmatch(r"# expect: (.+)", text):
            expect = m.group(1)
        elif m := re.fullmatch(r"# line: (\d+)", text):
            line = int(m.group(1))
    assert expect, f"{path.name}: first line must be '# expect: <text>'"
    return expect, line


def _params() -> list:
    return [pytest.param(p, id=p.stem) for p in BAD_FILES]


def test_every_error_class_has_a_fixture():
    names = {p.name for p in BAD_FILES}
    wanted = {"unknown_key.yaml", "wrong_type.yaml", "provider_without_issuer.yaml", "yaml_syntax.yaml",
              "negative_leeway.yaml", "zero_max_keys.yaml", "workers_with_memory_store.yaml",
              "listen_beyond_loopback.yaml", "admin_beyond_loopback.yaml", "policy_unknown_provider.yaml",
              "default_policy_undefined.yaml", "redis_inline_credentials.yaml", "memory_and_redis.yaml"}
    assert wanted <= names
    for p in BAD_FILES:
        assert p.read_text().startswith("# expect: "), p.name


@pytest.mark.parametrize("path", _params())
def test_bad_config_is_rejected_with_its_message(path: Path):
    expect, _ = _header(path)
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(path)
    msg = str(info.value)
    assert str(path) in msg
    assert expect in msg, msg


@pytest.mark.parametrize("path", [p for p in _params() if _header(p.values[0])[1] is not None])
def test_bad_config_names_the_line(path: Path):
    _, line = _header(path)
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}:"), msg


def test_every_problem_is_reported_once_per_line(tmp_path: Path):
    p = tmp_path / "two.yaml"
    p.write_text("server:\n  max_inflight: 3\nadmin:\n  listne: 127.0.0.1:1\n")
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(p)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{p}:2: server.max_inflight: unknown key (not part of extproc.yaml; check the spelling)",
        f"{p}:4: admin.listne: unknown key (not part of extproc.yaml; check the spelling)",
    ]


def test_unreadable_file_is_a_config_error(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(cfgmod.ConfigError, match=r"nope\.yaml: cannot read"):
        cfgmod.load(missing)


def test_empty_file_is_the_default_config(tmp_path: Path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing set\n")
    cfg = cfgmod.load(p)
    assert cfg == cfgmod.Config()
    assert cfg.store.kind == "memory"
    assert cfg.server.listen == "127.0.0.1:50051"


def test_shipped_config_loads():
    cfg = cfgmod.load(ROOT / "extproc.yaml")
    assert set(cfg.policies) == {"public", "api", "api-shadow", "payments", "logout", "admin-area", "reports"}
    assert cfg.default_policy == "api"
    assert cfg.unknown_policy == "deny"
    assert cfg.policies["api-shadow"].mode == "shadow"
    assert cfg.providers["demo"].claims_to_headers == {"sub": "x-user-id", "scope": "x-user-scopes"}
    assert cfg.providers["opaque"].introspection is not None
    assert cfg.api_keys is not None and cfg.api_keys.from_store
    assert cfg.store.kind == "memory"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path):
    sub = tmp_path / "conf"
    sub.mkdir()
    p = sub / "extproc.yaml"
    p.write_text("providers:\n  demo:\n    issuer: x\n    jwks_file: keys/jwks.json\n"
                 "admin:\n  token_file: /abs/token\n")
    cfg = cfgmod.load(p)
    assert cfg.providers["demo"].jwks_file == sub / "keys" / "jwks.json"
    assert cfg.admin.token_file == Path("/abs/token")


def test_non_loopback_listen_is_accepted_with_tls_or_unix():
    tls = cfgmod.parse("server:\n  listen: 0.0.0.0:50051\n  tls: {cert_file: c.pem, key_file: k.pem}\n")
    assert tls.server.tls is not None
    unix = cfgmod.parse("server:\n  listen: unix:/run/extproc.sock\n")
    assert unix.server.worker_listen(0) == "unix:/run/extproc.sock"
    remote_admin = cfgmod.parse("admin:\n  listen: 0.0.0.0:9902\n  allow_remote: true\n")
    assert remote_admin.admin.allow_remote


def test_workers_take_consecutive_ports():
    cfg = cfgmod.parse("server:\n  listen: 127.0.0.1:50051\n  workers: 3\n"
                       "store:\n  redis:\n    url: redis://127.0.0.1:6379/0\n")
    assert [cfg.server.worker_listen(i) for i in range(3)] == [
        "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]


def test_check_config_cli_accepts_the_shipped_file(capsys: pytest.CaptureFixture[str]):
    path = str(ROOT / "extproc.yaml")
    assert cli.main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: OK (7 policies, 2 providers, store memory, 1 worker(s))")
    assert err == ""


def test_check_config_cli_reports_a_bad_file_on_stderr(capsys: pytest.CaptureFixture[str]):
    path = BAD / "unknown_key.yaml"
    assert cli.main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}:4: server.max_inflight: unknown key" in err


def test_redacted_hides_where_secrets_come_from(tmp_path: Path):
    cfg = cfgmod.parse(
        "admin:\n  token_env: MY_ADMIN_TOKEN_VAR\n"
        "store:\n  redis:\n    url: redis://127.0.0.1:6379/0\n    password_file: /run/secrets/redis-pw\n"
        "server:\n  tls: {cert_file: /tls/cert.pem, key_file: /tls/key.pem}\n")
    out = cfgmod.redacted(cfg)
    text = json.dumps(out)
    for secret in ("MY_ADMIN_TOKEN_VAR", "/run/secrets/redis-pw", "/tls/key.pem"):
        assert secret not in text
    assert out["admin"]["token_env"] == "<redacted>"
    assert out["store"]["redis"]["password_file"] == "<redacted>"
    assert out["server"]["tls"]["key_file"] == "<redacted>"
    # what is not a secret stays readable; unset secret sources stay null
    assert out["server"]["tls"]["cert_file"] == "/tls/cert.pem"
    assert out["store"]["redis"]["url"] == "redis://127.0.0.1:6379/0"
    assert out["store"]["redis"]["password_env"] is None
    assert out["admin"]["token_file"] is None


def test_read_secret_prefers_the_file_and_strips_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    monkeypatch.setenv("SOME_TOKEN_VAR", "from-env")
    assert cfgmod.read_secret(f, "SOME_TOKEN_VAR", "admin.token") == "s3cret"
    assert cfgmod.read_secret(None, "SOME_TOKEN_VAR", "admin.token") == "from-env"
    monkeypatch.setenv("SOME_TOKEN_VAR", "")
    assert cfgmod.read_secret(None, "SOME_TOKEN_VAR", "admin.token") is None
    with pytest.raises(cfgmod.ConfigError, match=r"admin\.token: cannot read"):
        cfgmod.read_secret(tmp_path / "missing", None, "admin.token")


# -- rate-limit sync modes (sync: {mode: batched, interval_ms: N}) -------------------------------

_HOT_RULE = "rate_limits:\n  rules:\n    - name: hot\n      count_by: [route]\n      limit: 10\n"


@pytest.mark.parametrize(("tail", "line", "message"), [
    pytest.param("      sync: {mode: batched, interval_ms: 0}\n", 6,
                 "rate_limits.rules.0.sync.interval_ms: Input should be greater than or equal to 1", id="interval-0"),
    pytest.param("      sync: {mode: batched, interval_ms: 1001}\n", 6,
                 "rate_limits.rules.0.sync.interval_ms: Input should be less than or equal to 1000",
                 id="interval-1001"),
    pytest.param("      sync: {mode: every_request}\n", 6,
                 "rate_limits.rules.0.sync.mode: Input should be 'per_request' or 'batched'", id="unknown-mode"),
    pytest.param("      sync: {interval_ms: 5}\n", 6,
                 "rate_limits.rules.0.sync: interval_ms applies to mode: batched only", id="interval-per-request"),
    pytest.param("      sync: {mode: batched, every_ms: 5}\n", 6,
                 "rate_limits.rules.0.sync.every_ms: unknown key (not part of extproc.yaml; check the spelling)",
                 id="unknown-key"),
    pytest.param("      sync: {mode: batched}\n      fail: closed\n", 3,
                 "rate_limits.rules.0: sync mode batched admits between store syncs, which fail: closed forbids: "
                 "use fail: open with batched, or sync mode per_request", id="batched-fail-closed"),
])
def test_bad_rate_limit_sync_is_rejected_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      tail: str, line: int, message: str):
    p = tmp_path / "extproc.yaml"
    p.write_text(_HOT_RULE + tail)
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(p)
    assert str(info.value) == f"{p}:{line}: {message}"
    assert cli.main(["check-config", str(p)]) == 1           # check-config is the same loader
    out, err = capsys.readouterr()
    assert out == "" and f"{p}:{line}: {message}" in err


def test_rate_limit_sync_defaults_to_per_request_and_takes_the_interval_bounds():
    rule = cfgmod.parse(_HOT_RULE).rate_limits.rules[0]
    assert rule.sync == cfgmod.RateSync() and rule.sync.mode == "per_request"
    for ms in (1, 1000):
        batched = cfgmod.parse(_HOT_RULE + f"      sync: {{mode: batched, interval_ms: {ms}}}\n").rate_limits.rules[0]
        assert (batched.sync.mode, batched.sync.interval_ms) == ("batched", ms)
    shadow = cfgmod.parse(_HOT_RULE + "      sync: {mode: batched}\n      mode: shadow\n      fail: open\n")
    assert shadow.rate_limits.rules[0].sync.batch_ms == 5 and rule.sync.batch_ms == 0


def test_rate_limit_sync_survives_the_workers_override():
    """`serve --workers N` validates the dumped config again: defaults must round-trip."""
    cfg = cfgmod.parse(_HOT_RULE + "    - {name: other, count_by: [user], limit: 5, sync: {mode: batched}}\n"
                       "store:\n  redis:\n    url: redis://127.0.0.1:6379/0\n")
    again = cfgmod.override_workers(cfg, 2, "extproc.yaml")
    assert [r.sync for r in again.rate_limits.rules] == [r.sync for r in cfg.rate_limits.rules]
    assert [r.sync.batch_ms for r in again.rate_limits.rules] == [0, 5]


def test_the_shipped_config_batches_the_per_endpoint_rule():
    cfg = cfgmod.load(ROOT / "extproc.yaml")
    rules = {r.name: r for r in cfg.rate_limits.rules}
    assert rules["per-endpoint"].sync == cfgmod.RateSync(mode="batched", interval_ms=5)
    assert all(r.sync.mode == "per_request" for name, r in rules.items() if name != "per-endpoint")
