"""Golden audit logs from scripted scenarios (stand-in for the real engine).

``ScriptedEngine`` mimics the observable logging of ``lifecycle.TransferEngine``: transitions,
cancel/terminate results, late/illegal events and quarantine/recovery records are queued in causal
order and logged by ``poll()`` (only a NotFound result, which has no session, is logged at once);
deferred-termination notices (``lifecycle.terminate_now``) are logged after the batch.  A test
(``test_scripted_goldens_match_the_real_engine``) checks this against the real engine.  The lifecycle
itself comes from the table (``lifecycle.spec``), never from a copy here.

``RealEngineAdapter`` runs the same scenario functions on a real ``TransferEngine`` (same method names,
structlog rendering JSON lines): the tests compare its logs with the scripted ones.

    python tests/golden/make_golden.py            # rewrite tests/golden/*.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:  # runnable as a script
    sys.path.insert(0, str(ROOT))

from lifecycle import spec as _spec  # noqa: E402

SCHEMA = "kv-lifecycle.events/1"
MS = 1_000_000
SPEC = _spec.load(_spec.default_table_path())



class _TransportCalls:
    """expose/complete/fail through ``post`` (shared by the scripted and the real engine)."""

    def expose(self, req: int) -> None:
        self.post(req, "expose")

    def complete(self, req: int) -> None:
        self.post(req, "complete")

    def fail(self, req: int) -> None:
        self.post(req, "fail")

class ScriptedEngine(_TransportCalls):
    """A table-driven fake engine that logs what the real one logs, in the same order."""

    def __init__(self, rank: int = 0, pid: int = 4242, num_slots: int = 4, t0: int = 1_000_000 * MS,
                 spec: _spec.Spec = SPEC):
        self.rank, self.pid, self.spec = rank, pid, spec
        self.now = t0
        self.seq = 0
        self.events: list[dict] = []
        self.sessions: dict[int, dict] = {}
        self.free = list(range(num_slots))
        self.gen = [0] * num_slots
        self.queue: list[tuple] = []  # (name, req, role, t, extra)
        self.notices: list[int] = []

    # ------------------------------------------------------------------ clock and logging
    def advance(self, ms: float) -> None:
        self.now += int(ms * MS)

    def _emit(self, name: str, req: int | None, role: str | None, t: int, **kw) -> None:
        d = {"request": req, "rank": self.rank, "role": role, "t_mono_ns": t, "seq": self.seq, "pid": self.pid,
             "table": self.spec.digest, "schema": SCHEMA, **kw, "event": name, "level": "info"}
        self.seq += 1
        self.events.append(d)

    def _record(self, name: str, s: dict, **kw) -> None:
        self.queue.append((name, s["req"], s["role"], self.now, kw))

    def _transition(self, s: dict, frm: str | None, trig: str, deferred: bool = False) -> None:
        self._record("lifecycle.transition", s, from_state=frm, to_state=s["state"], trigger=trig,
                     outcome=s["outcome"] if s["state"] in self.spec.terminal or s["state"] in self.spec.final
                     else None, slot=s["slot"], generation=s["gen"], deferred=deferred)

    # ------------------------------------------------------------------ executor calls
    def advertise(self, req: int, role: str = "sender", nbytes: int = 0) -> None:
        slot, gen = -1, 0
        if nbytes > 0:
            slot = self.free.pop(0)
            self.gen[slot] += 1
            gen = self.gen[slot]
        s = {"req": req, "role": role, "state": self.spec.initial, "outcome": None, "deferred": False, "slot": slot,
             "gen": gen, "quarantined": False}
        self.sessions[req] = s
        self._transition(s, None, self.spec.create_event)

    def cancel(self, req: int) -> str:
        return self._call(req, "cancel", "lifecycle.cancel")

    def _call(self, req: int, event: str, name: str) -> str:
        """Like the engine: a result for a live session is queued after the records the call made
        (logged at the next poll, in order); NotFound has no session and is logged at once."""
        s = self.sessions.get(req)
        before = s["state"] if s else None
        r = self._apply(req, event)
        if s is None:
            self._emit(name, req, None, self.now, result=r, state=None)
        else:
            self._record(name, s, result=r, state=before)
        return r

    def terminate(self, req: int) -> str:
        return self._call(req, "terminate", "lifecycle.terminate")

    def post(self, req: int, event: str) -> None:
        self._apply(req, event)


    # ------------------------------------------------------------------ the table
    def _apply(self, req: int, event: str) -> str | None:
        s = self.sessions.get(req)
        if s is None:
            return "NotFound"
        row = self.spec.row(s["state"], event)
        if row is None:
            self._record("lifecycle.illegal_transition", s, trigger=event, state=s["state"])
            return None
        if row.dst == ".stay":
            return row.result
        if row.dst == ".late":
            self._record("lifecycle.late_event", s, trigger=event, state=s["state"])
            if event == "complete" and s["quarantined"]:  # evidence tied to this transfer: recover the slot
                s["quarantined"] = False
                self.free.append(s["slot"])
                self._record("lifecycle.buffer_recovered", s, slot=s["slot"], generation=s["gen"])
            return None
        if row.dst == ".defer":
            if s["deferred"]:
                return "AlreadyDeferred"
            s["deferred"] = True
            return row.result
        frm = s["state"]
        s["state"] = row.dst
        if row.outcome is not None:
            s["outcome"] = row.outcome
        self._transition(s, frm, event)
        if row.dst in self.spec.final:
            self._enter_final(s, frm)
        elif row.dst in self.spec.terminal and s["deferred"]:
            s["deferred"] = False
            fin = self.spec.row(row.dst, "terminate")
            s["state"] = fin.dst
            self._transition(s, row.dst, "terminate", deferred=True)
            self._enter_final(s, row.dst)
            self.notices.append(req)
            if event == "cancel":  # the engine's refinement: the notice releases it, not the cancel
                return "CancelledDeferred"
        return row.result

    def _enter_final(self, s: dict, frm: str) -> None:
        if s["slot"] < 0:
            return
        if frm == "Poisoned":
            s["quarantined"] = True
            self._record("lifecycle.slot_quarantined", s, slot=s["slot"], generation=s["gen"])
        else:
            self.free.append(s["slot"])

    # ------------------------------------------------------------------ polling
    def poll(self) -> None:
        for name, req, role, t, kw in self.queue:
            self._emit(name, req, role, t, **kw)
        self.queue.clear()
        for req in self.notices:
            self._emit("lifecycle.terminate_now", req, None, self.now)
        self.notices.clear()

    def health(self, healthy: bool, reasons: list[str]) -> None:
        self._emit("lifecycle.health", None, None, self.now, healthy=healthy, reasons=reasons)


class RealEngineAdapter(_TransportCalls):
    """The same calls on the real ``lifecycle.TransferEngine`` (manual clock); events go to structlog.

    Capture them with ``structlog.testing.capture_logs()`` (or a JSON renderer) to regenerate goldens
    from the engine itself.
    """

    def __init__(self, rank: int = 0, num_slots: int = 4, t0: int = 1_000_000 * MS, **_ignored):
        from lifecycle import ManualClock, TransferEngine

        self.clock = ManualClock(t0)
        self.engine = TransferEngine(rank=rank, clock=self.clock, num_slots=num_slots, slot_size=8192)

    def advance(self, ms: float) -> None:
        self.clock.advance(int(ms * MS))

    def advertise(self, req: int, role: str = "sender", nbytes: int = 0) -> None:
        self.engine.advertise(req, role, nbytes)

    def cancel(self, req: int) -> str:
        return self.engine.cancel(req).value

    def terminate(self, req: int) -> str:
        return self.engine.terminate(req).value

    def post(self, req: int, event: str) -> None:
        self.engine.post(req, event)


    def poll(self) -> None:
        self.engine.poll()

    def health(self, healthy: bool, reasons: list[str]) -> None:
        """The real engine logs a health change itself, in the poll() that sees it (the scripts say where)."""

    events: list = []  # the real engine logs through structlog instead


# ---------------------------------------------------------------------- scenarios (one per golden)


def clean_run(eng: ScriptedEngine | None = None) -> list[dict]:
    """Four transfers (both roles) that complete and are terminated."""
    e = eng or ScriptedEngine(pid=4101, t0=1_000_000 * MS)
    for req in (1, 2, 3, 4):
        e.advertise(req, "sender" if req % 2 else "receiver", nbytes=4096)
        e.advance(0.1)
    e.poll()
    for req in (1, 2, 3, 4):
        e.expose(req)
        e.advance(0.5)
    e.poll()
    for req in (2, 1, 4, 3):
        e.advance(2 + req)
        e.complete(req)
    e.poll()
    for req in (1, 2, 3, 4):
        e.terminate(req)
        e.advance(0.2)
    e.poll()
    return e.events


def cancellation(eng: ScriptedEngine | None = None) -> list[dict]:
    """Cancel before expose, cancel in flight (peer acks), a timeout (then DONE), a repeated cancel."""
    e = eng or ScriptedEngine(pid=4102, t0=1_100_000 * MS)
    for req in (10, 11, 12):
        e.advertise(req, "sender", nbytes=1024)
    e.poll()
    e.advance(1)
    e.cancel(10)  # CancelledBeforeAdvertise: never exposed
    e.expose(11)
    e.expose(12)
    e.poll()
    e.advance(3)
    e.cancel(11)  # CancelRequestedInFlight
    e.cancel(11)  # idempotent
    e.post(12, "timeout")
    e.poll()
    e.advance(4)
    e.complete(11)  # the peer's quiesced ack
    e.complete(12)
    e.poll()
    for req in (10, 11, 12):
        e.terminate(req)
    e.poll()
    e.advance(1)
    e.cancel(10)  # NotCancellable after Terminated
    return e.events


def poisoning(eng: ScriptedEngine | None = None) -> list[dict]:
    """A failure and an expired grace poison sessions; a late DONE recovers the slot, which is reused."""
    e = eng or ScriptedEngine(pid=4103, num_slots=2, t0=1_200_000 * MS)
    e.advertise(20, "receiver", nbytes=4096)
    e.advertise(21, "receiver", nbytes=4096)
    e.expose(20)
    e.expose(21)
    e.poll()
    e.advance(5)
    e.fail(20)  # backend error: not evidence -> Poisoned
    e.cancel(21)
    e.poll()
    e.advance(50)
    e.post(21, "grace_expired")
    e.poll()
    e.terminate(20)  # slot quarantined
    e.terminate(21)
    e.poll()
    # both slots of the pool quarantined: none can be leased (health, whatever the budget)
    e.health(False, ["quarantine: every slot of the pool (2) quarantined (budget 64): none can be leased until one "
                     "is recovered"])
    e.advance(7)
    e.complete(20)  # late DONE tied to that transfer: buffer_recovered
    e.fail(21)  # late, no evidence: stays quarantined
    e.poll()
    e.health(True, [])
    e.advertise(22, "receiver", nbytes=4096)  # leases the recovered slot
    e.expose(22)
    e.poll()
    e.advance(2)
    e.complete(22)
    e.poll()
    e.terminate(22)
    e.poll()
    return e.events


def deferred_termination(eng: ScriptedEngine | None = None) -> list[dict]:
    """terminate() before a terminal state is deferred and delivered exactly once."""
    e = eng or ScriptedEngine(pid=4104, t0=1_300_000 * MS)
    e.advertise(30, "sender", nbytes=512)
    e.advertise(31, "sender", nbytes=512)
    e.poll()
    e.terminate(30)  # Deferred while Advertised
    e.expose(30)
    e.expose(31)
    e.poll()
    e.advance(3)
    e.terminate(31)  # Deferred while InFlight
    e.terminate(31)  # AlreadyDeferred
    e.complete(30)
    e.poll()  # 30 -> Quiesced -> Terminated(deferred), TerminateNow
    e.advance(2)
    e.fail(31)
    e.poll()  # 31 -> Poisoned -> Terminated(deferred), quarantined, TerminateNow
    e.terminate(31)  # AlreadyTerminated
    return e.events


def two_rank() -> tuple[list[dict], list[dict]]:
    """The same requests on ranks 0 and 1 (two processes), same outcomes."""
    out = []
    for rank in (0, 1):
        e = ScriptedEngine(rank=rank, pid=5000 + rank, t0=2_000_000 * MS + rank * 137)
        for req in (40, 41, 42):
            e.advertise(req, "sender", nbytes=2048)
        e.poll()
        for req in (40, 41, 42):
            e.expose(req)
        e.poll()
        e.advance(3 + rank)
        e.complete(40)
        e.cancel(41)
        e.fail(42)
        e.poll()
        e.advance(1)
        e.complete(41)
        e.poll()
        for req in (40, 41, 42):
            e.terminate(req)
        e.poll()
        out.append(e.events)
    return out[0], out[1]


def merge_by_time(*streams: list[dict]) -> list[dict]:
    """One merged log (as a log shipper would write it): stable order by monotonic time."""
    tagged = [(d["t_mono_ns"], i, j, d) for i, s in enumerate(streams) for j, d in enumerate(s)]
    # keep each stream's own order: sort by (stream position order) merged on time via a stable merge
    import heapq

    return [d for _, _, _, d in heapq.merge(*[[x for x in tagged if x[1] == i] for i in range(len(streams))])]


def render(events: list[dict]) -> str:
    """JSON lines as structlog's JSONRenderer writes them."""
    return "".join(json.dumps(d) + "\n" for d in events)


def scenarios() -> dict[str, list[dict]]:
    r0, r1 = two_rank()
    return {
        "clean_run": clean_run(),
        "cancellation": cancellation(),
        "poisoning": poisoning(),
        "deferred_termination": deferred_termination(),
        "two_rank.rank0": r0,
        "two_rank.rank1": r1,
        "two_rank.merged": merge_by_time(r0, r1),
    }


def write_all(directory: Path = HERE) -> list[Path]:
    paths = []
    for name, events in scenarios().items():
        p = directory / f"{name}.jsonl"
        p.write_text(render(events), encoding="utf-8")
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in write_all():
        print(p)
