"""envoy/examples/tls.yaml through the real Envoy: TLS termination, the HTTPS redirect, and mTLS
to an upstream workload in STRICT and PERMISSIVE mode.

Certificates are generated here with `cryptography` (never committed) and the example's
/etc/envoy/tls/ paths pointed at them; otherwise the example runs as shipped, ports rewritten.
Proven: a TLS 1.2+ handshake on :8443 against the generated CA; plain HTTP answered with a 301 to
https; the STRICT sidecar refuses a handshake without a client certificate (and plaintext) and
accepts one with the mesh's client certificate; the PERMISSIVE sidecar accepts both plaintext
and mTLS; through the gateway, mTLS to STRICT works and certless TLS to STRICT gets a 503.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.test_traffic_lb import Example
from tests.support.procs import ROOT

pytestmark = pytest.mark.e2e

BOOTSTRAP = ROOT / "envoy" / "examples" / "tls.yaml"
CERT_DIR = "/etc/envoy/tls/"
HTTP, HTTPS, STRICT, PERMISSIVE, ADMIN, WORKLOAD = 8000, 8443, 8444, 8445, 9901, 18081


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool = False,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns or ips:
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write_certs(directory: Path) -> Path:
    """The files tls.yaml names, freshly generated into `directory` (returned)."""
    directory.mkdir(parents=True, exist_ok=True)

    def save(stem: str, cert: x509.Certificate, key=None) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (directory / f"{stem}-key.pem").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key = _key()
    ca = _cert("extproc test mesh CA", ca_key, None, ca_key, ca=True)
    save("mesh-ca", ca)
    for stem, cn, dns, ips in (("server", "gateway", ("localhost", "gateway.shop.test"), ("127.0.0.1",)),
                               ("workload", "webshop", ("webshop.mesh.local",), ()),
                               ("client", "gateway-client", ("gateway.mesh.local",), ())):
        k = _key()
        save(stem, _cert(cn, k, ca.subject, ca_key, dns=dns, ips=ips), k)
    return directory


def point_at(directory: Path):
    """An edit for Example.config: every /etc/envoy/tls/ path into `directory`."""
    def walk(doc: Any) -> Any:
        if isinstance(doc, dict):
            return {k: walk(v) for k, v in doc.items()}
        if isinstance(doc, list):
            return [walk(v) for v in doc]
        if isinstance(doc, str) and doc.startswith(CERT_DIR):
            return str(directory / doc[len(CERT_DIR):])
        return doc

    def edit(doc: dict) -> None:
        doc.update(walk(doc))
    return edit


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    base = tmp_path_factory.mktemp("traffic-tls")
    certs = write_certs(base / "certs")
    ex = Example(base, BOOTSTRAP, [HTTP, HTTPS, STRICT, PERMISSIVE, ADMIN, WORKLOAD])
    ex.certs = certs
    try:
        ex.start_replica(WORKLOAD, "r1")
        point = point_at(certs)

        def edit(doc: dict) -> None:
            point(doc)
            redirect = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
                "route_config"]["virtual_hosts"][0]["routes"][0]["redirect"]
            redirect["port_redirect"] = ex.port(HTTPS)
        ex.start_envoy(edit)
        yield ex
    finally:
        ex.stop()


def client_context(ex: Example, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ex.certs / "mesh-ca.pem"))
    if cert:
        ctx.load_cert_chain(str(ex.certs / "client.pem"), str(ex.certs / "client-key.pem"))
    return ctx


def https_get(ex: Example, port: int, path: str, ctx: ssl.SSLContext):
    """GET over TLS to 127.0.0.1 (the server certificate names that IP), verified against the CA."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read(), conn.sock.version()
    finally:
        conn.close()


def tls_request(port: int, ctx: ssl.SSLContext, server_name: str) -> bytes:
    """A raw HTTP/1.1 GET over TLS; raises when the handshake or the first read is refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        s.sendall(b"GET /echo/headers HTTP/1.1\r\nHost: webshop\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_tls_termination_on_8443(tls):
    status, headers, body, version = https_get(tls, tls.port(HTTPS), "/echo/headers", client_context(tls))
    assert status == 200 and headers["x-upstream-replica"] == "r1"
    assert version in ("TLSv1.2", "TLSv1.3")
    assert headers["strict-transport-security"].startswith("max-age=")
    assert json.loads(body)["headers"]["x-forwarded-proto"] == "https"


def test_plain_http_is_redirected_to_https(tls):
    before = tls.hits(WORKLOAD, "/echo/headers")
    conn = http.client.HTTPConnection("127.0.0.1", tls.port(HTTP), timeout=5)
    try:
        conn.request("GET", "/echo/headers?x=1", headers={"Host": "shop.test"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 301
        assert resp.getheader("location") == f"https://shop.test:{tls.port(HTTPS)}/echo/headers?x=1"
    finally:
        conn.close()
    assert tls.hits(WORKLOAD, "/echo/headers") == before       # the redirect never reaches the workload


def test_strict_refuses_a_client_without_certificate(tls):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_request(tls.port(STRICT), client_context(tls), "webshop.mesh.local")
    # plaintext is refused too: the TLS listener never answers HTTP
    with socket.create_connection(("127.0.0.1", tls.port(STRICT)), timeout=5) as s:
        s.sendall(b"GET /echo/headers HTTP/1.1\r\nHost: webshop\r\n\r\n")
        try:
            assert not s.recv(65536).startswith(b"HTTP/1.1 200")
        except ConnectionError:
            pass


def test_strict_accepts_the_mesh_client_certificate(tls):
    data = tls_request(tls.port(STRICT), client_context(tls, cert=True), "webshop.mesh.local")
    assert data.startswith(b"HTTP/1.1 200") and b"x-upstream-replica: r1" in data.lower()


def test_permissive_accepts_plaintext_and_mtls(tls):
    conn = http.client.HTTPConnection("127.0.0.1", tls.port(PERMISSIVE), timeout=5)
    try:
        conn.request("GET", "/echo/headers")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        conn.close()
    data = tls_request(tls.port(PERMISSIVE), client_context(tls, cert=True), "webshop.mesh.local")
    assert data.startswith(b"HTTP/1.1 200")


def test_gateway_to_upstream_mtls_strict_and_permissive(tls):
    ctx = client_context(tls)
    for path, expected in (("/strict/echo/headers", 200), ("/strict-nocert/echo/headers", 503),
                           ("/permissive/echo/headers", 200), ("/permissive-mtls/echo/headers", 200)):
        status, _headers, body, _v = https_get(tls, tls.port(HTTPS), path, ctx)
        assert status == expected, (path, status, body[:300])
    assert tls.stat("cluster.mesh_strict_nocert.upstream_cx_connect_fail") >= 1    # the handshake, refused
    assert tls.stat(f"listener.127.0.0.1_{tls.port(STRICT)}.ssl.fail_verify_no_cert") >= 1
