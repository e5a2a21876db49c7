"""`extproc explain`: run one request through a config's policies and print why it was decided.

It builds the same Runtime the sidecar serves (fetching remote keys once), then runs the
decision with a trace: which policy, which provider read which credential, which checks and
rules passed or failed, and the answer Envoy would get. Nothing is sent to the store: a
revocation check sees only what this process knows (nothing), which the output says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from . import config as cfgmod
from .core.request import Request


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip().lower(), value.strip()


async def explain(cfg: cfgmod.Config, req: Request, now: float) -> tuple[list[str], dict]:
    from .app import Runtime
    from .core import policy as core_policy

    api_keys = None
    if cfg.api_keys is not None:
        from .services.apikeys import ApiKeyRegistry

        api_keys = ApiKeyRegistry(cfg.api_keys.keys, None)   # config keys; store keys need the sidecar
    rt = Runtime.build(cfg, None, api_keys)
    trace: list[str] = []
    await rt.start()
    try:
        policy = rt.policies.select(req.policy)
        if policy is None:
            trace.append(f"policy {req.policy or '(none named)'!s}: not defined; unknown_policy is {cfg.unknown_policy}")
            d = core_policy.unknown_policy(req.policy or "", rt.policies)
        else:
            trace.append(f"policy {policy.name}" + (" (named by the route)" if req.policy else " (default_policy)")
                         + (", shadow mode" if policy.shadow else ""))
            for name in policy.providers:
                _, ks = rt.keys.get(name, (None, None))
                if ks is not None:
                    trace.append(f"provider {name}: {len(ks.keys)} key(s) loaded" if ks.loaded
                                 else f"provider {name}: keys unavailable")
            d = await rt.identity.decide(req, policy, now, trace)
    finally:
        await rt.close()
    result = {
        "allowed": d.allowed,
        "status": 200 if d.allowed else d.status,
        "reason": d.reason.value,
        "policy": d.policy,
        "rule": d.rule,
        "would_deny": d.would_deny,
        "headers_added": dict(d.headers) if d.allowed else {},
        "headers_removed": list(d.remove_headers),
        "reply_headers": {} if d.allowed else dict(d.headers),
        "reply_body": None if d.allowed else json.loads(d.body or b"null"),
        "metadata": d.metadata,
    }
    return trace, result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="extproc explain", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--policy", help="the policy the route names (default: the config's default_policy)")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/")
    p.add_argument("--header", "-H", action="append", type=_parse_header, default=[])
    p.add_argument("--token", help="sent as Authorization: Bearer TOKEN")
    p.add_argument("--api-key", help="sent in the first API-key source header")
    p.add_argument("--client-ip", default="127.0.0.1")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    headers = dict(args.header)
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    if args.api_key:
        src = cfg.api_keys.sources[0] if cfg.api_keys else None
        if src is None or src.header is None:
            print("explain: --api-key needs api_keys with a header source in the config", file=sys.stderr)
            return 2
        headers[src.header] = (src.prefix or "") + args.api_key
    req = Request(method=args.method.upper(), path=args.path, headers=headers, policy=args.policy,
                  client_ip=args.client_ip, request_id="explain")
    trace, result = asyncio.run(explain(cfg, req, time.time()))
    if args.json:
        print(json.dumps({"trace": trace, **result}, indent=2, default=str))
    else:
        for line in trace:
            print(f"  - {line}")
        verdict = "ALLOW" if result["allowed"] else "DENY"
        if result["would_deny"]:
            verdict = "ALLOW (shadow mode: would deny)"
        print(f"{verdict} {result['status']} reason={result['reason']} policy={result['policy']} rule={result['rule']}")
        for k, v in result["headers_added"].items():
            print(f"  + upstream header {k}: {v}")
        for k in result["headers_removed"]:
            print(f"  - upstream header {k}")
        for k, v in result["reply_headers"].items():
            print(f"  reply header {k}: {v}")
        if result["reply_body"] is not None:
            print(f"  reply body {json.dumps(result['reply_body'])}")
    return 0 if result["allowed"] else 1
