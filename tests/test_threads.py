"""Transport threads post completions while the executor cancels and terminates the same sessions."""

from __future__ import annotations

import json
import random
import threading
import time
from array import array
from collections import Counter

import pytest

from lifecycle import FINAL, TABLE, TERMINAL, State, TransferEngine, _core
from lifecycle.audit import audit_events

N = 3000
COMPLETE, FAIL = TABLE.events.index("complete"), TABLE.events.index("fail")


def test_concurrent_completions_cancels_and_terminates_keep_every_invariant():
    seed = random.randrange(2**32)
    notices: list[int] = []
    eng = TransferEngine(num_slots=N, slot_size=64, transfer_timeout=None, cancel_grace=None, quarantine_budget=N,
                         on_terminate=notices.append)
    for i in range(N):
        eng.advertise(i, "sender" if i % 2 else "receiver", 64)
        if i % 5:
            eng.expose(i)
    go = threading.Event()

    def transport(t: int) -> None:
        rng = random.Random(seed + t)
        go.wait()
        for _ in range(2):
            ids = array("Q", range(t, N, 4))
            evs = bytes(FAIL if rng.random() < 0.15 else COMPLETE for _ in ids)
            eng.apply_batch(ids, evs)  # GIL released: really concurrent with the executor below

    threads = [threading.Thread(target=transport, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    transitions = []
    rng = random.Random(seed)
    go.set()
    for i in range(N):
        r = rng.randrange(N)
        eng.cancel(r)
        eng.terminate(r)
        if i % 50 == 0:
            transitions += eng.poll()
    for th in threads:
        th.join()
    for i in range(N):
        if eng.state(i) is State.Advertised:
            eng.cancel(i)
        eng.terminate(i)
    transitions += eng.poll()

    assert all(eng.state(i) is State.Terminated for i in range(N)), f"seed={seed}"
    per_req = Counter(t.request for t in transitions if t.to_state in FINAL)
    assert set(per_req.values()) == {1}, f"seed={seed}"
    assert all(t.from_state in TERMINAL for t in transitions if t.to_state in FINAL), f"seed={seed}"
    # each deferred session that became terminal got exactly one notice, on this (polling) thread
    assert len(notices) == len(set(notices)) == eng.statistics().deferred, f"seed={seed}"
    deferred_terminations = {t.request for t in transitions if t.deferred}
    assert set(notices) == deferred_terminations
    pool = eng.pool.stats()
    stats = eng.statistics()
    poisoned = sum(1 for i in range(N) if eng.outcome(i) is not None and eng.outcome(i).value == "failed")
    assert pool["leased"] == 0 and pool["free"] + pool["quarantined"] == N
    assert pool["quarantined"] + stats.recovered == poisoned
    assert eng.live_sessions() == 0
    assert _core.STATUS_NAMES  # module exports the status names used by batch results


class _JsonLines:
    """A JSON-lines logger (structlog's renderer) that notes each request whose move to Terminated it logged, lets
    other threads in now and then (time.sleep(0) drops the GIL), and polls from every `repoll`-th line, as a logger
    that flushes through the engine might (poll()'s answer to its own logger, mid-batch: [])."""

    def __init__(self, repoll: int):
        import structlog

        self.render = structlog.processors.JSONRenderer()
        self.lines: list[str] = []
        self.moved: set[int] = set()
        self.repoll, self.engine, self.returned = repoll, None, []

    def bind(self):
        return self

    def info(self, event, **kw):
        self.lines.append(self.render(None, "info", {"event": event, **kw}))
        if event == "lifecycle.transition" and kw["to_state"] == "Terminated":
            self.moved.add(kw["request"])
        if len(self.lines) % 8 == 0:
            time.sleep(0)
        if self.engine is not None and len(self.lines) % self.repoll == 0:
            self.returned.append(self.engine.poll())


@pytest.mark.parametrize("budget", [1, 7])
def test_pollers_and_transports_with_a_poll_budget_keep_every_transition_and_notice_once_in_order(budget):
    """poll_budget under threads: three pollers (two poll(), one drain()) and a logger's own polls take turns while
    transport threads post completions and failures (GIL released) and the executor cancels and terminates.  Every
    transition is returned once, each poll()'s in its requests' order (the log's); every notice is delivered once,
    after its move's line; the audit finds the JSON log clean.  Control: the budget did leave records for a later
    poll().  Ad hoc (not kept): fails with notices not held back (_ready check off) or the split dropping the rest."""
    n = 1200
    seed = random.randrange(2**32)
    log = _JsonLines(repoll=97)
    delivered, early = [], []

    def on_terminate(req):
        if req not in log.moved:
            early.append(req)
        delivered.append(req)

    eng = TransferEngine(num_slots=n, slot_size=64, transfer_timeout=None, cancel_grace=None, quarantine_budget=n,
                         on_terminate=on_terminate, logger=log, poll_budget=budget)
    log.engine = eng
    done, go = threading.Event(), threading.Event()
    returned: list[list] = []  # every poll()'s answer (list.append: atomic)
    left_records, failed = [0], []

    def poller(k: int) -> None:
        go.wait()
        while not done.is_set() or eng._inbox or eng._notices or eng.pending():  # (the pollers log it all)
            try:
                got = eng.drain(0.001) if k == 2 else eng.poll()
            except BaseException as exc:  # (a thread's exception is only a warning: the test fails on it below)
                failed.append(exc)
                return
            returned.append(got)
            if eng._inbox:
                left_records[0] += 1
            if not got:
                time.sleep(1e-4)  # (another thread's turn, or nothing new: not a spin that starves it)

    def transport(t: int) -> None:
        rng = random.Random(seed + t)
        go.wait()
        for lo in range(t, n, 40):
            ids = array("Q", range(lo, min(lo + 40, n), 2))
            eng.apply_batch(ids, bytes(FAIL if rng.random() < 0.15 else COMPLETE for _ in ids))
            time.sleep(0)  # (the GIL to the others: a transport's batches spread over the executor's calls)

    for i in range(n):
        eng.advertise(i, "sender" if i % 2 else "receiver", 64)
        if i % 5:
            eng.expose(i)
    threads = [threading.Thread(target=poller, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=transport, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    rng = random.Random(seed)
    go.set()
    for k in range(n):
        r = rng.randrange(n)
        eng.cancel(r)
        eng.terminate(r)
        if k % 8 == 0:
            time.sleep(0)
    for th in threads[3:]:
        th.join()
    for i in range(n):
        if eng.state(i) is State.Advertised:
            eng.cancel(i)
        eng.terminate(i)
        if i % 8 == 0:
            time.sleep(0)
    done.set()
    for th in threads[:3]:
        th.join()
    log.engine = None
    while eng._inbox or eng._notices or eng.pending():
        returned.append(eng.poll())
    returned += log.returned

    assert failed == [] and all(eng.state(i) is State.Terminated for i in range(n)), f"seed={seed}"
    logged = [(d["request"], d["from_state"], d["to_state"]) for d in map(json.loads, log.lines)
              if d["event"] == "lifecycle.transition"]
    assert len(logged) == eng.statistics().transitions, f"seed={seed}"
    got = [[(t.request, t.from_state and t.from_state.value, t.to_state.value) for t in out] for out in returned]
    assert Counter(x for out in got for x in out) == Counter(logged), f"seed={seed}"  # each once
    last: dict[int, str] = {}
    for req, frm, to in logged:  # the log: each request's moves in order
        assert frm == last.get(req), (req, frm, last.get(req), f"seed={seed}")
        last[req] = to
    for out in got:  # each poll()'s answer: a stretch of the log
        seen: dict[int, str] = {}
        for req, frm, to in out:
            assert seen.get(req, frm) == frm, (req, frm, seen[req], f"seed={seed}")
            seen[req] = to
    assert early == [] and len(delivered) == len(set(delivered)) == eng.statistics().deferred, f"seed={seed}"
    res = audit_events([json.loads(line) for line in log.lines])
    assert res.ok, ([str(f) for f in res.findings if f.violation][:5], f"seed={seed}")
    assert left_records[0] > 0  # control: the budget split the work
