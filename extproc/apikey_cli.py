"""`extproc apikey create | list | revoke | digest`: manage API keys.

`create`, `list` and `revoke` talk to a running sidecar's admin API (store-managed keys,
`api_keys.from_store: true`); the admin token comes from $EXTPROC_ADMIN_TOKEN unless
`--token-env NAME` or `--token-file FILE` says otherwise, and is never accepted on the
command line (it would show in `ps` and shell history). `digest` works offline: it makes a
new key and prints the YAML entry for extproc.yaml's `api_keys.keys`, which holds only the
key's digest. A new key is printed exactly once; nothing keeps it but whoever runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import config as cfgmod
from .core import apikeys as core

DEFAULT_ADMIN = "http://127.0.0.1:9902"
DEFAULT_TOKEN_ENV = "EXTPROC_ADMIN_TOKEN"
TIMEOUT_SECONDS = 10.0
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_PLAIN_YAML = re.compile(r"[A-Za-z_][A-Za-z0-9_.@/-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


class CliError(Exception):
    """A failure to report on stderr, exit status 1."""


# ------------------------------------------------------------------------------------ helpers ---

def _duration(text: str) -> int:
    m = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 3600s, 90m, 12h, 30d, 52w")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _key_id(text: str) -> str:
    if not _ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"bad id {text!r}: use 1-63 of a-z 0-9 _ . - starting with a letter or digit")
    return text


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _yaml_scalar(value: str) -> str:
    if _PLAIN_YAML.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value)    # a JSON string is a valid YAML flow scalar


def config_entry(key_id: str, digest: str, owner: str, scopes: list[str], tier: str,
                 expires_at: float | None) -> str:
    """One `api_keys.keys` list item in YAML flow style."""
    parts = [f"id: {key_id}", f"digest: {digest}", f"owner: {_yaml_scalar(owner)}",
             f"scopes: [{', '.join(_yaml_scalar(s) for s in scopes)}]", f"tier: {_yaml_scalar(tier)}"]
    if expires_at is not None:
        parts.append(f"expires_at: {_when(expires_at)}")
    return "- {" + ", ".join(parts) + "}"


class AdminClient:
    """Blocking JSON calls to the admin API (a CLI may block); errors become CliError."""

    def __init__(self, url: str, token: str, token_hint: str, timeout: float = TIMEOUT_SECONDS):
        self.url = url.rstrip("/")
        self.token = token
        self.token_hint = token_hint
        self.timeout = timeout
        # no proxies: the admin API is local, and a proxy would see the bearer token
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.status, _json_or_none(resp.read())
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, _json_or_none(exc.read())
            exc.close()
            return status, payload
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the admin API at {self.url}: {reason}. Is the sidecar running? "
                           f"Point --admin at its admin.listen (default {DEFAULT_ADMIN})") from None

    def expect(self, status: int, payload: Any, ok: int) -> Any:
        if status == ok:
            return payload
        message = payload.get("error") if isinstance(payload, dict) else None
        if status == 401:
            raise CliError(f"the admin API refused the token (401): {self.token_hint} must hold the sidecar's "
                           "admin token (admin.token_file / admin.token_env in extproc.yaml)")
        if status == 403:
            raise CliError(f"the admin API refused the request (403): {message or 'forbidden'}")
        if status == 404 and message is None:
            raise CliError(f"{self.url} has no /apikeys endpoint (404): is this an extproc admin API of a "
                           "version with API key management?")
        raise CliError(f"the admin API answered {status}: {message or payload!r}")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _client(args: argparse.Namespace) -> AdminClient:
    if not args.admin.startswith(("http://", "https://")):
        raise CliError(f"--admin must be an http(s) URL, got {args.admin!r}")
    file = Path(args.token_file) if args.token_file else None
    try:
        token = cfgmod.read_secret(file, None if file else args.token_env, "admin token")
    except cfgmod.ConfigError as exc:
        raise CliError(str(exc)) from None
    hint = f"--token-file {file}" if file else f"${args.token_env}"
    if not token:
        raise CliError(f"no admin token: {hint} is empty or unset. Set it to the sidecar's admin token "
                       "(or use --token-env NAME / --token-file FILE)")
    return AdminClient(args.admin, token, hint)


# ----------------------------------------------------------------------------------- commands ---

def cmd_create(args: argparse.Namespace) -> int:
    client = _client(args)
    body: dict[str, Any] = {"owner": args.owner, "scopes": args.scope or [], "tier": args.tier}
    if args.expires is not None:
        body["expires_in_seconds"] = args.expires
    if args.id is not None:
        body["id"] = args.id
    created = client.expect(*client.call("POST", "/apikeys", body), ok=201)
    if args.json:
        print(json.dumps(created, indent=2))
    else:
        print(f"id:      {created['id']}")
        print(f"owner:   {created['owner']}")
        print(f"tier:    {created['tier']}")
        print(f"scopes:  {' '.join(created['scopes']) or '-'}")
        print(f"expires: {_when(created.get('expires_at'))}")
        print(f"key:     {created['key']}")
    print("The key is shown only this once; the sidecar keeps only its digest. Store it now.", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = _client(args)
    keys = client.expect(*client.call("GET", "/apikeys"), ok=200)["keys"]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    rows = [("ID", "SOURCE", "OWNER", "TIER", "SCOPES", "EXPIRES")]
    rows += [(k["id"], k["source"], k["owner"], k["tier"], ",".join(k["scopes"]) or "-", _when(k["expires_at"]))
             for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    status, payload = client.call("DELETE", "/apikeys/" + urllib.parse.quote(args.id, safe=""))
    if status == 404 and isinstance(payload, dict):
        raise CliError(f"no store-managed api key with id {args.id!r} (already revoked, or never created; "
                       "`extproc apikey list` shows the ids)")
    client.expect(status, payload, ok=204)
    print(f"revoked {args.id} (other replicas stop accepting it within their api key cache interval)")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    if args.stdin:
        raw = sys.stdin.readline().strip()
        if not core.plausible(raw):
            raise CliError("stdin must hold one key: 1-256 visible ASCII characters on the first line")
    else:
        raw = core.generate(secrets.token_bytes(core.RANDOM_BYTES))
    key_id = args.id or "key-" + secrets.token_hex(6)
    expires_at = None if args.expires is None else time.time() + args.expires
    if not args.stdin:
        print(f"key: {raw}")
        print("The key is shown only this once; extproc.yaml keeps only its digest. Store it now.",
              file=sys.stderr)
    print("# add under api_keys.keys in extproc.yaml, then reload:")
    print(config_entry(key_id, core.digest(raw), args.owner, args.scope or [], args.tier, expires_at))
    return 0


# ------------------------------------------------------------------------------------- parser ---

def build_parser() -> argparse.ArgumentParser:
    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--admin", default=os.environ.get("EXTPROC_ADMIN_URL", DEFAULT_ADMIN), metavar="URL",
                       help=f"the sidecar's admin API (default $EXTPROC_ADMIN_URL or {DEFAULT_ADMIN})")
    tok = admin.add_mutually_exclusive_group()
    tok.add_argument("--token-env", default=DEFAULT_TOKEN_ENV, metavar="NAME",
                     help=f"environment variable holding the admin token (default {DEFAULT_TOKEN_ENV})")
    tok.add_argument("--token-file", metavar="FILE", help="file holding the admin token (first line)")

    key = argparse.ArgumentParser(add_help=False)
    key.add_argument("--owner", required=True, help="who the key belongs to (sent upstream on success)")
    key.add_argument("--scope", action="append", metavar="S", help="a scope the key grants (repeatable)")
    key.add_argument("--tier", default="default", help="rate-limit tier (default: default)")
    key.add_argument("--expires", type=_duration, metavar="DURATION", help="lifetime, e.g. 30d, 12h (default: none)")
    key.add_argument("--id", type=_key_id, help="key id (default: key-<random>)")

    parser = argparse.ArgumentParser(prog="extproc apikey", description="Manage API keys")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", parents=[key, admin], help="issue a store-managed key via the admin API")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("list", parents=[admin], help="list config and store keys (never the keys themselves)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("revoke", parents=[admin], help="revoke a store-managed key by id")
    p.add_argument("id")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("digest", parents=[key],
                       help="offline: make a key and print its extproc.yaml entry (config-managed keys)")
    p.add_argument("--stdin", action="store_true",
                   help="digest an existing key read from stdin instead of making a new one")
    p.set_defaults(func=cmd_digest)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:       # --help, usage errors: a status, not an exit of the caller
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except CliError as exc:
        print(f"extproc apikey {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
