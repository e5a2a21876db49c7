"""Real processes for tests: free ports, start with a log file, poll readiness, stop by PID.

Every process a test starts goes through `Proc`, so a failing test can print the logs of
the processes it used (see tests/conftest.py) and nothing is ever killed by name. Ports,
processes and polling are scripts/proclib.py's, shared with scripts/stack.py and scripts/bench.py
(so a stack a test starts never gets a port the suite handed out already).
"""

from __future__ import annotations

import sys
from pathlib import Path

import proclib
from proclib import ROOT, free_consecutive, free_port, free_ports, http_status, port_open, wait_until

__all__ = ["ROOT", "VENV_BIN", "RUNNING", "STARTED", "Proc", "free_consecutive", "free_port", "free_ports",
           "http_status", "port_open", "wait_until"]

VENV_BIN = Path(sys.executable).parent
RUNNING: list[Proc] = []      # started and not yet stopped
STARTED: list[Proc] = []      # every process this session started, for failure reports


class Proc(proclib.Proc):
    """One child process with its output in a log file, tracked for the failure reports."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        super().__init__(name, argv, log_dir, env=env, cwd=cwd)
        RUNNING.append(self)
        STARTED.append(self)

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        if self in RUNNING:
            RUNNING.remove(self)
        return code
