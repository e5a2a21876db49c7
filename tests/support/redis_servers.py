"""Real Redis servers for tests: standalone and a 3-master cluster, on free ports.

Decides how tests get Redis: a fresh `redis-server` per session (never a shared one on a
fixed port), no persistence, started through `Proc` so it is stopped by PID and its log
is kept; readiness is polled (PING, then `cluster_state:ok` on every node), never slept on.
A missing `redis-server` is an error, not a skip: the contract suite is the proof that the
Redis backends keep the store contract.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.support.procs import Proc, free_port, wait_until

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
_CLUSTER_BUS_OFFSET = 10000
_MAX_CLUSTER_PORT = 55535  # the bus port (port + 10000) must stay a valid port


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not on PATH: the store contract tests need a real Redis "
                           "(apt-get install redis-server)")
    return path


def _command(port: int, *args: str, timeout: float = 1.0) -> str:
    """Send one inline command over a raw socket; the reply as text (enough for PING/INFO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                header, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(header[1:]) + 2:
                    break
        return b"".join(chunks).decode(errors="replace")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """n distinct free ports below 55535 whose cluster-bus port (+10000) is free too."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(2000):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            held.append(s)
            if port < _MAX_CLUSTER_PORT and port + _CLUSTER_BUS_OFFSET not in ports \
                    and _bindable(port + _CLUSTER_BUS_OFFSET):
                ports.append(port)
                if len(ports) == n:
                    return ports
        raise RuntimeError(f"found only {len(ports)} of {n} cluster ports with free bus ports")
    finally:
        for s in held:
            s.close()


class RedisServer:
    """One standalone redis-server on a free port."""

    def __init__(self, log_dir: Path, name: str = "redis"):
        binary = _require(REDIS_SERVER)
        port = free_port()
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = Proc(name, [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--daemonize", "no", "--dir", str(log_dir)],
                         log_dir)
        try:
            self.proc.wait_ready(lambda: _command(port, "PING").startswith("+PONG"), timeout=15)
        except BaseException:
            self.proc.stop()
            raise

    def command(self, *args: str) -> str:
        return _command(self.port, *args)

    def stop(self) -> None:
        self.proc.stop()


class RedisCluster:
    """`masters` cluster-enabled redis-server nodes joined into one cluster, no replicas."""

    def __init__(self, log_dir: Path, masters: int = 3):
        binary = _require(REDIS_SERVER)
        cli = _require(REDIS_CLI)
        self.ports = cluster_ports(masters)
        self.url = f"redis://127.0.0.1:{self.ports[0]}"
        self.procs: list[Proc] = []
        try:
            for port in self.ports:
                node_dir = log_dir / f"node-{port}"
                node_dir.mkdir(parents=True, exist_ok=True)
                self.procs.append(Proc(f"redis-cluster-{port}", [
                    binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--dir", str(node_dir), "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", "2000"], log_dir))
            for proc, port in zip(self.procs, self.ports, strict=True):
                proc.wait_ready(lambda port=port: _command(port, "PING").startswith("+PONG"), timeout=15)
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False)
            (log_dir / "redis-cluster-create.log").write_text(created.stdout + created.stderr)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({created.returncode}):\n"
                                   f"{created.stdout}\n{created.stderr}")
            wait_until(self._all_ok, timeout=30, what="cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise

    def _all_ok(self) -> bool:
        return all("cluster_state:ok" in _command(port, "CLUSTER", "INFO") for port in self.ports)

    def command_all(self, *args: str) -> list[str]:
        """Run one command on every node (e.g. SCRIPT FLUSH)."""
        return [_command(port, *args) for port in self.ports]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

