"""Hypothesis stateful test: the engine against a timed reference model, record by record.

test_engine_stateful.py compares states and results with the table model; this one adds what that leaves out:
time (transfer_timeout, cancel_grace, the progress deadline and the per-entry wedge check, with the clock moved
past timers that have not fired yet), the tombstone window (ids forgotten and advertised again, new serials),
the pool's slot order and generations, quarantine and recovery, the health snapshot, the counters, the batch
calls (apply_batch, advertise_batch) mixed with single calls, on_terminate that calls terminate() or poll() or
raises, a C++ caller's drain (its notices count as delivered), a poll_budget (the records one poll() logs; a notice
waits for its TerminateNow record, the rest for later polls), and every line poll() logs, in order.

The model is written from DESIGN §2-§6 and docs/engine.md, not from engine.cpp: one instant per batch, a batch's
items run grouped by shard, serial = per-shard count << 12 | shard, each shard keeps tombstones / shards (rounded
up) and a held tombstone joins its window once its notice was delivered, slots are leased lowest first and
released ones LIFO, health counts the progress deadline from the oldest exposure and checks each shard's oldest
entry of a state against its timer.  It knows the engine's id hash (the shard), which every advertise checks
through the serial.  Ran hard while written (3,000 programs of 100 steps; 1,500 of 200 over 40 ids, 12 slots):
no divergence.
"""

from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lifecycle import TABLE, ManualClock, TransferEngine, _core
from lifecycle.engine import _RECORD
from lifecycle.errors import DuplicateRequest, PoolExhausted, TerminateCallbackError
from lifecycle.model import ReferenceEngine

SEC = 1_000_000_000
IDS = range(8)
EVENTS = [e for e in TABLE.events if e != "advertise"]
ECODE = {e: i for i, e in enumerate(TABLE.events)}
KIND_STATUS = {"moved": "Moved", "stay": "Stay", "late": "Late", "defer": "Deferred", "illegal": "Illegal",
               "unknown": "Unknown"}
EXPOSED = ("InFlight", "CancelRequested")
NONTERMINAL = ("Advertised", "InFlight", "CancelRequested")
TNOW = "TerminateNow"  # the model's queue entry for a TerminateNow record (no line of its own)
COUNTERS = ("transitions", "illegal", "late", "unknown", "duplicate", "deferred", "terminate_now", "timeouts",
            "grace_expired", "quarantined", "recovered")


@dataclass
class _S:
    """What the model knows of one session beyond the table model's state."""

    role: str
    serial: int
    slot: int | None
    gen: int
    t: int  # entered its state
    order: int  # entry order among sessions (ties of t: a batch is one instant)
    exposed_at: int | None = None
    evidence: bool = False
    quarantined: bool = False
    was_poisoned: bool = False
    held: bool = False  # Terminated, its TerminateNow not delivered yet


class TimedModel:
    """The table model (lifecycle.model.ReferenceEngine) plus time, tombstones, pool and health."""

    def __init__(self, now, *, timeout, grace, deadline, budget, slots, tombstones, shards):
        self.ref = ReferenceEngine(TABLE)
        self.now = now
        self.timeout, self.grace, self.deadline, self.budget = timeout, grace, deadline, budget
        self.shards = 1 << (shards - 1).bit_length()  # rounded up to a power of two
        self.cap = -(-tombstones // self.shards)  # each shard keeps its share, rounded up
        self.s: dict[int, _S] = {}
        self.window: list[list[int]] = [[] for _ in range(self.shards)]  # tombstones in eviction order, per shard
        self.order = itertools.count()
        self.serials = [0] * self.shards
        # pool: untouched slots leased lowest first, released ones before them (LIFO)
        self.num_slots, self.free, self.gens, self.touched = slots, [], {}, 0
        self.quarantined, self.leases, self.recovered = 0, 0, 0
        self.ctr = dict.fromkeys(COUNTERS, 0)
        self.last_progress = now  # engine creation, then the last entry into a terminal state
        self.unhealthy = False  # as the last health() found it
        self.backend = (True, "")
        self.queue: list[tuple] = []  # records not drained yet, as poll() logs them
        self.notices: list[int] = []
        # drained by poll() but left by its poll_budget: records not logged yet, notices not delivered yet
        self.inbox: list[tuple] = []
        self.pending: list[int] = []

    # -- pool --
    def _lease(self):
        if self.free:
            slot = self.free.pop()
        elif self.touched < self.num_slots:
            slot, self.touched = self.touched, self.touched + 1
        else:
            return None
        self.gens[slot] = self.gens.get(slot, 0) + 1
        self.leases += 1
        return slot

    def slots_free(self):
        return len(self.free) + self.num_slots - self.touched

    def _rec(self, name, req, **kw):
        self.queue.append((name, req, tuple(sorted({**kw, "t_mono_ns": self.now}.items()))))

    def _transition(self, req, frm, to, event, deferred=False):
        s = self.s[req]
        self._rec("lifecycle.transition", req, from_state=frm, to_state=to, trigger=event,
                  outcome=self.ref.sessions[req].outcome, slot=-1 if s.slot is None else s.slot,
                  generation=s.gen, deferred=deferred)

    def _enter(self, req, state):
        s = self.s[req]
        s.t, s.order = self.now, next(self.order)
        if state == "InFlight":
            s.exposed_at = self.now
        if state in TABLE.terminal:
            self.last_progress = self.now

    def _try_recover(self, req):
        s = self.s[req]
        if s.quarantined:
            s.quarantined = False
            self.quarantined -= 1
            self.recovered += 1
            self.ctr["recovered"] += 1
            self.free.append(s.slot)
            self._rec("lifecycle.buffer_recovered", req, slot=s.slot, generation=s.gen)

    def _final(self, req, left):
        """`req` just left the terminal state `left` for Terminated."""
        s = self.s[req]
        if s.slot is not None and left == "Quiesced":
            self.free.append(s.slot)
        elif s.slot is not None:  # Poisoned: quarantined unless evidence came meanwhile
            s.quarantined = True
            self.quarantined += 1
            self.ctr["quarantined"] += 1
            self._rec("lifecycle.slot_quarantined", req, slot=s.slot, generation=s.gen)
            if s.evidence:
                self._try_recover(req)

    def shard(self, req):
        return _mix(req) & (self.shards - 1)

    def by_shard(self, reqs):
        """Indices of reqs in the order a batch runs them: grouped by shard, in order within each."""
        return sorted(range(len(reqs)), key=lambda i: self.shard(reqs[i]))

    def _evict(self, k):
        while len(self.window[k]) > self.cap:
            req = self.window[k].pop(0)
            del self.s[req], self.ref.sessions[req], self.ref.models[req]

    # -- calls --
    def advertise(self, req, role, with_slot):
        if req in self.s:
            self.ctr["duplicate"] += 1
            return "Duplicate"
        slot = None
        if with_slot:
            slot = self._lease()
            if slot is None:
                return "NoSlot"
        k = self.shard(req)
        self.serials[k] += 1
        self.s[req] = _S(role, self.serials[k] << 12 | k, slot, 0 if slot is None else self.gens[slot], self.now,
                         next(self.order))
        self.ref.advertise(req, role)
        self.ctr["transitions"] += 1
        self._transition(req, None, "Advertised", "advertise")
        return "Moved"

    def apply(self, req, event):
        """(status, from, to, result) as Engine::apply answers them (from/to None when Unknown)."""
        if req not in self.s:
            self.ctr["unknown"] += 1
            return "Unknown", None, None, None
        s, r = self.s[req], self.ref.sessions[req]
        frm, deferred_before, n_notices = r.state, r.deferred, len(self.ref.notices)
        kind, result = self.ref.apply(req, event, unhealthy=self.unhealthy or not self.backend[0])
        if kind == "illegal":
            self.ctr["illegal"] += 1
            self._rec("lifecycle.illegal_transition", req, trigger=event, state=frm)
            return "Illegal", frm, frm, None
        if kind == "late":
            self.ctr["late"] += 1
            self._rec("lifecycle.late_event", req, trigger=event, state=frm)
            if event == "complete" and (frm == "Poisoned" or (frm == "Terminated" and s.was_poisoned)):
                s.evidence = True
            if event == "complete" and frm == "Terminated":
                self._try_recover(req)
        elif kind == "defer" and not deferred_before:
            self.ctr["deferred"] += 1
        elif kind == "moved":
            row = TABLE.row(frm, event)
            self.ctr["transitions"] += 1
            self.ctr["timeouts"] += event == "timeout"
            self.ctr["grace_expired"] += event == "grace_expired"
            self._enter(req, row.dst)
            if row.dst == "Poisoned":
                s.was_poisoned = True
            self._transition(req, frm, row.dst, event)
            if row.dst in TABLE.final:
                self._final(req, frm)
                self.window[self.shard(req)].append(req)
            elif len(self.ref.notices) > n_notices:  # the deferred terminate, in the same step
                self.ctr["transitions"] += 1
                self.ctr["terminate_now"] += 1
                self._enter(req, "Terminated")
                self._transition(req, row.dst, "Terminated", "terminate", deferred=True)
                self._final(req, row.dst)
                self._rec(TNOW, req)  # a record too (poll_budget counts it), logged by no line
                self.notices.append(req)
                s.held = True
        to = self.ref.sessions[req].state
        if event in ("cancel", "terminate") and result is not None:
            self._rec(f"lifecycle.{event}", req, result=result, state=frm)
        self._evict(self.shard(req))
        return KIND_STATUS[kind], frm, to, result

    def tick(self):
        for k in range(self.shards):
            for state, event, timer in (("InFlight", "timeout", self.timeout),
                                        ("CancelRequested", "grace_expired", self.grace)):
                if timer:
                    due = sorted((s.order, req) for req, s in self.s.items()
                                 if self.shard(req) == k and self.ref.sessions[req].state == state
                                 and s.t <= self.now - timer)
                    for _, req in due:
                        self.apply(req, event)

    def delivered(self, req):
        s = self.s[req]
        assert s.held
        s.held = False
        self.window[self.shard(req)].append(req)
        self._evict(self.shard(req))

    def health(self):
        """(reason kinds, raw health fields) as the engine's health() reports them."""
        states = {req: self.ref.sessions[req].state for req in self.s}
        counts = {name: 0 for name in TABLE.states}
        for state in states.values():
            counts[state] += 1
        reasons = []
        exposed = [self.s[req].exposed_at for req, state in states.items() if state in EXPOSED]
        if exposed:
            since = self.now - max(self.last_progress, min(exposed))
            if since > self.deadline:
                reasons.append("no progress")
        else:
            since = self.now - self.last_progress
        wedged = []
        for k, (state, timer) in itertools.product(range(self.shards), (("InFlight", self.timeout),
                                                                          ("CancelRequested", self.grace))):
            inside = sorted((self.s[req].order, req) for req, st_ in states.items()
                            if st_ == state and self.shard(req) == k)
            if timer and inside:  # each shard's oldest entry of the state, whatever the others do
                req = inside[0][1]
                age = self.now - self.s[req].t
                if age > timer + self.deadline:
                    wedged.append((age, f"wedged: request {req} in {state}"))
        # oldest first (equal ages in any order)
        reasons += [w for _, w in sorted(wedged, key=lambda w: (-w[0], w[1]))]
        if self.quarantined > self.budget or 0 < self.num_slots == self.quarantined:
            reasons.append("quarantine")
        if not self.backend[0]:
            reasons.append("backend: " + (self.backend[1] or "unhealthy (no reason given)"))
        self.unhealthy = bool(reasons)
        oldest = [self.s[req].t for req, state in states.items() if state in NONTERMINAL]
        return reasons, {
            "healthy": not reasons, "counts": counts, "quarantined": self.quarantined,
            "quarantine_budget": self.budget, "oldest_nonterminal_ns": self.now - min(oldest) if oldest else -1,
            "since_progress_ns": since, "backend_healthy": self.backend[0], "backend_reason": self.backend[1],
            "live": sum(counts[s] for s in NONTERMINAL + tuple(TABLE.terminal)),
        }


class _Refused(Exception):
    pass


def _mix(x: int) -> int:
    """The engine's id hash (docs/engine.md: its low bits pick the shard; serials carry the shard index, so
    sessions_match checks this against the engine on every advertise)."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _reason_kind(reason: str) -> str:
    for prefix in ("no progress", "quarantine", "backend: "):
        if reason.startswith(prefix):
            return reason if prefix == "backend: " else prefix
    assert reason.startswith("wedged: request "), reason
    return reason.split(" for ")[0]


class _Log:
    """A structlog-shaped logger that keeps (event, request, fields) of every line."""

    KEEP = {"from_state", "to_state", "trigger", "outcome", "slot", "generation", "deferred", "t_mono_ns",
            "result", "state"}

    def __init__(self):
        self.lines: list[tuple] = []

    def bind(self):
        return self

    def info(self, event, request=None, **kw):
        if event == "lifecycle.health":
            self.lines.append((event, None, (("healthy", kw["healthy"]),
                                             ("reasons", tuple(sorted(_reason_kind(r) for r in kw["reasons"]))))))
            return
        self.lines.append((event, request, tuple(sorted((k, v) for k, v in kw.items() if k in self.KEEP))))


class EngineVsTimedModel(RuleBasedStateMachine):
    Model = TimedModel

    @initialize(timeout=st.sampled_from([None, 1, 3]), grace=st.sampled_from([None, 1, 2]),
                deadline=st.sampled_from([1, 2, 5]), budget=st.integers(0, 2), slots=st.integers(0, 3),
                tombstones=st.integers(0, 5), shards=st.sampled_from([1, 1, 2, 3]),
                start=st.sampled_from([0, 7 * SEC]), reenter=st.booleans(),
                callback=st.sampled_from(["returns", "polls", "raises 0", "raises 1"]),
                poll_budget=st.sampled_from([None, None, 1, 2, 3, 7]))
    def setup(self, timeout, grace, deadline, budget, slots, tombstones, shards, start, reenter, callback,
              poll_budget):
        self.clock = ManualClock(start)
        self.poll_budget = poll_budget
        self.levels: list[tuple] = []  # per poll() running (a callback's nests): (quota, ids of moves logged, notices)
        self.log = _Log()
        self.reenter = reenter  # on_terminate calls terminate() again
        self.repoll = callback == "polls"  # on_terminate calls poll() (once: not from the poll it calls)
        self.raises = int(callback[-1]) if callback.startswith("raises") else None  # for the ids of this parity
        self.polling = 0
        self.engine = TransferEngine(clock=self.clock, num_slots=slots, slot_size=64 if slots else 0,
                                     transfer_timeout=timeout, cancel_grace=grace, progress_deadline=deadline,
                                     quarantine_budget=budget, tombstones=tombstones, shards=shards,
                                     on_terminate=self._on_terminate, logger=self.log, poll_budget=poll_budget)
        self.model = self.Model(start, timeout=(timeout or 0) * SEC, grace=(grace or 0) * SEC,
                                deadline=deadline * SEC, budget=budget, slots=slots, tombstones=tombstones,
                                shards=shards)
        self.expected: list[tuple] = []  # the model's log lines

    def _log_records(self, quota):
        """What poll()'s budget lets it log of the records it drained (all without one): their lines expected, its
        logged moves noted; a TerminateNow record releases its notice."""
        m = self.model
        while m.inbox and (quota is None or quota[0] > 0):
            line = m.inbox.pop(0)
            if quota is not None:
                quota[0] -= 1
            if line[0] != TNOW:
                self.expected.append(line)
            if line[0] == "lifecycle.transition":
                self.levels[-1][1].append(line[1])

    def _on_terminate(self, req):
        # the callback's own calls find the session Terminated (DESIGN §5), whatever the window
        assert self.engine.info(req).state.value == "Terminated"
        m, (quota, _, delivered) = self.model, self.levels[-1]
        self._log_records(quota)  # (the delivery loop logs what its budget allows first)
        # the notices in order, each once, only once its TerminateNow record (after its move) was logged
        assert m.pending[:1] == [req], (req, m.pending)
        assert (TNOW, req) not in [line[:2] for line in m.inbox], (req, "delivered before its move was logged")
        m.pending.pop(0)
        delivered.append(req)
        self.expected.append(("lifecycle.terminate_now", req, (("t_mono_ns", self.model.now),)))
        if self.reenter:
            assert self.engine.terminate(req).value == "AlreadyTerminated"
            assert self.model.apply(req, "terminate")[3] == "AlreadyTerminated"
        if self.repoll and self.polling == 1:
            self.poll()  # delivers the batch's other notices, and logs what was queued meanwhile
        self.model.delivered(req)  # (the engine hears of it once the callback returned)
        if self.raises is not None and req % 2 == self.raises:
            self.expected.append(("lifecycle.callback_error", req, (("t_mono_ns", self.model.now),)))
            raise _Refused(req)

    def _call_line(self, event, req, result):
        if result == "NotFound":  # the facade logs these itself, at the call
            self.expected.append((f"lifecycle.{event}", req, (("result", "NotFound"), ("state", None),
                                                             ("t_mono_ns", self.model.now))))

    # -- executor and transport calls --
    @rule(req=st.sampled_from(IDS), receiver=st.booleans(), with_slot=st.booleans())
    def advertise(self, req, receiver, with_slot):
        with_slot = with_slot and self.model.num_slots > 0
        want = self.model.advertise(req, "receiver" if receiver else "sender", with_slot)
        try:
            self.engine.advertise(req, "receiver" if receiver else "sender", 64 if with_slot else 0)
            got = "Moved"
        except (DuplicateRequest, PoolExhausted) as exc:
            got = "Duplicate" if isinstance(exc, DuplicateRequest) else "NoSlot"
        assert got == want, (req, got, want)

    @rule(reqs=st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True), receiver=st.booleans(),
          with_slot=st.booleans())
    def advertise_batch(self, reqs, receiver, with_slot):
        with_slot = with_slot and self.model.num_slots > 0
        raw = self.engine.advertise_batch(array("Q", reqs), int(receiver), 64 if with_slot else 0)
        want = [None] * len(reqs)
        for i in self.model.by_shard(reqs):
            want[i] = self.model.advertise(reqs[i], "receiver" if receiver else "sender", with_slot)
        assert [_core.STATUS_NAMES[c] for c in raw] == want, (reqs, want)

    @rule(req=st.sampled_from(IDS), event=st.sampled_from(EVENTS))
    def apply(self, req, event):
        status, frm, to, result = self.engine.apply_raw(req, ECODE[event])
        want = self.model.apply(req, event)
        names = TABLE.cancel_results if event == "cancel" else TABLE.terminate_results
        known = _core.STATUS_NAMES[status] != "Unknown"  # (from and to mean nothing then)
        got = (_core.STATUS_NAMES[status], _core.STATE_NAMES[frm] if known else None,
               _core.STATE_NAMES[to] if known else None, None if result == 0xFF else names[result])
        assert got == want, (req, event, got, want)

    @rule(req=st.sampled_from(IDS), events=st.lists(st.sampled_from(EVENTS), min_size=1, max_size=4))
    def script(self, req, events):
        """Several events of one session, one call each."""
        for event in events:
            self.apply(req, event)

    @rule(data=st.data())
    def legal(self, data):
        """An event the table has a moving row for, on a session the model knows (most random events are not)."""
        live = sorted(req for req in self.model.s if TABLE.row(self.model.ref.sessions[req].state, "terminate"))
        if not live:
            return
        req = data.draw(st.sampled_from(live))
        state = self.model.ref.sessions[req].state
        moving = [e for e in EVENTS if (row := TABLE.row(state, e)) is not None and row.moves]
        self.apply(req, data.draw(st.sampled_from(moving or EVENTS)))

    @rule(items=st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(EVENTS + EVENTS + ["advertise", 200])),
                         min_size=1, max_size=6))
    def apply_batch(self, items):
        raw = self.engine.apply_batch(array("Q", [r for r, _ in items]),
                                      bytes(ECODE.get(e, 200) if isinstance(e, str) else e for _, e in items))
        want = [None] * len(items)
        for i in self.model.by_shard([r for r, _ in items]):
            r, e = items[i]
            want[i] = "BadArgument" if e in ("advertise", 200) else self.model.apply(r, e)[0]
        assert [_core.STATUS_NAMES[c] for c in raw] == want, (items, want)

    def _result_call(self, call: str, req: int) -> None:
        """cancel() or terminate(): the engine's result is the model's, and so is the line it logs."""
        got = getattr(self.engine, call)(req).value
        want = self.model.apply(req, call)[3] or "NotFound"
        self._call_line(call, req, want)
        assert got == want, (call, req, got, want)

    @rule(req=st.sampled_from(IDS))
    def cancel(self, req):
        self._result_call("cancel", req)

    @rule(req=st.sampled_from(IDS))
    def terminate(self, req):
        self._result_call("terminate", req)

    @rule(healthy=st.booleans(), reason=st.sampled_from(["peer lost", "ucx down", ""]))
    def backend(self, healthy, reason):
        self.engine.set_backend_health(healthy, "" if healthy else reason)
        self.model.backend = (healthy, "" if healthy else reason)

    # -- time --
    @rule(dt=st.sampled_from([1, SEC // 2, SEC - 1, SEC, 2 * SEC, 3 * SEC, 7 * SEC]))
    def advance(self, dt):
        """The clock moves; timers fire only at the next tick() or poll()."""
        self.clock.advance(dt)
        self.model.now += dt

    @rule()
    def tick(self):
        before = len(self.model.queue)
        self.model.tick()
        assert self.engine.tick() == sum(1 for line in self.model.queue[before:]
                                         if line[0] == "lifecycle.transition"
                                         and dict(line[2])["trigger"] in ("timeout", "grace_expired"))

    @rule()
    def health(self):
        h = self.engine._health()
        reasons, want = self.model.health()
        got = [_reason_kind(r) for r in h["reasons"]]
        wedged = [float(r.split(" for ")[1].split("s,")[0]) for r in h["reasons"] if r.startswith("wedged")]
        assert wedged == sorted(wedged, reverse=True), h["reasons"]  # oldest first
        # no progress, wedged (oldest first), quarantine, backend
        category = [r.split(":")[0].split(" ")[0] for r in got]
        assert sorted(got) == sorted(reasons) and category == [r.split(":")[0].split(" ")[0] for r in reasons], \
            (h["reasons"], reasons)
        assert {k: v for k, v in h.items() if k != "reasons"} == want, (h, want)

    @rule()
    def poll(self):
        m = self.model
        m.tick()
        was = not self.engine._was_healthy
        reasons, _ = m.health()
        # the native drain: with a budget, what it has room for next to the inbox (the rest stays queued)
        room = len(m.queue) if self.poll_budget is None else max(self.poll_budget - len(m.inbox), 0)
        taken, m.queue = m.queue[:room], m.queue[room:]
        tnow = sum(line[0] == TNOW for line in taken)
        m.inbox += taken
        m.pending += m.notices[:tnow]
        m.notices = m.notices[tnow:]
        # (a callback's poll() spends what is left of the budget of the poll() it is in)
        quota = self.levels[-1][0] if self.levels else None if self.poll_budget is None else [self.poll_budget]
        self.levels.append((quota, [], []))
        self._log_records(quota)
        if bool(reasons) != was:  # (after what it logged: health is checked once the records were)
            self.expected.append(("lifecycle.health", None, (("healthy", not reasons),
                                                             ("reasons", tuple(sorted(reasons))))))
        self.polling += 1
        errors = None
        try:
            got = self.engine.poll()
        except TerminateCallbackError as err:  # raised after every notice was delivered (DESIGN §5)
            for _, exc in err.errors:
                if isinstance(exc, AssertionError):  # the callback's checks
                    raise exc
            got, errors = err.transitions, [req for req, _ in err.errors]
        finally:
            self.polling -= 1
            _, logged, delivered = self.levels.pop()
        refused = [req for req in delivered if self.raises is not None and req % 2 == self.raises]
        assert (errors or []) == refused, (errors, refused)
        if errors is None and self.polling == 0:  # its second round (a callback's poll() drained more): more lines
            self.levels.append((quota, logged, delivered))
            self._log_records(quota)
            self.levels.pop()
        assert [t.request for t in got] == logged
        # a notice left is one whose TerminateNow record waits (every other one went out, in order)
        assert not m.pending or (TNOW, m.pending[0]) in [line[:2] for line in m.inbox], (m.pending, m.inbox)
        self.compare_logs()

    def teardown(self):
        """What a budget left is logged and delivered by the next polls, all of it (nothing lost, nothing waits
        for ever)."""
        if not hasattr(self, "engine"):
            return
        m = self.model
        for _ in range(1000):  # (each poll() logs one record at least, and the callbacks queue few)
            if not (m.inbox or m.pending or m.queue or m.notices):
                break
            self.poll()
        assert not (self.model.inbox or self.model.pending) and not (self.engine._inbox or self.engine._notices)
        assert self.engine.pending() == len(m.queue) == 0

    @rule()
    def drain_natively(self):
        """A C++ caller's drain (no tick, no log): each TerminateNow it takes counts as delivered, so its tombstone
        joins the window at once."""
        m = self.model
        queued, m.queue = m.queue, []
        notices, m.notices = m.notices, []
        for req in notices:
            m.delivered(req)
        kinds = _core.RECORD_KIND_NAMES
        raw = [(kinds[r[4]], r[0]) for r in _RECORD.iter_unpack(self.engine._drain())]
        assert [req for kind, req in raw if kind == "TerminateNow"] == notices
        assert [req for kind, req in raw if kind != "TerminateNow"] == [line[1] for line in queued if line[0] != TNOW]

    # -- after every step --
    @invariant()
    def compare_logs(self):
        assert self.log.lines == self.expected, _first_difference(self.log.lines, self.expected)

    @invariant()
    def sessions_match(self):
        for req in IDS:
            raw = self.engine._info(req)
            s = self.model.s.get(req)
            if s is None:
                assert raw is None, (req, raw)
                continue
            r = self.model.ref.sessions[req]
            want = (["sender", "receiver"].index(s.role), TABLE.states.index(r.state),
                    0 if r.outcome is None else 1 + TABLE.outcomes.index(r.outcome), r.deferred, s.evidence,
                    -1 if s.slot is None else s.slot, s.gen, s.t, s.serial)
            assert raw == want, (req, raw, want)

    @invariant()
    def pool_and_counters_match(self):
        m = self.model
        stats = self.engine.pool.stats()
        assert (stats["free"], stats["quarantined"], stats["leases"], stats["recovered"]) == \
               (m.slots_free(), m.quarantined, m.leases, m.recovered)
        for slot, gen in m.gens.items():
            assert self.engine.pool.generation(slot) == gen
        assert self.engine._counters() == m.ctr
        assert self.engine.next_deadline_ns() == min(
            [s.t + m.timeout for q, s in m.s.items() if m.timeout and m.ref.sessions[q].state == "InFlight"] +
            [s.t + m.grace for q, s in m.s.items() if m.grace and m.ref.sessions[q].state == "CancelRequested"] +
            [2**63 - 1])


def _first_difference(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"line {i}: got {a}, model {b}"
    return f"lengths {len(got)} vs {len(want)}: extra {got[len(want):] or want[len(got):]}"


EngineVsTimedModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
TestEngineVsTimedModel = EngineVsTimedModel.TestCase


class _ProgressFromTheCancel(TimedModel):
    """Counts the progress deadline from a timeout's or a cancel's entry into CancelRequested (the engine did,
    before session 24: health said OK up to another deadline after a cancellation burst)."""

    def _enter(self, req, state):
        super()._enter(req, state)
        if state == "CancelRequested":
            self.s[req].exposed_at = self.now


class _WindowRoundedDown(TimedModel):
    """Each shard's share of the tombstone window rounded down (the engine's, before session 20: a window
    smaller than the shard count kept no tombstone)."""

    def __init__(self, now, **kw):
        super().__init__(now, **kw)
        self.cap = kw["tombstones"] // self.shards


@pytest.mark.parametrize("mutant", [_ProgressFromTheCancel, _WindowRoundedDown])
def test_the_timed_model_comparison_can_fail(mutant):
    """Negative controls: a model with a bug the engine once had disagrees with the engine, and the test sees it."""

    class Mutant(EngineVsTimedModel):
        Model = mutant

    Mutant.TestCase.settings = settings(max_examples=1000, stateful_step_count=50, deadline=None, database=None,
                                        phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    with pytest.raises(AssertionError):
        Mutant.TestCase().runTest()
