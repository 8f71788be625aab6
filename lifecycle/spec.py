"""Parse and validate the lifecycle table (``schemas/lifecycle.table``).

This module is the only reader of the hand-written table.  It is stdlib-only on purpose: the build
imports it by path (``cpp/tools/gen_table.py``) to validate the table and generate the C++ header, so
an invalid table fails the build, and the Python package uses it to build enums, the reference model
and diagrams from the very text compiled into ``lifecycle._core``.

Validation reports every violation at once; each names the file and line of the row concerned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

__all__ = [
    "ACTIONS",
    "CREATE_SOURCE",
    "ENGINE_NAMES",
    "Row",
    "Spec",
    "SpecError",
    "Violation",
    "check_file",
    "load",
    "parse",
]

CREATE_SOURCE = "*"
ACTIONS = (".stay", ".late", ".defer")
_STATE_KINDS = ("initial", "active", "terminal", "final")
_EVENT_SOURCES = ("executor", "transport", "timer")
_SECTIONS = ("states", "events", "outcomes", "cancel-results", "terminate-results", "transitions")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Every name becomes a C++ enumerator (cpp/tools/gen_table.py) and a Python enum member (lifecycle.engine); one
# that cannot be either passed `spec check`, then failed the build inside the generated header (or `import
# lifecycle`) without naming the table's line.  A leading underscore is reserved by both (C++ `_Upper`/`__`,
# enum `_sunder_`), `mro` by enum, the outcome `none` is the generated Outcome enum's "no outcome", and the
# event `state` is the attribute where lifecycle.model's transitions machine keeps the state.
_CXX_KEYWORDS = frozenset("""
    alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t char32_t class
    compl concept const consteval constexpr constinit const_cast continue co_await co_return co_yield decltype
    default delete do double dynamic_cast else enum explicit export extern false float for friend goto if inline
    int long mutable namespace new noexcept not not_eq nullptr operator or or_eq private protected public register
    reinterpret_cast requires return short signed sizeof static static_assert static_cast struct switch template
    this thread_local throw true try typedef typeid typename union unsigned using virtual void volatile wchar_t
    while xor xor_eq""".split())


def _reserved(section: str, name: str) -> str | None:
    """Why ``name`` cannot name something in ``section`` of the generated code, or None."""
    if name in _CXX_KEYWORDS:
        return "is a C++ keyword (the generated enums cannot carry it)"
    if name.startswith("_"):
        return "starts with '_' (reserved for C++ and Python enum names)"
    if name == "mro":
        return "is reserved by Python's enum"
    if section == "events" and name == "state":  # transitions refuses a trigger named as its state attribute
        return "is reserved: the reference model (transitions) keeps the session's state in an attribute named state"
    if section == "outcomes" and name == "none":
        return "is reserved: the generated Outcome enum uses none for 'no outcome'"
    return None


# The names the C++ code (the engine, its bindings and tests: all in the build) spells out, section by section: a
# table without one passed the check and the generator, then the build failed in engine.cpp naming no table line.  tests/test_spec.py checks
# this list against the C++ sources.
ENGINE_NAMES: dict[str, tuple[str, ...]] = {
    "states": ("Advertised", "InFlight", "CancelRequested", "Quiesced", "Poisoned", "Terminated"),
    "events": ("expose", "cancel", "terminate", "complete", "fail", "timeout", "grace_expired"),
    "cancel-results": ("NotFound", "CancelledBeforeAdvertise", "CancelledDeferred", "CancelRequestedInFlight",
                       "BackendUnhealthy", "NotCancellable"),
    "terminate-results": ("NotFound", "Terminated", "Deferred", "AlreadyTerminated", "AlreadyDeferred"),
}
# What the state kinds cannot say: both terminal states end a session, but only Quiesced holds the evidence that no
# agent touches its buffers (DESIGN §2/§3).  The engine tells them apart by name (engine.cpp's enter_final returns
# the slot to the pool from Quiesced and quarantines it from Poisoned); both are in ENGINE_NAMES.
_EVIDENCE_STATE = "Quiesced"
# DESIGN §2: a Quiesced session's outcome says how it stopped (completed / cancelled); any other terminal state's
# claims no such thing.  poll_symmetric's consensus (lifecycle.collectives) reads a Terminated session's outcome
# by these names.
_EVIDENCE_OUTCOMES = ("completed", "cancelled")
_CONFIRMED = "completed"  # ... and only a complete confirms the transfer (what poll_symmetric's `completed` means)
# Who posts each event the engine knows (the transport's progress thread, tick(), the executor's calls).
_ENGINE_SOURCES = {"expose": "executor", "cancel": "executor", "terminate": "executor", "complete": "transport",
                   "fail": "transport", "timeout": "timer", "grace_expired": "timer"}
# The results the engine answers without a row: NotFound (no session) and the table header's three refinements.
_ENGINE_ONLY_RESULTS = {"cancel": ("NotFound", "BackendUnhealthy", "CancelledDeferred"),
                        "terminate": ("NotFound", "AlreadyDeferred")}
# The timers engine.cpp's tick() fires, by name: each overdue session at the head of the state's list gets the event
# until none is overdue, so that event's row must take the session out of the state.
_TIMERS = (("InFlight", "timeout"), ("CancelRequested", "grace_expired"))
# The engine's exposed states, where a transfer may run (posted, or aborted and awaiting its DONE or the peer's ack):
# the transport's progress thread posts complete there, and the evidence it awaits is that one transfer's.
_TRANSFER_STATES = tuple(s for s, _e in _TIMERS)  # (the engine times exactly those)
# engine.cpp issues the transport abort on each move into this state (the CancelRequestedInFlight answer).
_ABORT_STATE = "CancelRequested"
_ROW = re.compile(
    r"^(?P<src>\S+)\s*\+\s*(?P<event>\S+)\s*=\s*(?P<dst>\S+)"
    r"(?:\s*/\s*(?P<outcome>\S+))?(?:\s*->\s*(?P<result>\S+))?\s*$"
)


@dataclass(frozen=True)
class Violation:
    """One problem found in a table file."""

    path: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.code}] {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "line": self.line, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class Row:
    src: str  # a state name, or CREATE_SOURCE for the creating event
    event: str
    dst: str  # a state name or one of ACTIONS
    outcome: str | None
    result: str | None
    line: int

    @property
    def moves(self) -> bool:
        return self.dst not in ACTIONS


@dataclass(frozen=True)
class Spec:
    path: str
    text: str
    states: tuple[str, ...]
    state_kinds: dict[str, str]
    state_docs: dict[str, str]
    events: tuple[str, ...]
    event_sources: dict[str, str]
    event_docs: dict[str, str]
    outcomes: tuple[str, ...]
    cancel_results: tuple[str, ...]
    cancel_frees: dict[str, bool]
    terminate_results: tuple[str, ...]
    rows: tuple[Row, ...]
    digest: str = field(default="")

    @property
    def initial(self) -> str:
        return next(s for s in self.states if self.state_kinds[s] == "initial")

    @property
    def terminal(self) -> tuple[str, ...]:
        return tuple(s for s in self.states if self.state_kinds[s] == "terminal")

    @property
    def final(self) -> tuple[str, ...]:
        return tuple(s for s in self.states if self.state_kinds[s] == "final")

    @property
    def create_event(self) -> str:
        return next(r.event for r in self.rows if r.src == CREATE_SOURCE)

    def row(self, state: str, event: str) -> Row | None:
        return self._index().get((state, event))

    def _index(self) -> dict[tuple[str, str], Row]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {(r.src, r.event): r for r in self.rows}
            object.__setattr__(self, "_idx", idx)
        return idx

    def canonical(self) -> dict[str, object]:
        """The meaning of the table, independent of comments and spacing (hashed for the version)."""
        return {
            "states": [[s, self.state_kinds[s]] for s in self.states],
            "events": [[e, self.event_sources[e]] for e in self.events],
            "outcomes": list(self.outcomes),
            "cancel_results": [[r, self.cancel_frees[r]] for r in self.cancel_results],
            "terminate_results": list(self.terminate_results),
            "rows": [[r.src, r.event, r.dst, r.outcome, r.result] for r in self.rows],
        }


def _digest(canon: dict[str, object]) -> str:
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def parse(text: str, path: str = "<table>") -> Spec:
    """Parse and validate; raise SpecError listing every violation."""
    v: list[Violation] = []

    def bad(line: int, code: str, msg: str) -> None:
        v.append(Violation(path, line, code, msg))

    sections: dict[str, list[tuple[int, str]]] = {}
    section_line: dict[str, int] = {}
    current: str | None = None
    # only a newline ends a line (load() made every CRLF / CR one): str.splitlines() also split at a form feed,
    # vertical tab, NEL, U+2028 ..., so text after one in a comment became a row and later lines were misnumbered
    for lineno, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if "\0" in raw:  # (passed, then lifecycle._core.TABLE_TEXT, a C string, ended at it)
            bad(lineno, "nul-byte", f"a NUL byte at column {raw.index(chr(0)) + 1}; a table is text")
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[([a-z-]+)\]", line)
        if m:
            current = m.group(1)
            if current not in _SECTIONS:
                bad(lineno, "unknown-section", f"unknown section [{current}]")
                current = None
            elif current in sections:
                bad(lineno, "duplicate-section", f"section [{current}] appears twice")
                current = None
            else:
                sections[current] = []
                section_line[current] = lineno
            continue
        if current is None:
            bad(lineno, "outside-section", f"line outside any known section: {line!r}")
            continue
        sections[current].append((lineno, line))
    for s in _SECTIONS:
        if s not in sections:
            bad(1, "missing-section", f"section [{s}] is missing")
            sections[s] = []
            section_line[s] = 1

    def names(section: str, kinds: tuple[str, ...] | None) -> tuple[list[str], dict[str, str], dict[str, str], dict[str, int]]:
        order: list[str] = []
        kind: dict[str, str] = {}
        doc: dict[str, str] = {}
        where: dict[str, int] = {}
        for lineno, line in sections[section]:
            parts = line.split(None, 2 if kinds else 1)
            name = parts[0]
            if not _NAME.match(name):
                bad(lineno, "bad-name", f"[{section}] {name!r} is not an identifier")
                continue
            if (why := _reserved(section, name)) is not None:
                bad(lineno, "bad-name", f"[{section}] {name} {why}")
                continue
            if name in where:
                bad(lineno, "duplicate-name", f"[{section}] {name} already declared on line {where[name]}")
                continue
            if kinds:
                k = parts[1] if len(parts) > 1 else ""
                if k not in kinds:
                    bad(lineno, "bad-kind", f"[{section}] {name}: kind {k!r} is not one of {', '.join(kinds)}")
                    continue
                kind[name] = k
                doc[name] = parts[2] if len(parts) > 2 else ""
            else:
                doc[name] = parts[1] if len(parts) > 1 else ""
            order.append(name)
            where[name] = lineno
        return order, kind, doc, where

    states, state_kinds, state_docs, state_line = names("states", _STATE_KINDS)
    events, event_sources, event_docs, event_line = names("events", _EVENT_SOURCES)
    outcomes, _, _, _ = names("outcomes", None)
    cancel_results, cancel_flag, _, cancel_line = names("cancel-results", ("yes", "no"))
    terminate_results, _, _, _ = names("terminate-results", None)

    for kind in ("initial",):
        n = sum(1 for s in states if state_kinds[s] == kind)
        if n != 1:
            bad(section_line["states"], "initial-count", f"exactly one initial state required, found {n}")
    if not any(state_kinds[s] == "final" for s in states):
        bad(section_line["states"], "no-final", "no final state declared")
    if not any(state_kinds[s] == "terminal" for s in states):
        bad(section_line["states"], "no-terminal", "no terminal state declared")
    declared = {"states": states, "events": events, "cancel-results": cancel_results, "terminate-results": terminate_results}
    for section, required in ENGINE_NAMES.items():
        for name in required:
            if name not in declared[section]:
                bad(section_line[section], "engine-name", f"[{section}] {name} is required: the engine uses it")
    # Who posts each event the engine knows is fixed by the code (the transport posts complete and fail, tick() the
    # timers): `fail  executor` passed, and with it a table without Quiesced + fail = .late, so a disconnect after
    # quiescence raised IllegalTransition (DESIGN §2: late, never an error)
    for name, source in _ENGINE_SOURCES.items():
        if event_sources.get(name, source) != source:
            bad(event_line[name], "engine-source", f"[events] {name} comes from the {source} in the engine, not the "
                                                   f"{event_sources[name]}")

    rows: list[Row] = []
    seen: dict[tuple[str, str], int] = {}
    state_set, event_set = set(states), set(events)
    for lineno, line in sections["transitions"]:
        m = _ROW.match(line)
        if not m:
            bad(lineno, "syntax", f"cannot parse row {line!r}; expected 'SRC + event = DST [/ outcome] [-> result]'")
            continue
        src, ev, dst, outc, res = m.group("src", "event", "dst", "outcome", "result")
        ok = True
        if src != CREATE_SOURCE and src not in state_set:
            bad(lineno, "unknown-state", f"row source {src!r} is not a declared state"); ok = False
        if ev not in event_set:
            bad(lineno, "unknown-event", f"row event {ev!r} is not a declared event"); ok = False
        if dst not in state_set and dst not in ACTIONS:
            bad(lineno, "unknown-state", f"row destination {dst!r} is neither a state nor one of {', '.join(ACTIONS)}"); ok = False
        if outc is not None and outc not in outcomes:
            bad(lineno, "unknown-outcome", f"outcome {outc!r} is not declared"); ok = False
        if res is not None and res not in cancel_results and res not in terminate_results:
            bad(lineno, "unknown-result", f"result {res!r} is not a declared cancel or terminate result"); ok = False
        if not ok:
            continue
        key = (src, ev)
        if key in seen:
            bad(lineno, "duplicate-row", f"two rows for ({src}, {ev}): lines {seen[key]} and {lineno}")
            continue
        seen[key] = lineno
        rows.append(Row(src, ev, dst, outc, res, lineno))

    structure_ok = sum(1 for s in states if state_kinds[s] == "initial") == 1 and any(
        state_kinds[s] == "final" for s in states
    )
    if structure_ok:  # graph checks run over the rows that parsed, so every violation is reported at once
        _check_graph(path, states, state_kinds, events, event_sources, cancel_results, terminate_results, rows, state_line,
                     bad, event_line, section_line["transitions"], cancel_flag, cancel_line, outcomes)
    if v:
        raise SpecError(v)
    spec = Spec(
        path=path,
        text=text,
        states=tuple(states),
        state_kinds=state_kinds,
        state_docs=state_docs,
        events=tuple(events),
        event_sources=event_sources,
        event_docs=event_docs,
        outcomes=tuple(outcomes),
        cancel_results=tuple(cancel_results),
        cancel_frees={r: cancel_flag[r] == "yes" for r in cancel_results},
        terminate_results=tuple(terminate_results),
        rows=tuple(rows),
    )
    object.__setattr__(spec, "digest", _digest(spec.canonical()))
    return spec


def _closure(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    """Every node reachable from ``start`` along ``edges`` (breadth first)."""
    seen = set(start)
    todo = deque(start)
    while todo:
        for d in edges[todo.popleft()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def _check_graph(path, states, kinds, events, sources, cancel_results, terminate_results, rows, state_line, bad,
                 event_line, rows_line, cancel_flag, cancel_line, outcomes) -> None:
    """``state_line`` / ``event_line`` / ``cancel_line``: where each was declared; ``rows_line``: the [transitions]
    header; ``cancel_flag``: each cancel result's frees-now column."""
    initial = next(s for s in states if kinds[s] == "initial")
    finals = {s for s in states if kinds[s] == "final"}
    terminals = {s for s in states if kinds[s] == "terminal"}
    creators = [r for r in rows if r.src == CREATE_SOURCE]
    if len(creators) != 1:
        bad(creators[1].line if len(creators) > 1 else rows_line, "create-row", f"exactly one '*' (creating) row required, found {len(creators)}")
    for r in creators:
        if r.dst != initial:
            bad(r.line, "create-row", f"the creating row must lead to the initial state {initial}, not {r.dst}")
        if r.outcome is not None:  # the engine creates a session without one; the audit holds logs to that
            bad(r.line, "create-row", f"the creating row sets no outcome (a session starts without one), not {r.outcome}")
        if r.result is not None:  # no call answers with it: advertise returns no result
            bad(r.line, "create-row", f"the creating row returns no result, not {r.result}")
    # (Advertised + advertise = InFlight passed: the engine never applies the creating event to a session, advertise of
    # a live id answers Duplicate and post() refuses it, while the reference model and the audit took the row)
    for r in rows:
        if r.src != CREATE_SOURCE and r.event in {c.event for c in creators}:
            bad(r.line, "create-from-state", f"{r.src} + {r.event} = {r.dst}: {r.event} creates a session (the '*' "
                f"row, DESIGN §2); the engine answers it on a live one with Duplicate, never with this row")
    out: dict[str, set[str]] = {s: set() for s in states}
    for r in rows:
        if r.src == CREATE_SOURCE:
            continue
        if r.moves:
            out[r.src].add(r.dst)
        if r.src in finals and r.moves and r.dst != r.src:
            bad(r.line, "edge-out-of-final", f"row leaves the final state {r.src} ({r.src} + {r.event} = {r.dst})")
        if r.src in terminals and r.moves and r.dst not in finals:  # (Quiesced + complete = InFlight passed: a
            # session the executor was told is quiesced, AlreadyComplete freeing it, exposed again)
            bad(r.line, "edge-out-of-terminal", f"row leaves the terminal state {r.src} for {r.dst}; a terminal "
                                                f"state moves only to {'/'.join(sorted(finals))}")
        if r.dst == ".defer" and r.event != "terminate":  # the engine would flag a deferred terminate on it
            bad(r.line, "defer-not-terminate", f"only terminate can be deferred, not {r.event} ({r.src} + {r.event} = .defer)")
        if not r.moves and r.outcome is not None:  # the engine sets an outcome only when the session moves
            bad(r.line, "outcome-without-move", f"{r.src} + {r.event} = {r.dst} does not move, so it cannot set outcome {r.outcome}")
        if r.dst == ".defer" and r.src in terminals | finals:
            bad(r.line, "defer-terminal", f"{r.src} is terminal/final; terminate there must not be deferred")
        if r.dst == ".late" and sources[r.event] == "executor":
            bad(r.line, "late-executor-event", f"{r.event} comes from the executor; only transport/timer events can be late")
        elif r.dst == ".late" and r.src not in terminals | finals:
            # (InFlight + complete = .late passed: the transfer's DONE, the evidence, was dropped and counted late;
            # the session waited for its timers and ended Poisoned, its good slot quarantined)
            bad(r.line, "late-before-quiescence", f"{r.src} + {r.event} = .late: {r.src} is {kinds[r.src]}, and an "
                f"event is late only after quiescence (in a terminal or final state)")
        if r.result is not None:
            allowed = cancel_results if r.event == "cancel" else terminate_results if r.event == "terminate" else ()
            if r.result not in allowed:
                bad(r.line, "result-event-mismatch", f"result {r.result} does not belong to event {r.event}")
            elif r.result in _ENGINE_ONLY_RESULTS.get(r.event, ()):
                # (Advertised + cancel = Quiesced -> CancelledDeferred passed: every such cancel said 'TerminateNow
                # releases it', frees now: no, with no terminate deferred, so nothing ever freed the session)
                bad(r.line, "engine-only-result", f"{r.src} + {r.event} returns {r.result}, which only the engine "
                    f"answers ({'no session' if r.result == 'NotFound' else 'a refinement in the table header'})")
        after = r.dst if r.moves else r.src
        if r.event == "cancel" and cancel_flag.get(r.result) == "yes" and after not in terminals | finals:
            # (CancelRequestedInFlight marked yes passed: the engine and the audit take the flag from here, so an
            # executor following cancel_frees_now() freed buffers a transfer may still write)
            bad(cancel_line[r.result], "frees-not-terminal", f"cancel result {r.result} frees now, but {r.src} + "
                f"cancel (line {r.line}) returns it and leaves the session in non-terminal {after}")
        elif r.event == "cancel" and cancel_flag.get(r.result) == "yes" and after != _EVIDENCE_STATE:
            # (Poisoned + cancel = .stay -> AlreadyComplete passed: the terminal kind covers Poisoned too, so the
            # executor freed a quarantined slot a transfer may still write)
            bad(r.line, "frees-not-quiesced", f"{r.src} + cancel returns {r.result}, which frees now (line "
                f"{cancel_line[r.result]}), but leaves the session in {after}: only {_EVIDENCE_STATE} proves its "
                f"buffers safe (Poisoned ones are quarantined, a Terminated session's were released at terminate)")
        if r.event in ("cancel", "terminate") and r.result is None:
            bad(r.line, "missing-result", f"{r.src} + {r.event} needs a '-> result'")
        if r.moves and r.dst in terminals and r.outcome is None:
            # (InFlight + fail = Poisoned passed: the engine keeps the outcome the session had, none or an earlier
            # move's, so it ended without saying how, or saying it wrong; a Quiesced one never counted as completed
            # in poll_symmetric's consensus)
            fit = [o for o in outcomes if (o in _EVIDENCE_OUTCOMES) == (r.dst == _EVIDENCE_STATE)] or outcomes
            bad(r.line, "missing-outcome", f"{r.src} + {r.event} = {r.dst} enters terminal {r.dst} without an "
                                           f"outcome: add '/ outcome' (one of {', '.join(fit)})")
        if r.moves and r.outcome is not None and r.dst in finals:
            # (Poisoned + terminate = Terminated / completed passed: the ranks' consensus then counted a transfer
            # without evidence completed; and a deferred terminate, which the engine applies as a bare move, set none)
            bad(r.line, "outcome-into-final", f"{r.src} + {r.event} = {r.dst} sets outcome {r.outcome}: the move "
                                              f"into the final state keeps the terminal state's outcome")
        elif r.moves and r.outcome is not None and r.dst in terminals and (
                (r.dst == _EVIDENCE_STATE) != (r.outcome in _EVIDENCE_OUTCOMES)):
            # (InFlight + fail = Poisoned / completed passed: once terminated, counted completed by the consensus)
            bad(r.line, "outcome-state-mismatch", f"{r.src} + {r.event} = {r.dst} / {r.outcome}: " + (
                f"a {r.dst} session's outcome is {' or '.join(_EVIDENCE_OUTCOMES)} (DESIGN §2)"
                if r.dst == _EVIDENCE_STATE else f"{r.outcome} claims the evidence {r.dst} lacks (DESIGN §2)"))
        elif r.moves and r.outcome is not None and r.dst not in terminals:
            # (InFlight + cancel = CancelRequested / cancelled passed: engine.outcome() and the audit's line said the
            # transfer stopped with evidence while it may still write the buffers; docs/audit.md: null until terminal)
            bad(r.line, "outcome-before-terminal", f"{r.src} + {r.event} = {r.dst} / {r.outcome}: an outcome says how "
                f"a session ended (DESIGN §2), and {kinds[r.dst]} state {r.dst} has not: set it on the move into a "
                f"terminal state")
        elif r.moves and r.outcome == _CONFIRMED and r.event != "complete":
            # (Advertised + cancel = Quiesced / completed passed: a session cancelled before any byte moved said its
            # transfer finished, and poll_symmetric put it in `completed` on every rank)
            bad(r.line, "outcome-without-confirmation", f"{r.src} + {r.event} = {r.dst} / {r.outcome}: only complete "
                f"(the transport's DONE, the peer's done) confirms a transfer (DESIGN §2): not {_CONFIRMED} on "
                f"{r.event}")
        if r.event == "expose" and kinds[after] != "active":
            # (Quiesced + expose = .stay passed: the executor's expose() answered without an error and it handed out
            # the descriptors of buffers the session's AlreadyComplete had freed; Advertised + expose = .stay left a
            # session whose cancel is proof of never-exposed (CancelledBeforeAdvertise, frees now) exposed)
            bad(r.line, "expose-not-active", f"{r.src} + expose = {r.dst} leaves the session in {kinds[after]} state "
                f"{after}, which says no agent touches its buffers; expose must move it to an active state"
                + (" (after quiescence, expose has no row: an illegal transition)"
                   if kinds[r.src] in ("terminal", "final") else ""))
        if r.event == "expose" and r.src in _TRANSFER_STATES:
            # (InFlight + expose = .stay passed: a second expose() answered without an error, so an executor with its
            # own data path handed the descriptors out again, and the first transfer's DONE quiesced buffers, the
            # slot back in the pool, that the second was still writing)
            bad(r.line, "expose-while-exposed", f"{r.src} + expose = {r.dst}: a transfer may run in {r.src}, and the "
                f"engine awaits that one's evidence; expose leaves a state never exposed (DESIGN §2): no row here")
        if r.moves and r.dst == r.src and r.src not in terminals | finals and (r.src, r.event) not in _TIMERS:
            # (CancelRequested + cancel = CancelRequested passed: the engine's move re-enters the state, its entry time
            # reset, so each repeated cancel re-armed cancel_grace and a transfer that never acks was never Poisoned)
            bad(r.line, "self-move", f"{r.src} + {r.event} = {r.dst}: a move into its own state re-enters it (the "
                f"timers count from the entry again, DESIGN §6, a transition is recorded); '= .stay' changes nothing")
        if r.moves and r.dst in finals and r.src not in terminals:
            bad(r.line, "final-from-non-terminal", f"{r.dst} entered from non-terminal {r.src}")
        elif r.moves and r.dst in finals and r.event == "cancel":
            # (Poisoned + cancel = Terminated -> NotCancellable passed: the cancel ended the session while telling the
            # executor to wait, so its terminate answered AlreadyTerminated and on_terminate never ran: a leak)
            bad(r.line, "cancel-into-final", f"{r.src} + cancel = {r.dst}: only terminate enters {r.dst} (DESIGN §2: "
                f"the executor's resources released); a cancel there leaves them unreleased, its terminate answering "
                f"AlreadyTerminated: '= .stay'")
    # a deferred terminate is delivered by applying the terminal state's terminate row as a move into a final state
    term = {r.src: r for r in rows if r.event == "terminate"}
    for s in sorted(terminals, key=states.index):
        r = term.get(s)
        if r is None:
            bad(state_line[s], "terminate-at-terminal", f"terminal state {s} needs a terminate row that moves to "
                                                         f"{'/'.join(sorted(finals))}")
        elif not (r.moves and r.dst in finals):
            bad(r.line, "terminate-at-terminal", f"terminate in terminal state {s} must move to "
                                                 f"{'/'.join(sorted(finals))}, not {r.dst}")
    # DESIGN §5: a terminate before a terminal state sets the flag and answers Deferred; without its row the engine's
    # terminate() answered NotFound ("no session") for a live, maybe exposed, session and no TerminateNow ever came
    for s in states:
        if kinds[s] in ("terminal", "final"):
            continue
        r = term.get(s)
        if r is None:
            bad(state_line[s], "terminate-not-deferred", f"{kinds[s]} state {s} has no terminate row: add '{s} + "
                                                          f"terminate = .defer -> Deferred' (DESIGN §5)")
        elif r.dst != ".defer":
            bad(r.line, "terminate-not-deferred", f"{s} + terminate = {r.dst}: a terminate before a terminal state "
                                                  f"must be deferred (= .defer -> Deferred, DESIGN §5)")
    # ... and the final state answers it AlreadyTerminated (DESIGN §4, §5: a re-entrant terminate from on_terminate
    # too); without its row the engine's terminate() answered NotFound, "no session: free what you hold"
    for s in sorted(finals, key=states.index):
        if s not in term:
            bad(state_line[s], "terminate-in-final", f"final state {s} has no terminate row: a terminate there would "
                f"be an illegal transition, answered NotFound: add '{s} + terminate = .stay -> AlreadyTerminated'")
    # (No row, or InFlight + timeout = .stay, passed: tick() applied the event to the same overdue session for ever,
    # under its shard's lock, queueing an illegal_event record each time; a move back into the state re-arms the
    # timer, so the transfer is never aborted)
    for s, e in _TIMERS:
        r = next((r for r in rows if (r.src, r.event) == (s, e)), None)
        if s not in kinds or e not in sources:  # (engine-name reports it)
            continue
        if r is None:
            bad(state_line[s], "timer-stays", f"{kinds[s]} state {s} has no {e} row: the engine fires {e} there "
                                              f"until the session leaves {s} (DESIGN §6)")
        elif not r.moves or r.dst == s:
            bad(r.line, "timer-stays", f"{s} + {e} = {r.dst}: the engine fires {e} there until the session leaves "
                                       f"{s} (DESIGN §6); the row must move it to another state")
    # The timers must not loop: following them from a timed state never comes back to it without a terminal state
    # (CancelRequested + grace_expired = InFlight passed: tick() moved a hung transfer's session back and forth for
    # ever, aborted each time, never terminal, its deferred terminate never delivered: the wedge the timers exist to
    # end, DESIGN §6).  A timer into a state with no timer of the engine's (a review table's retry state the executor
    # leaves) is the executor's to end.  Reported once per loop, at the row that closes it.
    timer_row = {r.src: r for r in rows for s, e in _TIMERS if (r.src, r.event) == (s, e) and r.moves and r.dst != s}
    reported: set[str] = set()
    for s, _e in _TIMERS:
        chain, r = [s], timer_row.get(s)
        while r is not None and r.dst in timer_row and r.dst not in chain:
            chain.append(r.dst)
            r = timer_row[r.dst]
        if r is not None and r.dst in chain and not reported & set(chain):
            reported.update(chain)
            bad(r.line, "timer-loop", f"{r.src} + {r.event} = {r.dst}: the engine's timers lead from {r.dst} back to "
                                      f"{r.dst}, never to a terminal state (DESIGN §6: they end a hung transfer, "
                                      f"Poisoned)")
    # Nor may another event lead from a timed state back into its timers: CancelRequested + fail = InFlight passed
    # (timer-loop follows the timer rows only), and an abort answered with an error, as an aborted transfer's is, made
    # the session InFlight again, its transfer_timeout re-armed, aborted again, failed again: never terminal (a repeated
    # cancel toggled as well).  From a state with no timer of the engine's (a retry state) it is the executor's move.
    for r in rows:
        if not r.moves or r.dst == r.src or (r.src, r.event) in _TIMERS or r.src not in timer_row or r.src in reported:
            continue
        chain, x = [r.dst], timer_row.get(r.dst)
        while x is not None and x.dst not in chain and r.src not in chain:
            chain.append(x.dst)
            x = timer_row.get(x.dst)
        if r.src in chain:
            bad(r.line, "timer-reset", f"{r.src} + {r.event} = {r.dst}: the engine's timers lead from {r.dst} back to "
                f"{r.src} and restart there, so an {r.event} after each (an aborted transfer's error, a repeated "
                f"cancel) keeps the session from a terminal state (DESIGN §6)")
    # The engine's refinements answer these in place of a row's result, so no row shows where (BackendUnhealthy
    # marked yes passed: an executor following cancel_frees_now() freed buffers of the cancel it was told is still in
    # flight; CancelledDeferred marked yes: freed by the cancel and again by the deferred terminate's TerminateNow)
    for name, why in (("BackendUnhealthy", "for a cancel that moves an exposed session to CancelRequested"),
                      ("CancelledDeferred", "when a deferred terminate releases the session (TerminateNow)")):
        if cancel_flag.get(name) == "yes":
            bad(cancel_line[name], "frees-not-terminal", f"cancel result {name} frees now, but the engine answers it "
                                                         f"{why}: it must be no")
    # DESIGN §4: NotFound frees now.  The engine answers it with no session (never advertised, its tombstone gone), so
    # no terminal state or TerminateNow follows (marked no, it passed: an executor following cancel_frees_now() never
    # released the request's resources)
    if cancel_flag.get("NotFound") == "no":
        bad(cancel_line["NotFound"], "not-found-kept", "cancel result NotFound must free now (yes): the engine answers "
            "it when it has no session, so nothing later tells the executor to free (DESIGN §4)")
    # DESIGN §4: cancel answers in every state; without a row before the final state the engine's cancel() answered
    # NotCancellable ("Poisoned or already Terminated: nothing to cancel"): a transfer never aborted, or an Advertised
    # or Quiesced session the executor was never told it may free
    have_cancel = {r.src for r in rows if r.event == "cancel"}
    for s in states:
        if kinds[s] != "final" and s not in have_cancel:
            bad(state_line[s], "missing-cancel", f"{kinds[s]} state {s} has no cancel row: the engine's cancel() would "
                                                 f"answer NotCancellable there (DESIGN §4: cancel is idempotent)")
    # The answer follows from the row: the executor releases its resources on Terminated and waits for TerminateNow
    # on Deferred (.defer -> Terminated passed: it released them while exposed; Terminated + terminate = .stay ->
    # Terminated: released twice; a move to the final state answering AlreadyTerminated: never released)
    for r in term.values():
        want = ("Deferred" if r.dst == ".defer" else "Terminated" if r.moves and r.dst in finals
                else "AlreadyTerminated" if r.src in finals and r.dst == ".stay" else None)
        if want is not None and r.result in terminate_results and r.result != want:
            bad(r.line, "terminate-result", f"{r.src} + terminate = {r.dst} must return {want}, not {r.result}")
    # So does the cancel answer (DESIGN §4, the [cancel-results] meanings): an abort is issued only on the move into
    # CancelRequested, AlreadyComplete / CancelledBeforeAdvertise say Quiesced already / now, NotCancellable a session
    # past it (Poisoned + cancel = .stay -> CancelRequestedInFlight passed: the executor waited for a terminal state the
    # session was in; InFlight + cancel = CancelRequested -> NotCancellable: 'nothing to cancel' for a transfer being
    # aborted).  A frees-now result outside Quiesced, and the engine's own, are reported above.
    for r in rows:
        if r.event != "cancel" or r.result not in cancel_results or r.result in _ENGINE_ONLY_RESULTS["cancel"]:
            continue
        after = r.dst if r.moves else r.src
        if cancel_flag.get(r.result) == "yes" and after != _EVIDENCE_STATE:
            continue
        want = ("CancelRequestedInFlight" if after == _ABORT_STATE
                else "CancelledBeforeAdvertise" if r.moves and r.dst == _EVIDENCE_STATE
                else "AlreadyComplete" if after == _EVIDENCE_STATE
                else "NotCancellable" if after in terminals | finals else None)  # (an active one: the table's say)
        if want is not None and r.result != want:
            bad(r.line, "cancel-result", f"{r.src} + cancel = {r.dst} must return {want}, not {r.result}")
        elif want is None and r.result == "CancelRequestedInFlight":
            bad(r.line, "cancel-result", f"{r.src} + cancel = {r.dst} returns {r.result} (abort issued), but the "
                f"engine issues an abort only on the move into {_ABORT_STATE}")
    # DESIGN §2: a transport or timer event in a terminal or final state is late, never an error; without its row the
    # engine answered a backend's DONE after a disconnect with IllegalTransition.  And it is late, nothing else: a move
    # (Poisoned + complete = Terminated passed: the session terminated without the executor's terminate, which then
    # answered AlreadyTerminated, and its late DONE recovered nothing) or a `.stay` (dropped the evidence a late
    # complete gives a quarantined slot) broke that
    for r in rows:
        if r.src in terminals | finals and sources[r.event] != "executor" and r.dst != ".late":
            bad(r.line, "not-late", f"{r.src} + {r.event} = {r.dst}: a {sources[r.event]} event in "
                f"{'terminal' if r.src in terminals else 'final'} state {r.src} is late: '= .late' (DESIGN §2)")
    have = {(r.src, r.event) for r in rows}
    for s in sorted(terminals | finals, key=states.index):
        missing = [e for e in events if sources[e] != "executor" and (s, e) not in have]
        if missing:
            bad(state_line[s], "missing-late", f"{'terminal' if s in terminals else 'final'} state {s} has no row for "
                f"{', '.join(missing)}: add '{s} + {missing[0]} = .late' (a late event is never an error)")
    # DESIGN §3: only two things prove that no agent touches the buffers: the session was never exposed, or the
    # transport or the peer said the transfer stopped (complete).  A session in a state reached after an expose may be
    # exposed (InFlight + timeout = Quiesced / cancelled passed: elapsed time as evidence, the slot back in the pool
    # while bytes still land; InFlight + fail = Advertised passed: an exposed session back in the state whose cancel
    # is proof of never-exposed, CancelledBeforeAdvertise, frees now)
    exposed = _closure({r.dst for r in rows if r.event == "expose" and r.moves}, out)
    for r in rows:
        if not r.moves or r.src not in exposed:
            continue
        if r.dst == initial and r.src != initial:
            bad(r.line, "exposed-to-initial", f"{r.src} + {r.event} = {r.dst}: {r.src} may be exposed, and {initial} "
                                              f"means never exposed (its cancel is the evidence, DESIGN §3)")
        elif r.dst == _EVIDENCE_STATE and r.event != "complete":
            bad(r.line, "quiesced-without-evidence", f"{r.src} + {r.event} = {r.dst}: {r.src} may be exposed, and "
                f"{r.event} is not evidence that access stopped (only complete is, DESIGN §3): move to Poisoned")
    # ... and complete is: a row that drops it (InFlight + complete = .stay or = Poisoned passed, as did no row, the
    # DONE an IllegalTransition) left every transfer to its timers, Poisoned, its good slot quarantined.  The engine's
    # exposed states, where the transport's progress thread posts complete, need the row; a review table's other
    # states may leave complete illegal (`.late` is late-before-quiescence's; a move into itself, self-move's)
    for r in rows:
        if (r.event == "complete" and r.src in exposed and r.src not in terminals | finals and r.dst != r.src
                and r.dst not in (_EVIDENCE_STATE, ".late")):
            bad(r.line, "complete-not-evidence", f"{r.src} + complete = {r.dst}: {r.src} may be exposed, and complete "
                f"is the evidence that access stopped (DESIGN §3): move to {_EVIDENCE_STATE}")
    for s in _TRANSFER_STATES:
        if kinds.get(s) not in (None, "terminal", "final") and "complete" in sources and ("complete", s) not in {
                (r.event, r.src) for r in rows}:
            bad(state_line[s], "complete-not-evidence", f"{s} has no complete row: the transport's DONE there, the "
                f"evidence that access stopped (DESIGN §3), would be an illegal transition: add '{s} + complete = "
                f"{_EVIDENCE_STATE} / outcome'")
    # A complete confirms only a transfer there was: Advertised + complete = Quiesced / completed passed (a stray or
    # stale notification; nothing posted, no descriptor handed out), and poll_symmetric's consensus and the executor
    # took the KV data for arrived
    for r in rows:
        if r.moves and r.outcome == _CONFIRMED and r.event == "complete" and r.src not in exposed:
            bad(r.line, "completed-never-exposed", f"{r.src} + complete = {r.dst} / {r.outcome}: {r.src} was never "
                f"exposed, so no transfer ran for complete to confirm (DESIGN §2, §3): not {_CONFIRMED}")
    seen = _closure({initial}, out)  # reachable from the initial state
    for s in states:
        if s not in seen:
            bad(state_line[s], "unreachable", f"state {s} cannot be reached from {initial}")
        if s not in finals and not out[s] - {s}:
            bad(state_line[s], "dead-end", f"non-final state {s} has no transition out")
    # every non-final state must be able to reach a final state
    back: dict[str, set[str]] = {s: set() for s in states}
    for s, ds in out.items():
        for d in ds:
            back[d].add(s)
    reach_final = _closure(set(finals), back)
    for s in states:
        if s not in reach_final:
            bad(state_line[s], "cannot-terminate", f"state {s} can never reach {'/'.join(sorted(finals))}")
    used = {r.event for r in rows}
    for e in events:
        if e not in used:
            bad(event_line[e], "event-never-enabled", f"event {e} appears in no row")


# A lifecycle table is a few KiB; a file past this is not one (/dev/zero was read without end).
MAX_TABLE_BYTES = 1 << 20


def load(path: str | Path) -> Spec:
    if isinstance(path, str) and not path:  # (Path('') is '.', reported as a directory named '.')
        raise SpecError([Violation(path, 0, "unreadable", "cannot read table: the file name is empty")])
    p = Path(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO blocked for ever, a device never ended
            raise SpecError([Violation(str(p), 0, "unreadable", "cannot read table: not a regular file")])
        with open(p, "rb") as f:
            data = f.read(MAX_TABLE_BYTES + 1)
        if len(data) > MAX_TABLE_BYTES:
            raise SpecError([Violation(str(p), 0, "unreadable", f"cannot read table: larger than {MAX_TABLE_BYTES} "
                                                                "bytes, not a lifecycle table")])
        # universal newlines, as read_text; a UTF-8 byte order mark (some editors write one) is not the table's
        text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:  # (was line 0 and a byte offset: the line that holds the byte, and its column)
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # utf-8-sig counts from after the byte order mark
        head = data[bom:bom + exc.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line, col = head.count(b"\n") + 1, len(head) - head.rfind(b"\n")
        raise SpecError([Violation(str(p), line, "unreadable", f"cannot read table: not UTF-8: byte "
                                                               f"0x{data[bom + exc.start]:02x} at column {col}")]) from exc
    except SpecError:  # (raised above, and a ValueError: the clause below wrapped it, file and reason said twice)
        raise
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL byte in the name (os.stat's)
        raise SpecError([Violation(str(p), 0, "unreadable", f"cannot read table: {exc}")]) from exc
    return parse(text, str(p))


def check_file(path: str | Path) -> list[Violation]:
    """Every violation in the file (empty when valid)."""
    try:
        load(path)
    except SpecError as exc:
        return exc.violations
    return []


def default_table_path() -> Path:
    """The repository's table (a source checkout); installed builds read the copy inside _core."""
    return Path(__file__).resolve().parent.parent / "schemas" / "lifecycle.table"


def load_default(path: str | Path | None = None) -> Spec:
    """``path`` if given; else the repository's table in a source checkout; else (an installed
    wheel, which has no schemas/ folder) the table compiled into ``lifecycle._core``."""
    if path is not None:  # (an empty name was silently the default table)
        return load(path)
    src = default_table_path()
    if src.exists():
        return load(src)
    from . import _core

    return parse(_core.TABLE_TEXT, "<lifecycle._core>")
