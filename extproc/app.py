"""Composition root: builds the store, the policies and key sources, the servicers and servers,
and runs one worker's life: start, reload, drain, stop.

Shutdown order (SIGTERM): health NOT_SERVING and /readyz 503, the gRPC server stops accepting
and lets in-flight calls and streams finish within `server.shutdown_grace_seconds`, then key
fetchers, the store and the admin server close; exit 0.
Reload (SIGHUP, or the config file changing — also through a Kubernetes `..data` symlink swap):
a new Runtime is built and started, then swapped in; an invalid file logs one error and the old
config keeps serving. Listen addresses and the store need a restart to change.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from . import config as cfgmod
from .core.authorize import IpList, Requirements, RuleSet
from .core.credentials import Source
from .core.jwt import KeySet, ProviderRules, TokenCache
from .core.policy import CompiledPolicy, DecisionCache, PolicySet, ProviderPlan
from .services import accesslog, ratelimit_service
from .services.authz import AuthorizationService
from .services.authz import add_to_server as add_authz_to_server
from .services.identity import Identity
from .services.jwks import KeySource
from .services.processor import ExternalProcessorService
from .store import Store, StoreError
from .telemetry import metrics

log = logging.getLogger("extproc")

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
    ratelimit_service.SERVICE_NAME,
    accesslog.SERVICE_NAME,
)
STORE_PROBE_SECONDS = 2.0
# the server settings a reload applies (each Runtime reads them); the rest are fixed per process
RELOADABLE_SERVER = {"max_header_bytes", "token_cache_entries"}
CONFIG_POLL_SECONDS = 1.0


def _sources(sources: list[cfgmod.TokenSource]) -> tuple[Source, ...]:
    out = []
    for s in sources:
        if s.header is not None:
            out.append(Source.header(s.header, s.prefix))
        elif s.cookie is not None:
            out.append(Source("cookie", s.cookie))
        else:
            assert s.query is not None
            out.append(Source("query", s.query))
    return tuple(out)


def compile_policies(cfg: cfgmod.Config) -> PolicySet:
    """Everything a request reads about policies, built once per config."""
    plans = {}
    for name, p in cfg.providers.items():
        plans[name] = ProviderPlan(
            name=name, kind="introspection" if p.introspection is not None else "jwt",
            sources=_sources(p.token_sources), claims_to_headers=tuple(p.claims_to_headers.items()),
            metadata_claims=tuple(p.metadata_claims), revocation_fail_closed=p.revocation_fail == "closed")
    pols = {}
    for name, p in cfg.policies.items():
        auth = p.auth if isinstance(p.auth, cfgmod.PolicyAuth) else None
        requirements = None
        if auth is not None and (auth.scopes or auth.roles or auth.claims):
            requirements = Requirements.compile(auth)
        pols[name] = CompiledPolicy(
            name=name, shadow=p.mode == "shadow", public=auth is None,
            any_of=tuple(auth.providers_any) if auth else (), all_of=tuple(auth.all_of) if auth else (),
            api_keys=bool(auth and auth.api_keys), requirements=requirements,
            ip=IpList.compile(p.ip) if p.ip is not None and (p.ip.allow or p.ip.deny) else None,
            rules=RuleSet.compile(p.rules) if p.rules else None,
            keep_authorization=bool(auth and auth.keep_authorization),
            revoke_presented=p.revoke_presented_token)
    strip = {h for plan in plans.values() for _, h in plan.claims_to_headers}
    api_key_sources: tuple[Source, ...] = ()
    api_key_headers: list[tuple[str, str]] = []
    if cfg.api_keys is not None:
        api_key_sources = _sources(cfg.api_keys.sources)
        for what, header in (("owner", cfg.api_keys.owner_header), ("tier", cfg.api_keys.tier_header)):
            if header:
                api_key_headers.append((what, header))
                strip.add(header)
    query_names = frozenset(s.name for plan in plans.values() for s in plan.sources if s.kind == "query")
    query_names |= frozenset(s.name for s in api_key_sources if s.kind == "query")
    return PolicySet(policies=pols, default=cfg.default_policy, unknown_allows=cfg.unknown_policy == "allow",
                     providers=plans, api_key_sources=api_key_sources, api_key_headers=tuple(api_key_headers),
                     strip_headers=tuple(sorted(strip)), credential_query_params=query_names)


class GenericOnly:
    """A grpc.aio server as the generated `add_*_to_server` functions see it, registering their
    handlers as generic ones only.

    grpc.aio keeps one pending "request a call" future per *registered* method, plus one shared
    by all the other methods, and each incoming call of any method waits on all of them at once
    (`asyncio.wait(..., FIRST_COMPLETED)`: a done-callback added to and removed from each). With
    the seven methods of the worker's services registered, every Check paid for eight futures;
    the floor servicer pays for three. That cost 3-5 µs per call in a hot loop, and through Envoy
    it was most of the gap between a repeat token and the floor (side by side, 1.15× the floor's
    CPU per request before, 1.05-1.06× after). So only Check and Process, one call per request, are
    registered; the rate-limit service, the access-log stream (one call per Envoy stream), health
    and reflection are served as generic methods, found by name when called."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers) -> None:
        """Not registered: the generic handlers added with them serve these methods."""


@dataclass
class Runtime:
    """Everything a request reads, built from one config; swapped whole on reload. Fleet state
    (the store, the revocation list) belongs to the Worker and outlives reloads."""
    config: cfgmod.Config
    policies: PolicySet
    max_header_bytes: int
    identity: Identity
    keys: dict[str, tuple[ProviderRules, KeySet]] = field(default_factory=dict)
    sources: dict[str, KeySource] = field(default_factory=dict)
    introspectors: dict[str, Any] = field(default_factory=dict)
    ratelimiter: Any = None

    @classmethod
    def build(cls, cfg: cfgmod.Config, revocations: Any = None, api_keys: Any = None,
              previous: Runtime | None = None, store: Any = None, fallback: Any = None) -> Runtime:
        policies = compile_policies(cfg)
        keys: dict[str, tuple[ProviderRules, KeySet]] = {}
        sources = {name: KeySource(name, p, keys) for name, p in cfg.providers.items() if p.introspection is None}
        if previous is not None:
            for name, src in sources.items():
                if name in previous.sources:
                    src.adopt(previous.sources[name])
        introspectors: dict[str, Any] = {}
        for name, p in cfg.providers.items():
            if p.introspection is not None:
                from .services.introspection import Introspector

                try:
                    secret = cfgmod.read_secret(p.introspection.client_secret_file, p.introspection.client_secret_env,
                                                f"providers.{name}.introspection.client_secret")
                except cfgmod.ConfigError as exc:
                    # the sidecar still starts: this provider's tokens get an honest 503 until a reload
                    log.error("introspection client secret unreadable", extra={"provider": name, "error": str(exc)})
                    secret = None
                introspectors[name] = Introspector(p.introspection, secret)
        bound = cfg.server.token_cache_entries
        identity = Identity(policies, keys, sources, introspectors=introspectors, api_keys=api_keys,
                            revocations=revocations, token_cache=TokenCache(bound), decision_cache=DecisionCache(bound))
        from .services.ratelimit import RateLimiter
        from .store.memory import MemoryStore

        ratelimiter = RateLimiter(cfg.rate_limits, store if store is not None else MemoryStore(),
                                  fallback=fallback)
        if (previous is not None and previous.ratelimiter.store is ratelimiter.store
                and previous.config.rate_limits == cfg.rate_limits):
            # same rules: what is known to be over its limit still is (counters live in the store,
            # keyed by rule, partition, algorithm and period, so a reload never resets them)
            ratelimiter.deny_cache = previous.ratelimiter.deny_cache
        if previous is not None:
            ratelimiter.adopt(previous.ratelimiter)    # batched rules' local counts of unchanged rules
        return cls(config=cfg, policies=policies, max_header_bytes=cfg.server.max_header_bytes, identity=identity,
                   keys=keys, sources=sources, introspectors=introspectors, ratelimiter=ratelimiter)

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.sources.values()))

    async def close(self) -> None:
        if self.ratelimiter is not None:
            await self.ratelimiter.close()     # batched rate-limit rules: a last flush to the store
        for s in self.sources.values():
            await s.close()
        for i in self.introspectors.values():
            await i.close()

    def policy_label(self, name: str | None) -> str:
        """Metric label for a policy name: bounded to the configured names."""
        if not name:
            return self.policies.default or ""
        return name if name in self.policies.policies else "unknown"


def build_store(cfg: cfgmod.StoreConfig) -> Store:
    if cfg.redis is not None:
        from .store.redis import RedisStore

        r = cfg.redis
        password = cfgmod.read_secret(r.password_file, r.password_env, "store.redis.password")
        return RedisStore(r.url, cluster=r.cluster, password=password, timeout_ms=r.timeout_ms,
                          connect_timeout_ms=r.connect_timeout_ms, max_connections=r.max_connections)
    from .store.memory import MemoryStore

    mem = cfg.memory or cfgmod.MemoryStoreConfig()
    return MemoryStore(max_keys=mem.max_keys)


class Worker:
    """One serving process: the gRPC server, optionally the admin server, and their state."""

    def __init__(self, config_path: str | None, cfg: cfgmod.Config, *, listen: str | None = None,
                 with_admin: bool = True):
        self.config_path = Path(config_path) if config_path else None
        self.cfg = cfg
        self.listen = listen or cfg.server.listen
        self.with_admin = with_admin
        self.store: Store = build_store(cfg.store)
        # fleet state lives with the worker, not the config: it survives reloads
        from .services.revocation import RevocationList

        self.revocations = RevocationList(self.store, on_state=lambda ok: metrics.REVOCATION_COMPLETE.set(int(ok)))
        self.apikeys = None
        if cfg.api_keys is not None:
            from .services.apikeys import ApiKeyRegistry

            ak = cfg.api_keys
            self.apikeys = ApiKeyRegistry(ak.keys, self.store if ak.from_store else None,
                                          cache_seconds=ak.cache_seconds)
        # fail-open rate limits keep limiting per replica on this while the store is down
        from .store.memory import MemoryStore

        self.local_limits = MemoryStore(max_keys=100_000)
        from .core.concurrency import ConcurrencyLimiter

        self.concurrency = ConcurrencyLimiter.compile(cfg.concurrency)   # in-flight counts outlive reloads
        from .services.cache import ResponseCache

        # entries outlive reloads; the in-memory store would only repeat the in-process tier
        self.cache = ResponseCache(cfg.cache, self.store if cfg.store.kind == "redis" else None)
        from .services.breaker import Breakers

        # one state per upstream for the fleet (the store); the local record when the store is down
        self.breakers = Breakers(cfg.circuit_breakers, self.store, self.local_limits)
        self.processor: ExternalProcessorService | None = None
        self.authz: AuthorizationService | None = None
        self.runtime = Runtime.build(cfg, self.revocations, self.apikeys, store=self.store,
                                     fallback=self.local_limits)
        self.store_up: bool | None = None
        self.draining = False
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.admin = None
        self._tasks: list[asyncio.Task] = []
        self._reload_lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._config_sig = cfgmod.file_signature(self.config_path) if self.config_path else None
        self.bound_port: int | None = None

    def runtime_ref(self) -> Runtime:
        return self.runtime

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.revocations is not None:
            await self.revocations.start()
        await self.runtime.start()
        server = grpc.aio.server(
            maximum_concurrent_rpcs=self.cfg.server.max_in_flight,
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                     ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)])
        self.authz = authz = AuthorizationService(self.runtime_ref, breakers=self.breakers)
        add_authz_to_server(authz, server)
        from .telemetry import tracing

        tracing.setup(self.cfg.telemetry.tracing)       # per process: each worker exports its own spans
        await self.cache.start()
        await self.breakers.start()
        self.processor = ExternalProcessorService(self.runtime_ref, concurrency=self.concurrency, cache=self.cache,
                                                  breakers=self.breakers)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(self.processor, server)
        # the other services are found by name when called (see GenericOnly): not on the hot path
        rest = GenericOnly(server)
        ratelimit_service.add_to_server(rest, self.runtime_ref, lambda: self.store)
        accesslog.add_to_server(rest, self.runtime_ref, lambda: self.breakers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, rest)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)), rest)
        self.bound_port = self._bind(server)
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.with_admin:
            from .admin.server import AdminServer

            self.admin = AdminServer(self.cfg.admin, self, apikeys=self.apikeys, revocations=self.revocations,
                                     ratelimiter=lambda: self.runtime.ratelimiter, cache=self.cache,
                                     breakers=self.breakers)
            await self.admin.start()
        self._tasks.append(asyncio.create_task(self._probe_store(), name="store-probe"))
        self._tasks.append(asyncio.create_task(self._sample_loop(authz), name="loop-sampler"))
        if self.cfg.cache.rules and (self.with_admin or self.listen == self.cfg.server.worker_listen(0)):
            # one process per replica reads the shared tier's size (the gauges are summed over workers)
            self._tasks.append(asyncio.create_task(self._sample_store_tier(), name="cache-tier-sampler"))
        self._tasks.append(asyncio.create_task(self._follow_ratelimit_resets(), name="rl-resets"))
        if self.config_path is not None:
            self._tasks.append(asyncio.create_task(self._watch_config(), name="config-watch"))
        metrics.READY.set(1)
        metrics.CONFIG_LOADED_AT.set(time.time())
        log.info("serving", extra={"listen": self.listen, "port": self.bound_port, "store": self.store.name,
                                   "pid": os.getpid(), "policies": sorted(self.cfg.policies)})

    def _bind(self, server: grpc.aio.Server) -> int:
        tls = self.cfg.server.tls
        addr = self.listen
        if addr.startswith("unix:"):
            path = addr[5:]
            if os.path.exists(path):
                os.unlink(path)   # a stale socket from a killed process
        if tls is None:
            return server.add_insecure_port(addr)
        ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        creds = grpc.ssl_server_credentials([(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                                            root_certificates=ca, require_client_auth=ca is not None)
        return server.add_secure_port(addr, creds)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        if self.draining:
            return
        self.draining = True
        metrics.READY.set(0)
        log.info("draining", extra={"grace_seconds": self.cfg.server.shutdown_grace_seconds,
                                    "delay_seconds": self.cfg.server.drain_delay_seconds})
        await self.health.enter_graceful_shutdown()
        if self.server is not None and self.cfg.server.drain_delay_seconds > 0:
            # calls keep being served while Envoy's health checks notice NOT_SERVING; a call that
            # reached a stopping gRPC server before dispatch would be CANCELLED, not retried
            await asyncio.sleep(self.cfg.server.drain_delay_seconds)
        if self.server is not None:
            await self.server.stop(self.cfg.server.shutdown_grace_seconds)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runtime.close()
        if self.revocations is not None:
            await self.revocations.close()
        await self.cache.close()
        await self.breakers.close()
        from .telemetry import tracing

        await asyncio.to_thread(tracing.shutdown)       # flush the batched spans (bounded by the exporter)
        try:
            await self.store.close()
        except StoreError:
            pass
        if self.admin is not None:
            await self.admin.stop()
        log.info("stopped")
        self._stopped.set()

    # -- reload -----------------------------------------------------------------------------------
    async def reload(self, reason: str) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "no config file to reload"
        async with self._reload_lock:
            self._config_sig = cfgmod.file_signature(self.config_path)
            try:
                new = cfgmod.load(self.config_path)
            except cfgmod.ConfigError as exc:
                metrics.CONFIG_RELOADS.labels("rejected").inc()
                log.error("config reload rejected; the previous config keeps serving",
                          extra={"trigger": reason, "error": str(exc)})
                return False, str(exc)
            # the listener, workers and store are fixed for the process; the rest reloads
            fixed = self.cfg.server.model_dump(exclude=RELOADABLE_SERVER)
            restart_needed = [k for k, changed in (
                ("server", new.server.model_dump(exclude=RELOADABLE_SERVER) != fixed),
                ("store", new.store != self.cfg.store)) if changed]
            if restart_needed:
                log.warning("config changes to %s take effect after a restart", ", ".join(restart_needed))
            if self.apikeys is not None:
                ak = new.api_keys
                self.apikeys.update_config(ak.keys if ak else [])
                self.apikeys.store = self.store if ak and ak.from_store else None
            rt = Runtime.build(new, self.revocations, self.apikeys, previous=self.runtime, store=self.store,
                               fallback=self.local_limits)
            await rt.start()
            kept_server = self.cfg.server.model_copy(update={k: getattr(new.server, k) for k in RELOADABLE_SERVER})
            old, self.runtime, self.cfg = self.runtime, rt, new.model_copy(
                update={"server": kept_server, "store": self.cfg.store})
            if self.admin is not None:
                self.admin.cfg = self.cfg.admin   # a rotated admin token applies at once
            if self.processor is not None:
                self.processor.sync_limits(rt.config.concurrency)
            await old.close()
            metrics.CONFIG_RELOADS.labels("ok").inc()
            metrics.CONFIG_LOADED_AT.set(time.time())
            log.info("config reloaded", extra={"trigger": reason, "policies": sorted(new.policies)})
            return True, "reloaded"

    async def _watch_config(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            sig = cfgmod.file_signature(self.config_path)
            if sig is not None and sig != self._config_sig:
                await self.reload("file changed")

    async def _follow_ratelimit_resets(self) -> None:
        """An admin reset on any replica clears every replica's local over-limit memory."""
        from .store import keys as keyspace

        channel = keyspace.channel("rl", "reset")
        while True:
            try:
                sub = await self.store.subscribe(channel)
                # resets published while we were not listening are lost: forget all local
                # over-limit memory (it only saves store calls) whenever we (re)subscribe
                self.runtime.ratelimiter.deny_cache.clear()
                try:
                    async for msg in sub:
                        self.runtime.ratelimiter.forget(msg)
                finally:
                    await sub.close()
            except StoreError:
                pass
            except Exception:  # noqa: BLE001 - this follower must outlive any driver surprise
                log.exception("rate-limit reset follower failed; resubscribing")
            await asyncio.sleep(1.0)

    # -- store health -----------------------------------------------------------------------------
    async def _sample_loop(self, authz: AuthorizationService, period: float = 0.25) -> None:
        """Event-loop lag and in-flight work, sampled: no metric call on the request path."""
        loop = asyncio.get_running_loop()
        authz_gauge = metrics.IN_FLIGHT.labels("authz")
        proc_gauge = metrics.IN_FLIGHT.labels("ext_proc")
        while True:
            t0 = loop.time()
            await asyncio.sleep(period)
            metrics.LOOP_LAG.observe(max(0.0, loop.time() - t0 - period))
            authz_gauge.set(authz.in_flight)
            if self.processor is not None:
                proc_gauge.set(self.processor.in_flight)

    async def _sample_store_tier(self, period: float = 60.0) -> None:
        """gateway_cache_entries / gateway_cache_stored_bytes {tier="store"}: a bounded SCAN a minute."""
        entries = metrics.CACHE_ENTRIES.labels("store")
        size = metrics.CACHE_BYTES.labels("store")
        while True:
            usage = await self.cache.store_usage()
            if usage is not None and "entries" in usage:
                entries.set(usage["entries"])
                size.set(usage["bytes"])
            await asyncio.sleep(period)

    async def _probe_store(self) -> None:
        gauge = metrics.STORE_UP.labels(self.store.name)
        while True:
            try:
                await self.store.ping()
                up, err = True, ""
            except StoreError as exc:
                up, err = False, str(exc)
            if up != self.store_up:
                self.store_up = up
                gauge.set(1 if up else 0)
                if up:
                    log.info("store reachable", extra={"store": self.store.name})
                else:
                    log.error("store unreachable; each policy's failure setting decides meanwhile",
                              extra={"store": self.store.name, "error": err})
            await asyncio.sleep(STORE_PROBE_SECONDS)

    def readiness(self) -> tuple[bool, dict]:
        providers = {name: {"keys": len(ks.keys), "loaded": ks.loaded} for name, (_, ks) in self.runtime.keys.items()}
        detail = {
            "config": "loaded",
            "draining": self.draining,
            "store": {"kind": self.store.name, "up": self.store_up},
            "providers": providers,
            "revocations": self.revocations.status(),
            "concurrency": self.concurrency.snapshot(),
        }
        return (not self.draining), detail


async def run_worker(config_path: str | None, cfg: cfgmod.Config, *, listen: str | None = None,
                     with_admin: bool = True) -> int:
    worker = Worker(config_path, cfg, listen=listen, with_admin=with_admin)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(worker.stop()))
    loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(worker.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(worker.reload("SIGHUP")))
    from .admin.logs import take_from_supervisor

    loop.add_signal_handler(signal.SIGUSR1, take_from_supervisor)    # a log level from the supervisor
    try:
        await worker.start()
        # everything built at start-up (config, compiled policies, modules, protobuf descriptors)
        # lives for the whole process: keep it out of the collector's scans, which otherwise
        # walk it on every full collection under load
        gc.collect()
        gc.freeze()
    except Exception as exc:  # noqa: BLE001 - a start failure is one clear line, not a traceback
        log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
        await worker.stop()
        return 1
    await worker.wait_stopped()
    return 0
