"""pytest plugin of ``make gpu-check`` (benchmarks/gpu_check.py): selects one part of the suite, stops cleanly
at a deadline, and logs every test's outcome as it happens (one JSON object per line), so that a run cut short
still says what passed, what failed and what did not run.

    python -m pytest -p gpu_check_pytest --gpu-check-part cuda --gpu-check-deadline <epoch s> \\
        --gpu-check-log tests-cuda.jsonl tests/

Parts: ``cuda`` -- the tests with a ``cuda`` parameter (the ``device`` fixture's, or a test's own backend
parameter); ``rest`` -- all others, the operator and dtype test files first.  Log records:
``{"event": "collected", "ids": [...]}``, ``{"event": "result", "id", "outcome", "seconds", "message"}``,
``{"event": "stopped", "reason"}``.
"""
from __future__ import annotations

import json
import time

import pytest

# The rest of the suite runs in this order (what the kernels touch first), then every other file, and last the
# files that rebuild the package from scratch (minutes; CI runs them).
FIRST = ("test_lgm_ops.py", "test_dtypes.py", "test_pgd_step.py", "test_gpu_check.py", "test_modules.py",
         "test_lgm_ops_edge_cases.py", "test_inverse.py", "test_attacks.py", "test_distributed.py")
LAST = ("test_packaging.py",)


def pytest_addoption(parser):
    group = parser.getgroup("gpu-check")
    group.addoption("--gpu-check-part", choices=("cuda", "rest", "all"), default="all")
    group.addoption("--gpu-check-deadline", type=float, default=0.0, help="epoch seconds; 0: none")
    group.addoption("--gpu-check-log", default=None, help="JSON-lines log of the outcomes")


def is_cuda_item(item) -> bool:
    """A test parametrized with the value "cuda" (device fixture or an own backend parameter)."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(v == "cuda" for v in callspec.params.values() if isinstance(v, str))


def _rank(item) -> int:
    name = item.path.name if hasattr(item, "path") else str(item.fspath).rsplit("/", 1)[-1]
    if name in LAST:
        return len(FIRST) + 1
    return FIRST.index(name) if name in FIRST else len(FIRST)


class _Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None

    def write(self, **record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")


_LOG = _Log(None)


def pytest_configure(config):
    global _LOG
    _LOG = _Log(config.getoption("--gpu-check-log"))


def pytest_collection_modifyitems(session, config, items):
    part = config.getoption("--gpu-check-part")
    keep = list(items) if part == "all" else [it for it in items if is_cuda_item(it) == (part == "cuda")]
    if part == "rest":
        keep.sort(key=_rank)  # stable: within a file, pytest's order
    kept = set(keep)
    dropped = [it for it in items if it not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    _LOG.write(event="collected", ids=[it.nodeid for it in items])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    deadline = item.config.getoption("--gpu-check-deadline")
    if deadline and time.time() >= deadline:
        if not item.session.shouldstop:
            _LOG.write(event="stopped", reason="time budget reached")
        item.session.shouldstop = "gpu-check: time budget reached"
        return True  # not run; the session stops before the next test
    return None


def pytest_runtest_logreport(report):
    """One record per test: its call's outcome, or the setup's/teardown's when that failed or skipped."""
    failed_phase = report.when != "call" and report.outcome == "failed"
    if not (report.when == "call" or failed_phase or (report.when == "setup" and report.outcome == "skipped")):
        return
    message = ""
    if report.outcome == "failed":
        lines = (report.longreprtext or "").strip().splitlines()
        message = lines[-1][:300] if lines else ""
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:300]
    _LOG.write(event="result", id=report.nodeid, outcome="error" if failed_phase else report.outcome,
               seconds=round(report.duration, 3), message=message)
