"""Real Redis servers for tests: standalone and a cluster (3 masters, optional replicas), on free ports.

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

from tests.support.procs import Proc, free_port, free_ports, wait_until

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"


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
    """`masters` cluster-enabled redis-server nodes joined into one cluster, each master with
    `replicas` replicas (none by default).

    With replicas, readiness also waits until every replica's `master_link_status:up` and every
    node knows the whole topology (failover needs the masters' votes for a replica they know).
    `node_timeout_ms` is how long a silent node takes to be suspected (cluster-node-timeout): a
    short one makes a failover test quick. Nodes are stopped by PID; `kill(port)` SIGKILLs one
    and `wait_failover(port)` polls until its slots are served by a promoted replica.
    """

    def __init__(self, log_dir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000):
        binary = _require(REDIS_SERVER)
        cli = _require(REDIS_CLI)
        self.masters = masters
        self.replicas = replicas
        self.ports = free_ports(masters * (1 + replicas), cluster_bus=True)     # their bus ports free too
        self.url = f"redis://127.0.0.1:{self.ports[0]}"
        self.procs: list[Proc] = []
        self.proc_by_port: dict[int, Proc] = {}
        # a replica whose master died long ago may still be promoted (tests kill on purpose), and
        # a replica's first full sync starts at once instead of after the default 5 s delay
        replica_options = ["--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0"] if replicas else []
        try:
            for port in self.ports:
                node_dir = log_dir / f"node-{port}"
                node_dir.mkdir(parents=True, exist_ok=True)
                proc = Proc(f"redis-cluster-{port}", [
                    binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--dir", str(node_dir), "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms), *replica_options], log_dir)
                self.procs.append(proc)
                self.proc_by_port[port] = proc
            for proc, port in zip(self.procs, self.ports, strict=True):
                proc.wait_ready(lambda port=port: _command(port, "PING").startswith("+PONG"), timeout=15)
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False)
            (log_dir / "redis-cluster-create.log").write_text(created.stdout + created.stderr)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({created.returncode}):\n"
                                   f"{created.stdout}\n{created.stderr}")
            wait_until(self._all_ok, timeout=30, what="cluster_state:ok on every node")
            if replicas:
                wait_until(self._replicas_ready, timeout=30,
                           what="every replica's master_link_status:up, the topology known to every node")
        except BaseException:
            self.stop()
            raise

    # -- state --------------------------------------------------------------------------------
    def live_ports(self) -> list[int]:
        return [port for port in self.ports if self.proc_by_port[port].alive()]

    def _all_ok(self) -> bool:
        return all("cluster_state:ok" in _command(port, "CLUSTER", "INFO") for port in self.live_ports())

    def nodes(self, port: int | None = None) -> list[dict]:
        """CLUSTER NODES as seen by `port` (default: the first live node): port, role, flags,
        master port (replicas), slot ranges (masters)."""
        text = _command(port or self.live_ports()[0], "CLUSTER", "NODES")
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("$")]
        ids: dict[str, int] = {}
        rows = []
        for ln in lines:
            fields = ln.split()
            node_port = int(fields[1].split("@", 1)[0].rsplit(":", 1)[1])
            ids[fields[0]] = node_port
            flags = set(fields[2].split(","))
            ranges = []
            for spec in fields[8:]:
                if spec.startswith("["):      # a slot being migrated or imported
                    continue
                lo, _, hi = spec.partition("-")
                ranges.append((int(lo), int(hi or lo)))
            rows.append({"port": node_port, "flags": flags, "master_id": fields[3], "slots": ranges,
                         "role": "master" if "master" in flags else "replica"})
        for row in rows:
            row["master_port"] = ids.get(row.pop("master_id"))
        return rows

    def info(self, port: int, section: str) -> dict[str, str]:
        text = _command(port, "INFO", section)
        return dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln and not ln.startswith("#"))

    def _replicas_ready(self) -> bool:
        expected = self.masters * self.replicas
        up = 0
        for port in self.live_ports():
            info = self.info(port, "replication")
            if info.get("role") == "slave":
                if info.get("master_link_status") != "up":
                    return False
                up += 1
            seen = self.nodes(port)
            if sum(1 for n in seen if n["role"] == "replica" and "fail" not in n["flags"]) != expected:
                return False
        return up == expected

    def master_for_slot(self, slot: int, port: int | None = None) -> int:
        """The port of the master serving `slot`, as `port` (default: the first live node) sees it."""
        for node in self.nodes(port):
            if node["role"] == "master" and any(lo <= slot <= hi for lo, hi in node["slots"]):
                return node["port"]
        raise LookupError(f"slot {slot} is not served by any master")

    def replicas_of(self, master_port: int) -> list[int]:
        return [n["port"] for n in self.nodes() if n["role"] == "replica" and n["master_port"] == master_port]

    def failed_over(self, dead_port: int) -> bool:
        """Every live node marks `dead_port` failed, none gives it a slot, all 16384 slots are
        served and the cluster is ok again."""
        for port in self.live_ports():
            info = _command(port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                return False
            for node in self.nodes(port):
                if node["port"] == dead_port and ("fail" not in node["flags"] or node["slots"]):
                    return False
        return True

    # -- actions ------------------------------------------------------------------------------
    def kill(self, port: int) -> None:
        """SIGKILL one node by its PID (no shutdown, no goodbye to the cluster)."""
        self.proc_by_port[port].kill()

    def wait_failover(self, dead_port: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.failed_over(dead_port), timeout=timeout,
                   what=f"a replica of 127.0.0.1:{dead_port} promoted and the cluster ok")

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        """redis-cli against one node (for replies the raw helper does not parse: arrays, scans)."""
        done = subprocess.run([_require(REDIS_CLI), "-p", str(port), *args], capture_output=True, text=True,
                              timeout=timeout, check=True)
        return done.stdout

    def command_all(self, *args: str) -> list[str]:
        """Run one command on every node (e.g. SCRIPT FLUSH)."""
        return [_command(port, *args) for port in self.live_ports()]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
