"""Every (state, event) pair: legal ones land where the table says; illegal ones raise, change nothing."""

from __future__ import annotations

import re

import pytest
from conftest import drive

from lifecycle import TABLE, CancelResult, IllegalTransition, State, TerminateResult, UnknownRequest

PAIRS = [(s, e) for s in TABLE.states for e in TABLE.events if e != TABLE.create_event]


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
def test_every_state_event_pair_follows_the_table(engine, state, event):
    drive(engine, 7, state, nbytes=100)
    before = engine.info(7)
    counters = engine.statistics()
    row = TABLE.row(state, event)
    if row is None:
        with pytest.raises(IllegalTransition, match=rf"^can't handle event {event} when state={state} for request 7$") as ei:
            engine.post(7, event) if event not in ("cancel", "terminate") else engine.apply(7, TABLE.events.index(event))
        assert (ei.value.request, ei.value.state, ei.value.event) == (7, state, event)
        assert engine.info(7) == before
        assert engine.statistics().illegal == counters.illegal + 1
        return
    if event == "cancel":
        got = engine.cancel(7)
        assert got is CancelResult[row.result]
    elif event == "terminate":
        got = engine.terminate(7)
        assert got is TerminateResult[row.result]
    else:
        engine.post(7, event)
    after = engine.info(7)
    if row.dst in (".stay", ".late", ".defer"):
        assert after.state == before.state
        if row.dst == ".late":
            assert engine.statistics().late == counters.late + 1
        if row.dst == ".defer":
            assert after.deferred
    else:
        assert after.state == State[row.dst]
        if row.outcome:
            assert after.outcome.value == row.outcome


def test_advertise_of_a_live_id_is_refused_and_changes_nothing(engine):
    from lifecycle import DuplicateRequest

    for i, st in enumerate(TABLE.states):
        drive(engine, 100 + i, st)
        before = engine.info(100 + i)
        with pytest.raises(DuplicateRequest, match=rf"^request {100 + i} already has a session \(state={st}\)"):
            engine.advertise(100 + i, "sender")
        assert engine.info(100 + i) == before


def test_unknown_request_is_a_typed_error(engine):
    with pytest.raises(UnknownRequest, match=r"^no session for request 99 for event complete$"):
        engine.complete(99)
    assert engine.cancel(99) is CancelResult.NotFound
    assert engine.terminate(99) is TerminateResult.NotFound


def test_cancel_after_terminate_is_idempotent(engine):
    drive(engine, 1, "Quiesced")
    assert engine.terminate(1) is TerminateResult.Terminated
    assert engine.cancel(1) is CancelResult.NotCancellable
    assert engine.cancel(1) is CancelResult.NotCancellable
    assert engine.terminate(1) is TerminateResult.AlreadyTerminated


def test_second_deferred_terminate_says_already_deferred(engine):
    drive(engine, 1, "InFlight")
    assert engine.terminate(1) is TerminateResult.Deferred
    assert engine.terminate(1) is TerminateResult.AlreadyDeferred
    engine.complete(1)
    assert engine.state(1) is State.Terminated


def test_cancel_while_unhealthy_reports_backend_unhealthy(engine):
    drive(engine, 1, "InFlight")
    engine.set_backend_health(False, "ucx endpoint lost")
    assert not engine.health().healthy
    assert engine.cancel(1) is CancelResult.BackendUnhealthy
    assert engine.state(1) is State.CancelRequested


@pytest.mark.parametrize("deferred", [True, False])
def test_cancel_that_fires_a_deferred_terminate_does_not_free_now(clock, deferred):
    """Advertised, terminate (Deferred), cancel: the cancel's move to Quiesced fires the deferred terminate (the
    session is Terminated, TerminateNow runs on_terminate at the next poll), and cancel() answered
    CancelledBeforeAdvertise, whose frees-now is yes: an executor that freed on it freed again in on_terminate.  It
    answers CancelledDeferred (frees now: no) now, and the reference model gives the same.  Control (deferred=False):
    the same cancel with no deferred terminate answers CancelledBeforeAdvertise, frees now, and no notice comes."""
    from lifecycle import TransferEngine, cancel_frees_now
    from lifecycle.model import ReferenceEngine

    notices: list[int] = []
    engine = TransferEngine(clock=clock, num_slots=4, slot_size=4096, on_terminate=notices.append)
    model = ReferenceEngine(TABLE)
    engine.advertise(1, "sender")
    model.advertise(1, "sender")
    if deferred:
        assert engine.terminate(1) is TerminateResult.Deferred
        assert model.apply(1, "terminate") == ("defer", "Deferred")
    got = engine.cancel(1)
    assert got is (CancelResult.CancelledDeferred if deferred else CancelResult.CancelledBeforeAdvertise)
    assert model.apply(1, "cancel") == ("moved", got.value)
    assert cancel_frees_now(got) is not deferred
    assert engine.state(1) is (State.Terminated if deferred else State.Quiesced)
    assert model.sessions[1].state == engine.state(1).value
    engine.poll()
    assert notices == model.notices == ([1] if deferred else [])


def test_error_message_names_state_event_and_request_on_one_line(engine):
    drive(engine, 5, "Advertised")
    with pytest.raises(IllegalTransition) as ei:
        engine.complete(5)
    assert "\n" not in str(ei.value)
    assert re.fullmatch(r"can't handle event complete when state=Advertised for request 5", str(ei.value))
