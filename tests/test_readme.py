"""README's embedding example runs as written (with the executor's parts stubbed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


class _Once:
    def __init__(self, n):
        self.n = n

    def __bool__(self):
        self.n -= 1
        return self.n >= 0


def test_readme_embedding_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    freed: list[int] = []
    reports: list = []
    ns = {
        "kv_cache_manager": type("KV", (), {"free": staticmethod(freed.append)})(),
        "req_id": 1,
        "nbytes": 1024,
        "serving": _Once(3),
        "cancelled_by_client": iter([[1, 2], [], []]).__next__,
        "report": reports.append,
    }
    exec(compile(code, "README.md", "exec"), ns)
    engine = ns["engine"]
    # request 1 was in flight when cancelled: deferred, engine still owns it until evidence arrives
    assert freed == [2] and engine.state(1).value == "CancelRequested"
    engine.complete(1)  # the transport's DONE
    engine.poll()
    assert freed == [2, 1] and engine.state(1).value == "Terminated"


def test_readme_loop_releases_a_cancelled_session_whose_terminate_was_deferred_once():
    """The executor deferred request 3's terminate while it was Advertised (Deferred: TerminateNow comes when it is
    terminal), then the client cancelled it.  The cancel moves it to Quiesced, the deferred terminate fires at once,
    and cancel() answered CancelledBeforeAdvertise, which frees now: the README's loop released 3 at the cancel and
    on_terminate released it again at the next poll (freed == [3, 4, 3], a double free of its KV blocks).  It
    answers CancelledDeferred now (frees now: no): released once, by on_terminate.  Control: request 4, cancelled
    without a deferred terminate, still answers CancelledBeforeAdvertise and is released once, by the loop itself."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    freed: list[int] = []
    ns: dict = {}
    rounds: list[int] = []

    def cancelled_by_client():
        eng = ns["engine"]
        rounds.append(len(rounds))
        if rounds == [0]:
            eng.advertise(3, "sender", 0)
            assert eng.terminate(3).value == "Deferred"
            eng.advertise(4, "sender", 0)
            return [3, 4]
        return []

    ns.update({
        "kv_cache_manager": type("KV", (), {"free": staticmethod(freed.append)})(),
        "req_id": 1,
        "nbytes": 1024,
        "serving": _Once(3),
        "cancelled_by_client": cancelled_by_client,
        "report": lambda reasons: None,
    })
    exec(compile(code, "README.md", "exec"), ns)
    engine = ns["engine"]
    assert freed == [4, 3], freed  # 4 by the loop at its cancel, 3 by on_terminate at the next poll
    assert engine.state(3).value == engine.state(4).value == "Terminated"
    engine.poll()
    assert freed == [4, 3], freed


def test_readme_does_not_promise_a_tombstone_for_tombstones_more_terminations():
    """README's loop said a terminated session answers NotFound 'after `tombstones` more terminations'.  The window
    is kept per shard (tombstones / shards each, docs/engine.md), so a session's tombstone can go sooner: with the
    default window (65,536, 16 shards) request 1 answered NotFound after 65,251 later terminations.  The comment
    says 'about ..., maybe fewer' now.  Control: the engine does evict before the full count here (the claim the
    text no longer makes was false), and the example's code is unchanged by the comment."""
    from lifecycle import ManualClock, TransferEngine

    text = README.read_text()
    line = " ".join(re.search(r"# NotFound frees-now:(.*?)free only what is held", text, re.S).group(1).split())
    assert "after `tombstones` more terminations" not in line
    assert "maybe fewer" in line
    eng = TransferEngine(clock=ManualClock(0))  # the default window: 65,536 in 16 shards
    eng.advertise(1, "sender")
    eng.cancel(1)
    eng.terminate(1)
    later = 0
    while eng.cancel(1).value != "NotFound":
        later += 1
        eng.advertise(1 + later, "sender")
        eng.cancel(1 + later)
        eng.terminate(1 + later)
        assert later < 1 << 20  # (bounded: each shard keeps 4,096)
    assert later < 65_536


def test_readme_says_the_transports_apply_expose_themselves():
    """README's loop calls ``engine.expose(req_id)`` itself and says transport threads post the rest.  An executor
    that does so and then hands the session to lifecycle.transport (``expect`` / ``read`` / ``write``, which apply
    ``expose`` themselves) gets IllegalTransition from the transport, and its session stays InFlight with nothing
    offered or posted: no evidence can ever come, so a cancel ends it Poisoned (expired) and its slot quarantined.
    README says so now.  Control: the same session without the manual expose is offered."""
    from lifecycle import IllegalTransition, ManualClock, TransferEngine
    from lifecycle.transport import LoopbackTransport, connect_all, pool_slot

    text = " ".join(README.read_text().split())
    assert "apply `expose` themselves" in text and "never call it first" in text
    clock = ManualClock(0)
    e = TransferEngine(num_slots=2, slot_size=4096, transfer_timeout=1, cancel_grace=1, clock=clock)
    peer = TransferEngine(num_slots=2, slot_size=4096)
    with LoopbackTransport(e, "readme-a") as a, LoopbackTransport(peer, "readme-b") as b:
        a.register(e.pool)
        b.register(peer.pool)
        connect_all(a, b)
        e.advertise(1, "sender", 100)
        e.expose(1)  # as README's loop does
        with pytest.raises(IllegalTransition):
            a.expect(1, "readme-b", pool_slot(e, 1).slice(0, 100))
        assert e.state(1).value == "InFlight" and a.stats().passive == 0  # exposed, nothing offered
        e.cancel(1)
        clock.advance(3 * 10**9)
        e.poll()
        assert e.info(1).state.value == "Poisoned" and e.info(1).outcome.value == "expired"
        assert e.terminate(1).value == "Terminated" and e.pool.stats()["quarantined"] == 1
        # control: without the manual expose, the transport exposes and offers
        e.advertise(2, "sender", 100)
        a.expect(2, "readme-b", pool_slot(e, 2).slice(0, 100))
        assert e.state(2).value == "InFlight" and a.stats().passive == 1


def test_readme_says_a_terminate_alone_never_ends_an_advertised_session():
    """README's loop cancels before it terminates, and says a Deferred terminate's release runs 'when terminal'.  An
    executor that drops a request it advertised but never exposed with a terminate alone waits for ever: Advertised
    has no timer and is not counted by the progress deadline, so the session stays, its slot leased, health OK.
    README says to cancel first now.  Control: the cancel ends it, and on_terminate runs once."""
    from lifecycle import ManualClock, TransferEngine

    text = " ".join(README.read_text().split())
    assert "a terminate alone defers for good" in text
    released: list[int] = []
    clock = ManualClock(0)
    e = TransferEngine(num_slots=1, slot_size=4096, progress_deadline=1, clock=clock, on_terminate=released.append)
    e.advertise(1, "sender", 100)
    assert e.terminate(1).value == "Deferred"
    clock.advance(10**6 * 10**9)  # a million seconds
    e.poll()
    assert e.state(1).value == "Advertised" and e.pool.stats()["leased"] == 1 and e.health().healthy
    assert released == []
    assert e.cancel(1).value == "CancelledDeferred"  # control
    e.poll()
    assert released == [1] and e.pool.stats()["leased"] == 0


def test_readme_reads_the_outcome_where_the_session_is_still_known():
    """README's release() said to tell a Poisoned session by ``engine.info(req).outcome``, and the loop calls release()
    right after terminate() answered Terminated.  With ``TransferEngine(tombstones=0)`` that terminate evicts the
    tombstone at once, so the advised info() raised UnknownRequest inside release().  README says to read it before
    the terminate in the loop now (on_terminate's request keeps its tombstone until the callback returned).  Shown
    here: the loop's order raises; reading first, and info() inside on_terminate (control), give the outcome."""
    from lifecycle import Outcome, TerminateResult, TransferEngine, UnknownRequest

    text = " ".join(re.sub(r"\n\s*# ", " ", README.read_text()).split())  # (the comment's lines as one)
    assert "engine.info(req).outcome in on_terminate; in the loop read it before terminate()" in text
    assert "may evict the tombstone at once (tombstones=0)" in text
    outcomes: list = []
    e = TransferEngine(num_slots=2, slot_size=4096, tombstones=0,
                       on_terminate=lambda req: outcomes.append(e.info(req).outcome))
    e.advertise(1, "sender", 10)
    e.cancel(1)
    assert e.terminate(1) is TerminateResult.Terminated
    with pytest.raises(UnknownRequest):  # the old advice, in the loop's order
        e.info(1)
    e.advertise(2, "sender", 10)
    e.cancel(2)
    before = e.info(2).outcome  # the advice now
    assert e.terminate(2) is TerminateResult.Terminated and before is Outcome.cancelled
    e.advertise(3, "sender", 10)
    e.expose(3)
    assert e.terminate(3) is TerminateResult.Deferred
    e.fail(3)
    e.poll()
    assert outcomes == [Outcome.failed]  # control: in on_terminate the session is still known
