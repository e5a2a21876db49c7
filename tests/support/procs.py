"""Real processes for tests: free ports, start with a log file, poll readiness, stop by PID.

Every process a test starts goes through `Proc`, so a failing test can print the logs of
the processes it used (see tests/conftest.py) and nothing is ever killed by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RUNNING: list[Proc] = []      # started and not yet stopped
STARTED: list[Proc] = []      # every process this session started, for failure reports


# Listening ports for test processes come from below the kernel's ephemeral range (32768-60999
# here): a port picked by binding to 0 is an ephemeral one, and any outgoing connection of the
# suite (Envoy to an upstream, a client) may take it before the process that was meant to listen
# binds it ("Address already in use", seen on a busy machine). Ports are picked at random, checked
# bindable, and never handed out twice by this process.
_LOW, _HIGH = 10000, 32000
_HANDED: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so none repeats), below the ephemeral range."""
    import random

    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(50 * n + 100):
            if len(ports) == n:
                break
            port = random.randrange(_LOW, _HIGH)
            if port in _HANDED or port in ports:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
        if len(ports) < n:
            raise RuntimeError(f"no {n} free ports found in {_LOW}-{_HIGH}")
        _HANDED.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll `check` until it returns a true value (returned) or the deadline passes (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polling tolerates errors until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_status(url: str, timeout: float = 1.0, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code


class Proc:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=str(cwd or ROOT), start_new_session=True)
        self.pid = self.popen.pid
        RUNNING.append(self)
        STARTED.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> Proc:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            return check()
        try:
            wait_until(ready, timeout=timeout, what=f"{self.name} ready")
        except RuntimeError:
            raise
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from None
        return self

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, then SIGKILL the process group after the timeout."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
        else:
            self.popen.wait()
        if not self._log.closed:
            self._log.close()
        if self in RUNNING:
            RUNNING.remove(self)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def free_consecutive(n: int, low: int = _LOW, high: int = _HIGH) -> int:
    """A base port such that base .. base+n-1 are all free (for `serve --workers n`)."""
    import random

    for _ in range(200):
        base = random.randrange(low, high - n)
        socks = []
        if any(base + i in _HANDED for i in range(n)):
            continue
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            _HANDED.update(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")
