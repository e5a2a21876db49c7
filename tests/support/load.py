"""A bounded background load of GETs for e2e tests that kill something mid-traffic.

`threads` threads each send GETs to `urls[i % len(urls)]` (thread i), until the `with` block ends
or `max_seconds` pass, and record `(monotonic time, status)` per response, 0 for a connection
error. Two shapes, as the tests need them:

* unpaced, a new connection per request (the default): as many requests as the gateway answers,
  each one a fresh client connection (tests/e2e/test_resilience.py);
* paced and keep-alive (`rate`, `keep_alive=True`): `rate` requests/s shared by the threads, each
  on its own persistent connection (tests/e2e/test_scaleout.py counts failures per connection).
"""

from __future__ import annotations

import http.client
import threading
import time
from urllib.parse import urlsplit

from tests.support.http import get
from tests.support.procs import wait_until


class BackgroundLoad:
    def __init__(self, urls: str | list[str], token: str | None = None, *, threads: int = 4,
                 rate: float | None = None, keep_alive: bool = False, headers: dict[str, str] | None = None,
                 max_seconds: float = 30.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.headers = dict(headers or {})
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.threads = threads
        self.rate = rate
        self.keep_alive = keep_alive
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + max_seconds
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    @property
    def statuses(self) -> list[int]:
        with self._lock:
            return [status for _, status in self.results]

    def _run(self, i: int) -> None:
        url = self.urls[i % len(self.urls)]
        period = self.threads / self.rate if self.rate else 0.0
        next_at = time.monotonic() + i * period / self.threads
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if period:
                self._stop.wait(max(0.0, next_at - time.monotonic()))     # pacing, not synchronisation
                next_at += period
            if self.keep_alive:
                status, conn = self._on(conn, url)
            else:
                try:
                    status = get(url, headers=self.headers, timeout=5).status
                except (OSError, http.client.HTTPException):
                    status = 0
            with self._lock:
                self.results.append((time.monotonic(), status))
        if conn is not None:
            conn.close()

    def _on(self, conn: http.client.HTTPConnection | None, url: str) -> tuple[int, http.client.HTTPConnection | None]:
        """One GET on the thread's persistent connection (opened again after an error)."""
        u = urlsplit(url)
        try:
            if conn is None:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            conn.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=self.headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status, conn
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            return 0, None

    def __enter__(self) -> BackgroundLoad:
        for t in self._workers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=10)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        """Until `n` responses in all."""
        wait_until(lambda: self.count() >= n, timeout=timeout, what=f"{n} responses of the background load")

    def wait_for_more(self, n: int, timeout: float = 15.0) -> None:
        """Until `n` more responses than now."""
        self.wait_for(self.count() + n, timeout=timeout)
