"""The demo's TLS listener (:8443 in envoy/envoy.yaml): the same gateway as :8000 over TLS 1.2+,
with the self-signed certificate scripts/setup makes (.extproc/tls)."""

from __future__ import annotations

import http.client
import ssl

import pytest

from tests.support.procs import ROOT

pytestmark = pytest.mark.e2e


def https(stack, path: str, headers: dict[str, str] | None = None,
          ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    if ctx is None:
        ctx = ssl.create_default_context(cafile=str(ROOT / ".extproc" / "tls" / "server.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", stack.ports["external_tls"], context=ctx, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_the_tls_listener_is_the_same_gateway(stack, token):
    status, headers, _ = https(stack, "/api/products/1")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, headers, body = https(stack, "/api/products/1", {"Authorization": f"Bearer {token}"})
    assert status == 200 and b"product" in body
    assert headers["x-cache-status"] in ("HIT", "MISS") and "server-timing" in headers   # ext_proc ran too


def test_tls_1_2_is_accepted(stack):
    """The minimum is TLS 1.2 (envoy.yaml tls_params); this Python cannot offer anything older to
    show the refusal, so the floor itself is what is checked here."""
    ctx = ssl.create_default_context(cafile=str(ROOT / ".extproc" / "tls" / "server.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    status, _, _ = https(stack, "/public/health", ctx=ctx)
    assert status == 200


def test_an_untrusted_client_sees_the_certificate_is_self_signed(stack):
    with pytest.raises(ssl.SSLCertVerificationError):
        https(stack, "/public/health", ctx=ssl.create_default_context())
