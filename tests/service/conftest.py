"""In-process service tests: the real `extproc.app.Worker` on free ports, real gRPC clients.

Each test body is one `asyncio.run(...)`: the worker, its gRPC channel and the admin HTTP
session live and close inside that one event loop. Requests are built the way Envoy 1.40
sends them (see ENVOY-NOTES.md). Metrics are process-global prometheus objects: tests assert
on deltas. Nothing sleeps for synchronisation: `eventually` polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import ipaddress
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from extproc import app as appmod
from extproc import config as cfgmod
from extproc.app import Worker
from extproc.demo import idp
from extproc.telemetry import metrics
from tests.support.procs import free_port

T = TypeVar("T")
ADMIN_TOKEN_ENV = "EXTPROC_TEST_ADMIN_TOKEN"
RPC_TIMEOUT = 5.0


def run(body: Callable[[], Awaitable[T]]) -> T:
    """One event loop per test: everything the body opens, it closes."""
    return asyncio.run(body())


async def eventually(check: Callable[[], Any], within: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns something truthy, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except (grpc.aio.AioRpcError, aiohttp.ClientError, OSError, AssertionError) as exc:
            last = exc
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}" + (f": {last!r}" if last else ""))
        await asyncio.sleep(interval)


def sample(name: str, **labels: str) -> float:
    """Current value of one prometheus sample (0 when the child does not exist yet), as a scrape
    would see it: counts kept off the hot path are added first (metrics.flush_pending)."""
    metrics.flush_pending()
    return REGISTRY.get_sample_value(name, labels) or 0.0


def write_atomic(path: Path, text: str) -> None:
    """Write as operators (and Kubernetes) do: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------ Envoy-shaped input ---

def check_request(path: str = "/api/products", *, policy: str | None = None, token: str | None = None,
                  headers: dict[str, str] | None = None, method: str = "GET",
                  host: str = "shop.example:8000", client_ip: str = "203.0.113.7") -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy 1.40's ext_authz filter sends it (pseudo-headers included)."""
    request_id = str(uuid.uuid4())
    h = {":authority": host, ":method": method, ":path": path, ":scheme": "http",
         "user-agent": "curl/8.5.0", "accept": "*/*", "x-forwarded-proto": "http", "x-request-id": request_id}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    h.update(headers or {})
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = client_ip
    a.source.address.socket_address.port_value = 53124
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 8000
    a.request.time.GetCurrentTime()
    http = a.request.http
    http.id = "14713487234623479832"
    http.method = method
    http.headers.update(h)
    http.path = path
    http.host = host
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    if policy is not None:
        a.context_extensions["policy"] = policy
    return req


def _header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def request_headers(path: str = "/api/products", end_of_stream: bool = True) -> external_processor_pb2.ProcessingRequest:
    return external_processor_pb2.ProcessingRequest(request_headers=external_processor_pb2.HttpHeaders(
        headers=_header_map({":authority": "shop.example:8000", ":method": "GET", ":path": path,
                             ":scheme": "http", "x-request-id": str(uuid.uuid4())}),
        end_of_stream=end_of_stream))


def response_headers(status: int = 200) -> external_processor_pb2.ProcessingRequest:
    return external_processor_pb2.ProcessingRequest(response_headers=external_processor_pb2.HttpHeaders(
        headers=_header_map({":status": str(status), "content-type": "application/json"}), end_of_stream=False))


def request_body(data: bytes = b"{}") -> external_processor_pb2.ProcessingRequest:
    return external_processor_pb2.ProcessingRequest(
        request_body=external_processor_pb2.HttpBody(body=data, end_of_stream=True))


def header_options(opts) -> dict[str, str]:
    return {o.header.key: (o.header.value or o.header.raw_value.decode()) for o in opts}


def denied_body(resp: external_auth_pb2.CheckResponse) -> dict:
    return json.loads(resp.denied_response.body)


# ------------------------------------------------------------------------------------ worker ---

@dataclass
class Running:
    worker: Worker
    target: str
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession
    config_path: Path | None

    @property
    def admin_url(self) -> str:
        assert self.worker.admin is not None
        return f"http://127.0.0.1:{self.worker.admin.port}"

    async def check(self, req: external_auth_pb2.CheckRequest,
                    channel: grpc.aio.Channel | None = None) -> external_auth_pb2.CheckResponse:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel or self.channel)
        return await stub.Check(req, timeout=RPC_TIMEOUT)

    def process(self, policy: str | None = None, channel: grpc.aio.Channel | None = None):
        stub = external_processor_pb2_grpc.ExternalProcessorStub(channel or self.channel)
        metadata = (("x-extproc-policy", policy),) if policy else None
        return stub.Process(metadata=metadata, timeout=30)

    async def health(self, service: str = "", channel: grpc.aio.Channel | None = None) -> int:
        stub = health_pb2_grpc.HealthStub(channel or self.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        return resp.status

    async def admin(self, method: str, path: str, **kw) -> tuple[int, Any]:
        async with self.http.request(method, self.admin_url + path, **kw) as resp:
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text


class Sidecar:
    """Builds configs around one signing key and runs workers for one test."""

    def __init__(self, tmp_path: Path, key: idp.SigningKey):
        self.tmp_path = tmp_path
        self.key = key
        self.jwks_file = tmp_path / "jwks.json"
        self.jwks_file.write_text(json.dumps(key.jwks()))

    def token(self, sub: str = "alice", **kw: Any) -> str:
        return self.key.mint(sub, **kw)

    def config(self) -> dict[str, Any]:
        """A fresh config dict: loopback on a free port, the demo provider on a local JWKS file."""
        return {
            # no drain delay: a test's stop() goes straight to refusing new calls
            "server": {"listen": f"127.0.0.1:{free_port()}", "max_in_flight": 64, "shutdown_grace_seconds": 5,
                       "drain_delay_seconds": 0},
            # port 0: the admin server binds any free port and reports it (worker.admin.port)
            "admin": {"listen": "127.0.0.1:0", "token_env": ADMIN_TOKEN_ENV},
            "store": {"memory": {"max_keys": 1000}},
            "providers": {"demo": {"issuer": idp.DEMO_ISSUER, "audiences": [idp.DEMO_AUDIENCE],
                                   "algorithms": ["RS256"], "jwks_file": str(self.jwks_file),
                                   "leeway_seconds": 5, "claims_to_headers": {"sub": "x-jwt-sub"}}},
            "policies": {"public": {"auth": "none"},
                         "api": {"mode": "enforce", "auth": {"providers": ["demo"]}},
                         "api-shadow": {"mode": "shadow", "auth": {"providers": ["demo"]}}},
            "default_policy": "api",
            "unknown_policy": "deny",
        }

    @contextlib.asynccontextmanager
    async def run(self, cfg: dict[str, Any] | str, *, config_file: bool = False, config_path: Path | None = None,
                  credentials: grpc.ChannelCredentials | None = None,
                  target: str | None = None) -> AsyncIterator[Running]:
        """Start a Worker for `cfg` (parsed, or written to a file it watches); stop it on exit."""
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
        if config_file and config_path is None:
            config_path = self.tmp_path / "extproc.yaml"
            write_atomic(config_path, text)
        parsed = cfgmod.load(config_path) if config_path else cfgmod.parse(text, "<test>")
        worker = Worker(str(config_path) if config_path else None, parsed)
        try:
            await worker.start()
            listen = parsed.server.listen
            tgt = target or (listen if listen.startswith("unix:") else f"127.0.0.1:{worker.bound_port}")
            channel = (grpc.aio.secure_channel(tgt, credentials) if credentials
                       else grpc.aio.insecure_channel(tgt))
            try:
                async with aiohttp.ClientSession() as http:
                    yield Running(worker, tgt, channel, http, config_path)
            finally:
                await channel.close()
        finally:
            await worker.stop()


@pytest.fixture(scope="session")
def signing_key() -> idp.SigningKey:
    return idp.generate()


@pytest.fixture
def sidecar(tmp_path: Path, signing_key: idp.SigningKey, monkeypatch: pytest.MonkeyPatch) -> Sidecar:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    monkeypatch.setattr(appmod, "CONFIG_POLL_SECONDS", 0.05)
    return Sidecar(tmp_path, signing_key)


# --------------------------------------------------------------------------------------- PKI ---

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_credentials(self, with_cert: bool) -> grpc.ChannelCredentials:
        if with_cert:
            return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.client_key.read_bytes(),
                                                self.client_cert.read_bytes())
        return grpc.ssl_channel_credentials(self.ca.read_bytes())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool,
          san: list[x509.GeneralName] | None = None, client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "extproc test CA")])
    ca = _cert("extproc test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("localhost", server_key, ca_name, ca_key, ca=False,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("envoy", client_key, ca_name, ca_key, ca=False, client=True)
    out = Pki(d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem", d / "client-key.pem")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    out.server_key.write_bytes(_key_pem(server_key))
    out.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    out.client_key.write_bytes(_key_pem(client_key))
    return out
