"""`extproc serve | check-config | explain | token | apikey | upstream`."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys

from . import config as cfgmod


def _ttl(text: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h, 2d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = cfgmod.load(args.file)
    except cfgmod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(cfg.policies)} policies, {len(cfg.providers)} providers, "
          f"store {cfg.store.kind}, {cfg.server.workers} worker(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .telemetry import logs

    logs.setup(args.log_level)
    try:
        cfg = cfgmod.load(args.config) if args.config else cfgmod.Config()
        if args.workers is not None:
            cfg = cfgmod.override_workers(cfg, args.workers, args.config or "defaults")
    except cfgmod.ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    if args.worker_index is not None:
        from .app import run_worker

        listen = cfg.server.worker_listen(args.worker_index)
        return asyncio.run(run_worker(args.config, cfg, listen=listen, with_admin=False))
    if cfg.server.workers > 1:
        import shutil
        import tempfile

        # must be set before prometheus_client is imported here or in the workers; removed when
        # the supervisor returns (its workers have exited by then)
        metrics_dir = tempfile.mkdtemp(prefix="extproc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from .supervisor import run_supervisor

        try:
            return asyncio.run(run_supervisor(args.config, cfg, log_level=args.log_level))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    from .app import run_worker

    return asyncio.run(run_worker(args.config, cfg))


def cmd_token(args: argparse.Namespace) -> int:
    from .demo import idp

    key = idp.load_or_create()
    extra = {}
    for item in args.claim or ():
        k, _, v = item.partition("=")
        extra[k] = v
    print(key.mint(args.sub, scopes=args.scope or (), ttl_seconds=args.ttl, extra=extra or None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extproc", description="Envoy ext_authz + ext_proc sidecar")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the sidecar")
    p.add_argument("--config", "-c", default=os.environ.get("EXTPROC_CONFIG"))
    p.add_argument("--workers", type=int, default=None, help="override server.workers")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default=os.environ.get("EXTPROC_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate extproc.yaml; non-zero exit on any problem")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("token", help="mint a token the demo stack accepts (demo identity provider key)")
    p.add_argument("--sub", required=True)
    p.add_argument("--scope", action="append")
    p.add_argument("--ttl", type=_ttl, default=3600, help="lifetime, e.g. 1h (default), 15m, 90s")
    p.add_argument("--claim", action="append", help="extra claim name=value")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("explain", help="run one request through a config's policies and say why",
                       add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("apikey", help="manage API keys: create | list | revoke (admin API), digest (offline)",
                       add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("upstream", help="run the demo upstream (webshop API + demo identity provider)",
                       add_help=False)
    p.set_defaults(func=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "explain":
        from . import explain

        return explain.main(rest)
    if args.command == "apikey":
        from . import apikey_cli

        return apikey_cli.main(rest)
    if args.command == "upstream":
        from .demo import upstream

        return upstream.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
