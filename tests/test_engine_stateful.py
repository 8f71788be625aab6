"""Hypothesis stateful test: the C++ engine and the transitions reference model, side by side.

Random advertise/expose/complete/fail/cancel/timeout/terminate/late events and clock ticks, with or without a
poll_budget.  After every step: identical states, outcomes and results; the invariants of DESIGN §5/§6 hold; poll()
returned each transition once, as logged, in each request's order, and ran each on_terminate once, after its move's
line.  At the end: every record and notice a budget left came out, and the audit finds the JSON log clean.
"""

from __future__ import annotations

import json

import hypothesis.strategies as st
import structlog
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lifecycle import TABLE, FINAL, TERMINAL, ManualClock, State, TransferEngine, _core
from lifecycle.audit import audit_events
from lifecycle.model import ReferenceEngine

SEC = 1_000_000_000
TIMEOUT, GRACE = 10 * SEC, 3 * SEC
SLOTS = 4
STATUS = {n: i for i, n in enumerate(_core.STATUS_NAMES)}
KIND_OF_STATUS = {"Moved": "moved", "Stay": "stay", "Late": "late", "Deferred": "defer", "Illegal": "illegal",
                  "Unknown": "unknown"}
EVENTS = [e for e in TABLE.events if e not in ("advertise",)]
ids = st.integers(min_value=0, max_value=7)


class _JsonLog:
    """A structlog-shaped logger that renders every line as JSON (structlog's renderer) and keeps the lines, the
    transitions in the order logged, and the requests whose move to Terminated was logged."""

    def __init__(self):
        self.render = structlog.processors.JSONRenderer()
        self.lines: list[str] = []
        self.transitions: list[tuple] = []
        self.moved: set[int] = set()

    def bind(self):
        return self

    def info(self, event, **kw):
        self.lines.append(self.render(None, "info", {"event": event, **kw}))
        if event == "lifecycle.transition":
            self.transitions.append((kw["request"], kw["from_state"], kw["to_state"]))
            if kw["to_state"] == "Terminated":
                self.moved.add(kw["request"])


class EngineVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = ManualClock(0)
        self.notices: list[int] = []
        self.log = _JsonLog()
        self.model = ReferenceEngine(TABLE)
        self.entered: dict[int, int] = {}  # model: time each session entered its state
        self.slot: dict[int, bool] = {}  # model: session holds a pool slot
        self.evidence: set[int] = set()
        self.quarantined: set[int] = set()  # model: sessions whose slot sits in quarantine
        self.free = SLOTS
        self.transitions_seen: list = []

    @initialize(poll_budget=st.sampled_from([None, 1, 2, 3, 7]))
    def setup(self, poll_budget):
        self.engine = TransferEngine(clock=self.clock, num_slots=SLOTS, slot_size=64, transfer_timeout=TIMEOUT / SEC,
                                     cancel_grace=GRACE / SEC, progress_deadline=100, on_terminate=self._notice,
                                     logger=self.log, poll_budget=poll_budget)

    def _notice(self, req):
        assert req in self.log.moved, f"on_terminate({req}) ran before its move to Terminated was logged"
        self.notices.append(req)

    # -- model bookkeeping shared by every rule --
    def _model_apply(self, req: int, event: str, unhealthy: bool = False):
        before = self.model.sessions.get(req)
        old_state = before.state if before else None
        n_notices = len(self.model.notices)
        kind, result = self.model.apply(req, event, unhealthy=unhealthy)
        s = self.model.sessions.get(req)
        if kind == "late" and event == "complete":
            if s.state == "Poisoned":
                self.evidence.add(req)
            elif s.state == "Terminated" and req in self.quarantined:
                self.quarantined.discard(req)
                self.free += 1
        if kind == "moved":
            self.entered[req] = self.clock.now_ns()
            if s.state == "Terminated":
                # the terminal state left: old_state, or (deferred) the state the event led to
                left = old_state if len(self.model.notices) == n_notices else TABLE.row(old_state, event).dst
                if self.slot.get(req):
                    if left == "Quiesced" or req in self.evidence:
                        self.free += 1
                    else:
                        self.quarantined.add(req)
        return kind, result

    @rule(req=ids, receiver=st.booleans(), with_slot=st.booleans())
    def advertise(self, req, receiver, with_slot):
        role = "receiver" if receiver else "sender"
        if req in self.model.sessions:
            raw = self.engine.advertise_batch(memoryview(bytearray(req.to_bytes(8, "little"))).cast("Q"), int(receiver),
                                              64 if with_slot else 0)
            assert raw[0] == STATUS["Duplicate"]
            return
        if with_slot and self.free == 0:
            raw = self.engine.advertise_batch(memoryview(bytearray(req.to_bytes(8, "little"))).cast("Q"), int(receiver), 64)
            assert raw[0] == STATUS["NoSlot"]
            return
        self.engine.advertise(req, role, 64 if with_slot else 0)
        self.model.advertise(req, role)
        self.entered[req] = self.clock.now_ns()
        self.slot[req] = with_slot
        if with_slot:
            self.free -= 1

    @rule(req=ids, event=st.sampled_from(EVENTS))
    def event(self, req, event):
        unhealthy = not self.engine.health().healthy  # (health() stores what cancel reads: every reason)
        status, frm, to, result = self.engine.apply_raw(req, TABLE.events.index(event))
        kind, mresult = self._model_apply(req, event, unhealthy=unhealthy)
        assert KIND_OF_STATUS[_core.STATUS_NAMES[status]] == kind, (req, event)
        if kind != "unknown":
            names = TABLE.cancel_results if event == "cancel" else TABLE.terminate_results
            got = None if result == 0xFF else names[result]
            if kind in ("moved", "stay", "defer"):
                assert got == mresult, (req, event, got, mresult)
            assert _core.STATE_NAMES[to] == self.model.sessions[req].state

    @rule(req=ids)
    def cancel(self, req):
        unhealthy = not self.engine.health().healthy  # (health() stores what cancel reads: every reason)
        got = self.engine.cancel(req)
        kind, result = self._model_apply(req, "cancel", unhealthy=unhealthy)
        assert got.value == (result or "NotFound")

    @rule(req=ids)
    def terminate(self, req):
        got = self.engine.terminate(req)
        kind, result = self._model_apply(req, "terminate")
        assert got.value == (result or "NotFound")

    @rule(healthy=st.booleans())
    def backend(self, healthy):
        self.engine.set_backend_health(healthy, "" if healthy else "peer lost")

    @rule(dt=st.sampled_from([SEC // 2, 2 * SEC, 4 * SEC, 11 * SEC]))
    def tick(self, dt):
        self.clock.advance(dt)
        self.engine.tick()
        now = self.clock.now_ns()
        for req, s in list(self.model.sessions.items()):
            if s.state == "InFlight" and self.entered[req] + TIMEOUT <= now:
                self._model_apply(req, "timeout")
        for req, s in list(self.model.sessions.items()):
            if s.state == "CancelRequested" and self.entered[req] + GRACE <= now:
                self._model_apply(req, "grace_expired")

    @rule()
    def poll(self):
        self.transitions_seen.extend(self.engine.poll())

    @invariant()
    def same_states_and_outcomes(self):
        for req, s in self.model.sessions.items():
            info = self.engine.info(req)
            assert info.state.value == s.state, (req, info.state, s.state)
            assert (info.outcome.value if info.outcome else None) == s.outcome
            assert info.deferred == s.deferred

    @invariant()
    def terminated_only_from_terminal_states(self):
        for tr in self.transitions_seen:
            if tr.to_state in FINAL:
                assert tr.from_state in TERMINAL

    @invariant()
    def transitions_returned_once_as_logged_in_request_order(self):
        got = [(t.request, t.from_state and t.from_state.value, t.to_state.value) for t in self.transitions_seen]
        assert got == self.log.transitions
        last: dict[int, str] = {}
        for req, frm, to in got:  # (ids are never advertised again here: the tombstone window outlives the test)
            assert frm == last.get(req), (req, frm, last.get(req))
            last[req] = to

    @invariant()
    def terminate_now_exactly_once(self):
        # every notice delivered is one the model emitted, each at most once (order across sessions
        # is free: sessions live in different shards)
        assert len(set(self.notices)) == len(self.notices)
        assert set(self.notices) <= set(self.model.notices)

    @invariant()
    def pool_matches_and_no_slot_leased_twice(self):
        stats = self.engine.pool.stats()
        assert stats["free"] == self.free
        assert stats["quarantined"] == len(self.quarantined)
        live_slots = []
        for req, s in self.model.sessions.items():
            info = self.engine.info(req)
            if not self.slot[req]:
                assert info.slot is None
                continue
            if s.state != "Terminated":
                live_slots.append(info.slot)
                assert self.engine.pool.slot_state(info.slot) == "Leased"
                assert self.engine.pool.generation(info.slot) == info.generation
            elif req in self.quarantined:
                # no slot returned to the pool from Poisoned without evidence
                assert self.engine.pool.slot_state(info.slot) == "Quarantined"
                assert self.engine.pool.generation(info.slot) == info.generation
        assert len(live_slots) == len(set(live_slots))
        assert stats["leased"] == len(live_slots)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        for _ in range(1000):  # (what a budget left: each poll() logs one record at least)
            self.poll()
            if not (self.engine._inbox or self.engine._notices or self.engine.pending()):
                break
        # every transition came out, and every deferred session that reached a terminal state got exactly one notice
        assert len(self.transitions_seen) == self.engine.statistics().transitions
        self.transitions_returned_once_as_logged_in_request_order()
        assert sorted(self.notices) == sorted(self.model.notices)
        assert len(set(self.notices)) == len(self.notices)
        res = audit_events([json.loads(line) for line in self.log.lines], leak_age_ns=-1)  # (live sessions remain)
        assert res.ok, [str(f) for f in res.findings if f.violation][:5]


EngineVsModel.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestEngineVsModel = EngineVsModel.TestCase


def test_the_model_comparison_can_fail():
    """Negative control: a model that forgets deferral disagrees with the engine, and the test sees it."""
    import pytest

    class Forgetful(EngineVsModel):
        def __init__(self):
            super().__init__()
            orig = self.model.apply

            def apply(req, event, unhealthy=False):
                if event == "terminate" and self.model.sessions.get(req) and \
                        self.model.sessions[req].state in ("Advertised", "InFlight", "CancelRequested"):
                    return ("defer", "Deferred")  # answers like the engine, but forgets to set the flag
                return orig(req, event, unhealthy)

            self.model.apply = apply

    Forgetful.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None, database=None,
                                           report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow])
    with pytest.raises(AssertionError, match="deferred"):
        Forgetful.TestCase().runTest()
