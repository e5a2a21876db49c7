"""Session-wide fixtures: the native stack (upstream + sidecar + real Envoy) starts once.

Processes are started through tests.support.procs.Proc and stopped by PID; when a test fails,
the logs of every process still running are attached to its report.
"""

from __future__ import annotations

import pytest

from tests.support import procs
from tests.support.stack import Stack, shipped_stack

_FIRST_PROC = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.stash[_FIRST_PROC] = len(procs.STARTED)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        # the processes still running (session stacks) and those this test started and stopped
        mine = procs.STARTED[item.stash.get(_FIRST_PROC, len(procs.STARTED)):]
        for p in dict.fromkeys([*procs.RUNNING, *mine]):
            report.sections.append((f"log of {p.name} (pid {p.pid})", p.log_tail(80)))


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """The shipped envoy.yaml + extproc.yaml on free ports, started once per session."""
    with shipped_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="session")
def token(stack: Stack) -> str:
    from extproc.demo import idp

    return idp.load_or_create(stack.dir).mint("alice", scopes=["read", "write"])
