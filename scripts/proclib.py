"""Child processes and free ports for the dev scripts (stack.py, bench.py) and the test suite
(tests/support/procs.py): stdlib only, imported as `proclib` with scripts/ on sys.path.

- `free_ports`, `free_port`, `free_consecutive`: listening ports below the kernel's ephemeral
  range, never the same port twice in one process.
- `Proc`: one child process in its own session, its output in a log file, stopped by its PID.
- `wait_until`, `http_status`: polling readiness instead of sleeping.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]

# Listening ports come from below the kernel's ephemeral range (32768-60999 here): a port picked
# by binding to 0 is an ephemeral one, and any outgoing connection (Envoy to an upstream, wrk, a
# client) may take it before the process that was meant to listen binds it ("Address already in
# use", seen on a busy machine). Ports are picked at random, checked bindable, and never handed out
# twice by this process: a caller closes the probing sockets before its servers bind, so a second
# call could otherwise pick them again.
PORT_LOW, PORT_HIGH = 10000, 32000
CLUSTER_BUS_OFFSET = 10000       # a Redis Cluster node's bus port is its port + 10000
_HANDED: set[int] = set()        # every port handed out (and Redis Cluster bus port reserved) so far


def bindable(port: int) -> bool:
    """Nothing listens on `port` (connections in TIME_WAIT from a previous run do not count:
    the servers set SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, cluster_bus: bool = False, avoid: Iterable[int] = ()) -> list[int]:
    """n distinct free ports (held open together so none repeats) in PORT_LOW..PORT_HIGH, none
    handed out before by this process nor in `avoid`. With `cluster_bus`, each port's Redis
    Cluster bus port (+10000) is free, below PORT_HIGH too, and reserved as well."""
    taken = _HANDED | set(avoid)
    high = PORT_HIGH - CLUSTER_BUS_OFFSET if cluster_bus else PORT_HIGH
    held: list[socket.socket] = []
    out: list[int] = []
    try:
        for _ in range(50 * n + 200):
            if len(out) == n:
                break
            port = random.randrange(PORT_LOW, high)
            if port in taken or port in out:
                continue
            bus = port + CLUSTER_BUS_OFFSET
            if cluster_bus and (bus in out or port - CLUSTER_BUS_OFFSET in out or bus in taken or not bindable(bus)):
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            out.append(port)
        if len(out) < n:
            raise RuntimeError(f"found only {len(out)} of {n} free ports in {PORT_LOW}-{high}")
        _HANDED.update(out)
        if cluster_bus:
            _HANDED.update(p + CLUSTER_BUS_OFFSET for p in out)
        return out
    finally:
        for s in held:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def free_port() -> int:
    return free_ports(1)[0]


def free_consecutive(n: int, low: int = PORT_LOW, high: int = PORT_HIGH) -> int:
    """A base port such that base .. base+n-1 are all free (for `serve --workers n`)."""
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


class ProcessExited(RuntimeError):
    """The process being waited for is gone: waiting longer cannot help."""


def wait_until(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll `check` until it returns a true value (returned) or the deadline passes (no fixed
    sleeps). Errors of `check` are retried until then, except ProcessExited."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except ProcessExited:
            raise
        except Exception as exc:  # noqa: BLE001 - polling tolerates errors until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def http_status(url: str, timeout: float = 1.0, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code


def exit_with_parent() -> None:
    """A `preexec_fn`: the child gets SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so a
    SIGKILLed bench leaves no Envoy or Python server behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


class Proc:
    """One child process, its output in `<log_dir>/<name>.log`, in its own session (a Ctrl-C on
    the terminal reaches only the parent, which then stops each child by its PID). With
    `die_with_parent`, it also ends when the parent dies."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, die_with_parent: bool = False):
        self.name, self.argv = name, argv
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(cwd or ROOT),
                                      env={**os.environ, **(env or {})}, start_new_session=True,
                                      preexec_fn=exit_with_parent if die_with_parent else None)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> Self:
        def ready() -> bool:
            if not self.alive():
                raise ProcessExited(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            return check()
        try:
            wait_until(ready, timeout=timeout, what=f"{self.name} ready")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- {self.name} log ({self.log_path}) ---\n{self.log_tail()}") from None
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
