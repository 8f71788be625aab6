"""The Python facade over ``lifecycle._core.Engine``.

The compiled core owns the sessions, the table, timers and the buffer pool, and is safe for
transport threads.  This facade adds what only Python should do: Pythonic enums and results,
structlog events for every record the core queued (one canonical ``lifecycle.transition`` per
transition), and the executor's ``on_terminate`` callback, run on the thread that polls.
"""

from __future__ import annotations

import collections
import enum
import functools
import itertools
import math
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import structlog

from . import logstream as _logstream
from . import spec as _spec
from .errors import InvalidArgument, TerminateCallbackError, UnknownRequest, _shown

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - exercised by hand, not in CI
    raise ImportError(
        "kv-lifecycle's compiled core lifecycle._core is missing or broken "
        f"({exc}); build it with `make build` (source checkout) or `pip install .`"
    ) from exc

__all__ = [
    "CancelResult",
    "Event",
    "Health",
    "ManualClock",
    "Outcome",
    "Role",
    "SessionInfo",
    "Statistics",
    "State",
    "TABLE",
    "TerminateResult",
    "TransferEngine",
    "Transition",
    "cancel_frees_now",
]

log = structlog.get_logger("lifecycle")

#: The table compiled into the extension (the single source at run time).
TABLE: _spec.Spec = _spec.parse(_core.TABLE_TEXT, "<lifecycle._core>")


def _check_build_is_current() -> None:
    src = _spec.default_table_path()
    if src.exists():
        current = _spec.load(src).digest
        if current != _core.TABLE_DIGEST:
            raise ImportError(
                f"stale build: {src} has digest {current} but lifecycle._core was built from "
                f"{_core.TABLE_DIGEST}; rebuild with `make build`"
            )


_check_build_is_current()


def _enum(name: str, names: Iterable[str], doc: str) -> type[enum.Enum]:
    e = enum.Enum(name, [(n, n) for n in names], module=__name__, type=str)
    e.__doc__ = doc
    return e


# Generated from the table: member order == C++ enum order (checked by tests).
State = _enum("State", TABLE.states, "Lifecycle states (generated from the table).")
Event = _enum("Event", TABLE.events, "Lifecycle events (generated from the table).")
Outcome = _enum("Outcome", TABLE.outcomes, "How a session ended (generated from the table).")
CancelResult = _enum("CancelResult", TABLE.cancel_results, "What cancel() returns (generated from the table).")
TerminateResult = _enum("TerminateResult", TABLE.terminate_results, "What terminate() returns (generated).")


class Role(str, enum.Enum):
    sender = "sender"  # owns the source blocks (context / prefill worker)
    receiver = "receiver"  # owns the destination blocks (generation / decode worker)


ManualClock = _core.ManualClock

_STATES = list(State)
_EVENTS = list(Event)
_OUTCOMES: list = [None, *Outcome]
_CANCEL = list(CancelResult)
_TERMINATE = list(TerminateResult)
_ROLES = list(Role)
_ROLE_CODE = {"sender": 0, "receiver": 1}
_EVENT_CODE = {e: i for i, e in enumerate(_EVENTS)}
_RECORD = struct.Struct(_core.RECORD_FORMAT)
_KIND_AT = struct.calcsize(_core.RECORD_FORMAT[:5])  # the kind byte's offset in a record (after req, t, slot, gen)
_KIND = {n: i for i, n in enumerate(_core.RECORD_KIND_NAMES)}
_K_TRANSITION, _K_TNOW = _KIND["Transition"], _KIND["TerminateNow"]
_K_QUAR, _K_RECOV = _KIND["SlotQuarantined"], _KIND["BufferRecovered"]
_K_LATE, _K_ILLEGAL = _KIND["LateEvent"], _KIND["IllegalEvent"]
_K_RESULT = _KIND["CallResult"]
_CANCEL_EV = list(TABLE.events).index("cancel")
_STATE_NAMES = [x.value for x in _STATES]
_EVENT_NAMES = [x.value for x in _EVENTS]
_OUTCOME_NAMES = [None if x is None else x.value for x in _OUTCOMES]
_ROLE_NAMES = [x.value for x in _ROLES]
_CANCEL_NAMES = [x.value for x in _CANCEL]
_TERMINATE_NAMES = [x.value for x in _TERMINATE]
_new_transition = tuple.__new__
_INFO = 20
_ABOVE_INFO = ((30, "warning"), (40, "error"), (50, "critical"))  # where a lifecycle.log_level "filtered" line goes
_NO_STATE = 0xFF
_NO_SLOT = 0xFFFFFFFF
TERMINAL = frozenset(State[s] for s in TABLE.terminal)
FINAL = frozenset(State[s] for s in TABLE.final)
SCHEMA = _core.EVENTS_SCHEMA  # "kv-lifecycle.events/1" (audit.SCHEMA_ID, which needs no core, is tested equal)

_engine_ids = itertools.count()  # the `engine` key: unique per engine within a process (its sessions and pool)
_engines: weakref.WeakSet = weakref.WeakSet()  # every live TransferEngine (for _after_fork_in_child)


def _after_fork_in_child() -> None:
    """A child forked while another thread had poll()'s turn (handling a batch) has no such thread: the turn is
    given back, or no poll() there ever logged or delivered again (each found it taken and returned [])."""
    for eng in list(_engines):
        eng._handler = 0
        eng._turn = collections.deque((None,))
        eng._mid_batch = False
        eng._level_lock = threading.RLock()  # (held by a thread the child does not have)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Transition(NamedTuple):
    """One state change, as queued by the core (immutable; a tuple, cheap to build on the poll path)."""

    request: int
    from_state: State | None  # None for the creating advertise
    to_state: State
    event: Event
    outcome: Outcome | None
    role: Role
    t_ns: int
    slot: int | None
    generation: int
    deferred: bool


@dataclass(frozen=True, slots=True)
class Health:
    """Immutable health snapshot.  ``healthy`` is False exactly when ``reasons`` is non-empty.

    ``oldest_nonterminal_s`` is the longest time a non-terminal session (Advertised, InFlight or CancelRequested)
    has been in its *current* state (the clock its timers run on), not the time since its advertise; None with
    none.  Quiesced and Poisoned sessions awaiting ``terminate`` count in ``live`` and ``counts``, not here.

    ``backend_healthy`` and ``backend_reason`` are the last ``set_backend_health(healthy, reason)``'s: the reason is
    kept with ``healthy=True`` too (a note), and listed in ``reasons`` only while ``backend_healthy`` is False (an
    empty one as "backend: unhealthy (no reason given)")."""

    healthy: bool
    reasons: tuple[str, ...]
    counts: Mapping[State, int]
    quarantined: int
    quarantine_budget: int
    oldest_nonterminal_s: float | None
    since_progress_s: float | None
    backend_healthy: bool
    backend_reason: str
    live: int


@dataclass(frozen=True, slots=True)
class SessionInfo:
    request: int
    role: Role
    state: State
    outcome: Outcome | None
    deferred: bool
    evidence: bool  # a late DONE after Poisoned (recovers its slot); False on a Quiesced session: docs/engine.md
    slot: int | None
    generation: int
    state_since_ns: int
    serial: int  # names this session in the engine: the same id advertised again later gets another


@dataclass(frozen=True, slots=True)
class Statistics:
    """Counters since the engine was created (trio-style ``statistics()``)."""

    transitions: int
    illegal: int
    late: int
    unknown: int
    duplicate: int
    deferred: int
    terminate_now: int
    timeouts: int
    grace_expired: int
    quarantined: int
    recovered: int
    live: int
    pending_records: int
    memory_bytes: int


_MAX_SECONDS = _core.MAX_DURATION_NS / 1e9


def _seconds_to_ns(name: str, value: float | None) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise InvalidArgument(name, f"expected seconds >= 0 or None, got {_shown(value)}")
    if value > _MAX_SECONDS:  # the engine's kMaxDurationNs (inf too: it overflowed the conversion)
        raise InvalidArgument(name, f"expected at most {_MAX_SECONDS:.0f} seconds (about 31.7 years), "
                                    f"got {_shown(value)}")
    # rounded, not truncated: 1.001 * 1e9 is 1000999999.9999999, and a timer 1 ns short fired before its time
    ns = round(value * 1e9)
    # a positive duration is at least 1 ns: rounded down to 0 it meant "no timer" (transfer_timeout=1e-10 never
    # fired)
    return ns if ns > 0 or value == 0 else 1


class TransferEngine(_core.Engine):
    """Per-process engine of KV-transfer sessions.

    Executor calls: :meth:`advertise`, :meth:`expose`, :meth:`cancel`, :meth:`terminate`;
    transport events: :meth:`complete`, :meth:`fail` (also posted by C++ transport threads);
    :meth:`poll` (never blocks) logs what happened and runs ``on_terminate`` for deferred
    terminations; :meth:`drain` / :meth:`wait_terminal` block with the GIL released.
    """

    def __init__(
        self,
        *,
        rank: int = 0,
        slot_size: int = 0,
        num_slots: int = 0,
        transfer_timeout: float | None = 30.0,
        cancel_grace: float | None = 5.0,
        progress_deadline: float = 60.0,
        quarantine_budget: int = 64,
        tombstones: int = 1 << 16,
        shards: int = 16,
        wait_spin: float = 250e-6,
        clock: _core.Clock | None = None,
        on_terminate: Callable[[int], object] | None = None,
        logger: object | None = None,
        poll_budget: int | None = None,
    ):
        if "_engine_id" in self.__dict__:
            # pybind11 ignores a second __init__ of the core: only the Python half would be replaced (the drained
            # notices not yet delivered dropped, the engine id changed under live sessions)
            raise TypeError(f"{type(self).__name__}.__init__ called again on a live engine: the core ignores it "
                            "(its sessions and configuration stay); make a new engine instead")
        if (isinstance(progress_deadline, bool) or not isinstance(progress_deadline, (int, float))
                or not progress_deadline > 0):  # (a str compared with 0 raised a bare TypeError)
            raise InvalidArgument("progress_deadline", f"must be > 0 seconds, got {_shown(progress_deadline):.40}")
        if on_terminate is not None and not callable(on_terminate):
            raise InvalidArgument("on_terminate", f"expected a callable(request) or None, got {type(on_terminate).__name__}")
        if logger is not None and not callable(getattr(logger, "bind", None)):  # (the first poll() failed on it)
            raise InvalidArgument("logger", f"expected a structlog logger (with .bind()), got {type(logger).__name__}")
        for name, v in (("slot_size", slot_size), ("num_slots", num_slots), ("quarantine_budget", quarantine_budget),
                        ("tombstones", tombstones), ("shards", shards), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidArgument(name, f"expected an int, got {type(v).__name__}")
            if not -(1 << 63) <= v < 1 << 63:  # (the core's own range checks name it inside int64)
                raise InvalidArgument(name, f"out of the int64 range: {_shown(v)}")
        if rank < 0:  # (every event it logged broke the event schema's rank >= 0: the audit read each as malformed)
            raise InvalidArgument("rank", f"expected an int >= 0, got {rank}")
        if poll_budget is not None and (isinstance(poll_budget, bool) or not isinstance(poll_budget, int)
                                        or poll_budget < 1):
            raise InvalidArgument("poll_budget",
                                  f"expected an int >= 1 (records) or None, got {_shown(poll_budget):.40}")
        if clock is not None and not isinstance(clock, _core.Clock):
            raise InvalidArgument("clock", f"expected a lifecycle clock (ManualClock), got {type(clock).__name__}")
        super().__init__(
            _seconds_to_ns("transfer_timeout", transfer_timeout),
            _seconds_to_ns("cancel_grace", cancel_grace),
            _seconds_to_ns("progress_deadline", progress_deadline),
            quarantine_budget, num_slots, slot_size, tombstones, shards, clock,
            _seconds_to_ns("wait_spin", wait_spin),
        )
        self.rank = rank
        self._engine_id = next(_engine_ids)
        self.on_terminate = on_terminate
        self._log = logger if logger is not None else log
        # Whether the logger filtered INFO out when last asked (_logger_info; None: not asked yet): a change either
        # way is logged, one lifecycle.log_level line, so the audit knows between which seqs this engine's lines
        # were not logged
        self._info_filtered: bool | object | None = None  # (_CHANGING while the line is written)
        # Held while a changed answer's line is written (_level_changed, only on a change): a thread that asks
        # meanwhile waits for it, so no line is logged past a change before the change's own line
        self._level_lock = threading.RLock()
        self._was_healthy = True
        # Drained but not yet handled: packed batches not yet logged, TerminateNow requests whose on_terminate
        # has not run.  The native drain hands each batch over into these before it returns, so an exception
        # raised between two bytecodes (a signal handler's: Ctrl-C, SystemExit, a SIGALRM timeout) cannot drop
        # it; the next poll() goes on with what is left.
        self._inbox: list[bytes] = []
        self._notices: collections.deque[int] = collections.deque()
        # Transitions that wait_terminal() / a transport's wait_idle() drained (and logged, and delivered the
        # notices of): the next poll() returns them first, so an executor that acts on poll()'s transitions still
        # sees every session end (thrown away, a session that ended during a wait stayed Quiesced, leased, for good).
        self._kept: list[Transition] = []
        # The turn to log and deliver (poll()): one token, held by the thread `_handler` while it handles.
        self._turn: collections.deque[None] = collections.deque((None,))
        self._handler = 0
        self._quota: list | None = None  # the handling poll()'s [records left] (poll_budget), its re-entrant ones' too
        # True while the thread handling logs a batch it took off the inbox: a logger's own poll() meanwhile (on that
        # thread) leaves everything to the poll() logging it (see poll()).
        self._mid_batch = False
        # poll_budget: the records one poll() drains (with the inbox's) and logs at most (None: all).  The rest
        # stays queued natively, or in the inbox, for the next poll(); a notice is delivered only once its
        # TerminateNow record was logged.
        # _ready counts those (it may lag, never lead: a notice waits longer, never goes out ahead of its move);
        # with the inbox empty every notice is ready.
        self._poll_budget = poll_budget
        self._ready = 0
        _engines.add(self)

    # ---- executor calls -------------------------------------------------------------------
    def advertise(self, request: int, role: Role | str, nbytes: int = 0) -> None:
        """Create the session for ``request`` (leasing a pool slot when ``nbytes`` > 0)."""
        code = _ROLE_CODE.get(role) if isinstance(role, str) else None
        if code is None:
            raise InvalidArgument("role", f"expected 'sender' or 'receiver', got {_shown(role)}")
        self._advertise(request, code, nbytes)

    def cancel(self, request: int) -> CancelResult:
        """Ask the session to stop.  Idempotent.  Only a result that ``cancel_frees_now(result)`` says frees now lets
        the caller free."""
        r = _CANCEL[self._cancel(request)]
        if r.value == "NotFound":  # no session, so the core queued nothing: log it here
            self._emit("lifecycle.cancel", request, None, result=r.value, state=None)
        return r

    def terminate(self, request: int) -> TerminateResult:
        """Release now if terminal, else defer: on_terminate(request) runs exactly once later (from poll()).
        Until it ran, the session stays the id's (Terminated; advertise refuses the id): the callback's own calls
        find it, whatever the size of the tombstone window."""
        r = _TERMINATE[self._terminate(request)]
        if r.value == "NotFound":  # otherwise the core queued the result in order with the transitions
            self._emit("lifecycle.terminate", request, None, result=r.value, state=None)
        return r

    def post(self, request: int, event: Event | str) -> bool:
        """Apply any non-creating event by name; True when the state changed."""
        try:  # (a name: Enum's own refusal of another object quotes its repr(), which may raise)
            code = _EVENT_CODE[Event(event)] if isinstance(event, str) else None
        except ValueError:
            code = None
        if code is None:
            raise InvalidArgument("event", f"unknown event {_shown(event)}; events are {', '.join(TABLE.events)}")
        return self.apply(request, code)

    # ---- inspection -------------------------------------------------------------------------
    def info(self, request: int) -> SessionInfo:
        return _session_info(self, request)

    def state(self, request: int) -> State:
        raw = self._info(request)
        if raw is None:
            raise UnknownRequest(request)
        return _STATES[raw[1]]

    def outcome(self, request: int) -> Outcome | None:
        raw = self._info(request)
        if raw is None:
            raise UnknownRequest(request)
        return _OUTCOMES[raw[2]]

    def health(self) -> Health:
        h = self._health()
        return Health(
            healthy=h["healthy"],
            reasons=tuple(h["reasons"]),
            counts={State[k]: v for k, v in h["counts"].items()},
            quarantined=h["quarantined"],
            quarantine_budget=h["quarantine_budget"],
            oldest_nonterminal_s=None if h["oldest_nonterminal_ns"] < 0 else h["oldest_nonterminal_ns"] / 1e9,
            since_progress_s=None if h["since_progress_ns"] < 0 else h["since_progress_ns"] / 1e9,
            backend_healthy=h["backend_healthy"],
            backend_reason=h["backend_reason"],
            live=h["live"],
        )

    def statistics(self) -> Statistics:
        c = self._counters()
        return Statistics(**c, live=self.live_sessions(), pending_records=self.pending(),
                          memory_bytes=self.memory_bytes())

    # ---- polling ----------------------------------------------------------------------------
    def poll(self) -> list[Transition]:
        """Fire due timers, drain every queued record, log it, run deferred-termination callbacks.

        Never blocks.  Callback errors are logged and re-raised (TerminateCallbackError) after the
        whole batch was delivered, so no notice is lost; the batch's transitions are on its ``transitions``.  A
        logger or a health check that raises while the batch is logged does not lose its notices either: every
        one of them is delivered, then that error propagates (it carries no transitions: they are in the log; a
        callback's error raised meanwhile takes its place, with them on ``transitions``).  The rest of the
        batch is logged before the notices go out, so each notice's line follows its move's; only the record the
        error hit may lack its line.

        Polled from several threads, one logs and delivers at a time (the callbacks run on it; its own poll() from
        a callback goes on as usual).  A poll() on another thread meanwhile returns [] at once: what it drained is
        logged, returned and delivered by the thread handling (so an ``on_terminate`` must not wait for another
        thread's poll()).  So does a logger's own poll() while a batch is half logged: the poll() logging it logs
        what that one drained after it, then delivers.

        With ``poll_budget=N`` it drains (natively) and logs N records at most (timers and health as always), the
        poll() calls a callback or a logger makes within it included; the rest waits for the next poll(), and a
        notice whose TerminateNow record waits with it is delivered by that poll() too.
        """
        inbox, notices = self._inbox, self._notices
        if self._poll_budget is None:
            healthy = self._poll_into(inbox, notices)  # tick + drain + health, one native call
        else:  # drained: what the budget has room for next to what the inbox holds; the rest stays queued natively
            room = self._poll_budget - sum(map(len, inbox)) // _RECORD.size
            healthy = self._poll_into(inbox, notices, max(0, min(room, 1 << 62)))  # (an int64 natively)
        if not inbox:
            if healthy != self._was_healthy:
                self._check_health()  # the reasons, logged when health changes
            if not notices:
                return self._take_kept([]) if self._kept else []
        out: list[Transition] = []
        me = threading.get_ident()
        if self._handler == me:  # a callback's (or logger's) own poll(): this thread is the one handling already
            if self._mid_batch:
                # A logger's, while a batch it took is half logged: delivered now, that batch's notices went out
                # ahead of its moves (and, logged now, later batches' moves ahead of its own).  The poll() logging it
                # logs what this drained after it, then delivers: its loops take what the inbox and queue hold.
                return self._take_kept([]) if self._kept else []
            # What is left of the budget of the poll() it was made in: a budget of its own (a logger's poll() from
            # bind() or a terminate_now line) had that poll() log twice its budget.
            self._handle(inbox, healthy, out, self._quota)
            return self._take_kept(out) if self._kept else out
        quota = None if self._poll_budget is None else [self._poll_budget]  # (one budget for both rounds below)
        # One thread logs and delivers at a time: a second one that delivered while the first was still logging the
        # batch it had taken told the executor (and the log) of notices ahead of their moves.  The turn is taken in
        # one C call (_take_one: a signal's exception as it returns finds it in `taken`, and the finally gives it
        # back); a thread that finds it taken returns at once (poll() never blocks): the loop of the thread handling
        # takes what it drained.  Checked once more after the turn is given back: what was drained while it was
        # handled, too late for its loop, is not left for the next poll() (once: bounded however fast others drain).
        turn = self._turn
        for _ in range(2):
            if not (inbox or notices):
                break
            taken: list = []
            try:
                try:
                    _take_one(turn.popleft, taken)
                except IndexError:
                    break
                self._quota = quota  # (before _handler: a re-entrant poll() finds it set)
                self._handler = me
                self._handle(inbox, healthy, out, quota)
            finally:
                if taken:
                    self._handler = 0
                    turn.extend(taken)
            healthy = self._was_healthy  # (checked)
        return self._take_kept(out) if self._kept else out

    def _take_kept(self, out: list) -> list:
        """The transitions a wait kept, then ``out``: what poll() returns."""
        kept, self._kept = self._kept, []
        kept.extend(out)
        return kept

    def _drain_keeping(self, timeout: float) -> None:
        """drain(timeout) for a wait (wait_terminal, a transport's wait_idle): what it returns is kept for the next
        poll().  What earlier waits kept is set aside meanwhile: a poll() would return it at once, and the wait
        would spin instead of blocking."""
        kept, self._kept = self._kept, []
        got: list = []
        try:
            got = self.drain(timeout)
        finally:  # (kept first, then what another thread's wait kept meanwhile, then this drain's)
            kept.extend(self._kept)
            kept.extend(got)
            self._kept = kept

    def _handle(self, inbox: list, healthy: bool, out: list, quota: list | None = None) -> None:
        """Log every drained batch, then deliver every notice (poll()'s body, on the one thread handling); with a
        ``quota`` ([records left], poll_budget), that many records and the notices they release."""
        try:
            if inbox:
                self._log_inbox(inbox, out, quota)
            if healthy != self._was_healthy:
                self._check_health()
        except BaseException:
            # The records are drained.  What is left of them is logged first (a signal's exception does not come
            # again; a logger that raises again is given up on), so that no notice is logged ahead of the move it
            # follows; then every notice is delivered (a callback error raised here carries this one as its
            # __context__), then the logger's, the signal's or the health check's error goes on.
            try:
                self._log_inbox(inbox, out, quota)
            except BaseException:
                pass
            self._deliver_batch(out, quota)
            raise
        self._deliver_batch(out, quota)

    def _deliver_batch(self, out: list, quota: list | None = None) -> None:
        """``_deliver()`` for a batch whose transitions are ``out``: a callback's error takes the place of poll()'s
        return value, so it carries them (poll_symmetric learns from them what sessions ended as: a tombstone may
        go in this very poll)."""
        try:
            self._deliver(out, quota)
        except TerminateCallbackError as err:
            err.transitions = out
            raise

    def _log_inbox(self, inbox: list, out: list, quota: list | None = None) -> None:
        """Log every batch in ``inbox``, taking each out as it goes; its transitions go to ``out``.  With a
        ``quota`` ([records left]), that many records at most: a batch longer than what is left is split in place
        (one list operation: interrupted before or after it, the inbox holds the whole batch either way)."""
        info = self._logger_info()  # once per batch
        stream = _logstream.current
        common = {"rank": self.rank, "pid": stream.pid, "proc": stream.proc, "engine": self._engine_id,
                  "table": TABLE.digest, "schema": SCHEMA}
        take = functools.partial(inbox.pop, 0)
        size = _RECORD.size
        while inbox:
            if quota is not None:
                left = quota[0]
                if left <= 0:
                    break
                first = inbox[0]
                if len(first) > left * size:
                    whole = memoryview(first)  # (slices share its buffer: no copy of the rest)
                    head, rest = whole[:left * size], whole[left * size:]
                    if inbox and inbox[0] is first:
                        inbox[0:1] = head, rest
                first = inbox[0]
                nrec = len(first) // size
                tnow = memoryview(first)[_KIND_AT::size].tobytes().count(_K_TNOW)
            taken: list[bytes] = []
            try:
                _take_one(take, taken)
            except IndexError:  # another polling thread took it
                break
            except BaseException:
                if taken:  # interrupted as it was taken: put back, for the next try
                    inbox.insert(0, taken[0])
                raise
            if quota is not None and taken[0] is first:
                # (counted before the take: a call between the take and the log, at whose return a signal's
                # exception was raised, would lose the batch; its notices go once it was logged)
                quota[0] -= nrec
                self._ready += tnow
            # Decoded into ``out`` (transitions), each record logged (the TerminateNow notices were taken out by the
            # native drain).  Interrupted (a logger's error; a signal's, raised as a call returns or a function
            # begins), the batch's other records are still logged, then the first error goes on; the record it
            # interrupted may lack its line.  Interrupted before its first record (as iter_unpack returned, as
            # _log_records began), the whole batch is logged: the try begins before its iterator is made.
            records = None
            try:  # (set inside the try: a signal's exception cannot leave it set)
                self._mid_batch = True
                records = _RECORD.iter_unpack(taken[0])
                self._log_records(records, out, info, common, stream.seq)
            except BaseException:
                if records is None:
                    records = _RECORD.iter_unpack(taken[0])
                for _ in range(len(taken[0]) // size):  # (bounded: each try takes one record at least)
                    try:
                        self._log_records(records, out, info, common, stream.seq)
                        break
                    except BaseException:
                        continue
                raise
            finally:
                self._mid_batch = False

    @staticmethod
    def _log_records(records, out: list, info, common: dict, seq) -> None:
        for req, t, slot, gen, kind, frm, to, ev, outc, role, deferred, result, _rseq in records:
            if kind == _K_TRANSITION:
                s = None if slot == _NO_SLOT else slot
                out.append(_new_transition(Transition, (
                    req, None if frm == _NO_STATE else _STATES[frm], _STATES[to], _EVENTS[ev], _OUTCOMES[outc],
                    _ROLES[role], t, s, gen, deferred == 1)))
                if info is not None:
                    info("lifecycle.transition", request=req, role=_ROLE_NAMES[role], t_mono_ns=t, seq=next(seq),
                         **common, from_state=None if frm == _NO_STATE else _STATE_NAMES[frm],
                         to_state=_STATE_NAMES[to], trigger=_EVENT_NAMES[ev], outcome=_OUTCOME_NAMES[outc],
                         slot=-1 if s is None else s, generation=gen, deferred=deferred == 1)
            elif kind == _K_TNOW:
                continue
            elif info is None:
                continue
            elif kind == _K_RESULT:
                if ev == _CANCEL_EV:
                    info("lifecycle.cancel", request=req, role=_ROLE_NAMES[role], t_mono_ns=t, seq=next(seq),
                         **common, result=_CANCEL_NAMES[result], state=_STATE_NAMES[frm])
                else:
                    info("lifecycle.terminate", request=req, role=_ROLE_NAMES[role], t_mono_ns=t, seq=next(seq),
                         **common, result=_TERMINATE_NAMES[result], state=_STATE_NAMES[frm])
            elif kind == _K_QUAR:
                info("lifecycle.slot_quarantined", request=req, role=_ROLE_NAMES[role], t_mono_ns=t, seq=next(seq),
                     **common, slot=slot, generation=gen)
            elif kind == _K_RECOV:
                info("lifecycle.buffer_recovered", request=req, role=_ROLE_NAMES[role], t_mono_ns=t, seq=next(seq),
                     **common, slot=slot, generation=gen)
            elif kind == _K_LATE:
                info("lifecycle.late_event", request=req, role=_ROLE_NAMES[role], t_mono_ns=t, seq=next(seq),
                     **common, trigger=_EVENT_NAMES[ev], state=_STATE_NAMES[frm])
            elif kind == _K_ILLEGAL:
                info("lifecycle.illegal_transition", request=req, role=_ROLE_NAMES[role], t_mono_ns=t,
                     seq=next(seq), **common, trigger=_EVENT_NAMES[ev], state=_STATE_NAMES[frm])

    def _deliver(self, out: list, quota: list | None = None) -> None:
        """Run on_terminate for every pending notice, whatever raises on the way (the callback, the
        logger): a notice skipped here is a session whose resources are never released.  Each is taken off
        the engine's queue just before its callback runs, so a re-entrant poll() (from a callback) or another
        polling thread never delivers it again, and one an interrupted poll() left is delivered by the next.
        Afterwards: a callback's KeyboardInterrupt/SystemExit first, then TerminateCallbackError, then a
        logger's error.  With a ``quota`` (poll_budget), while records wait in the inbox only the notices their
        logged records released go (``_ready``)."""
        errors: list[tuple[int, BaseException]] = []
        fatal: BaseException | None = None
        log_error: BaseException | None = None
        cb = self.on_terminate
        notices, inbox = self._notices, self._inbox
        info = _UNRESOLVED  # the logger's info, resolved at the first line (once: a lazy logger binds on each call)
        take = notices.popleft
        while notices:
            # drained meanwhile (by another thread, whose poll() left it to this one): its moves first
            if inbox and (quota is None or quota[0] > 0):
                try:
                    self._log_inbox(inbox, out, quota)
                except BaseException as exc:
                    log_error = log_error or exc
            if quota is not None:
                if inbox and self._ready <= 0:  # its move not logged yet (the budget is spent): the next poll()
                    break
                if self._ready > 0:  # (before the take: interrupted in between, it lags, never leads)
                    self._ready -= 1
            taken: list[int] = []
            try:
                _take_one(take, taken)
            except IndexError:  # another polling thread took the last one
                break
            except BaseException as exc:  # a signal's, as the notice was taken: the next poll() delivers it
                if taken:
                    notices.appendleft(taken[0])
                fatal = fatal or exc
                break
            req = taken[0]
            try:
                if info is _UNRESOLVED:
                    info = self._logger_info()
                if info is not None:
                    self._emit("lifecycle.terminate_now", req, None, info=info)
            except BaseException as exc:
                log_error = log_error or exc
            if cb is not None:
                try:
                    cb(req)
                except BaseException as exc:  # recorded and re-raised after the batch: no notice is lost
                    errors.append((req, exc))
                    if fatal is None and not isinstance(exc, Exception):
                        fatal = exc
                    try:
                        if info is _UNRESOLVED:
                            info = self._logger_info()
                        if info is not None:
                            self._emit("lifecycle.callback_error", req, None, info=info, error=_shown(exc))
                    except BaseException as log_exc:
                        log_error = log_error or log_exc
            # The core kept the session's tombstone until now (the native drain held it): the callback found it
            # Terminated, and nobody could advertise the id again before the executor was told.  It may go now.
            try:
                self._notice_delivered(req)
            except BaseException as exc:  # a signal's, before the call or as it returned: it is idempotent
                fatal = fatal or exc
                self._notice_delivered(req)
        if fatal is not None:
            raise fatal
        if errors:
            raise TerminateCallbackError(errors)
        if log_error is not None:
            raise log_error

    def _check_health(self) -> None:
        h = self._health()
        if h["healthy"] != self._was_healthy:
            self._was_healthy = h["healthy"]
            self._emit("lifecycle.health", None, None, healthy=h["healthy"], reasons=list(h["reasons"]))

    def drain(self, timeout: float) -> list[Transition]:
        """Block (GIL released) until something happened or ``timeout`` seconds passed, then poll()."""
        deadline = time.monotonic() + check_seconds("timeout", timeout)
        while True:
            got = self.poll()
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            if self._poll_budget is not None and (self._inbox or self.pending()):
                # records a budget left: _wait_ready would return at once (they are queued), so no wait on it
                if not self._handler:
                    continue  # none of them a transition: this poll() takes the next, no wait for new ones first
                if self._handler == threading.get_ident():
                    return got  # a callback's drain() in a poll() whose budget is spent: nothing moves until it returns
                time.sleep(min(left, 0.0005))  # another thread's poll() handles them: wait for it, never spin
                continue
            nd = self.next_deadline_ns()
            if nd < 2**62:
                left = min(left, max((nd - self.now_ns()) / 1e9, 0.0) + 1e-4)
            self._wait_ready(min(left, 0.05))

    def wait_terminal(self, request: int, timeout: float) -> State:
        """Block until ``request`` is Quiesced, Poisoned or Terminated (polling meanwhile).

        Waits for the session the id names when called (UnknownRequest if none): should that session be
        terminated and forgotten meanwhile (its tombstone evicted, the id perhaps advertised again as another
        session), the wait returns Terminated, not UnknownRequest or the new session's fate.  What its polls drain
        (any session's) is logged and delivered as poll() does, and the transitions are returned by the next
        poll(); an on_terminate error there raises out of the wait (TerminateCallbackError, that poll's transitions
        on it), as out of a poll().  Past ``timeout`` with the session live: TimeoutError."""
        deadline = time.monotonic() + check_seconds("timeout", timeout)
        serial = self.info(request).serial
        while True:
            raw = self._info(request)
            if raw is None or raw[8] != serial:
                return State.Terminated
            st = _STATES[raw[1]]
            if st in TERMINAL or st in FINAL:
                return st
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {request} still {st.value} after {timeout}s")
            self._drain_keeping(min(left, 0.05))

    def poll_symmetric(self, group, requests, *, site=None):
        """Rank-consistent decisions over ``requests``; every rank must call it every iteration.  The ledger
        records the caller's line as the call site (it recorded this line, for every caller: divergent calls
        through here went unseen)."""
        from .collectives import _site_from, poll_symmetric

        return poll_symmetric(self, group, requests, site=_site_from(sys._getframe(1)) if site is None else site)

    # ---- logging ----------------------------------------------------------------------------
    def _logger_info(self):
        """The logger's ``info``, resolved (a lazy logger's bind()), or None where the logger says INFO is filtered
        out: then no line is made and no seq taken.  (A seq taken for a line never written reads as a lost line in
        the process's stream, a seq_gap, in the log of another engine whose logger writes INFO.)  An answer other
        than the last one is logged first (_level_changed).  A logger without ``is_enabled_for`` (a generic
        structlog BoundLogger's proxy of it, which raises AttributeError) is asked nothing: every line is made."""
        logger = self._log.bind()
        if _logstream.writes(logger, _INFO):
            if self._info_filtered is not False:  # (one attribute read while the level stays)
                self._level_changed(logger, False)
            return logger.info
        if self._info_filtered is not True:
            self._level_changed(logger, True)
        return None

    def _level_changed(self, logger, filtered: bool) -> None:
        """The logger filters INFO out now (``filtered``), or writes it again: one ``lifecycle.log_level`` line says
        so, at INFO when written again, else at the lowest level the logger writes (none when it writes none: the
        audit then knows the stretch's end only).  The first answer is no change (an engine whose logger filters INFO
        throughout writes nothing).  Without it a level raised and lowered mid-run left a log with no seq gap,
        missing lines the audit could not know of (a stream it took as complete).  Under _level_lock (taken only on
        a change) the answer reads _CHANGING while the line is written: every thread that asks meanwhile finds an
        answer other than its own, waits for the line, and then writes its own only if its answer differs from the
        one recorded (two threads that saw the same change: one line).  Until session 30 (no lock, the answer
        recorded before its line), a "filtered" slow to be written (a busy handler) came after another thread's
        later "written again": a stretch open to the end of the log, every later session unjudged; and a poll() on
        another thread, finding "written again" recorded, logged its batch ahead of that line: sessions it
        advertised read as live when the stretch ended, unjudged (a real leak too)."""
        with self._level_lock:
            was = self._info_filtered
            if was is filtered:
                return
            if was is None:
                self._info_filtered = filtered
                return
            self._info_filtered = _CHANGING
            try:
                if not filtered:
                    write = logger.info
                else:
                    write = next((getattr(logger, name, None) for level, name in _ABOVE_INFO
                                  if _logstream.writes(logger, level)), None)
                    if write is None:
                        return
                stream = _logstream.current
                write("lifecycle.log_level", request=None, rank=self.rank, role=None, t_mono_ns=self.now_ns(),
                      seq=next(stream.seq), pid=stream.pid, proc=stream.proc, engine=self._engine_id,
                      table=TABLE.digest, schema=SCHEMA, info_filtered=filtered)
            finally:
                self._info_filtered = filtered  # (a logger that raises too: not asked to write it again)

    def _emit(self, name: str, request: int | None, role: str | None, t_ns: int | None = None, info=None,
              **kw) -> None:
        """Log one line at INFO (``info``: the logger's, resolved by the caller; by default resolved here)."""
        if info is None:
            info = self._logger_info()
            if info is None:
                return
        stream = _logstream.current
        info(name, request=request, rank=self.rank, role=role, t_mono_ns=self.now_ns() if t_ns is None else t_ns,
             seq=next(stream.seq), pid=stream.pid, proc=stream.proc, engine=self._engine_id, table=TABLE.digest,
             schema=SCHEMA, **kw)


def _take_one(take: Callable[[], object], into: list) -> None:
    """Move one item, ``take()``, into the list ``into`` in one C call (list.extend drives ``take``; IndexError
    when there is none).  ``x = take()`` can lose it: CPython runs a pending signal's handler as a call returns,
    and an exception that handler raises discards the value the call returned (a notice popped and never
    delivered).  Raised as this returns, the exception finds the item in ``into``, where the caller puts it back."""
    into.extend(itertools.islice(iter(take, _NOTHING), 1))


_NOTHING = object()  # a sentinel no queue holds
_UNRESOLVED = object()  # a logger's info not resolved yet (_deliver)
_CHANGING = object()  # TransferEngine._info_filtered while a lifecycle.log_level line is written (_level_changed)


def _session_info(engine: _core.Engine, request: int) -> SessionInfo:
    """``info()`` of any core engine (a bare ``_core.Engine`` too, which the transports accept)."""
    raw = engine._info(request)
    if raw is None:
        raise UnknownRequest(request)
    role, st, outc, deferred, evidence, slot, gen, since, serial = raw
    return SessionInfo(request, _ROLES[role], _STATES[st], _OUTCOMES[outc], deferred, evidence,
                       None if slot < 0 else slot, gen, since, serial)


def check_seconds(name: str, value) -> float:
    """A wait's timeout: an int or float >= 0 (inf waits for ever); NaN, bools and other types are refused
    (NaN compares false with every deadline: a wait on it never ended).  Returns it as a float: an int too
    large for one is inf (time.monotonic() + 10**400 raised a bare OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgument(name, f"expected seconds >= 0, got {_shown(value)}")
    return math.inf if value > sys.float_info.max else float(value)


def cancel_frees_now(result: CancelResult) -> bool:
    """Whether the executor may free the request's resources right after this cancel result."""
    if not isinstance(result, CancelResult):
        raise InvalidArgument("result", f"expected a CancelResult (cancel()'s answer), got {_shown(result):.40}")
    return TABLE.cancel_frees[result.value]

