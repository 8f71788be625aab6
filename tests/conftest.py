"""Shared helpers: build engines on a manual clock, drive a session into any state by the table."""

from __future__ import annotations

import os
from collections import deque

import pytest
import structlog

import lifecycle
from lifecycle import TABLE, ManualClock, State, TransferEngine
from lifecycle.spec import ACTIONS, CREATE_SOURCE

SEC = 1_000_000_000

# a hung test fails with every thread's stack (tests/hang_guard.py), not silently at CI's limit
pytest_plugins = ["hang_guard"]

# The test suite is the application: it decides where the library's events go.  Every event any
# test produces is validated against schemas/events.schema.json (autouse fixture below).
_CURRENT: list[dict] = []


def _collect(logger, method, event_dict):
    _CURRENT.append(dict(event_dict))
    raise structlog.DropEvent


structlog.configure(processors=[_collect], cache_logger_on_first_use=False)

# The test suite may switch on the negative controls (unsafe_release_on_cancel, unsafe_ack_stop_at_once);
# a production process cannot without this (lifecycle.transport.UNSAFE_ENV).
os.environ["KV_LIFECYCLE_ALLOW_UNSAFE"] = "1"


def _shape(v):
    """Everything the schema can distinguish about a value.  The schema constrains integers only by
    `minimum` -1 / 0 and strings by enums and patterns, so equal shapes validate identically; this
    makes validating every event of the suite affordable (jsonschema is ~0.6 ms per event)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return ("int", max(min(v, 0), -2))
    if isinstance(v, float):
        return ("float",)
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_shape(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _shape(x)) for k, x in v.items())))
    return ("other", type(v).__name__)


_SHAPES: dict = {}


def schema_errors(event: dict) -> list[str]:
    from lifecycle import audit

    key = _shape(event)
    if key not in _SHAPES:
        _SHAPES[key] = audit.event_errors(event)
    return _SHAPES[key]


@pytest.fixture(autouse=True)
def _every_event_matches_the_schema():
    _CURRENT.clear()
    yield
    bad = [(e.get("event"), errs) for e in _CURRENT if (errs := schema_errors(e))]
    _CURRENT.clear()
    assert not bad, f"{len(bad)} event(s) violate the event schema, first: {bad[0]}"


def path_to(state: str) -> list[str]:
    """Shortest event path from the initial state to ``state`` over the table's moving rows."""
    start = TABLE.initial
    prev: dict[str, tuple[str, str] | None] = {start: None}
    todo = deque([start])
    while todo:
        s = todo.popleft()
        for r in TABLE.rows:
            if r.src == s and r.dst not in ACTIONS and r.dst not in prev:
                prev[r.dst] = (s, r.event)
                todo.append(r.dst)
    assert state in prev, f"{state} unreachable"
    out: list[str] = []
    cur = state
    while prev[cur] is not None:
        s, e = prev[cur]
        out.append(e)
        cur = s
    return out[::-1]


def drive(engine: TransferEngine, req: int, state: str, role: str = "sender", nbytes: int = 0) -> None:
    engine.advertise(req, role, nbytes)
    for ev in path_to(state):
        if ev == "terminate":
            assert engine.terminate(req).value == "Terminated"
        elif ev == "cancel":
            engine.cancel(req)
        else:
            engine.post(req, ev)
    assert engine.state(req) == State[state]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_000 * SEC)


@pytest.fixture
def engine(clock) -> TransferEngine:
    return TransferEngine(clock=clock, num_slots=64, slot_size=4096, transfer_timeout=10, cancel_grace=2,
                          progress_deadline=30, quarantine_budget=4)


__all__ = ["CREATE_SOURCE", "SEC", "drive", "lifecycle", "path_to"]


# Every fault injector a test builds, so that a failing test prints the seeds (and probabilities) that
# replay it, whatever its own asserts say.  Emptied as the next test's setup starts, not by the fixture's
# teardown: the teardown phase is reported after every fixture's teardown, and a failure there (the event-schema
# check above) must show them too.
_FAULTS: list = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _FAULTS.clear()


@pytest.fixture(autouse=True)
def _record_fault_seeds(monkeypatch):
    from lifecycle import transport

    check = transport.Faults.__post_init__

    def recorded(self):
        check(self)
        _FAULTS.append(self)

    monkeypatch.setattr(transport.Faults, "__post_init__", recorded)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true, set by the CI runner) nothing may be skipped: the environment guards above
    (no mpiexec, no NIXL, no chromium, no dot) are for a developer's partial machine only, and in CI
    they would mean a broken install.  A skip there becomes a failure that says why.  A failing test
    that injected faults gets a report section with every Faults it built (seed first): the replay."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _FAULTS:
        rep.sections.append(("fault seeds (replay with these)", "\n".join(repr(f) for f in _FAULTS)))
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI, which must run every test: {rep.longrepr}"
