"""Transport threads post completions while the executor cancels and terminates the same sessions."""

from __future__ import annotations

import random
import threading
from array import array
from collections import Counter

from lifecycle import FINAL, TABLE, TERMINAL, State, TransferEngine, _core

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
