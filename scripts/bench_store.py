#!/usr/bin/env python3
"""Client CPU of the rate-limit store call: one request's two rules, batched or not.

Starts its own redis-server (and, with --cluster, a 3-master Redis Cluster) on free ports,
stops them by PID at the end, and runs `RedisStore.rate_limit` for a request under two rules
that share a hash tag (one EVALSHA of lua/ratelimit.lua with two keys, the shape measured in
../shared/ENVOY-NOTES.md) N times from C concurrent tasks. For each row it reports the client
process's CPU time per call (time.process_time: the Redis servers are other processes), the
calls per second, and for the batched rows how many calls each pipeline carried.

Rows: raw redis-py EVALSHA (the ENVOY-NOTES baseline), RedisStore with `autobatch=False`
(every call its own EVALSHA) and with auto-batching (the default), at 32 and at 1 concurrent
callers. Limits are set so no request is ever rejected; tags are spread over 1000 partitions
so Cluster calls land on every node.

    .venv/bin/python scripts/bench_store.py                    # standalone only
    .venv/bin/python scripts/bench_store.py --cluster -n 20000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extproc.core.ratelimit import Algorithm, Limit, Period  # noqa: E402
from extproc.store.base import RateCheck  # noqa: E402
from extproc.store.keys import KeySpace  # noqa: E402
from extproc.store.redis import RedisStore, _rate_args  # noqa: E402
from tests.support.redis_servers import RedisCluster, RedisServer  # noqa: E402

PER_USER = Limit("per-user", Algorithm.SLIDING_WINDOW, 10**9, Period.parse("minute"))
PER_ROUTE = Limit("per-user-route", Algorithm.FIXED_WINDOW, 10**9, Period.parse("minute"))
PARTITIONS = 1000


def requests(prefix: str) -> list[list[RateCheck]]:
    space = KeySpace(prefix)
    return [[RateCheck(space.rate_limit(f"user-{i}", PER_USER), PER_USER),
             RateCheck(space.rate_limit(f"user-{i}", PER_ROUTE), PER_ROUTE)] for i in range(PARTITIONS)]


async def drive(call, n: int, concurrency: int) -> tuple[float, float]:
    """(client CPU seconds, wall seconds) for n calls from `concurrency` tasks."""
    per_task = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            await call(w * per_task + i)

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def bench(url: str, cluster: bool, n: int, label: str) -> list[tuple]:
    rows = []
    for concurrency in (32, 1):
        for mode in ("raw redis-py EVALSHA", "RedisStore, unbatched", "RedisStore, auto-batched"):
            store = RedisStore(url, cluster=cluster, timeout_ms=2000, max_connections=64,
                               autobatch=mode.endswith("auto-batched"))
            reqs = requests(f"bench-{int(time.time() * 1000)}-{concurrency}")
            try:
                if mode.startswith("raw"):
                    client, sha = store._client, store._ratelimit_sha
                    await store.rate_limit(reqs[0])          # loads the script, finds the slots

                    async def call(i: int, client=client, sha=sha, reqs=reqs) -> None:
                        checks = reqs[i % PARTITIONS]
                        await client.evalsha(sha, 2, checks[0].key, checks[1].key, *_rate_args("charge", "", checks))
                else:
                    async def call(i: int, store=store, reqs=reqs) -> None:
                        await store.rate_limit(reqs[i % PARTITIONS])
                await drive(call, min(2000, n), concurrency)     # warm-up: connections, script
                before = (store.batched_calls, store.pipelines)
                cpu, wall = await drive(call, n, concurrency)
                batched, pipelines = store.batched_calls - before[0], store.pipelines - before[1]
                per_pipe = f"{batched / pipelines:.1f}" if pipelines else "-"
                share = f"{batched / n:.0%}" if not mode.startswith("raw") else "-"
                rows.append((label, mode, concurrency, cpu / n * 1e6, n / wall, share, per_pipe))
            finally:
                await store.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="calls per row (default 20000)")
    parser.add_argument("--cluster", action="store_true", help="also measure a 3-master Redis Cluster")
    args = parser.parse_args()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        server = RedisServer(Path(tmp), name="bench-redis")
        try:
            rows += asyncio.run(bench(server.url, False, args.n, "redis"))
        finally:
            server.stop()
        if args.cluster:
            cluster = RedisCluster(Path(tmp) / "cluster", masters=3)
            try:
                rows += asyncio.run(bench(cluster.url, True, args.n, "redis-cluster"))
            finally:
                cluster.stop()
    print(f"\nrate_limit of a request under two rules (one 2-key EVALSHA), N={args.n} per row")
    print(f"{'backend':<14} {'client':<26} {'conc':>4} {'client CPU/call':>16} {'calls/s':>9} "
          f"{'pipelined':>9} {'calls/pipeline':>14}")
    for label, mode, conc, us, rate, share, per_pipe in rows:
        print(f"{label:<14} {mode:<26} {conc:>4} {us:>13.1f} us {rate:>9.0f} {share:>9} {per_pipe:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
