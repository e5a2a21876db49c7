"""In-flight caps through the real Envoy and the shipped envoy.yaml: `/delay/{ms}` runs through
ext_proc with policy `public`, so with `default_route_limit: 3` the 4th concurrent slow request
is answered at once with the sidecar's ImmediateResponse, and client aborts (the client closes
its socket mid-request; Envoy then just ends the ext_proc stream) give every permit back.

The in-flight count is read from the sidecar's /metrics (`gateway_concurrent_requests`); every
wait polls it with a deadline.
"""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import Response, get
from tests.support.procs import wait_until
from tests.support.stack import Stack, new_stack

pytestmark = pytest.mark.e2e

CAP = 3
SLOW = "/delay/1500"


@pytest.fixture(scope="module")
def capped(tmp_path_factory) -> Stack:
    s = new_stack(tmp_path_factory.mktemp("concurrency"))
    try:
        s.start_upstream()
        s.write_sidecar_config({"concurrency": {"global_limit": 50, "default_route_limit": CAP}})
        s.start_sidecar()
        s.start_envoy()
        yield s
    finally:
        s.stop()


def metric(stack: Stack, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{stack.sidecar_admin}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def in_flight(stack: Stack, route: str = "public") -> float:
    return metric(stack, "gateway_concurrent_requests", route=route)


def wait_in_flight(stack: Stack, n: int, what: str) -> None:
    wait_until(lambda: in_flight(stack) == n, timeout=20, interval=0.01, what=what)


class Slow:
    """Requests to a slow route, each in its own thread, holding their permits meanwhile."""

    def __init__(self, url: str, n: int):
        self.responses: list[Response | Exception] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(url,), daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _one(self, url: str) -> None:
        try:
            r: Response | Exception = get(url, timeout=15)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on by the test
            r = exc
        with self._lock:
            self.responses.append(r)

    def join(self) -> list[Response | Exception]:
        for t in self._threads:
            t.join(timeout=20)
        return self.responses


def slow_request(stack: Stack) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.ports["external"]), timeout=5)
    sock.sendall(f"GET {SLOW} HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: abort-test\r\n\r\n".encode())
    return sock


def abort(sock: socket.socket) -> None:
    # RST rather than FIN: the client is simply gone, as when a browser tab closes
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def assert_cap_holds(stack: Stack) -> None:
    """CAP slow requests hold the route; the next one is rejected at once; all CAP pass."""
    slow = Slow(f"{stack.external}{SLOW}", CAP)
    wait_in_flight(stack, CAP, f"{CAP} slow requests holding permits")
    r = get(f"{stack.external}{SLOW}")
    assert r.status == 503, r.body
    assert r.header("x-extproc-concurrency") == "route"
    assert r.header("retry-after") == "1"
    assert r.header("content-type") == "application/json"
    body = r.json()
    assert body["reason"] == "concurrency_limit" and body["limit"] == "route"
    assert body["route"] == "public" and body["max_in_flight"] == CAP
    results = slow.join()
    assert [getattr(x, "status", x) for x in results] == [200] * CAP
    wait_in_flight(stack, 0, "permits released after the responses")


def test_the_fourth_concurrent_request_is_rejected_and_a_later_one_passes(capped: Stack):
    assert_cap_holds(capped)
    r = get(f"{capped.external}/delay/0")
    assert r.status == 200 and r.json()["delayed_ms"] == 0
    assert r.header("x-extproc-concurrency") is None


def test_client_aborts_give_every_permit_back(capped: Stack):
    gone_before = metric(capped, "extproc_streams_total", policy="public", end="client_gone")
    aborted = 0
    while aborted < 200:
        n = min(CAP, 200 - aborted)
        socks = [slow_request(capped) for _ in range(n)]
        wait_in_flight(capped, n, f"{n} requests in flight (after {aborted} aborts)")
        for sock in socks:
            abort(sock)
        aborted += n
        wait_in_flight(capped, 0, f"permits back after {aborted} aborts")
    # each abort ended its ext_proc stream before response headers: Envoy's only sign of it
    assert metric(capped, "extproc_streams_total", policy="public", end="client_gone") >= gone_before + 200
    # aborts at whatever stage the request has reached (before ext_authz, in ext_proc, upstream)
    for _ in range(20):
        socks = [slow_request(capped) for _ in range(10)]
        for sock in socks:
            abort(sock)
    wait_in_flight(capped, 0, "permits back after racing aborts")
    assert_cap_holds(capped)
