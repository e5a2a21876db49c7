"""A JWKS / OpenID discovery server on 127.0.0.1 whose answers a test switches at will.

Blocking (http.server in a thread), so an e2e test drives it from plain synchronous code while
a real sidecar fetches from it. Each path answers as set: a JSON document (optionally with a
Cache-Control header), `http_500`, `garbage` (truncated JSON), or 404 when nothing is set. Every
request is counted per path. HTTP/1.0: one connection per request, so stopping leaves no
keep-alive connection (and no handler thread) behind.
"""

from __future__ import annotations

import collections
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GARBAGE = b'{"keys": [{"kty": "RSA", "n": '


class KeyServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._behaviour: dict[str, tuple[str, bytes, str | None]] = {}
        self._hits: collections.Counter[str] = collections.Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- what each path answers -------------------------------------------------------------------
    def publish(self, path: str, doc: Any, cache_control: str | None = None) -> None:
        with self._lock:
            self._behaviour[path] = ("json", json.dumps(doc).encode(), cache_control)

    def fail(self, path: str, how: str) -> None:
        if how not in ("http_500", "garbage"):
            raise ValueError(f"unknown failure {how!r}")
        with self._lock:
            self._behaviour[path] = (how, b"", None)

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits[path]

    def _answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self._hits[path] += 1
            kind, body, cache_control = self._behaviour.get(path, ("missing", b"", None))
        if kind == "http_500":
            return 500, b"internal error", {"content-type": "text/plain"}
        if kind == "garbage":
            return 200, GARBAGE, {"content-type": "application/json"}
        if kind == "missing":
            return 404, b"", {}
        headers = {"content-type": "application/json"}
        if cache_control:
            headers["cache-control"] = cache_control
        return 200, body, headers

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> KeyServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                status, body, headers = owner._answer(self.path.partition("?")[0])
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="keyserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> KeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
