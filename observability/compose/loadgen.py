"""A small load generator for the compose stack's dashboards: a steady mix of webshop requests.

    python loadgen.py [--target URL] [--rps N] [--duration S | --requests N] [--token T]

Logs in through the gateway (POST /api/auth/login, a demo user) unless --token is given, then
sends, per 200 requests: 180 authenticated catalog reads, 8 user reads, 10 anonymous reads of a
protected route (401), and --errors 5xx probes (/status/503, default 1: 0.5 %, under the error
alert's 1 %). `--rps 0` sends as fast as --concurrency allows. Prints one JSON line of counts by
status every 10 s and at the end. Settings also come from LOADGEN_* environment variables.
Needs only aiohttp (in the extproc image).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time

import aiohttp


def _schedule(errors: int) -> list[tuple[str, bool]]:
    """200 (path, with_token) slots, spread so any window of the run has the same mix."""
    slots: list[tuple[str, bool]] = [(f"/api/products/{1 + i % 4}", True) for i in range(200)]   # the 4 seeded products
    for i in range(8):
        slots[i * 25 + 3] = ("/api/users/1", True)
    for i in range(10):
        slots[i * 20 + 7] = ("/api/products", False)
    for i in range(min(errors, 20)):
        slots[i * 10 + 9] = ("/status/503", True)
    return slots


async def _login(session: aiohttp.ClientSession, target: str, user: str, password: str) -> tuple[str, float]:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with session.post(f"{target}/api/auth/login", json={"username": user, "password": password}) as r:
                if r.status == 200:
                    body = await r.json()
                    return body["access_token"], time.monotonic() + float(body.get("expires_in", 3600)) / 2
                reason = f"HTTP {r.status}"
        except aiohttp.ClientError as exc:
            reason = repr(exc)
        if time.monotonic() > deadline:
            raise SystemExit(f"loadgen: cannot log in at {target}: {reason}")
        print(f"loadgen: login failed ({reason}), retrying", file=sys.stderr, flush=True)
        await asyncio.sleep(1)


async def run(args: argparse.Namespace) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    slots = _schedule(args.errors)
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        token, renew_at = (args.token, float("inf")) if args.token else \
            await _login(session, args.target, args.user, args.password)
        sem = asyncio.Semaphore(args.concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one(path: str, with_token: bool) -> None:
            headers = {"Authorization": f"Bearer {token}"} if with_token else {}
            try:
                async with session.get(f"{args.target}{path}", headers=headers) as r:
                    await r.read()
                    counts[str(r.status)] += 1
            except (TimeoutError, aiohttp.ClientError):
                counts["failed"] += 1
            finally:
                sem.release()

        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + args.duration if args.duration > 0 else float("inf")
        next_report = start + 10
        i = 0
        while (args.requests <= 0 or i < args.requests) and loop.time() < end:
            if args.rps > 0:
                # open-loop pacing: request i is due at start + i / rps
                await asyncio.sleep(max(0.0, start + i / args.rps - loop.time()))
            if not args.token and time.monotonic() > renew_at:
                token, renew_at = await _login(session, args.target, args.user, args.password)
            await sem.acquire()
            task = asyncio.create_task(one(*slots[i % len(slots)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            if loop.time() >= next_report:
                next_report += 10
                print(json.dumps({"sent": i, **counts}), flush=True)
        if tasks:
            await asyncio.gather(*tasks)
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=env("LOADGEN_TARGET", "http://envoy:8000"))
    p.add_argument("--rps", type=float, default=float(env("LOADGEN_RPS", "20")), help="0: as fast as possible")
    p.add_argument("--duration", type=float, default=float(env("LOADGEN_DURATION", "0")), help="seconds; 0: no limit")
    p.add_argument("--requests", type=int, default=int(env("LOADGEN_REQUESTS", "0")), help="0: no limit")
    p.add_argument("--concurrency", type=int, default=int(env("LOADGEN_CONCURRENCY", "8")))
    p.add_argument("--errors", type=int, default=int(env("LOADGEN_ERRORS", "1")), help="5xx probes per 200 requests (max 20)")
    p.add_argument("--token", default=env("LOADGEN_TOKEN"))
    p.add_argument("--user", default=env("LOADGEN_USER", "alice"))
    p.add_argument("--password", default=env("LOADGEN_PASSWORD", "alice-password"))
    args = p.parse_args(argv)
    counts = asyncio.run(run(args))
    print(json.dumps({"done": True, "sent": sum(counts.values()), **counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
