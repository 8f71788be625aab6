"""Shared helpers: build engines on a manual clock, drive a session into any state by the table."""

from __future__ import annotations

from collections import deque

import pytest
import structlog

import lifecycle
from lifecycle import TABLE, ManualClock, State, TransferEngine
from lifecycle.spec import ACTIONS, CREATE_SOURCE

SEC = 1_000_000_000

# The test suite is the application: it decides where the library's events go.  Every event any
# test produces passes through `_collect` (schema validation is added there when the schema exists).
EVENTS_SEEN: list[dict] = []


def _collect(logger, method, event_dict):
    if len(EVENTS_SEEN) < 200_000:
        EVENTS_SEEN.append(event_dict)
    raise structlog.DropEvent


structlog.configure(processors=[_collect], cache_logger_on_first_use=False)


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
