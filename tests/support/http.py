"""A tiny blocking HTTP client for tests: status, headers (lower-case) and body, no redirects."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


def request(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
            timeout: float = 5.0) -> Response:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + (f"?{u.query}" if u.query else "")
        conn.request(method, path or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        hdrs: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            hdrs.setdefault(k.lower(), []).append(v)
        return Response(resp.status, hdrs, data)
    finally:
        conn.close()


def get(url: str, token: str | None = None, headers: dict[str, str] | None = None, **kw) -> Response:
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    return request("GET", url, h, **kw)


def burst(url: str, token: str | None, n: int, headers: dict[str, str] | None = None,
          timeout: float = 30.0) -> list[Response]:
    """n concurrent GETs (one thread each), all started before any is awaited; bounded by `timeout`."""
    import threading

    out: list[Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = get(url, token, headers=headers)
        with lock:
            out.append(r)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return out


def parallel(n: int, fn, timeout: float = 30.0) -> list:
    """Run `fn` in n threads released together (a barrier); its results, in finishing order.
    Fails when a call is still running after `timeout` (a client hung)."""
    import threading

    out: list = []
    lock = threading.Lock()
    gate = threading.Barrier(n)

    def one() -> None:
        gate.wait()
        r = fn()
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return out
