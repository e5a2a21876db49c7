"""scripts/proclib.py's port picker, shared by scripts/stack.py, scripts/bench.py and tests/support:
distinct free ports below the ephemeral range, `avoid` honoured, Redis Cluster bus ports free too,
and never the same port twice in one process."""

from __future__ import annotations

import socket
import sys
import time

import proclib
import pytest

from tests.support import procs


def test_ports_are_distinct_below_the_ephemeral_range_and_never_handed_out_twice():
    seen: list[int] = []
    for _ in range(5):
        ports = proclib.free_ports(20)
        assert len(set(ports)) == 20
        assert all(proclib.PORT_LOW <= p < proclib.PORT_HIGH for p in ports)
        assert not set(ports) & set(seen)
        seen += ports
    base = proclib.free_consecutive(4)
    assert not set(range(base, base + 4)) & set(seen)
    assert procs.free_ports is proclib.free_ports      # the tests' ports come from the same record


def test_cluster_ports_have_free_bus_ports_that_are_never_handed_out():
    nodes = proclib.free_ports(6, cluster_bus=True)
    buses = [p + proclib.CLUSTER_BUS_OFFSET for p in nodes]
    assert all(bus < proclib.PORT_HIGH and proclib.bindable(bus) for bus in buses)
    assert not set(buses) & set(nodes)
    assert not set(buses) & set(proclib.free_ports(200))


def _picks(monkeypatch: pytest.MonkeyPatch, *ports: int) -> None:
    """randrange yields `ports` in turn, against an empty record of handed-out ports."""
    it = iter(ports)
    monkeypatch.setattr(proclib.random, "randrange", lambda low, high: next(it))
    monkeypatch.setattr(proclib, "_HANDED", set())


def test_avoid_is_honoured_for_the_ports_and_their_bus_ports(monkeypatch: pytest.MonkeyPatch):
    a, b, c = proclib.free_ports(3, cluster_bus=True)
    # a: avoided; b: its bus port avoided; c: free
    _picks(monkeypatch, a, b, c)
    assert proclib.free_ports(1, cluster_bus=True, avoid=[a, b + proclib.CLUSTER_BUS_OFFSET]) == [c]


def test_a_port_in_use_or_with_its_bus_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch):
    a, b, c = proclib.free_ports(3, cluster_bus=True)
    with socket.socket() as busy, socket.socket() as busy_bus:
        busy.bind(("127.0.0.1", a))
        busy.listen()
        busy_bus.bind(("127.0.0.1", b + proclib.CLUSTER_BUS_OFFSET))
        busy_bus.listen()
        _picks(monkeypatch, a, b, c)
        assert proclib.free_ports(1, cluster_bus=True) == [c]
        _picks(monkeypatch, a, b)
        assert proclib.free_ports(1) == [b]            # without cluster_bus, b's bus port does not matter


def test_a_port_is_not_handed_out_twice_even_once_its_socket_is_closed(monkeypatch: pytest.MonkeyPatch):
    _picks(monkeypatch, 20001, 20001, 20002)
    monkeypatch.setattr(proclib.socket, "socket", _Unbound)
    assert proclib.free_port() == 20001
    assert proclib.free_port() == 20002


class _Unbound:
    """Every port counts as free: no real socket is bound."""

    def bind(self, addr: tuple[str, int]) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_bench_process_that_dies_is_a_bench_error(tmp_path):
    """scripts/bench.py's Proc is proclib's, ended with the bench; a child that exits before it is
    ready is a BenchError (printed without a traceback), with its log tail, as soon as it is gone."""
    from tests.unit.test_stack_config import load_script

    bench = load_script("bench")
    proc = bench.Proc("dies", [sys.executable, "-c", "print('no config'); raise SystemExit(3)"], tmp_path)
    started = time.monotonic()
    with pytest.raises(bench.BenchError, match=r"(?s)dies exited with 3.*no config"):
        proc.wait_ready(lambda: False, timeout=60)
    assert time.monotonic() - started < 30      # at once, not at the deadline
    assert proc.stop() == 3
