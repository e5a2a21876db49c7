"""`serve --workers N`: one supervisor, N worker processes, worker i on base port + i.

Envoy keeps one HTTP/2 connection per endpoint and multiplexes all of a worker thread's calls
on it, so SO_REUSEPORT on one port would leave all load on one process (measured); each worker
is its own endpoint instead, and the shipped multi-worker envoy config lists every one.
The supervisor owns the admin port (one aggregated /metrics through prometheus-client's
multiprocess mode, health, reload), passes SIGHUP and SIGTERM on, and restarts a worker that
dies (with backoff). Workers never open the admin port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from . import config as cfgmod
from .admin.server import AdminServer
from .telemetry import metrics

log = logging.getLogger("extproc.supervisor")


class Supervisor:
    def __init__(self, config_path: str | None, cfg: cfgmod.Config, log_level: str):
        self.config_path = config_path
        self.cfg = cfg
        self.log_level = log_level
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.draining = False
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._followers: list = []          # callables taking the reloaded config (admin-side state)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        argv = [sys.executable, "-m", "extproc", "serve", "--worker-index", str(index),
                "--log-level", self.log_level, "--workers", str(self.cfg.server.workers)]
        if self.config_path:
            argv += ["--config", self.config_path]
        proc = await asyncio.create_subprocess_exec(*argv)
        self.procs[index] = proc
        log.info("worker started", extra={"worker": index, "pid": proc.pid,
                                          "listen": self.cfg.server.worker_listen(index)})
        return proc

    async def _keep(self, index: int) -> None:
        backoff = 0.5
        while not self.draining:
            proc = await self._spawn(index)
            started = time.monotonic()
            rc = await proc.wait()
            metrics.mark_process_dead(proc.pid)
            if self.draining:
                return
            log.error("worker exited; restarting", extra={"worker": index, "pid": proc.pid, "code": rc})
            backoff = 0.5 if time.monotonic() - started > 10 else min(backoff * 2, 10.0)
            await asyncio.sleep(backoff)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    def log_level_changed(self, level: str, logger: str) -> None:
        """The admin API changed the log level here: every worker takes it too."""
        from .admin.logs import hand_to_workers

        hand_to_workers(level, logger, self.signal_all)

    async def reload(self, reason: str) -> tuple[bool, str]:
        try:
            new = cfgmod.load(self.config_path) if self.config_path else self.cfg
        except cfgmod.ConfigError as exc:
            log.error("config reload rejected; workers keep the previous config", extra={"error": str(exc)})
            return False, str(exc)
        self.cfg = new.model_copy(update={k: getattr(self.cfg, k) for k in ("server", "store")})
        for follower in self._followers:
            follower(self.cfg)            # the admin API's cache and breakers follow the new config
        self.signal_all(signal.SIGHUP)
        return True, "reload signalled to workers"

    def readiness(self) -> tuple[bool, dict]:
        alive = {i: p.returncode is None for i, p in self.procs.items()}
        ready = not self.draining and any(alive.values())
        return ready, {"config": "loaded", "draining": self.draining,
                       "workers": {str(i): ("up" if a else "down") for i, a in alive.items()},
                       "worker_pids": {str(i): p.pid for i, p in self.procs.items()},
                       "store": {"kind": self.cfg.store.kind}}

    async def stop(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining workers")
        self.signal_all(signal.SIGTERM)
        deadline = self.cfg.server.drain_delay_seconds + self.cfg.server.shutdown_grace_seconds + 5
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
        except TimeoutError:
            self.signal_all(signal.SIGKILL)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopped.set()

    async def run(self) -> int:
        # the admin API's revocations and API keys write to the shared store the workers read
        # (N > 1 workers always have Redis); the workers learn of them by pub/sub and lookups
        store = revocations = apikeys = None
        if self.cfg.store.kind == "redis":
            from .app import build_store
            from .services.apikeys import ApiKeyRegistry
            from .services.revocation import RevocationList

            store = build_store(self.cfg.store)
            revocations = RevocationList(store)
            ak = self.cfg.api_keys
            if ak is not None:
                apikeys = ApiKeyRegistry(ak.keys, store if ak.from_store else None, cache_seconds=ak.cache_seconds)
        ratelimiter = None
        if store is not None:
            from .services.ratelimit import RateLimiter

            built: dict = {}

            def ratelimiter():
                # follows reloads: the admin API's rules are the config in force
                if built.get("cfg") is not self.cfg.rate_limits:
                    built["cfg"], built["limiter"] = self.cfg.rate_limits, RateLimiter(self.cfg.rate_limits, store)
                return built["limiter"]
        cache = None
        if store is not None:
            from .services.cache import ResponseCache

            cache = ResponseCache(self.cfg.cache, store)     # not started: its purges go to the store
        breakers = None
        if store is not None:
            from .services.breaker import Breakers
            from .store.memory import MemoryStore

            breakers = Breakers(self.cfg.circuit_breakers, store, MemoryStore())   # forcings go to the store
        if cache is not None:
            self._followers.append(lambda cfg: cache.reconfigure(cfg.cache))
        if breakers is not None:
            self._followers.append(lambda cfg: breakers.reconfigure(cfg.circuit_breakers))
        admin = AdminServer(self.cfg.admin, self, apikeys=apikeys, revocations=revocations, ratelimiter=ratelimiter,
                            cache=cache, breakers=breakers)
        await admin.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP")))
        self._tasks = [asyncio.create_task(self._keep(i)) for i in range(self.cfg.server.workers)]
        await self._stopped.wait()
        await admin.stop()
        if store is not None:
            await store.close()
        log.info("stopped")
        return 0


async def run_supervisor(config_path: str | None, cfg: cfgmod.Config, log_level: str) -> int:
    return await Supervisor(config_path, cfg, log_level).run()

