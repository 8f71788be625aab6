"""Reference model of the lifecycle, built with ``transitions`` from the same table as the C++ core.

Two uses: diagrams (``lifecycle.diagram`` walks the machine built here) and the test oracle
(``ReferenceEngine`` mirrors the engine's observable behaviour session by session, so a hypothesis
stateful test can drive both side by side).  Nothing here is hand-written about the lifecycle: the
states, rows, outcomes and results all come from the parsed table.
"""

from __future__ import annotations

from dataclasses import dataclass

from transitions import Machine

from .spec import ACTIONS, CREATE_SOURCE, Row, Spec

__all__ = ["ReferenceEngine", "ReferenceSession", "build_machine"]


def build_machine(spec: Spec, model: object | None = None, initial: str | None = None) -> Machine:
    """A ``transitions.Machine`` whose states and moving rows are exactly the table's.

    Rows with an action destination (.stay/.late/.defer) are internal transitions (dest=None), so
    the machine accepts exactly the (state, event) pairs the table accepts; every other pair raises
    ``transitions.MachineError``.
    """
    m = Machine(
        model=model if model is not None else "self",
        states=list(spec.states),
        initial=initial or spec.initial,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        send_event=True,
    )
    for r in spec.rows:
        if r.src == CREATE_SOURCE:
            continue
        m.add_transition(r.event, r.src, None if r.dst in ACTIONS else r.dst)
    return m


@dataclass
class ReferenceSession:
    """One session of the reference engine; ``machine`` is the transitions model object."""

    req: int
    role: str
    state: str = ""
    outcome: str | None = None
    deferred: bool = False


class _Obj:
    """A bare model object for ``transitions`` (it sets ``.state``)."""

    state: str


class ReferenceEngine:
    """The oracle: table-driven semantics, independent of the C++ implementation.

    It only knows what the table says plus the three documented runtime refinements (AlreadyDeferred,
    BackendUnhealthy, CancelledDeferred).  ``apply`` returns ``(kind, result)`` where kind is one of
    ``"moved" | "stay" | "late" | "defer" | "illegal" | "unknown"``.
    """

    def __init__(self, spec: Spec):
        self.spec = spec
        self.sessions: dict[int, ReferenceSession] = {}
        self.models: dict[int, _Obj] = {}
        self.notices: list[int] = []  # TerminateNow, in emission order
        self.illegal = 0
        self.late = 0

    def advertise(self, req: int, role: str) -> str:
        if req in self.sessions:
            return "duplicate"
        obj = _Obj()
        build_machine(self.spec, obj)
        self.models[req] = obj
        self.sessions[req] = ReferenceSession(req, role, state=self.spec.initial)
        return "moved"

    def apply(self, req: int, event: str, unhealthy: bool = False) -> tuple[str, str | None]:
        s = self.sessions.get(req)
        if s is None:
            return ("unknown", "NotFound")
        row: Row | None = self.spec.row(s.state, event)
        if row is None:
            self.illegal += 1
            return ("illegal", None)
        result = row.result
        if row.dst == ".stay":
            return ("stay", result)
        if row.dst == ".late":
            self.late += 1
            return ("late", None)
        if row.dst == ".defer":
            if s.deferred:
                return ("defer", "AlreadyDeferred")
            s.deferred = True
            return ("defer", result)
        obj = self.models[req]
        getattr(obj, event)()  # the transitions machine performs the move (raises on a mismatch)
        assert obj.state == row.dst
        s.state = row.dst
        if row.outcome is not None:
            s.outcome = row.outcome
        if event == "cancel" and unhealthy and row.result == "CancelRequestedInFlight":
            result = "BackendUnhealthy"
        if s.deferred and s.state in self.spec.terminal:
            # exactly-once deferred termination: marked Terminated at once, one notice queued
            final = self.spec.row(s.state, "terminate")
            assert final is not None and final.moves
            getattr(obj, "terminate")()
            s.state = final.dst
            s.deferred = False
            self.notices.append(req)
            if event == "cancel":  # the notice releases the session, not the cancel (frees now: no)
                result = "CancelledDeferred"
        return ("moved", result)
