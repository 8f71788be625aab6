"""Audit structured lifecycle logs: replay every request through the table and report what went wrong.

Theory of operation
-------------------
The engine emits one JSON event per line (the format is ``schemas/events.schema.json``, generated
from the table by :func:`build_schema`; prose in ``docs/audit.md``).  The auditor reads
one or many files (one per rank, or a merged one; plain or gzip), and streams them: per-request state
is kept only while a request is *live*.  When a session reaches ``Terminated`` its numbers fold into
fixed-size aggregates (log-bucketed histograms for time per state, a top-K heap of the slowest
requests, counters) and a small tombstone stays behind in a bounded window, so a second termination
or a late ``TerminateNow`` is still caught.  Memory is bounded by the number of live requests plus
fixed-size windows, not by file length.

A session is one request on one rank in one role (DESIGN §2), of one engine: sessions are keyed by ``(rank, request,
(stream, engine))`` when events carry the optional ``engine`` key, else by ``(rank, request, role)``; a seq stream is
a ``proc`` (optional key, random per process), else a pid within one file; slots are ``(stream, engine, slot)``
(one engine's pool holds both roles).  Each ``lifecycle.transition`` is checked against the table
(``spec.rows``): the replayed state must equal ``from_state`` and ``from_state + trigger`` must be a
moving row that lands on ``to_state``.  Cancel/terminate *results* are checked for validity and against the state
their line logs, and move nothing in the replay (the engine logs them in causal order at ``poll()``, after the
transitions the call caused, except ``NotFound``, which is logged at once); ``Deferred``, ``AlreadyDeferred`` and
``Terminated`` are checked against the session's deferral (``deferred_order``, ``double_termination``), and
the replayed state against the one the result's row leaves (the logged state on a row that moves nothing, such as
``AlreadyTerminated``, ``AlreadyComplete``; the destination on a moving row): ``result_state_mismatch``.

Violations (exit status 1): ``malformed`` (a line that is not a valid event; file:line named),
``illegal_transition``, ``terminated_before_terminal``, ``leak`` (never terminated), ``double_termination``,
``wrong_result`` (a cancel/terminate result the table does not give in the state the line logs),
``result_state_mismatch`` (a cancel/terminate result whose live session, as replayed, is not in the state its row
leaves: the logged one on a row that moves nothing, such as ``AlreadyTerminated`` or ``AlreadyComplete``, the row's
destination on a moving one, such as ``CancelledBeforeAdvertise`` while the session is still ``InFlight``),
``misclassified_event`` (a late or engine-rejected event the table does not make late / illegal in the state it logs,
or whose state is not its live session's),
``deferred_delivery`` (a deferred terminate delivered 0 or >= 2 times, or delivered without a deferral),
``deferred_order`` (a deferral's records in an order the engine never logs: a TerminateNow before its session's
Terminated transition, a Deferred after it or logged twice, a deferred Terminated transition without a Deferred),
``slot_reuse`` (a slot leased again while poisoned/quarantined without ``buffer_recovered``, or while
another live session holds it), ``rank_disagreement`` (ranks report different outcomes for one request in one
role), ``seq_gap`` (lost or duplicated lines in a stream's sequence), ``collective_desync``, ``unreadable``,
``no_events`` (a file read to its end that holds no lifecycle event: empty, blank lines only, or nothing but
malformed lines; such an audit could not fail).
Warnings (reported, exit 0; ``docs/audit.md`` says what each means): ``rejected_event``, ``callback_error``,
``unhealthy``, ``stream_start``, ``adopted_session``, ``orphan_event``, ``table_mismatch``, ``live``,
``window_evicted``, ``delivery_unchecked``, ``log_filtered``, ``unjudged``.

Two engines
-----------
:class:`Auditor` (this module) is the reference replay.  :func:`audit_paths` and the CLI use the native
replay in ``lifecycle._core`` (``cpp/src/audit.cpp``) when they can: the same replay over the compiled
table with a strict JSON reader that accepts what orjson accepts, several times faster.  Python still
opens and reads the files (plain or gzip, 1 MiB chunks) and formats each finding's message (repr() of
the JSON values involved, orjson's error text for a malformed line), so the results are identical;
``tests/test_audit_native.py`` holds the two engines to that.  The Python replay is used when asked
(``native=False``, ``--engine python``, or ``LIFECYCLE_AUDIT_ENGINE=python``), and, unless the native one is
required (``native=True``, ``--engine native``, ``LIFECYCLE_AUDIT_ENGINE=native``), whenever it
cannot give the reference's answer: a table other than the compiled one, no orjson, a stale or missing
build, option values outside what it takes (see :func:`native_unavailable`).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import heapq
import inspect
import itertools
import json
import numbers
import operator
import os
import re
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import spec as _spec
from .errors import InvalidArgument, LifecycleError, _shown

__all__ = [
    "EXCUSABLE_KINDS",
    "MAX_DEPTH",
    "SCHEMA_ID",
    "AuditResult",
    "Auditor",
    "EventSchemaError",
    "Finding",
    "LogHistogram",
    "VIOLATION_KINDS",
    "WARNING_KINDS",
    "audit_events",
    "audit_paths",
    "build_schema",
    "check_options",
    "event_errors",
    "format_text",
    "load_schema",
    "main_audit",
    "native_unavailable",
    "schema_path",
    "validate_event",
]

SCHEMA_ID = "kv-lifecycle.events/1"
AUDIT_FORMAT = "kv-lifecycle.audit/2"  # /2: `streams` keyed "proc N" / "pid P in FILE" (was: by pid)

VIOLATION_KINDS = (
    "malformed",
    "unreadable",
    "illegal_transition",
    "terminated_before_terminal",
    "leak",
    "double_termination",
    "wrong_result",
    "result_state_mismatch",
    "misclassified_event",
    "deferred_delivery",
    "deferred_order",
    "slot_reuse",
    "rank_disagreement",
    "seq_gap",
    "collective_desync",
    "no_events",
)
WARNING_KINDS = (
    "rejected_event",
    "callback_error",
    "unhealthy",
    "stream_start",
    "adopted_session",
    "orphan_event",
    "table_mismatch",
    "live",
    "window_evicted",
    "delivery_unchecked",
    "log_filtered",
    "unjudged",
)
# Violations a caller may excuse (AuditResult.excuse): an empty log is right for a rank that created no session
EXCUSABLE_KINDS = ("no_events",)

MAX_LINE = 1 << 20  # longer lines are reported (not parsed, not held in memory)
# Lines nesting brackets deeper than this (outside strings) are reported, not parsed: orjson 3.8 recurses
# and overflows its stack near 150 k levels, the stdlib parser near 1 k, and no event nests beyond 3.
MAX_DEPTH = 512
_CHUNK = 1 << 20
_ZCHUNK = 1 << 16  # compressed bytes per read of a gzip log
_RUN = 64  # lines parsed together, then replayed together (see Auditor._feed_one)
# Merging files: a file's first timestamp is looked for in its first _LOOKAHEAD lines (not blank), which are
# held until the merge starts; a file with none there has no first time (its times are used as they are).
_LOOKAHEAD = 4096
# Mismatched `table` values are reported once each for the first _MAX_TABLES distinct ones, then on every line
# with a value not remembered: memory stays bounded (a value may be a line long) whatever the log holds.
_MAX_TABLES = 64

# ------------------------------------------------------------------------------------------------
# Event schema (generated from the table)
# ------------------------------------------------------------------------------------------------

_EVENT_NAMES = (
    "lifecycle.transition",
    "lifecycle.cancel",
    "lifecycle.terminate",
    "lifecycle.terminate_now",
    "lifecycle.callback_error",
    "lifecycle.slot_quarantined",
    "lifecycle.buffer_recovered",
    "lifecycle.late_event",
    "lifecycle.illegal_transition",
    "lifecycle.health",
    "lifecycle.collective_desync",
    "lifecycle.log_level",
)


def build_schema(spec: _spec.Spec) -> dict:
    """The JSON Schema (draft 2020-12) of every structured event, enum lists taken from ``spec``."""
    ref = lambda name: {"$ref": f"#/$defs/{name}"}  # noqa: E731
    int_req = {"properties": {"request": {"type": "integer"}}}
    null_req = {"properties": {"request": {"type": "null"}}}
    per_event: dict[str, dict] = {
        "lifecycle.transition": {
            "description": "One state change: the canonical event, one per transition.",
            "required": ["from_state", "to_state", "trigger", "outcome", "slot", "generation", "deferred"],
            "properties": {
                "request": {"type": "integer"},
                "role": ref("role"),
                "from_state": {"anyOf": [ref("state"), {"type": "null"}],
                               "description": "null only for the creating event"},
                "to_state": ref("state"),
                "trigger": ref("lifecycle_event"),
                "outcome": {"anyOf": [ref("outcome"), {"type": "null"}]},
                "slot": {"type": "integer", "minimum": -1, "description": "-1 when no slot is leased"},
                "generation": {"type": "integer", "minimum": 0},
                "deferred": {"type": "boolean",
                             "description": "true on the Terminated transition of a deferred terminate"},
            },
            "if": {"properties": {"from_state": {"type": "null"}}, "required": ["from_state"]},
            "then": {"properties": {"trigger": {"const": spec.create_event}, "to_state": {"const": spec.initial}}},
            "else": {"properties": {"trigger": {"not": {"const": spec.create_event}}}},
        },
        "lifecycle.cancel": {
            "description": "What cancel() returned.",
            "required": ["result", "state"],
            "properties": {"request": {"type": "integer"}, "result": ref("cancel_result"),
                           "state": {"anyOf": [ref("state"), {"type": "null"}]}},
        },
        "lifecycle.terminate": {
            "description": "What terminate() returned; result Deferred is a deferral.",
            "required": ["result", "state"],
            "properties": {"request": {"type": "integer"}, "result": ref("terminate_result"),
                           "state": {"anyOf": [ref("state"), {"type": "null"}]}},
        },
        "lifecycle.terminate_now": {
            "description": "Delivery of a deferred termination to the executor callback (exactly once).",
            **int_req,
        },
        "lifecycle.callback_error": {
            "description": "The executor's on_terminate callback raised; re-raised after the batch.",
            "required": ["error"],
            "properties": {"request": {"type": "integer"}, "error": {"type": "string"}},
        },
        "lifecycle.slot_quarantined": {
            "description": "A poisoned session's slot moved to quarantine.",
            "required": ["slot", "generation"],
            "properties": {"request": {"type": "integer"}, "slot": {"type": "integer", "minimum": 0},
                           "generation": {"type": "integer", "minimum": 0}},
        },
        "lifecycle.buffer_recovered": {
            "description": "A quarantined slot returned to the pool on evidence tied to its generation.",
            "required": ["slot", "generation"],
            "properties": {"request": {"type": "integer"}, "slot": {"type": "integer", "minimum": 0},
                           "generation": {"type": "integer", "minimum": 0}},
        },
        "lifecycle.late_event": {
            "description": "A transport/timer event after quiescence: counted, never an error.",
            "required": ["trigger", "state"],
            "properties": {"request": {"type": "integer"}, "trigger": ref("lifecycle_event"), "state": ref("state")},
        },
        "lifecycle.illegal_transition": {
            "description": "An event the table does not allow in this state; rejected, session unchanged.",
            "required": ["trigger", "state"],
            "properties": {"request": {"type": "integer"}, "trigger": ref("lifecycle_event"), "state": ref("state")},
        },
        "lifecycle.health": {
            "description": "The engine's health changed.",
            "required": ["healthy", "reasons"],
            "properties": {"request": {"type": "null"}, "healthy": {"type": "boolean"},
                           "reasons": {"type": "array", "items": {"type": "string"}}},
        },
        "lifecycle.collective_desync": {
            "description": "Ranks diverged in a collective (or one never arrived).",
            "required": ["seq_no", "field", "sites"],
            "properties": {"request": {"type": "null"}, "seq_no": {"type": "integer"}, "field": {"type": "string"},
                           "sites": {"type": "array", "items": {"type": ["string", "null"]}},
                           "missing": {"type": "array", "items": {"type": "integer"}}},
        },
        "lifecycle.log_level": {
            "description": "The engine's logger began to filter its INFO lines out by level (logged at the lowest "
                           "level it writes), or writes them again (at INFO): the engine's lines in between are "
                           "missing, with no seq gap.",
            "required": ["info_filtered"],
            "properties": {"request": {"type": "null"}, "info_filtered": {"type": "boolean"}},
        },
    }
    assert tuple(per_event) == _EVENT_NAMES
    del null_req
    defs: dict[str, dict] = {
        "state": {"enum": list(spec.states)},
        "lifecycle_event": {"enum": list(spec.events)},
        "outcome": {"enum": list(spec.outcomes)},
        "cancel_result": {"enum": list(spec.cancel_results)},
        "terminate_result": {"enum": list(spec.terminate_results)},
        "role": {"enum": list(_ROLES)},
    }
    for name, body in per_event.items():
        defs[name.replace("lifecycle.", "ev_")] = {"type": "object", **body}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kv-lifecycle.invalid/schemas/events.schema.json",
        "title": "kv-lifecycle structured log events",
        "description": (
            f"Version {SCHEMA_ID}.  GENERATED from the lifecycle table (digest {spec.digest}) by "
            "`python -m lifecycle.audit --write-schema`; do not edit.  One JSON object per event "
            "(structlog event dict: key 'event' is the name; the application may add keys such as "
            "'level', 'log_level' or 'timestamp')."
        ),
        "x-schema-version": SCHEMA_ID,
        "x-table-digest": spec.digest,
        "type": "object",
        "required": ["event", "request", "rank", "role", "t_mono_ns", "seq", "pid", "table", "schema"],
        "properties": {
            "event": {"enum": list(_EVENT_NAMES)},
            "request": {"type": ["integer", "null"]},
            "rank": {"type": "integer", "minimum": 0},
            "role": ref("role"),
            "t_mono_ns": {"type": "integer", "description": "engine monotonic clock, ns"},
            "seq": {"type": "integer", "minimum": 0, "description": "per-process sequence; gaps = lost lines"},
            "pid": {"type": "integer", "minimum": 0},
            "table": {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "lifecycle table digest"},
            "schema": {"const": SCHEMA_ID},
            "proc": {**_OPTIONAL_ID, "description": "optional: random per process (new after fork); keys the seq "
                     "stream; null or absent: the stream is keyed by file and pid (logs written before it)"},
            "engine": {**_OPTIONAL_ID, "description": "optional: the emitting engine, unique within its proc; null "
                       "or absent for events not from an engine (collectives)"},
        },
        "allOf": [
            {"if": {"properties": {"event": {"const": name}}, "required": ["event"]},
             "then": ref(name.replace("lifecycle.", "ev_"))}
            for name in _EVENT_NAMES
        ],
        "$defs": defs,
    }


def schema_path() -> Path:
    return Path(__file__).resolve().parent.parent / "schemas" / "events.schema.json"


def render_schema(spec: _spec.Spec) -> str:
    return json.dumps(build_schema(spec), indent=2, sort_keys=False) + "\n"


_VALIDATOR = None


def load_schema() -> dict:
    """The schema file when present (source checkout), else generated from the default table."""
    p = schema_path()
    if p.exists():
        return json.loads(p.read_text(encoding="utf-8"))
    return build_schema(_spec.load_default())


def _validator():
    global _VALIDATOR
    if _VALIDATOR is None:
        try:
            import jsonschema
        except ImportError as exc:  # pragma: no cover - jsonschema is a test dependency
            raise ImportError("validate_event needs jsonschema (pip install 'kv-lifecycle[test]')") from exc
        schema = load_schema()
        jsonschema.Draft202012Validator.check_schema(schema)
        # "integer" as the audit reads it: an int (not a bool), never a float (JSON Schema counts 0.0 as an integer,
        # and the audit reports a line with one where it wants an int malformed)
        ints = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
        _VALIDATOR = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=ints)(schema)
    return _VALIDATOR


class EventSchemaError(LifecycleError, ValueError):
    """An event does not match ``schemas/events.schema.json``; ``errors`` lists each problem."""

    def __init__(self, event: object, errors: list[str]):
        self.event, self.errors = event, list(errors)
        name = event.get("event") if isinstance(event, dict) else type(event).__name__
        super().__init__(f"event {name!r} does not match {SCHEMA_ID}: " + "; ".join(self.errors))


def event_errors(event: object) -> list[str]:
    """Every schema violation of one event dict (empty when valid); ``log_level`` etc. are allowed."""
    errs = sorted(_validator().iter_errors(event), key=lambda e: list(e.absolute_path))
    # each once (a non-object event failed every branch of the schema's oneOf alike: the same line 12 times)
    return list(dict.fromkeys(f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errs))


def validate_event(event: object) -> None:
    """Raise :class:`EventSchemaError` unless ``event`` (a structlog event dict) matches the schema."""
    errs = event_errors(event)
    if errs:
        raise EventSchemaError(event, errs)


# ------------------------------------------------------------------------------------------------
# Bounded aggregates
# ------------------------------------------------------------------------------------------------


def _bucket(v: int) -> int:
    """Log-linear bucket (HDR style): exact below 64, then 32 sub-buckets per power of two (<= 1.6% error)."""
    if v < 64:
        return v if v > 0 else 0
    e = v.bit_length() - 6
    return (e << 5) + (v >> e)


def _bucket_start(b: int) -> int:
    """The least value in bucket ``b`` (b >= 1)."""
    if b < 64:
        return b
    e = (b >> 5) - 1
    return (b - (e << 5)) << e


def _bucket_value(b: int) -> int:
    if b < 64:
        return b
    e = (b >> 5) - 1
    m = b - (e << 5)
    return (m << e) + ((1 << e) >> 1)


_HIST_BATCH = 4096


def nearest_rank(q: float, n: int) -> int:
    """The 1-based rank of the ``q``-quantile of ``n`` sorted values, by nearest rank: the smallest value with at
    least ``q * n`` values at or below it (p99 of 100 values is the 99th, p50 of 2 the first).  The product is
    cut to 1e-3 first, so float error does not round it up a rank (0.99 * 300 is 297.00000000000006)."""
    return max(1, -(-int(q * n * 1000) // 1000))


class LogHistogram:
    """Fixed-size histogram of non-negative ints (ns); quantiles within ~1.6% relative error.

    :meth:`add` only appends to a batch of at most 4096 values; a full batch is sorted and counted per
    bucket with a bisection per bucket (not per value), which is several times cheaper than binning
    values one by one.  Reading any field folds the batch in first.
    """

    __slots__ = ("_buckets", "_max", "_total", "_batch")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self._max = 0
        self._total = 0
        self._batch: list[int] = []

    def add(self, v: int) -> None:
        batch = self._batch
        batch.append(v)
        if len(batch) >= _HIST_BATCH:
            self._fold_batch()

    def _fold_batch(self) -> None:
        batch = self._batch
        if not batch:
            return
        batch.sort()
        self._total += sum(batch)
        if batch[-1] > self._max:
            self._max = batch[-1]
        buckets = self._buckets
        i, n = 0, len(batch)
        while i < n:
            b = _bucket(batch[i])
            j = bisect.bisect_left(batch, _bucket_start(b + 1), i + 1)
            buckets[b] = buckets.get(b, 0) + j - i
            i = j
        batch.clear()

    @property
    def buckets(self) -> dict[int, int]:
        self._fold_batch()
        return self._buckets

    @property
    def count(self) -> int:
        return sum(self.buckets.values())

    @property
    def max(self) -> int:
        self._fold_batch()
        return self._max

    @property
    def total(self) -> int:
        self._fold_batch()
        return self._total

    def quantile(self, q: float) -> int:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:  # (NaN too)
            raise InvalidArgument("q", f"expected a quantile in [0, 1], got {_shown(q):.40}")
        if not self.count:
            return 0
        rank = nearest_rank(q, self.count)
        seen = 0
        buckets = self.buckets
        for b in sorted(buckets):
            seen += buckets[b]
            if seen >= rank:
                return min(_bucket_value(b), self.max)
        return self.max

    def as_dict(self) -> dict:
        return {"count": self.count, "p50_ns": self.quantile(0.5), "p99_ns": self.quantile(0.99),
                "max_ns": self.max, "mean_ns": self.total // self.count if self.count else 0}


# ------------------------------------------------------------------------------------------------
# Findings and results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One violation or warning; ``line`` is 1-based in ``file`` (0 when not tied to a line)."""

    kind: str
    file: str
    line: int
    message: str
    rank: int | None = None
    request: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def violation(self) -> bool:
        return self.kind in VIOLATION_KINDS

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "file": self.file, "line": self.line, "rank": self.rank,
             "request": self.request, "message": self.message}
        if self.extra:
            d["extra"] = self.extra
        return d

    def __str__(self) -> str:
        who = ""
        if self.request is not None:
            who = f" rank {self.rank} request {self.request}:"
        elif self.rank is not None:
            who = f" rank {self.rank}:"
        return f"{self.file}:{self.line}: [{self.kind}]{who} {self.message}"


@dataclass
class RequestSummary:
    """A finished (or leaked) request kept for the report: the slowest, and those with violations."""

    rank: int
    request: int
    role: str | None
    file: str
    line: int
    start_ns: int
    end_ns: int
    outcome: str | None
    final_state: str
    segments: list  # [(state, t_start_ns, t_end_ns)]
    kinds: list  # violation kinds touching this request
    ended: bool  # False: still live when the log ended

    @property
    def lifetime_ns(self) -> int:
        return self.end_ns - self.start_ns

    def as_dict(self) -> dict:
        return {"rank": self.rank, "request": self.request, "role": self.role, "file": self.file,
                "line": self.line, "lifetime_ns": self.lifetime_ns, "outcome": self.outcome,
                "final_state": self.final_state, "ended": self.ended, "violations": list(self.kinds),
                "segments": [[s, a - self.start_ns, b - self.start_ns] for s, a, b in self.segments]}


@dataclass
class AuditResult:
    files: list[str]
    table_digest: str
    lines: int
    events: int
    requests: int
    terminated: int
    live: int
    findings: list[Finding]
    finding_counts: dict[str, int]
    time_in_state: dict[str, LogHistogram]
    lifetime: LogHistogram
    outcomes: dict[str, int]
    event_counts: dict[str, int]
    edges: dict[tuple[str | None, str, str], int]
    illegal_edges: dict[tuple[str | None, str, str], int]
    late: dict[tuple[str, str], int]
    rejected: dict[tuple[str, str], int]
    slowest: list[RequestSummary]
    violating: list[RequestSummary]
    streams: dict[str, dict]  # label (_stream_label) -> {events, next_seq, file, first_seq, pid, proc}
    ranks: list[int]
    # Invariant: keys are in EXCUSABLE_KINDS, values equal finding_counts' (set by excuse(), never by the replay)
    excused: dict[str, int] = field(default_factory=dict)

    @property
    def violations(self) -> int:
        return sum(n for k, n in self.finding_counts.items() if k in VIOLATION_KINDS and k not in self.excused)

    def excuse(self, kind: str) -> "AuditResult":
        """Stop counting ``kind``'s findings as violations (they stay in ``findings`` and ``finding_counts``, and
        ``excused`` says how many): ``no_events`` for a log that may rightly be empty, as a rank or side that
        created no session (``lifecycle audit --allow-empty``; the demo for a side that started none)."""
        if kind not in EXCUSABLE_KINDS:
            raise InvalidArgument("kind", f"only {', '.join(EXCUSABLE_KINDS)} can be excused, got {_shown(kind)}")
        if self.finding_counts.get(kind):
            self.excused[kind] = self.finding_counts[kind]
        return self

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def as_dict(self) -> dict:
        viol = {k: self.finding_counts.get(k, 0) for k in VIOLATION_KINDS}
        warn = {k: self.finding_counts.get(k, 0) for k in WARNING_KINDS}
        return {
            "format": AUDIT_FORMAT,
            "ok": self.ok,
            "files": self.files,
            "table": self.table_digest,
            "lines": self.lines,
            "events": self.events,
            "requests": {"total": self.requests, "terminated": self.terminated, "live": self.live},
            "ranks": self.ranks,
            "violations": viol,
            "warnings": warn,
            "excused": dict(self.excused),
            "findings": [f.as_dict() for f in self.findings],
            "time_in_state": {s: h.as_dict() for s, h in self.time_in_state.items()},
            "lifetime": self.lifetime.as_dict(),
            "outcomes": dict(self.outcomes),
            "event_counts": dict(sorted(self.event_counts.items())),
            "edges": [{"from": a, "trigger": e, "to": b, "count": n} for (a, e, b), n in sorted(
                self.edges.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))],
            "illegal_edges": [{"from": a, "trigger": e, "to": b, "count": n} for (a, e, b), n in sorted(
                self.illegal_edges.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))],
            "late": [{"state": s, "trigger": e, "count": n} for (s, e), n in sorted(self.late.items())],
            "rejected": [{"state": s, "trigger": e, "count": n} for (s, e), n in sorted(self.rejected.items())],
            "slowest": [r.as_dict() for r in self.slowest],
            "violating": [r.as_dict() for r in self.violating],
            "streams": {str(p): v for p, v in sorted(self.streams.items())},
        }


# ------------------------------------------------------------------------------------------------
# Reading lines (plain or gzip, bounded line length)
# ------------------------------------------------------------------------------------------------

TOO_LONG = object()


class _Unreadable(Exception):
    pass


def log_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be audited as a log ("no such file", "not a regular file"), or None."""
    if Path(path).is_file():
        return None
    return "not a regular file" if Path(path).exists() else "no such file"


def _blank(raw: bytes) -> bool:
    """Whitespace only (as ``str.strip`` sees it, so a line counts as blank exactly as it always did)."""
    return not raw.decode("utf-8", "surrogateescape").strip()


def iter_blocks(path: str, max_line: int = MAX_LINE) -> Iterator[tuple[int, object]]:
    """Yield ``(first_lineno, lines)`` per run of at most ``_RUN`` consecutive lines (``bytes`` without the
    newline), or ``(lineno, TOO_LONG)`` for a line over ``max_line`` bytes.

    Lines come from 1 MiB reads split at once, so a caller's loop costs one list item per line.  Memory
    stays bounded by ``max_line`` + one chunk whatever the file holds.  A read error (truncated gzip, I/O
    error) raises :class:`_Unreadable` carrying the line number reached.
    """
    lineno = 0  # lines yielded so far
    buf = b""
    skipping = False
    try:
        for chunk in _read_chunks(path):
            if skipping:
                i = chunk.find(b"\n")
                if i < 0:
                    continue
                skipping = False
                lineno += 1
                yield lineno, TOO_LONG
                chunk = chunk[i + 1:]
            lines = (buf + chunk).split(b"\n") if buf else chunk.split(b"\n")
            buf = lines.pop()
            if lines:
                yield from _runs(lineno + 1, lines, max_line)
                lineno += len(lines)
            if len(buf) > max_line:
                buf = b""
                skipping = True
    except (OSError, EOFError, zlib.error) as exc:
        raise _Unreadable(lineno + 1, f"{type(exc).__name__}: {exc}") from exc
    if skipping:
        yield lineno + 1, TOO_LONG
    elif not _blank(buf):
        yield lineno + 1, [buf]


def _runs(first: int, lines: list[bytes], max_line: int) -> Iterator[tuple[int, object]]:
    """``lines`` in runs of at most ``_RUN``, cut around the lines over ``max_line`` bytes (each yielded as
    TOO_LONG)."""
    if max(map(len, lines)) <= max_line:
        for i in range(0, len(lines), _RUN):
            yield first + i, lines[i:i + _RUN]
        return
    start = 0
    for i, line in enumerate(lines):
        if len(line) > max_line:
            if i > start:
                yield from _runs(first + start, lines[start:i], max_line)
            yield first + i, TOO_LONG
            start = i + 1
    if start < len(lines):
        yield from _runs(first + start, lines[start:], max_line)


_SCAN = json.JSONDecoder().scan_once  # the C scanner: json.loads minus its wrappers


try:  # optional accelerator (requirements.txt installs it); the stdlib path below is complete alone
    from orjson import loads as _ORJSON_LOADS
except ImportError:  # pragma: no cover - exercised where orjson is absent
    _ORJSON_LOADS = None


def _parse_stdlib(raw: bytes):
    """One line with the stdlib: the C scanner, json.loads for anything unusual (undecodable bytes are
    kept as surrogates, so the parser reports them)."""
    line = raw.decode("utf-8", "surrogateescape")
    try:
        obj, end = _SCAN(line, 0)
        if end == len(line):
            return obj
    except (StopIteration, ValueError, RecursionError):
        pass
    return json.loads(line)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.S)  # a JSON string, or the rest of the line
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def _too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than ``max_depth`` anywhere in ``raw`` (the native
    reader applies the same rule; a backslash in a string escapes the next byte, an unterminated string
    runs to the end of the line)."""
    if len(raw) <= max_depth or raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    depth = 0
    for c in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        if c == 0x5B or c == 0x7B:
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


_MAX_KEPT_TABLE = 256  # longer mismatched table values are remembered by digest (cpp/src/audit.cpp: the same)


def _new_bad_table(seen: set, tbl: object) -> bool:
    """Whether a mismatched ``table`` value is reported: once per value (by Python ==; a list or dict by its
    repr), remembering at most _MAX_TABLES values; a value not remembered is reported every time."""
    key = repr(tbl) if type(tbl) in (list, dict) else tbl
    if type(key) is str and len(key) > _MAX_KEPT_TABLE:
        # a value can be a whole line (1 MiB) long: a long one is remembered by its digest
        key = ("digest", len(key), hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    if key in seen:
        return False
    if len(seen) < _MAX_TABLES:
        seen.add(key)
    return True


def _line_parser():
    """orjson.loads when installed (it takes the bytes as they are; its errors are ValueErrors), else the
    stdlib."""
    return _ORJSON_LOADS if _ORJSON_LOADS is not None else _parse_stdlib


def _parser_keys(*names: str) -> tuple[str, ...]:
    """``names`` as the very str objects orjson gives its dicts' keys (it caches them), else as they are.

    orjson builds presized dicts, which CPython searches with a generic rich comparison whenever the key
    looked up is an equal but distinct object: about three times the cost of a lookup by the same object.
    If orjson's cache ever hands out a new object, lookups are as correct as before, only slower.
    """
    if _ORJSON_LOADS is None:
        return names
    return tuple(_ORJSON_LOADS(json.dumps(dict.fromkeys(names, 0))))


# the keys the hot path reads, each group fetched in one C call (itemgetter raises KeyError if one is missing)
_COMMON_KEYS = _parser_keys("event", "rank", "seq", "pid", "t_mono_ns", "request", "table", "role", "schema")
_ROLES = ("sender", "receiver", None)  # a role, or null (engine-wide events): the schema's enum too
# The optional keys naming who logged an event: present, each is an int >= 0 or null (null reads as absent).  The
# schema's rule (build_schema) and the replays' (Auditor.event, _bad_common; audit.cpp's Impl::event) are this one
# (tests/test_audit.py holds them together).
_OPTIONAL_IDS = ("proc", "engine")
_OPTIONAL_ID = {"type": ["integer", "null"], "minimum": 0}
_common_fields = operator.itemgetter(*_COMMON_KEYS)
_MOVE_KEYS = _parser_keys("from_state", "trigger", "to_state", "outcome", "deferred")
_move_fields = operator.itemgetter(*_MOVE_KEYS)


# ------------------------------------------------------------------------------------------------
# The auditor
# ------------------------------------------------------------------------------------------------

# session list fields (a list, not an object: one allocation per request, fast field access).  The first
# _TOMB fields are also a tombstone's: a folded session leaves s[:_TOMB] (_S_LAST_LINE: its final transition).
_S_DEFERRED, _S_NOTICES, _S_TERM_RESULTS, _S_FILE, _S_LAST_LINE, _S_DEFER_LINE, _S_NOTICE_LINE = range(7)
# the files of those three lines (a session's lines may span files: a rotated log), _S_FILE being its advertise's
_S_LAST_FILE, _S_DEFER_FILE, _S_NOTICE_FILE = range(7, 10)
_S_KEY, _S_KINDS, _TOMB = range(10, 13)
_S_STATE, _S_ENTERED, _S_START, _S_ROLE, _S_SLOT, _S_STREAM, _S_OUTCOME, _S_LINE, _S_HIST = range(_TOMB, _TOMB + 9)
_S_MOVES = _TOMB + 9  # the moves out of _S_STATE: {trigger: edge record}
_S_ENGINE = _TOMB + 10  # the `engine` key of its creating event (None: absent); its slots are (stream, engine, slot)
_S_ADOPTED = _TOMB + 11  # first seen mid-life (no advertise): its deferral may precede the log
# stream list fields (one stream per proc, or per (file, pid) for lines without proc).  Invariant: events seen =
# [_ST_BIAS] + [_ST_NEXT], so a line in sequence (the common case) only advances _ST_NEXT.
_ST_NEXT, _ST_MAX_T, _ST_MISSING, _ST_BIAS, _ST_FILE, _ST_FIRST, _ST_HEAD, _ST_PID, _ST_PROC = range(9)
# (_ST_MISSING: None, or [seqs awaited, [[first, end, (file, line, rank)], ...]]: runs of awaited seqs [first, end),
# sorted, never adjacent (the seq before a run was seen), each with where its loss was seen.  One entry per run, not
# per seq: a gap of 4096 lines on every line (a sampled log) cost 4096 entries per line, 100 k lines 166 s.)
# (_ST_HEAD: seq 0 seen; _ST_PID, _ST_PROC: of its first line)
# Sessions are keyed (rank, request, ident): ident is (stream key, engine) when the event names its engine, else
# the role.  An event with a null role and no engine (terminate_now in logs without `engine`) finds the session of
# that request on that rank in these roles, in this order.
_NULL_ROLE_LOOKUP = (None, "sender", "receiver")
# A stream that began at most this far past seq 0 and meets a seq before its first within this many lines is
# reading its head out of order (two threads logging at start), not restarting: the others are awaited.
_HEAD_REORDER = 64
# what reaching a state means for the replay
_INTO_ACTIVE, _INTO_TERMINAL, _INTO_FINAL = range(3)
# edge record fields, one record per moving row: times taken, histogram of the state left, what reaching
# the state means, the state (the table's str), the moves out of it, the row's outcome (None: the row sets none,
# so the move keeps the session's)
_E_COUNT, _E_TIS, _E_INTO, _E_DST, _E_MOVES, _E_OUT = range(6)


# Each option's least value (None: any int; a negative keep_* keeps none, a negative leak_age_ns reports no leaks)
_OPTION_FLOOR = {"window": 1, "top": 1, "keep_findings": None, "keep_violating": None, "leak_age_ns": None,
                 "max_line": 0}


def check_options(**opts) -> dict:
    """The audit's options, checked the same way for both replays (InvalidArgument names the option): ints
    (numpy's too), ``window`` and ``top`` >= 1, ``max_line`` >= 0, each inside int64 (``leak_age_ns`` any
    int).  Returns them as plain ints."""
    out = {}
    for k, v in opts.items():
        if k not in _OPTION_FLOOR:
            raise InvalidArgument(k, f"not an audit option (choose from {', '.join(_OPTION_FLOOR)})")
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InvalidArgument(k, f"expected an int, got {type(v).__name__}")
        v = out[k] = int(v)
        floor = _OPTION_FLOOR[k]
        if floor is not None and v < floor:
            raise InvalidArgument(k, f"expected an int >= {floor}, got {_shown(v)}")
        if k != "leak_age_ns" and not -(1 << 63) <= v < 1 << 63:
            raise InvalidArgument(k, f"out of the int64 range: {_shown(v)}")
    return out


class Auditor:
    """Streaming replay of lifecycle events.  Feed files with :meth:`feed_files` (or parsed events with
    :meth:`event`), then call :meth:`finish`.

    The hot path (one call of :meth:`event` per line) is tuned for the common case, a legal move of a live
    session.  The table is held as data shaped for it: each session points at the moves out of its state,
    ``{trigger: edge record}``, so one lookup by trigger and two comparisons (``to_state``, a known outcome)
    prove the move legal, and the record holds what the move needs (its counter, the histogram of the state
    left, what the new state means, the moves out of it).  Everything else (creation, adoption, malformed or
    illegal transitions) takes :meth:`_check_transition`, the complete checks; both then share the update.
    """

    def __init__(self, spec: _spec.Spec | None = None, *, window: int = 8192, top: int = 20,
                 keep_findings: int = 1000, keep_violating: int = 50, leak_age_ns: int = 0,
                 max_line: int = MAX_LINE):
        o = check_options(window=window, top=top, keep_findings=keep_findings, keep_violating=keep_violating,
                          leak_age_ns=leak_age_ns, max_line=max_line)
        window, top, keep_findings, keep_violating = o["window"], o["top"], o["keep_findings"], o["keep_violating"]
        leak_age_ns, max_line = o["leak_age_ns"], o["max_line"]
        if spec is not None and not isinstance(spec, _spec.Spec):
            raise InvalidArgument("spec", f"expected a lifecycle Spec (spec.load_default()), got {type(spec).__name__}")
        self.spec = spec if spec is not None else _spec.load_default()
        sp = self.spec
        self.window = window
        self.top = top
        self.keep_findings = keep_findings
        self.keep_violating = keep_violating
        self.leak_age_ns = leak_age_ns
        self.max_line = max_line
        self.states = frozenset(sp.states)
        self.events_set = frozenset(sp.events)
        self.outcomes_set = frozenset(sp.outcomes)
        self.terminal = frozenset(sp.terminal)
        self.final = frozenset(sp.final)
        self.initial = sp.initial
        self.create_event = sp.create_event
        self.digest = sp.digest
        self.files: list[str] = []
        self.lines = 0
        self.requests = 0
        self.terminated = 0
        self.live: dict[tuple[int, int], list] = {}
        self.tombs: dict[tuple[int, int], list] = {}  # the last `window` folded sessions
        # Invariant: every tombstone in self.tombs but the awaiting ones (below) is here, oldest first; so are
        # tombstones removed since (a request advertised again: key set to None), skipped when they reach the front.
        self._tomb_order: deque[list] = deque()
        # Tombstones the window evicted while their deferred terminate awaited its TerminateNow (poll() logs a
        # batch's notices after all its moves, so a batch ending more deferred sessions than the window evicts
        # them first): still in self.tombs, not counted in the window, up to `window` of them, until the notice.
        # _awaiting_order holds them oldest first, and those since resolved or re-advertised (skipped).
        self._awaiting: dict[tuple, list] = {}
        self._awaiting_order: deque[list] = deque()
        self.findings: list[Finding] = []
        self.counts: dict[str, int] = {}
        self.tis: dict[str, LogHistogram] = {s: LogHistogram() for s in sp.states if s not in self.final}
        self.lifetime = LogHistogram()
        self.outcomes: dict[str, int] = {o: 0 for o in sp.outcomes}
        self.event_counts: dict[str, int] = dict.fromkeys(_EVENT_NAMES, 0)  # names never seen: dropped by finish
        self.illegal_edges: dict[tuple, int] = {}
        self.late: dict[tuple[str, str], int] = {}
        self.rejected: dict[tuple[str, str], int] = {}
        self.slowest: list = []  # min-heap of (lifetime, tiebreak, RequestSummary)
        self._tiebreak = 0
        self.violating: list[RequestSummary] = []
        # stream key (proc, or (file, pid) for lines without proc) -> [next seq, max t, missing {seq: (file, line,
        # rank)}, ...]
        self.streams: dict[object, list] = {}
        # (stream key, engine, slot) -> [status, owner session key, file, line, generation (None: not an int)]
        self.slots: dict[tuple, list] = {}
        # (request, role) -> [outcome, rank, ranks reported, reported, file, line]: the first outcome of the
        # request's current lifetime among that role's ranks (a rank reporting again starts a new lifetime)
        self.xrank: dict[tuple, list] = {}
        self.ranks: set[int] = set()
        # (stream key, engine) -> [seq, file, line, rank, pid, stretch] of a lifecycle.log_level line saying that
        # engine's INFO lines are filtered out from there on, until one says they are written again; a stretch is
        # [first seq, last seq (None: not yet, or to the end of the log), pid, engine], shared by the sessions it cut
        self._filtered: dict[tuple, list] = {}
        # session key -> [session, stretch]: live when its engine's INFO lines were filtered out (_cut), not seen
        # since: its next line is adopted as at the start of a log; never seen again, it is `unjudged`, not a leak
        self._unseen: dict[tuple, list] = {}
        self._bad_tables: set = set()
        self._file = "<events>"
        # every file fed, by name (a name given twice is one file): [lines read, any event, unreadable]
        self._fed: dict[str, list] = {}
        # the table, shaped for the replay
        self._into = {s: _INTO_FINAL if s in self.final else _INTO_TERMINAL if s in self.terminal else _INTO_ACTIVE
                      for s in sp.states}
        self._moves: dict[str, dict[str, list]] = {s: {} for s in sp.states}  # [src][trigger] -> edge record
        self._edges: dict[tuple[str, str, str], list] = {}  # (src, trigger, dst) -> the same edge record
        for r in sp.rows:
            if r.src != _spec.CREATE_SOURCE and r.moves:
                edge = [0, self.tis.get(r.src), self._into[r.dst], r.dst, self._moves[r.dst], r.outcome]
                self._moves[r.src][r.event] = self._edges[(r.src, r.event, r.dst)] = edge
        self._created = 0  # creating transitions (the edge * + create_event = initial)
        # (state, call) -> the results cancel/terminate may return there: the row's, then the engine's three runtime
        # refinements (the table's comment; cpp/src/audit.cpp check_result: the same): a second deferral returns
        # AlreadyDeferred, a cancel that moves to CancelRequested while unhealthy returns BackendUnhealthy, a cancel
        # that moves into a terminal state while its terminate is deferred returns CancelledDeferred
        self._results: dict[tuple[str, str], tuple[str, ...]] = {}
        for r in sp.rows:
            if r.result is not None and r.src != _spec.CREATE_SOURCE:
                cancel_moves = r.event == "cancel" and r.moves
                self._results[(r.src, r.event)] = (r.result, *(
                    ("AlreadyDeferred",) if r.dst == ".defer" else
                    ("BackendUnhealthy",) if cancel_moves and r.result == "CancelRequestedInFlight" else ()), *(
                    ("CancelledDeferred",) if cancel_moves and r.dst in sp.terminal else ()))
        # (state, event) -> the row's destination (a state or an action): a late record needs .late, a rejected one none
        self._cells = {(r.src, r.event): r.dst for r in sp.rows if r.src != _spec.CREATE_SOURCE}
        # every (from_state, trigger, to_state, outcome) whose names are in the table, legal or not
        self._well_formed = set(itertools.product((None, *sp.states), sp.events, sp.states, (None, *sp.outcomes)))
        self._handlers = {
            "lifecycle.transition": self._transition,
            "lifecycle.cancel": self._cancel,
            "lifecycle.terminate": self._terminate,
            "lifecycle.terminate_now": self._terminate_now,
            "lifecycle.callback_error": self._callback_error,
            "lifecycle.slot_quarantined": self._slot_event,
            "lifecycle.buffer_recovered": self._slot_event,
            "lifecycle.late_event": self._late_or_rejected,
            "lifecycle.illegal_transition": self._late_or_rejected,
            "lifecycle.health": self._health,
            "lifecycle.collective_desync": self._collective_desync,
            "lifecycle.log_level": self._log_level,
        }
        assert set(self._handlers) == set(_EVENT_NAMES)

    @property
    def events(self) -> int:
        """Events replayed so far (lines that parsed to an event with a known name and valid common keys)."""
        return sum(self.event_counts.values())

    # -------------------------------------------------------------------- findings
    def _find(self, kind: str, line: int, message: str, rank=None, request=None, file=None, **extra) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.keep_findings:
            self.findings.append(Finding(kind, file or self._file, line, message, rank, request, extra))

    def _mark(self, s: list, kind: str) -> None:
        k = s[_S_KINDS]
        if k is None:
            s[_S_KINDS] = [kind]
        elif kind not in k:
            k.append(kind)

    # -------------------------------------------------------------------- input
    def feed_file(self, path: str | Path) -> None:
        self.feed_files([path])

    def feed_files(self, paths: Iterable[str | Path]) -> None:
        paths = [str(p) for p in paths]
        self.files.extend(paths)
        if len(paths) == 1:
            self._feed_one(paths[0])
        elif paths:
            self._feed_merged(paths)

    def _feed_one(self, path: str) -> None:
        """Parse a run of lines, then replay it: alternating the JSON parser and the replay per line costs
        more (each evicts the other's code from the CPU's instruction cache)."""
        self._file = path
        loads = _line_parser()
        event = self.event
        events_before, last, unread = self.events, 0, False
        try:
            for first, lines in iter_blocks(path, self.max_line):
                if lines is TOO_LONG:
                    last = first
                    self.lines += 1
                    self._find("malformed", first, self._too_long(), file=path)
                    continue
                last = first + len(lines) - 1
                self.lines += len(lines)
                if max(map(len, lines)) > MAX_DEPTH:
                    parsed = None  # a line that might nest too deep for the parser: checked one by one
                else:
                    try:
                        parsed = list(map(loads, lines))
                    except (ValueError, RecursionError):  # a bad line: parse one by one (findings in line order)
                        parsed = None
                if parsed is not None:
                    for lineno, d in enumerate(parsed, first):
                        event(d, lineno)
                    parsed = d = None  # freed before the next run is parsed, which then reuses warm memory
                    continue
                for lineno, d, not_json in self._parse_each(first, lines, loads):
                    if not_json is None:
                        event(d, lineno)
                    else:
                        self._find("malformed", lineno, not_json, file=path)
        except _Unreadable as exc:
            unread = True
            self._find("unreadable", exc.args[0], f"cannot read further: {exc.args[1]}", file=path)
        self._fed_file(path, last, self.events != events_before, unread)

    def _fed_file(self, path: str, lines: int, got_events: bool, unread: bool) -> None:
        """Note what a read of ``path`` found (its last line number, any event, a read error); see finish()."""
        rec = self._fed.get(path)
        if rec is None:
            self._fed[path] = [lines, got_events, unread]
        else:
            rec[0] = max(rec[0], lines)
            rec[1] = rec[1] or got_events
            rec[2] = rec[2] or unread

    def _too_long(self) -> str:
        return f"line longer than {self.max_line} bytes; skipped"

    def _parse_each(self, first: int, lines: list[bytes], loads) -> Iterator[tuple[int, object, str | None]]:
        """``(lineno, parsed, None)`` per line, ``(lineno, None, message)`` for one that is not JSON; a blank
        line is skipped and not counted."""
        for lineno, raw in enumerate(lines, first):
            if len(raw) > MAX_DEPTH and _too_deep(raw, MAX_DEPTH):
                yield lineno, None, f"not JSON: nested deeper than {MAX_DEPTH} levels"
                continue
            try:
                d = loads(raw)
            except (ValueError, RecursionError) as exc:
                if _blank(raw):
                    self.lines -= 1
                else:
                    yield lineno, None, f"not JSON: {_short(exc)}"
                continue
            yield lineno, d, None

    def _feed_merged(self, paths: list[str]) -> None:
        """Interleave several files (one per rank) by time, so cross-rank state stays small.

        Each file keeps its own order; the merge key is the event's monotonic time (relative to the
        file's first event when the files' clocks are more than an hour apart: different hosts; the files of one
        process, whose first events have the same ``proc``, have one clock and the earliest start).  A file's
        first time is looked for in its first ``_LOOKAHEAD`` lines only, so what is held before the merge
        starts stays bounded (a file with no timestamps is not read whole first).
        """
        loads = _line_parser()
        bad = object()  # the item of a line that is a finding (kind, message), reported when merged
        last = [0] * len(paths)  # per source: its last line number read
        unread = [False] * len(paths)
        got = [False] * len(paths)  # per source: an event replayed

        def source(i: int, path: str):
            try:
                for first, lines in iter_blocks(path, self.max_line):
                    if lines is TOO_LONG:
                        last[i] = first
                        self.lines += 1
                        yield bad, first, ("malformed", self._too_long())
                        continue
                    last[i] = first + len(lines) - 1
                    self.lines += len(lines)
                    for lineno, d, not_json in self._parse_each(first, lines, loads):
                        yield (d, lineno, None) if not_json is None else (bad, lineno, ("malformed", not_json))
            except _Unreadable as exc:
                unread[i] = True
                yield bad, exc.args[0], ("unreadable", f"cannot read further: {exc.args[1]}")

        def tkey(d) -> int | None:
            t = d.get("t_mono_ns") if type(d) is dict else None
            return t if type(t) is int else None

        chains = []
        firsts: list[int | None] = []
        procs = []  # the proc of the event that gave each file's first time (None: none, or not an int)
        for i, path in enumerate(paths):
            g = source(i, path)
            buffered = []
            first = proc = None
            for item in g:
                buffered.append(item)
                first = tkey(item[0])
                if first is not None:
                    proc = item[0].get("proc")
                if first is not None or len(buffered) >= _LOOKAHEAD:
                    break
            firsts.append(first)
            procs.append(proc if type(proc) is int else None)
            chains.append(itertools.chain(buffered, g))
        known = [f for f in firsts if f is not None]
        relative = bool(known) and max(known) - min(known) > 3600 * 10**9
        if relative:  # the files of one process (one proc: a rotated log) have one clock, so one start: their earliest
            start: dict[int, int] = {}
            for f, p in zip(firsts, procs):
                if f is not None and p is not None:
                    start[p] = min(start.get(p, f), f)
            firsts = [start[p] if f is not None and p is not None else f for f, p in zip(firsts, procs)]
        heap: list = []
        last_key = [0] * len(paths)

        def push(i: int, item) -> None:
            k = tkey(item[0])
            if k is None:
                k = last_key[i]
            elif relative and firsts[i] is not None:
                k -= firsts[i]
            last_key[i] = k
            heapq.heappush(heap, (k, i, item[1], item))

        for i, ch in enumerate(chains):
            nxt = next(ch, None)
            if nxt is not None:
                push(i, nxt)
        event = self.event
        while heap:
            _, i, _, (d, lineno, finding) = heapq.heappop(heap)
            self._file = paths[i]
            if d is bad:
                self._find(finding[0], lineno, finding[1], file=paths[i])
            elif got[i]:
                event(d, lineno)
            else:  # (self.events is summed only until this source's first event)
                n = self.events
                event(d, lineno)
                got[i] = self.events != n
            nxt = next(chains[i], None)
            if nxt is not None:
                push(i, nxt)
        for i, path in enumerate(paths):
            self._fed_file(path, last[i], got[i], unread[i])

    # -------------------------------------------------------------------- the hot path
    def event(self, d: object, line: int) -> None:
        """Replay one parsed event (``line`` is its line number in the current file)."""
        try:
            name, rank, seq, pid, t, req, tbl, role, schema = _common_fields(d)
        except (KeyError, TypeError):  # a key missing (a missing request or table reads as null), or not an object
            if type(d) is not dict or "role" not in d:
                self._bad_common(d, line)
                return
            name, rank, seq, pid, t, req, tbl, role, schema = map(d.get, _COMMON_KEYS)
        if type(name) is not str or type(rank) is not int or type(seq) is not int or type(pid) is not int \
                or type(t) is not int or rank < 0 or seq < 0 or pid < 0 or schema != SCHEMA_ID \
                or role not in _ROLES:
            self._bad_common(d, line)
            return
        proc, eng = d.get("proc"), d.get("engine")  # optional (_OPTIONAL_IDS; older logs lack them)
        if (proc is not None and (type(proc) is not int or proc < 0)) or \
                (eng is not None and (type(eng) is not int or eng < 0)):
            self._bad_common(d, line)
            return
        if req is not None and type(req) is not int:
            self._find("malformed", line, f"'request' must be an int or null, got {_tname(req)}", rank=rank)
            return
        if tbl != self.digest:
            self._table_mismatch(tbl, line, rank)
        handler = self._handlers.get(name)
        if handler is not None:
            self.event_counts[name] += 1
        self.ranks.add(rank)
        # per-process sequence: keyed by proc; without it by (file, pid), as processes in different files may share
        # a pid (containers)
        sk = proc if proc is not None else (self._file, pid)
        st = self.streams.get(sk)
        if st is None:
            self.streams[sk] = [seq + 1, t, None, -seq, self._file, seq, seq == 0, pid, proc]
            if seq != 0:
                self._find("stream_start", line, f"pid {pid}: stream starts at seq {seq}, not 0 (rotated log?)",
                           rank=rank)
        else:
            if t > st[_ST_MAX_T]:
                st[_ST_MAX_T] = t
            if seq == st[_ST_NEXT]:
                st[_ST_NEXT] = seq + 1
            else:
                self._seq_mismatch(st, st[_ST_PID], seq, line, rank)
        if handler is None:
            self._find("malformed", line, f"unknown event name {name[:80]!r}", rank=rank, request=req)
        else:
            handler(d, name, req, rank, sk, eng, role if eng is None else (sk, eng), t, line)

    def _table_mismatch(self, tbl: object, line: int, rank: int) -> None:
        if _new_bad_table(self._bad_tables, tbl):
            self._find("table_mismatch", line, f"event logged with table {_rl(tbl)}; auditing with {self.digest}",
                       rank=rank)

    def _bad_common(self, d: object, line: int) -> None:
        if type(d) is not dict:
            self._find("malformed", line, f"not a JSON object but {type(d).__name__}")
            return
        probs = []
        for k, want in (("event", str), ("rank", int), ("seq", int), ("pid", int), ("t_mono_ns", int)):
            v = d.get(k, _MISSING)
            if v is _MISSING:
                probs.append(f"missing '{k}'")
            elif type(v) is not want:
                probs.append(f"'{k}' must be {want.__name__}, got {_tname(v)}")
            elif want is int and k != "t_mono_ns" and v < 0:
                probs.append(f"'{k}' must be >= 0")
        v = d.get("role", _MISSING)
        if v is _MISSING:
            probs.append("missing 'role'")
        elif v not in _ROLES:
            probs.append("'role' must be 'sender', 'receiver' or null")
        v = d.get("schema", _MISSING)
        if v is _MISSING:
            probs.append("missing 'schema'")
        elif v != SCHEMA_ID:
            probs.append(f"'schema' must be '{SCHEMA_ID}'")
        for k in _OPTIONAL_IDS:
            v = d.get(k)
            if v is not None and type(v) is not int:
                probs.append(f"'{k}' must be int or null, got {_tname(v)}")
            elif v is not None and v < 0:
                probs.append(f"'{k}' must be >= 0")
        rank = d.get("rank") if type(d.get("rank")) is int else None
        req = d.get("request") if type(d.get("request")) is int else None
        self._find("malformed", line, "; ".join(probs), rank=rank, request=req)

    def _seq_mismatch(self, st: list, pid: int, seq: int, line: int, rank: int) -> None:
        expected = st[_ST_NEXT]
        missing = st[_ST_MISSING]
        if seq > expected:
            n = seq - expected
            if n <= 4096:
                if missing is None:
                    missing = st[_ST_MISSING] = [0, []]
                missing[1].append([expected, seq, (self._file, line, rank)])
                missing[0] += n
                if missing[0] > 8192:
                    self._flush_missing(st, pid, keep=4096)
            else:
                self._find("seq_gap", line, f"pid {pid}: {n} line(s) lost (seq {expected}..{seq - 1})", rank=rank,
                           pid=pid, first=expected, last=seq - 1)
            st[_ST_NEXT] = seq + 1
        elif not st[_ST_HEAD] and seq < st[_ST_FIRST] <= _HEAD_REORDER and expected - st[_ST_FIRST] <= _HEAD_REORDER:
            st[_ST_HEAD] = True  # the head, out of order: the other seqs before the stream's first one are awaited
            if missing is None:
                missing = st[_ST_MISSING] = [0, []]
            where = (self._file, line, rank)
            missing[1][:0] = [r for r in ([0, seq, where], [seq + 1, st[_ST_FIRST], where]) if r[0] < r[1]]
            missing[0] += st[_ST_FIRST] - 1
        elif missing is not None and (i := bisect.bisect_right(missing[1], seq, key=_RUN_FIRST) - 1) >= 0 \
                and seq < missing[1][i][1]:
            # a line written out of order (two threads emitting): not lost
            runs = missing[1]
            a, b, where = runs[i]
            if b - a == 1:
                del runs[i]
            elif seq == a:
                runs[i][0] = a + 1
            elif seq == b - 1:
                runs[i][1] = b - 1
            else:
                runs[i][1] = seq
                runs.insert(i + 1, [seq + 1, b, where])
            missing[0] -= 1
        elif seq == 0:
            st[_ST_HEAD] = True
            self._flush_missing(st, pid)
            st[_ST_NEXT] = 1  # the process restarted its sequence (or a second run appended to the file)
            self._find("stream_start", line, f"pid {pid}: seq restarts at 0 after seq {expected - 1} (a second run "
                       "appended, or the same log given twice?)", rank=rank)
        else:
            self._find("seq_gap", line, f"pid {pid}: seq {seq} repeated or out of order (expected {expected})",
                       rank=rank, pid=pid, first=seq, last=seq)
        st[_ST_BIAS] += 1 + expected - st[_ST_NEXT]  # this event counted (see the invariant)

    def _flush_missing(self, st: list, pid: int, keep: int = 0) -> None:
        """Report the awaited seqs as lost, all but the ``keep`` highest: one finding per run of consecutive seqs."""
        missing = st[_ST_MISSING]
        if not missing or not missing[0]:
            return
        drop = missing[0] - keep
        runs = missing[1]
        i = 0
        while drop > 0:
            a, b, (f, ln, rank) = runs[i]
            if b - a > drop:  # the run's highest seqs are kept
                runs[i][0] = b = a + drop
            else:
                i += 1
            what = f"seq {a}" if a == b - 1 else f"seq {a}..{b - 1}"
            self._find("seq_gap", ln, f"pid {pid}: {b - a} line(s) lost ({what})", rank=rank, file=f,
                       pid=pid, first=a, last=b - 1)
            drop -= b - a
            missing[0] -= b - a
        del runs[:i]
        if not runs:
            st[_ST_MISSING] = None

    def _transition(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        try:
            move = _move_fields(d)
        except KeyError:  # a missing key reads as null
            move = tuple(map(d.get, _MOVE_KEYS))
        frm, trig, to, outcome, deferred = move
        key = (rank, req, sid)
        s = self.live.get(key)
        try:
            edge = s[_S_MOVES].get(trig) if s is not None and frm == s[_S_STATE] else None
            # the logged outcome is the session's after the move: the row's, or the one it had
            legal = edge is not None and to == edge[_E_DST] and outcome == (edge[_E_OUT] or s[_S_OUTCOME])
        except TypeError:  # a JSON list or object where a name belongs (unhashable)
            legal = False
        if legal:
            count, tis, into, to, moves, _ = edge
            edge[_E_COUNT] = count + 1
        else:
            s = self._check_transition(key, s, frm, to, trig, outcome, d, sk, eng, t, line)
            if s is None:
                return
            tis = self.tis.get(s[_S_STATE])
            into = self._into[to]
            moves = self._moves[to]
        # the move: time in the state we leave (the replayed one), then the new state
        if tis is not None:
            dt = t - s[_S_ENTERED]
            tis.add(dt if dt > 0 else 0)
        s[_S_STATE] = to
        s[_S_MOVES] = moves
        s[_S_ENTERED] = t
        s[_S_LAST_LINE] = line
        s[_S_LAST_FILE] = self._file
        hist = s[_S_HIST]
        hist.append(to)
        hist.append(t)
        if outcome is not None:
            s[_S_OUTCOME] = outcome
        if deferred is True:
            s[_S_DEFERRED] = True
            if into != _INTO_FINAL:
                self._deferred_order(s, line, rank, req, f"{frm} --{trig}--> {to} marked deferred: only the deferred "
                                     f"retry's move to {'/'.join(self.spec.final)} is")
        if into == _INTO_TERMINAL:
            if outcome is not None:
                self.outcomes[outcome] += 1
                self._xrank(s, req, d.get("role"), rank, outcome, line)
            if to != "Quiesced" and s[_S_SLOT] >= 0:
                sl = self.slots.get((s[_S_STREAM], s[_S_ENGINE], s[_S_SLOT]))
                if sl is not None and sl[1] == key:
                    sl[0] = "poisoned"
        elif into == _INTO_FINAL:
            if (deferred is True) != bool(s[_S_DEFER_LINE]) and not (deferred is True and s[_S_ADOPTED]):
                self._deferred_order(s, line, rank, req, (
                    f"deferred {to} transition with no Deferred terminate before it" if deferred is True else
                    f"{to} transition not marked deferred, though terminate() was deferred at "
                    f"{_at(s[_S_DEFER_FILE], s[_S_DEFER_LINE], self._file)} (the deferred retry is that transition)"))
            self._fold(key, s, t, line)

    def _check_transition(self, key, s: list | None, frm, to, trig, outcome, d: dict, sk, eng, t: int,
                          line: int) -> list | None:
        """Every transition but a legal move of a live session: validate, report, create or adopt the
        session, count the edge.  Returns the session to move to ``to``, or None when the event ends here."""
        rank, req, _ = key
        try:
            well_formed = type(req) is int and (frm, trig, to, outcome) in self._well_formed
        except TypeError:  # a JSON list or object where a name belongs (unhashable)
            well_formed = False
        if not well_formed:
            self._malformed_transition(req, rank, frm, to, trig, outcome, line)
            return None
        if frm is None:
            self._create(key, s, to, trig, outcome, d, sk, eng, t, line)
            return None
        if s is None:
            tomb = self.tombs.get(key)
            if tomb is not None:
                if to in self.final:
                    self._find("double_termination", line,
                               f"second transition to {to} (first terminated at "
                               f"{_at(tomb[_S_LAST_FILE], tomb[_S_LAST_LINE], self._file)})",
                               rank=rank, request=req, first_line=tomb[_S_LAST_LINE])
                else:
                    self._illegal(frm, trig, to, line, rank, req, None, "transition after the final state")
                return None
            # the session started before this log did, or was live when its engine's INFO lines were filtered out
            # (_cut): adopt it at from_state
            u = self._unseen.get(key) if self._unseen else None
            self._find("adopted_session", line, f"first seen in state {frm} (advertise not in the log)" if u is None
                       else f"seen again in state {frm} after its engine's INFO lines were filtered out by level (last "
                       f"seen in state {u[0][_S_STATE]})", rank=rank, request=req)
            s = self._new_session(key, frm, d, sk, eng, t, line)
            s[_S_ADOPTED] = True
            s[_S_OUTCOME] = outcome  # unknown before this line: a row without an outcome logs the one it had
        cur = s[_S_STATE]
        edge = self._moves[frm].get(trig)
        dst = edge[_E_DST] if edge is not None else None
        if cur != frm or dst != to:
            if to in self.final and frm not in self.terminal and dst is None:
                self._find("terminated_before_terminal", line,
                           f"{frm} --{trig}--> {to}: terminated before reaching a terminal state "
                           f"({'/'.join(self.spec.terminal)})", rank=rank, request=req)
                self._mark(s, "terminated_before_terminal")
                ie = self.illegal_edges
                ie[(frm, trig, to)] = ie.get((frm, trig, to), 0) + 1
            elif cur != frm and dst == to:
                self._illegal(frm, trig, to, line, rank, req, s, f"replayed state is {cur}, the log says {frm}")
            else:
                self._illegal(frm, trig, to, line, rank, req, s,
                              "not in the table" if dst is None else f"the table says {frm} + {trig} = {dst}")
        else:
            edge[_E_COUNT] += 1
            want = edge[_E_OUT] or s[_S_OUTCOME]
            if outcome != want:
                self._illegal(frm, trig, to, line, rank, req, s, (
                    f"outcome {outcome}, but the table says {frm} + {trig} = {to} / {want}" if edge[_E_OUT] else
                    f"outcome {outcome}, but the session's outcome is {want} and this row sets none"), count=False)
        return s

    def _malformed_transition(self, req, rank: int, frm, to, trig, outcome, line: int) -> None:
        states = self.states
        if type(req) is not int or not _member(to, states) or not _member(trig, self.events_set) or (
                frm is not None and not _member(frm, states)):
            self._find("malformed", line,
                       f"lifecycle.transition: bad request/from_state/to_state/trigger "
                       f"{_r(req)}/{_r(frm)}/{_r(to)}/{_r(trig)}", rank=rank,
                       request=req if type(req) is int else None)
        else:
            self._find("malformed", line, f"lifecycle.transition: unknown outcome {_r(outcome)}", rank=rank,
                       request=req)

    def _create(self, key, s: list | None, to: str, trig: str, outcome, d: dict, sk, eng, t: int, line: int) -> None:
        """The creating event (from_state null)."""
        rank, req, _ = key
        if trig != self.create_event or to != self.initial:
            self._illegal(None, trig, to, line, rank, req, s,
                          f"creating event must be {self.create_event} -> {self.initial}")
            return
        if s is not None:
            self._illegal(None, trig, to, line, rank, req, s, f"advertise of a live session (state {s[_S_STATE]})")
            return
        tomb = self.tombs.pop(key, None)
        if tomb is not None:
            if self._awaiting:
                self._unawait(key)
            self._check_tomb(tomb)
            tomb[_S_KEY] = None  # removed: skipped in self._tomb_order
            if len(self._tomb_order) > 2 * len(self.tombs) + 64:  # drop the removed ones: O(1) amortized
                self._tomb_order = deque(x for x in self._tomb_order if x[_S_KEY] is not None)
        self._created += 1
        s = self._new_session(key, to, d, sk, eng, t, line)
        if outcome is not None:  # the creating row sets none (spec.py checks the table for it)
            self._illegal(None, trig, to, line, rank, req, s, f"outcome {outcome}, but a session starts without one",
                          count=False)  # (the session keeps none: the lines after it are checked against that)
        if s[_S_SLOT] >= 0:
            self._lease(s, key, (sk, eng, s[_S_SLOT]), line, rank, req, d.get("generation"))

    def _new_session(self, key, state: str, d: dict, sk, eng, t: int, line: int) -> list:
        slot = d.get("slot")
        s = [False, 0, 0, self._file, line, 0, 0, self._file, None, None, key, None,
             state, t, t, d.get("role"), slot if type(slot) is int and slot >= 0 else -1, sk, None, line, [state, t],
             self._moves[state], eng, False]
        if self._unseen:  # (seen again: judged from here on)
            self._unseen.pop(key, None)
        self.live[key] = s
        self.requests += 1
        return s

    def _illegal(self, frm, trig, to, line, rank, req, s, why: str, count: bool = True) -> None:
        """An illegal_transition finding; ``count``: the move is not in the table, so it joins illegal_edges (a
        row's move with the wrong outcome is counted on its row)."""
        if count:
            ie = self.illegal_edges
            ie[(frm, trig, to)] = ie.get((frm, trig, to), 0) + 1
        self._find("illegal_transition", line, f"{frm or '*'} --{trig}--> {to}: {why}", rank=rank, request=req)
        if s is not None:
            self._mark(s, "illegal_transition")

    def _lease(self, s: list, key, sk: tuple, line: int, rank: int, req: int, gen) -> None:
        """Slots are keyed (stream, engine, slot): one engine's pool (both roles share it); two engines in one
        process have two pools."""
        slot = sk[2]
        prev = self.slots.get(sk)
        if prev is not None:
            status, owner, pf, pl, _ = prev
            if status == "held":
                why = f"slot {slot} leased while still held by live request {owner[1]} ({_at(pf, pl, self._file)})"
            else:
                why = (f"slot {slot} leased again after it was {status} by request {owner[1]} at {pf}:{pl} "
                       f"with no buffer_recovered")
            self._find("slot_reuse", line, why, rank=rank, request=req, slot=slot, previous_request=owner[1],
                       previous_line=pl, previous_status=status)
            self._mark(s, "slot_reuse")
        self.slots[sk] = ["held", key, self._file, line, gen if type(gen) is int else None]

    def _xrank(self, s: list, req: int, role, rank: int, outcome: str, line: int) -> None:
        """Compare a terminal outcome with the first one of the same request and role on other ranks (the
        tensor-parallel ranks of one side; a sender is never compared with a receiver).  Every outcome is
        recorded, whether or not other ranks have been seen yet (a rank's first line may come later), in a
        window of ``window`` (request, role) entries, oldest evicted first (counted as window_evicted once
        several ranks were seen).  A rank that reports the request again starts a new lifetime of it (the id
        was reused)."""
        xk = (req, role)
        x = self.xrank.get(xk)
        # x: [outcome, first rank, the other ranks (None until one reports: no set per entry), reported, file, line]
        if x is None or rank == x[1] or (x[2] is not None and rank in x[2]):
            if x is not None:
                del self.xrank[xk]
            elif len(self.xrank) >= self.window:
                self.xrank.pop(next(iter(self.xrank)))
                if len(self.ranks) > 1:
                    self.counts["window_evicted"] = self.counts.get("window_evicted", 0) + 1
            self.xrank[xk] = [outcome, rank, None, False, self._file, line]
            return
        if x[2] is None:
            x[2] = {rank}
        else:
            x[2].add(rank)
        if x[0] != outcome and not x[3]:
            x[3] = True
            self._find("rank_disagreement", line,
                       f"rank {rank} says {outcome}, rank {x[1]} said {x[0]} ({x[4]}:{x[5]})", rank=rank,
                       request=req, outcomes={str(x[1]): x[0], str(rank): outcome}, other_line=x[5],
                       other_file=x[4])
            self._mark(s, "rank_disagreement")

    def _cancel(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        r = d.get("result")
        if not _member(r, self.spec.cancel_frees):
            self._find("malformed", line, f"lifecycle.cancel: unknown result {_rl(r)}", rank=rank, request=req)
            return
        self._check_result("cancel", r, d.get("state"), line, rank, req, sid)

    def _check_result(self, call: str, r: str, state, line: int, rank: int, req, sid) -> None:
        """A result checked against the state the line logs (the session's before the call; null for NotFound,
        not checked): Terminated, or a cancel result that frees now, from a non-terminal state let the executor
        free buffers the transport may still touch.  The result is logged right after the moves the call made (in
        its critical section), so the live session as replayed is in the row's state: the state logged on a row that
        moves nothing (.stay: AlreadyComplete logged while the session is InFlight told the executor to free buffers
        in flight; AlreadyTerminated, a live session released), the row's destination on a moving row (none live
        when the move ended it: its deferred retry ran, or it was Terminated; CancelledBeforeAdvertise logged while
        the session is InFlight, the same).  Deferrals (.defer) are deferred_order's."""
        key = (state, call)
        ok = self._results.get(key) if type(state) is str else None
        if ok is None:
            return
        if r not in ok:
            self._find("wrong_result", line, f"{call}() returned {r} in state {state}; the table gives "
                       f"{' or '.join(ok)}", rank=rank, request=req)
        cell = self._cells[key]
        if type(req) is int and (cell == ".stay" or cell in self._into):
            s = self._session(rank, req, sid, False)
            if s is not None and s[_S_STATE] != (state if cell == ".stay" else cell):
                self._find("result_state_mismatch", line, f"{call}() returned {r} in state {state}, but the session "
                           f"is {s[_S_STATE]} (since {_at(s[_S_LAST_FILE], s[_S_LAST_LINE], self._file)})" + (
                               "" if cell == ".stay" else f", not {cell}, where the call moves it"),
                           rank=rank, request=req)
                self._mark(s, "result_state_mismatch")

    def _late_or_rejected(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        trig, state = d.get("trigger"), d.get("state")
        if not _member(trig, self.events_set) or not _member(state, self.states):
            self._find("malformed", line, f"{name}: bad trigger/state {_rl(trig)}/{_rl(state)}", rank=rank,
                       request=req)
            return
        late = name == "lifecycle.late_event"
        cell = self._cells.get((state, trig))
        what = f"{'late' if late else 'engine rejected'} {trig} in state {state}"
        if cell != (".late" if late else None):
            self._find("misclassified_event", line, f"{what}, but the table says " + (
                f"{state} + {trig} = {cell}" if cell else "it is illegal"), rank=rank, request=req)
        elif type(req) is int:  # queued in causal order: the state is the live session's, as replayed
            s = self._session(rank, req, sid, False)
            if s is not None and s[_S_STATE] != state:
                self._find("misclassified_event", line, f"{what}, but the session is {s[_S_STATE]} (since "
                           f"{_at(s[_S_LAST_FILE], s[_S_LAST_LINE], self._file)})", rank=rank, request=req)
                self._mark(s, "misclassified_event")
        if late:
            self.late[(state, trig)] = self.late.get((state, trig), 0) + 1
        else:
            self.rejected[(state, trig)] = self.rejected.get((state, trig), 0) + 1
            self._find("rejected_event", line, f"engine rejected {trig} in state {state} (illegal call)", rank=rank,
                       request=req)

    def _slot_event(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        slot = d.get("slot")
        if type(slot) is not int or type(d.get("generation")) is not int:
            self._find("malformed", line, f"{name}: slot/generation must be ints", rank=rank, request=req)
            return
        key = (sk, eng, slot)
        gen = d.get("generation")
        if name == "lifecycle.buffer_recovered":
            # evidence frees the slot's lease of its own generation only (a stale transfer's is the ABA that
            # generations exist for); a lease whose generation was not an int is freed by any.  Only a quarantined
            # slot: the engine recovers none other, and a live session's hold (held, or poisoned until terminated)
            # freed here let the slot be leased again while its transfer was still in flight
            sl = self.slots.get(key)
            if sl is not None and sl[0] == "quarantined" and (sl[4] is None or sl[4] == gen):
                del self.slots[key]
        else:
            self.slots[key] = ["quarantined", (rank, req, sid), self._file, line, gen]

    def _callback_error(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        self._find("callback_error", line, f"on_terminate raised {_rl(d.get('error'))}", rank=rank, request=req)

    def _health(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        if d.get("healthy") is False:
            self._find("unhealthy", line, "engine unhealthy: " + _health_reasons(d.get("reasons")), rank=rank)

    def _collective_desync(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        self._find("collective_desync", line,
                   f"collective #{_cut(str(d.get('seq_no')))} diverged in {_cut(str(d.get('field')))}: "
                   f"sites {_cut(str(d.get('sites')))}", rank=rank)

    def _log_level(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        filtered = d.get("info_filtered")
        if type(filtered) is not bool:
            self._find("malformed", line, "lifecycle.log_level: 'info_filtered' must be a bool", rank=rank)
            return
        key = (sk, eng)
        seq = d["seq"]
        if filtered:
            off = self._filtered.get(key)
            if off is None:  # (a second one, two threads logging the change: the first seq holds)
                off = self._filtered[key] = [seq, self._file, line, rank, d["pid"], [seq, None, d["pid"], eng]]
            self._cut(sk, eng, rank, off[5], f"from seq {seq}")
            return
        off = self._filtered.pop(key, None)
        self._find_filtered(d["pid"], eng, None if off is None else off[0], seq, line, rank)
        if off is None:
            stretch = [None, seq, d["pid"], eng]
        else:
            stretch = off[5]
            stretch[1] = seq
        self._cut(sk, eng, rank, stretch, f"up to seq {seq}")

    def _find_filtered(self, pid: int, eng, first, last, line: int, rank: int, file=None) -> None:
        """A stretch of an engine's lines its logger did not write (``first`` None: its start not logged, the logger
        writing no level then; ``last`` None: to the end of the log)."""
        self._find("log_filtered", line, f"{_who(pid, eng)}: INFO lines filtered "
                   f"out by level {_filtered_span(first, last)}: the log is incomplete there", rank=rank, file=file,
                   engine=eng, first=first, last=last)

    def _cut(self, sk, eng, rank: int, stretch: list, span: str) -> None:
        """An engine's INFO lines were filtered out by level (from a lifecycle.log_level line on, or up to one, or to
        the end of the log): what its sessions did meanwhile is not in the log.  Its end is read as the start of a
        log for that engine (only: a session is of one stream and engine), as its lines say nothing of the others.
        Each live session is set aside (``_unseen``): its next line is adopted, or it is reported ``unjudged`` at
        the end (it may have ended unlogged), never a leak, nor an illegal move from the state it was last seen in.
        Its tombstones go (the id may have been advertised again meanwhile: its next line is not a second
        termination), judged now as far as their lines are in the log (a deferral whose TerminateNow is not is
        ``unjudged``); its slots are forgotten (a release or buffer_recovered may be among the lines filtered out).
        Without ``engine`` keys, the engine is the one of the line's ``rank`` (an engine has one rank): a session of
        another rank, in another file or not, is another engine's, judged as before.
        Cost: one pass over the live sessions, tombstones and slots per lifecycle.log_level line, none per line."""
        live, unseen = self.live, self._unseen
        for key, s in [kv for kv in live.items() if kv[1][_S_STREAM] == sk and kv[1][_S_ENGINE] == eng and
                       (eng is not None or kv[0][0] == rank)]:
            del live[key]
            unseen[key] = [s, stretch]
        sid = (sk, eng)  # (logs without `engine` key sessions by rank and role: their tombstones name no stream)
        cut = [kv for kv in self.tombs.items() if
               (kv[0][2] == sid if eng is not None else type(kv[0][2]) is not tuple and kv[0][0] == rank)]
        who = _who(stretch[2], eng)
        for key, tomb in cut:
            del self.tombs[key]
            if self._awaiting:
                self._unawait(key)
            if tomb[_S_DEFERRED] and not tomb[_S_NOTICES]:
                f, ln = _deferred_at(tomb)
                self._find("unjudged", ln, f"{who}: deferred termination's delivery not judged: INFO lines filtered "
                           f"out by level {span}, where its TerminateNow may be", rank=key[0], request=key[1], file=f,
                           engine=eng)
            else:
                self._check_tomb(tomb)
            tomb[_S_KEY] = None  # removed: skipped in self._tomb_order
        for k in [k for k in self.slots if k[0] == sk and k[1] == eng]:
            del self.slots[k]

    def _terminate(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        r = d.get("result")
        if r not in self.spec.terminate_results or type(req) is not int:
            self._find("malformed", line, f"lifecycle.terminate: bad result/request {_r(r)}/{_r(req)}", rank=rank)
            return
        self._check_result("terminate", r, d.get("state"), line, rank, req, sid)
        if r == "Deferred" or r == "AlreadyDeferred":
            s = self._session(rank, req, sid, True)
            if s is not None and len(s) == _TOMB:  # (a tombstone)
                at = _at(s[_S_LAST_FILE], s[_S_LAST_LINE], self._file)
                self._deferred_order(None, line, rank, req, f"terminate() returned {r} after the session was "
                                     f"{'/'.join(self.spec.final)} ({at})")
                return
            if s is None:
                if r == "Deferred":
                    self._find("orphan_event", line, "terminate deferred for a request with no live session",
                               rank=rank, request=req)
                return
            first = s[_S_DEFER_LINE]
            if r == "AlreadyDeferred":
                if not first and not s[_S_ADOPTED]:
                    self._deferred_order(s, line, rank, req, "terminate() returned AlreadyDeferred with no Deferred "
                                         "before it")
                return
            if first:
                self._deferred_order(s, line, rank, req, f"terminate() returned Deferred twice (first at "
                                     f"{_at(s[_S_DEFER_FILE], first, self._file)}): a deferred session answers "
                                     f"AlreadyDeferred")
            elif s[_S_STATE] in self.terminal:
                self._deferred_order(s, line, rank, req, f"terminate() returned Deferred while the session was "
                                     f"already {s[_S_STATE]}, where the deferred retry had run")
            s[_S_DEFERRED] = True
            if not first:
                s[_S_DEFER_LINE] = line
                s[_S_DEFER_FILE] = self._file
        elif r == "Terminated":
            s = self._session(rank, req, sid, True)
            if s is None:  # (as a Deferred one is: it was ignored)
                self._find("orphan_event", line, "terminate returned Terminated for a request with no session in the "
                           "window", rank=rank, request=req)
                return
            s[_S_TERM_RESULTS] += 1
            if s[_S_TERM_RESULTS] == 2:
                self._find("double_termination", line, "terminate() returned Terminated twice", rank=rank,
                           request=req)
                self._mark(s, "double_termination")
            elif s[_S_DEFERRED]:  # the deferred retry releases it (on_terminate): the engine answers AlreadyTerminated
                self._find("double_termination", line, "terminate() returned Terminated for a session whose "
                           "termination was deferred (its TerminateNow releases it)", rank=rank, request=req)
                self._mark(s, "double_termination")

    def _session(self, rank: int, req: int, sid, tombs: bool, notice: bool = False) -> list | None:
        """The live session (or, with ``tombs``, the tombstone) an event about ``req`` refers to: by its key, or for
        an event with a null role and no engine (older logs), the first of that request's sessions on that rank by
        role; for a TerminateNow (``notice``), the first one deferred and not yet delivered, a Terminated one (a
        tombstone) first, if any."""
        live = self.live
        if sid is not None:
            k = (rank, req, sid)
            return live.get(k) or (self.tombs.get(k) if tombs else None)
        first = waiting = None
        for r in _NULL_ROLE_LOOKUP:  # (a plain loop: this runs for every terminate of an older log)
            k = (rank, req, r)
            s = live.get(k)
            if s is None and tombs:
                s = self.tombs.get(k)
            if s is None:
                continue
            if not notice:
                return s
            if s[_S_DEFERRED] and not s[_S_NOTICES]:
                if len(s) == _TOMB:
                    return s
                if waiting is None:
                    waiting = s
            if first is None:
                first = s
        return waiting or first

    def _terminate_now(self, d: dict, name: str, req, rank: int, sk, eng, sid, t: int, line: int) -> None:
        if type(req) is not int:
            self._find("malformed", line, "lifecycle.terminate_now needs an int request", rank=rank)
            return
        s = self._session(rank, req, sid, True, True)
        if s is None:
            self._find("orphan_event", line, "TerminateNow for a request with no session in the window", rank=rank,
                       request=req)
            return
        aw = self._awaiting
        if aw and aw.get(s[_S_KEY]) is s:
            # evicted from the window, awaiting this notice: back into the window, delivered, as the newest tombstone
            # (forgotten, a second release of it, a notice or a Terminated result, was only an orphan warning)
            self._unawait(s[_S_KEY])
            self._tomb_order.append(s)
            if len(self.tombs) > self.window + len(aw):
                self._evict_tomb()
        elif len(s) > _TOMB:  # live: the engine logs the notice after the deferred move to the final state
            self._deferred_order(s, line, rank, req, f"TerminateNow while the session is still {s[_S_STATE]}, before "
                                 f"its deferred {'/'.join(self.spec.final)} transition")
        s[_S_NOTICES] += 1
        n = s[_S_NOTICES]
        if n == 1:
            s[_S_NOTICE_LINE] = line
            s[_S_NOTICE_FILE] = self._file
        elif n == 2:
            self._find("deferred_delivery", line, "deferred termination delivered twice (TerminateNow #2)",
                       rank=rank, request=req, deliveries=2)
            self._mark(s, "deferred_delivery")
        # a notice without a deferral is judged when the tombstone is checked (a Deferred after it: deferred_order)

    def _deferred_order(self, s: list | None, line: int, rank: int, req: int, message: str) -> None:
        """A deferral's records in an order the engine never logs them in (DESIGN §5: the Deferred result, later the
        move to a terminal state and at once the deferred move to the final state, then one TerminateNow)."""
        self._find("deferred_order", line, message, rank=rank, request=req)
        if s is not None:
            self._mark(s, "deferred_order")

    def _fold(self, key, s: list, t: int, line: int) -> None:
        """The session reached the final state: aggregate it and leave a tombstone."""
        del self.live[key]
        self.terminated += 1
        life = t - s[_S_START]
        if life < 0:
            life = 0
        self.lifetime.add(life)
        hist = s[_S_HIST]
        frm = hist[-4] if len(hist) >= 4 else None
        slot = s[_S_SLOT]
        if slot >= 0:
            sk = (s[_S_STREAM], s[_S_ENGINE], slot)
            sl = self.slots.get(sk)
            if sl is not None and sl[1] == key:
                if frm == "Poisoned" or sl[0] == "poisoned":
                    sl[0] = "quarantined"
                else:
                    del self.slots[sk]
        slowest = self.slowest
        if s[_S_KINDS] is not None:
            if len(self.violating) < self.keep_violating:
                self.violating.append(self._summary(key, s, t, True))
        elif len(slowest) < self.top or life > slowest[0][0]:
            self._tiebreak += 1
            item = (life, self._tiebreak, self._summary(key, s, t, True))
            if len(slowest) < self.top:
                heapq.heappush(slowest, item)
            else:
                heapq.heapreplace(slowest, item)
        tomb = s[:_TOMB]
        tombs = self.tombs
        tombs[s[_S_KEY]] = tomb  # (the session's key object: one tuple per tombstone)
        self._tomb_order.append(tomb)
        if len(tombs) > self.window + len(self._awaiting):
            self._evict_tomb()

    def _evict_tomb(self) -> None:
        """Check and forget the oldest tombstone (or keep it aside while its deferred terminate awaits its notice)."""
        order = self._tomb_order
        while True:
            tomb = order.popleft()
            key = tomb[_S_KEY]
            if key is not None:
                if tomb[_S_DEFERRED] and not tomb[_S_NOTICES]:
                    self._await_notice(key, tomb)
                    return
                del self.tombs[key]
                if tomb[_S_NOTICES]:
                    self._check_tomb(tomb)
                return

    def _await_notice(self, key, tomb: list) -> None:
        """Keep an evicted tombstone whose deferred terminate awaits its TerminateNow (beyond the window: its
        notice may come after a whole batch's moves); past `window` of them, forget the oldest unchecked."""
        aw = self._awaiting
        aw[key] = tomb
        order = self._awaiting_order
        order.append(tomb)
        if len(aw) > self.window:
            while True:
                old = order.popleft()
                k = old[_S_KEY]
                if aw.get(k) is old:
                    del aw[k]
                    del self.tombs[k]
                    f, ln = _deferred_at(old)
                    self._find("delivery_unchecked", ln,
                               f"deferred termination's delivery not checked: evicted from the window, then from the "
                               f"{self.window} tombstones awaiting their TerminateNow (--window)", rank=k[0],
                               request=k[1], file=f)
                    return

    def _unawait(self, key) -> None:
        """``key``'s tombstone no longer awaits its notice (delivered, or the request advertised again)."""
        aw = self._awaiting
        if aw.pop(key, None) is not None and len(self._awaiting_order) > 2 * len(aw) + 64:
            self._awaiting_order = deque(x for x in self._awaiting_order if aw.get(x[_S_KEY]) is x)  # O(1) amortized

    def _check_tomb(self, tomb: list) -> None:
        rank, req, _ = tomb[_S_KEY]
        n = tomb[_S_NOTICES]
        if tomb[_S_DEFERRED] and n == 0:
            f, ln = _deferred_at(tomb)
            self._find("deferred_delivery", ln, "deferred termination never delivered (no TerminateNow)", rank=rank,
                       request=req, file=f, deliveries=0)
        elif not tomb[_S_DEFERRED] and n:
            self._find("deferred_delivery", tomb[_S_NOTICE_LINE],
                       "TerminateNow delivered for a termination that was never deferred", rank=rank, request=req,
                       file=tomb[_S_NOTICE_FILE], deliveries=n)

    def _summary(self, key, s: list, t_end: int, ended: bool) -> RequestSummary:
        hist = s[_S_HIST]
        segs = []
        for i in range(0, len(hist) - 2, 2):
            segs.append((hist[i], hist[i + 1], hist[i + 3]))
        if not ended:
            segs.append((hist[-2], hist[-1], max(t_end, hist[-1])))
        return RequestSummary(key[0], key[1], s[_S_ROLE], s[_S_FILE], s[_S_LINE], s[_S_START],
                              max(t_end, s[_S_START]), s[_S_OUTCOME], s[_S_STATE], segs, list(s[_S_KINDS] or ()),
                              ended)

    # -------------------------------------------------------------------- end of input
    def finish(self) -> AuditResult:
        # A file read to its end without one event: nothing was audited there (an empty log, the wrong file), so
        # the audit of it could not fail.  An unreadable file is already reported as such.
        for path, (n, got_events, unread) in self._fed.items():
            if not got_events and not unread:
                self._find("no_events", 0, f"no lifecycle events in {path} ({n} line{'' if n == 1 else 's'}): "
                           f"nothing to audit", file=path, lines=n)
        for st in self.streams.values():
            self._flush_missing(st, st[_ST_PID])
        for (sk, eng), (first, f, ln, rank, pid, stretch) in self._filtered.items():
            self._find_filtered(pid, eng, first, None, ln, rank, file=f)
            self._cut(sk, eng, rank, stretch, f"from seq {first} to the end of the log")
        self._filtered.clear()
        for tomb in self.tombs.values():
            self._check_tomb(tomb)
        self.tombs.clear()
        self._tomb_order.clear()
        self._awaiting.clear()
        self._awaiting_order.clear()
        for key, (s, (first, last, pid, eng)) in sorted(self._unseen.items(),
                                                         key=lambda kv: (kv[1][0][_S_FILE], kv[1][0][_S_LINE])):
            state = s[_S_STATE]
            self._find("unjudged", s[_S_LINE], f"{_who(pid, eng)}: live in state "
                       f"{state} ({_at(s[_S_LAST_FILE], s[_S_LAST_LINE], s[_S_FILE])}) when INFO lines were filtered "
                       f"out by level {_filtered_span(first, last)}, not seen after: not judged (it may have ended "
                       f"there)", rank=key[0], request=key[1], file=s[_S_FILE], engine=eng, first=first, last=last,
                       last_state=state)
            if s[_S_KINDS] is not None and len(self.violating) < self.keep_violating:
                self.violating.append(self._summary(key, s, self.streams[s[_S_STREAM]][_ST_MAX_T], False))
        self._unseen.clear()
        live_left = 0
        for key, s in sorted(self.live.items(), key=lambda kv: (kv[1][_S_FILE], kv[1][_S_LINE])):
            live_left += 1
            pid_t = self.streams[s[_S_STREAM]][_ST_MAX_T]
            age = max(pid_t - s[_S_START], 0)
            state = s[_S_STATE]
            if s[_S_DEFERRED] and state in self.terminal and s[_S_NOTICES] == 0:
                f, ln = _deferred_at(s)
                self._find("deferred_delivery", ln, f"deferred termination never delivered; session still {state}",
                           rank=key[0], request=key[1], file=f, deliveries=0)
                self._mark(s, "deferred_delivery")
            if age >= self.leak_age_ns and self.leak_age_ns >= 0:
                self._find("leak", s[_S_LINE], f"never terminated: last state {state} "
                           f"({_at(s[_S_LAST_FILE], s[_S_LAST_LINE], s[_S_FILE])}), "
                           f"age {age / 1e9:.3f}s at end of log", rank=key[0], request=key[1], file=s[_S_FILE],
                           last_state=state, age_ns=age, last_line=s[_S_LAST_LINE])
                self._mark(s, "leak")
            else:
                self._find("live", s[_S_LINE], f"still {state} at end of log, age {age / 1e9:.3f}s", rank=key[0],
                           request=key[1], file=s[_S_FILE], last_state=state, age_ns=age)
            if s[_S_KINDS] is not None and len(self.violating) < self.keep_violating:
                self.violating.append(self._summary(key, s, pid_t, False))
        edges: dict[tuple, int] = {(None, self.create_event, self.initial): self._created} if self._created else {}
        edges.update((e, rec[_E_COUNT]) for e, rec in self._edges.items() if rec[_E_COUNT])
        self.findings.sort(key=lambda f: (f.kind not in VIOLATION_KINDS, f.file, f.line, f.kind))
        streams = {_stream_label(st[_ST_PID], st[_ST_PROC], st[_ST_FILE]): {
                       "events": st[_ST_BIAS] + st[_ST_NEXT], "next_seq": st[_ST_NEXT], "file": st[_ST_FILE],
                       "first_seq": st[_ST_FIRST], "pid": st[_ST_PID], "proc": st[_ST_PROC]}
                   for st in self.streams.values()}
        return AuditResult(
            files=list(self.files), table_digest=self.digest, lines=self.lines, events=self.events,
            requests=self.requests, terminated=self.terminated, live=live_left, findings=self.findings,
            finding_counts=dict(self.counts), time_in_state=self.tis, lifetime=self.lifetime,
            outcomes=self.outcomes, event_counts={k: n for k, n in self.event_counts.items() if n}, edges=edges,
            illegal_edges=dict(self.illegal_edges), late=self.late, rejected=self.rejected,
            slowest=[x[2] for x in sorted(self.slowest, key=lambda x: (-x[0], x[1]))],
            violating=self.violating, streams=streams, ranks=sorted(self.ranks),
        )


_MISSING = object()
_RUN_FIRST = operator.itemgetter(0)  # an awaited run's first seq (Auditor._seq_mismatch's bisection)


def _stream_label(pid: int, proc: int | None, file: str) -> str:
    """A stream's name in AuditResult.streams: its proc, or for lines without one, its pid and file."""
    return f"proc {proc}" if proc is not None else f"pid {pid} in {file}"


def _member(v: object, names) -> bool:
    """``v in names`` for a collection of names (str), False for any other JSON value (lists and objects
    are unhashable)."""
    return type(v) is str and v in names


def _tname(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _who(pid, eng) -> str:
    """A stream's engine as a finding names it: "pid P, engine E" ("pid P" for a log without engine keys)."""
    return f"pid {pid}" if eng is None else f"pid {pid}, engine {eng}"


def _filtered_span(first, last) -> str:
    """The seqs between which an engine's INFO lines were filtered out (``first`` None: its start not logged;
    ``last`` None: to the end of the log)."""
    return (f"up to seq {last} (where it began is not in the log)" if first is None else
            f"from seq {first} to {'the end of the log' if last is None else f'seq {last}'}")


def _deferred_at(s: list) -> tuple[str, int]:
    """(file, line) a finding on a session's deferred termination points at: its Deferred result's, else its last
    line's."""
    return (s[_S_DEFER_FILE], s[_S_DEFER_LINE]) if s[_S_DEFER_LINE] else (s[_S_LAST_FILE], s[_S_LAST_LINE])


def _at(file: str, line: int, own: str) -> str:
    """Where a finding's message cites another line: "line N" in the finding's own file, else "FILE:N" (a session's
    lines may span files: a rotated log)."""
    return f"line {line}" if file == own else f"{file}:{line}"


def _r(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# A log value quoted in a kept finding's message is cut to this many characters (a value may be a line long, 1 MiB,
# and keep_findings of them were kept whole).  The native replay's messages are formatted here too, so both agree.
_MAX_QUOTED = 200


def _cut(s: str) -> str:
    return s if len(s) <= _MAX_QUOTED else s[:_MAX_QUOTED - 3] + "..."


def _rl(v: object) -> str:
    """repr(v), cut to _MAX_QUOTED characters."""
    return _cut(repr(v))


def _short(exc: BaseException) -> str:
    s = str(exc) or type(exc).__name__
    return s if len(s) <= 120 else s[:117] + "..."


def _log_paths(paths) -> list[str]:
    """``paths`` as a list of str (bytes decoded as the file system does).  One str given for the list was read
    as one path per character, a bytes path was audited as its repr, and a NUL byte raised a bare ValueError."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise InvalidArgument("paths", f"expected a list of log paths, got one {type(paths).__name__} "
                                       f"{_shown(paths):.80} (pass [path])")
    try:
        items = list(paths)
    except TypeError:
        raise InvalidArgument("paths", f"expected a list of log paths, got {type(paths).__name__}") from None
    except ValueError as exc:  # (a released memoryview; a ctypes py_object array with a NULL item)
        raise InvalidArgument("paths", f"expected a list of log paths, got a {type(paths).__name__} that cannot be "
                                       f"read ({exc})") from None
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, (str, bytes, os.PathLike)):
            raise InvalidArgument("paths", f"item {i}: expected a str or path, got {type(p).__name__}")
        try:
            s = os.fsdecode(os.fspath(p))
        except TypeError as exc:  # (an __fspath__ returning something else)
            raise InvalidArgument("paths", f"item {i}: {exc}") from None
        if "\0" in s:
            raise InvalidArgument("paths", f"item {i}: {s!r:.80} holds a NUL byte")
        out.append(s)
    return out


def audit_paths(paths: Iterable[str | Path], spec: _spec.Spec | None = None, *, native: bool | None = None,
                **kw) -> AuditResult:
    """Audit log files (one per rank, or merged; plain or gzip JSON lines).

    ``native``: None (default) takes the choice from ``LIFECYCLE_AUDIT_ENGINE``: ``auto`` (or unset) uses the
    native replay when :func:`native_unavailable` allows it and the Python one otherwise, ``native`` requires
    it (:class:`InvalidArgument` naming the variable and the reason when it cannot be used), ``python``
    forces the Python :class:`Auditor`.  False forces the Python replay; True requires the native one
    (ValueError when it cannot be used).  Both give the same result.
    """
    paths = _log_paths(paths)
    kw = check_options(**kw)
    if type(native).__module__ == "numpy" and type(native).__name__ in ("bool", "bool_"):
        native = bool(native)
    if native is not None and not isinstance(native, bool):  # ('python' was true: it required the native replay)
        raise InvalidArgument("native", f"expected True, False or None, got {type(native).__name__}")
    if spec is not None and not isinstance(spec, _spec.Spec):
        raise InvalidArgument("spec", f"expected a lifecycle Spec (spec.load_default()), got {type(spec).__name__}")
    from_env = native is None
    if from_env:
        engine = os.environ.get(ENGINE_ENV, "auto").strip().lower() or "auto"
        if engine not in ENGINES:
            raise InvalidArgument(ENGINE_ENV, f"the environment variable must be 'auto' (the native replay where it "
                                              f"can be used, else python; the default), 'native' (required) or "
                                              f"'python', got {engine!r}")
        native = ENGINES[engine]
    if native is None:
        native = native_unavailable(spec, **kw) is None
    elif native and (why := native_unavailable(spec, **kw)) is not None:
        if from_env:
            raise InvalidArgument(ENGINE_ENV, f"{ENGINE_ENV}=native, but the native audit cannot be used: {why} "
                                              f"(set it to 'auto' to fall back to the python replay)")
        raise ValueError(f"the native audit cannot be used: {why}")
    if native:
        return _audit_native(paths, spec, **kw)
    a = Auditor(spec, **kw)
    a.feed_files(paths)
    return a.finish()


# ------------------------------------------------------------------------------------------------
# The native replay (lifecycle._core.AuditReplay): Python reads and formats, C++ parses and replays
# ------------------------------------------------------------------------------------------------

ENGINE_ENV = "LIFECYCLE_AUDIT_ENGINE"
ENGINES = {"auto": None, "native": True, "python": False}  # its values -> audit_paths' native; unset or empty is auto


def _native_core():
    try:
        from . import _core
    except ImportError:
        return None
    return _core if hasattr(_core, "AuditReplay") else None


_AUDITOR_OPTIONS = {name: p.default for name, p in inspect.signature(Auditor.__init__).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _native_options(**kw) -> dict:
    """Auditor's keyword arguments with its defaults filled in (an unknown keyword is a TypeError, as for
    Auditor): read from Auditor's own signature, so the defaults exist once."""
    unknown = sorted(set(kw) - set(_AUDITOR_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return {**_AUDITOR_OPTIONS, **kw}


def native_unavailable(spec: _spec.Spec | None = None, **kw) -> str | None:
    """Why :func:`audit_paths` cannot use the native replay for these arguments, or None when it can."""
    core = _native_core()
    if core is None:
        return "lifecycle._core is not built or has no AuditReplay (run `make build`)"
    if _ORJSON_LOADS is None:
        return "orjson is not installed (the native reader implements orjson's JSON semantics)"
    digest = (spec if spec is not None else _spec.load_default()).digest
    if digest != core.TABLE_DIGEST:
        return f"table {digest} is not the compiled table {core.TABLE_DIGEST}"
    try:
        check_options(**_native_options(**kw))
    except InvalidArgument as exc:
        return str(exc)
    return None


def _read_chunks(path: str) -> Iterator[bytes]:
    """The file (gzip decompressed) in pieces of at most ``_CHUNK`` bytes; read errors propagate to the caller.

    gzip is decompressed here, member by member, so that every byte before a bad spot is handed on before
    the error is raised: ``gzip.GzipFile.read`` raised for trailing junk or a cut stream without returning
    the 1 MiB it had decompressed (a log with junk after its gzip member audited as 0 events).  Output is
    bounded per piece, so a gzip bomb costs no memory; compressed input goes in ``_ZCHUNK`` reads, so many
    small members cost no large copies.  Zero bytes between or after members are padding (as gzip reads
    them)."""
    with open(path, "rb") as f:
        read = f.read
        data = read(_CHUNK)
        while 0 < len(data) < 2 and (more := read(_CHUNK)):  # (the magic, even with a tiny _CHUNK)
            data += more
        if data[:2] != b"\x1f\x8b":
            while data:
                yield data
                data = read(_CHUNK)
            return
        read = functools.partial(f.read, _ZCHUNK)
        d = zlib.decompressobj(wbits=31)  # a gzip member
        offset = 0  # compressed bytes consumed before ``data``
        while True:
            while data:
                out = d.decompress(data, _CHUNK)
                offset += len(data) - len(d.unconsumed_tail) - len(d.unused_data)
                data = d.unconsumed_tail or d.unused_data
                if out:
                    yield out
                if d.eof:  # a member ended: another may follow (concatenated gzip), after zero padding
                    rest = d.unused_data.lstrip(b"\0")
                    while len(rest) < 2 and (more := read()):
                        rest = (rest + more).lstrip(b"\0")
                    if not rest:
                        return
                    if rest[:2] != b"\x1f\x8b":
                        raise OSError(f"trailing data after a gzip member (compressed byte {offset} or later)")
                    d, data = zlib.decompressobj(wbits=31), rest
            data = read()
            if not data:
                tail = d.flush()  # output zlib still held when the last piece filled _CHUNK exactly
                if tail:
                    yield tail
                if d.eof:
                    return
                raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _span(raw: bytes, depth: int):
    """A JSON value the native reader validated, parsed as the Python replay sees it."""
    if depth > MAX_DEPTH:  # the reader reports such lines instead of parsing them
        raise AssertionError(f"native reader passed a value nested {depth} deep (> MAX_DEPTH {MAX_DEPTH})")
    return _ORJSON_LOADS(raw)


def _health_reasons(v) -> str:
    """A health event's reasons as a finding quotes them (cut to _MAX_QUOTED characters)."""
    reasons = v or ()
    if not isinstance(reasons, (list, dict, str)):
        reasons = (reasons,)
    return _cut("; ".join(map(str, reasons)))


class _NativeFindings:
    """Turns the native replay's findings into :class:`Finding` objects, formatting their messages exactly
    as the Python replay does; owns the table-mismatch dedup (Python ==) and count."""

    def __init__(self, files: list[str], keep: int):
        self.files = files
        self.keep = keep
        self.findings: list[Finding] = []
        self.bad_tables: set = set()
        self.table_mismatches = 0

    def drain(self, rep) -> None:
        files, append = self.files, self.findings.append
        for kind, fi, line, rank, req, pieces, extra in rep.take_findings():
            if kind == "table_mismatch":
                if not _new_bad_table(self.bad_tables, _span(pieces[1][1], pieces[1][2])):
                    continue
                self.table_mismatches += 1
                if self.table_mismatches > self.keep:
                    continue
            append(Finding(kind, files[fi], line, self._message(pieces), rank, req,
                           {k: self._extra(t, v) for k, t, v in extra}))

    def _message(self, pieces) -> str:
        out = []
        for i, (op, text, depth) in enumerate(pieces):
            if op == 0:
                out.append(text.decode())
            elif op == 6:  # a malformed line: orjson's own words, as the Python replay reports them
                try:
                    _ORJSON_LOADS(text)
                except (ValueError, RecursionError) as exc:
                    return f"not JSON: {_short(exc)}"
                return f"not JSON: {pieces[i + 1][1].decode()}"  # (orjson accepted it: a reader bug)
            elif op == 7:
                out.append(self.files[int(text)])
            elif op == 8:
                out.append(f"{int(text) / 1e9:.3f}")
            else:
                v = _span(text, depth)
                out.append(_rl(v) if op == 1 else _r(v) if op == 2 else _cut(str(v)) if op == 3 else
                           repr(v[:80]) if op == 4 else _health_reasons(v))
        return "".join(out)

    def _extra(self, t: int, v):
        if t == 3:
            return self.files[v]
        if t == 4:
            return {v[0]: v[1], v[2]: v[3]}
        return v


def _histogram(d: dict) -> LogHistogram:
    h = LogHistogram()
    h._buckets, h._max, h._total = d["buckets"], d["max"], d["total"]
    return h


def _audit_native(paths: list[str], spec: _spec.Spec | None, **kw) -> AuditResult:
    core = _native_core()
    opts = _native_options(**kw)
    digest = (spec if spec is not None else _spec.load_default()).digest
    rep = core.AuditReplay(**opts, max_depth=MAX_DEPTH, lookahead=_LOOKAHEAD, max_tables=_MAX_TABLES)
    sink = _NativeFindings(paths, opts["keep_findings"])
    if paths:
        # a file's number: the first index of its name (a name given twice is one file, as Python keys it)
        first: dict[str, int] = {}
        rep.begin([first.setdefault(p, i) for i, p in enumerate(paths)])
        chunks = [_read_chunks(p) for p in paths]
        while (i := rep.run()) >= 0:
            try:
                chunk = next(chunks[i], None)
            except (OSError, EOFError, zlib.error) as exc:
                rep.unreadable(i, f"{type(exc).__name__}: {exc}")
            else:
                if chunk is None:
                    rep.end(i)
                else:
                    rep.feed(i, chunk)
            sink.drain(rep)
    names = {f: i for i, f in enumerate(sorted(set(paths)))}
    raw = rep.finish([names[p] for p in paths])
    sink.drain(rep)
    findings = sink.findings
    findings.sort(key=lambda f: (f.kind not in VIOLATION_KINDS, f.file, f.line, f.kind))
    counts = {k: (sink.table_mismatches if k == "table_mismatch" else n) for k, n in raw["counts"]}

    def summary(x) -> RequestSummary:
        rank, req, role, role_depth, fi, line, start, end, outcome, state, segs, kinds, ended = x
        return RequestSummary(rank, req, _span(role, role_depth), paths[fi], line, start, end, outcome, state,
                              segs, kinds, ended)

    return AuditResult(
        files=list(paths), table_digest=digest, lines=raw["lines"], events=raw["events"],
        requests=raw["requests"], terminated=raw["terminated"], live=raw["live"], findings=findings,
        finding_counts=counts, time_in_state={s: _histogram(h) for s, h in raw["time_in_state"]},
        lifetime=_histogram(raw["lifetime"]), outcomes=dict(raw["outcomes"]),
        event_counts={k: n for k, n in raw["event_counts"] if n},
        edges={(a, e, b): n for a, e, b, n in raw["edges"]},
        illegal_edges={(a, e, b): n for a, e, b, n in raw["illegal_edges"]},
        late={(s, e): n for s, e, n in raw["late"]}, rejected={(s, e): n for s, e, n in raw["rejected"]},
        slowest=[summary(x) for x in raw["slowest"]], violating=[summary(x) for x in raw["violating"]],
        streams={_stream_label(pid, proc, paths[fi]): {"events": ev, "next_seq": nxt, "file": paths[fi],
                                                       "first_seq": first, "pid": pid, "proc": proc}
                 for pid, ev, nxt, fi, first, proc in raw["streams"]},
        ranks=raw["ranks"],
    )


def audit_events(events: Iterable[dict], spec: _spec.Spec | None = None, **kw) -> AuditResult:
    """Audit in-memory event dicts (e.g. from ``structlog.testing.capture_logs()``); line = index + 1."""
    a = Auditor(spec, **kw)
    a._file = "<events>"
    a.files.append("<events>")
    for i, d in enumerate(events, start=1):
        a.lines += 1
        a.event(d, i)
    return a.finish()


# ------------------------------------------------------------------------------------------------
# Text output and CLI
# ------------------------------------------------------------------------------------------------


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def format_text(res: AuditResult, max_findings: int = 50) -> str:
    out: list[str] = []
    w = out.append
    w(f"kv-lifecycle audit: {len(res.files)} file(s), {res.lines} line(s), {res.events} event(s), "
      f"{res.requests} request(s) ({res.terminated} terminated, {res.live} live), ranks {res.ranks}, "
      f"table {res.table_digest}")
    viol = [f for f in res.findings if f.violation and f.kind not in res.excused]
    warn = [f for f in res.findings if not f.violation]
    if res.violations:
        w(f"\nVIOLATIONS: {res.violations}  (" + ", ".join(
            f"{k} {res.finding_counts[k]}" for k in VIOLATION_KINDS
            if res.finding_counts.get(k) and k not in res.excused) + ")")
        for f in viol[:max_findings]:
            w(f"  {f}")
        if len(viol) > max_findings:
            w(f"  ... {len(viol) - max_findings} more (use --json)")
    else:
        w("\nno violations")
    if res.excused:
        w(f"\nexcused (not violations: empty logs allowed): " + ", ".join(
            f"{k} {n}" for k, n in res.excused.items()))
        for f in [f for f in res.findings if f.kind in res.excused][:10]:
            w(f"  {f}")
    nwarn = sum(n for k, n in res.finding_counts.items() if k in WARNING_KINDS)
    if nwarn:
        w(f"\nwarnings: {nwarn}  (" + ", ".join(
            f"{k} {res.finding_counts[k]}" for k in WARNING_KINDS if res.finding_counts.get(k)) + ")")
        for f in warn[:10]:
            w(f"  {f}")
        if len(warn) > 10:
            w(f"  ... {len(warn) - 10} more (use --json)")
    w("\ntime in state (ms):")
    w(f"  {'state':<16}{'n':>10}{'p50':>12}{'p99':>12}{'max':>12}")
    for s, h in res.time_in_state.items():
        w(f"  {s:<16}{h.count:>10}{_ms(h.quantile(0.5)):>12}{_ms(h.quantile(0.99)):>12}{_ms(h.max):>12}")
    lt = res.lifetime
    w(f"  {'(lifetime)':<16}{lt.count:>10}{_ms(lt.quantile(0.5)):>12}{_ms(lt.quantile(0.99)):>12}{_ms(lt.max):>12}")
    w("\noutcomes: " + ", ".join(f"{k} {v}" for k, v in res.outcomes.items()))
    if res.late:
        w("late events: " + ", ".join(f"{s}+{e} {n}" for (s, e), n in sorted(res.late.items())))
    if res.slowest:
        w("\nslowest requests:")
        for r in res.slowest[:10]:
            w(f"  rank {r.rank} request {r.request}: {_ms(r.lifetime_ns)} ms, outcome {r.outcome}, "
              f"{' > '.join(seg[0] for seg in r.segments)} ({r.file}:{r.line})")
    return "\n".join(out) + "\n"


def main_audit(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lifecycle audit",
                                description="Replay request lifetimes from JSON-lines logs through the lifecycle table.")
    p.add_argument("logs", nargs="+", help="log files: one per rank or merged; plain or gzip JSON lines")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained HTML report")
    p.add_argument("--table", default=None, help="lifecycle table (default: the repository's)")
    p.add_argument("--leak-age", type=float, default=0.0, metavar="SECONDS",
                   help="sessions live at the end of the log younger than this are reported as live, not leaks")
    p.add_argument("--window", type=int, default=8192, help="terminated sessions remembered (tombstones)")
    p.add_argument("--top", type=int, default=20, help="slowest requests kept")
    p.add_argument("--max-findings", type=int, default=1000, help="findings kept per kind (all are counted)")
    p.add_argument("--timeline-cap", type=int, default=60, help="requests shown in the HTML timeline")
    p.add_argument("--allow-empty", action="store_true",
                   help="a log with no lifecycle event (no_events) is reported, not a violation: for a rank that "
                        "created no session")
    p.add_argument("--engine", choices=("native", "python"), default=None,
                   help="replay engine: native (C++, the default when it can be used) or python (the reference); "
                        f"default from ${ENGINE_ENV}")
    a = p.parse_args(argv)
    try:
        sp = _spec.load_default(a.table)
    except _spec.SpecError as exc:
        print(f"lifecycle audit: {exc}", file=sys.stderr)
        return 2
    if a.html == "":
        p.error("--html needs a file name")
    for path in a.logs:
        if (why := log_path_problem(path)) is not None:
            print(f"lifecycle audit: {why}: {path}", file=sys.stderr)
            return 2
    if not -1e9 <= a.leak_age <= 1e9:  # (NaN too: int() of it raised; a negative age reports no leaks)
        p.error(f"--leak-age must be seconds in [-1e9, 1e9], got {a.leak_age}")
    kw = dict(window=a.window, top=a.top, keep_findings=a.max_findings, leak_age_ns=int(a.leak_age * 1e9))
    try:
        check_options(**kw)
    except InvalidArgument as exc:
        flag = {"keep_findings": "max-findings"}.get(exc.argument, exc.argument.replace("_", "-"))
        p.error(f"--{flag}: {exc}")
    if a.timeline_cap < 0:
        p.error(f"--timeline-cap must be >= 0, got {a.timeline_cap}")
    if a.engine == "native" and (why := native_unavailable(sp, **kw)) is not None:
        print(f"lifecycle audit: --engine native: {why}", file=sys.stderr)
        return 2
    res = audit_paths(a.logs, sp, native=None if a.engine is None else a.engine == "native", **kw)
    if a.allow_empty:
        res.excuse("no_events")
    if a.html:
        from .report import write_html

        try:
            write_html(res, sp, a.html, timeline_cap=a.timeline_cap)
        except OSError as exc:
            print(f"lifecycle audit: cannot write the HTML report {a.html}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if a.json:
        print(json.dumps(res.as_dict(), indent=2))  # (ASCII: json escapes the rest)
    else:
        _write_text(format_text(res) + (f"HTML report: {a.html}\n" if a.html else ""))
    return 0 if res.ok else 1


def _write_text(text: str) -> None:
    """``text`` on stdout; what its encoding cannot hold (a file name with undecodable bytes: argv keeps them as
    surrogates) is written as backslash escapes instead of raising UnicodeEncodeError."""
    out = sys.stdout
    try:
        out.write(text)
    except UnicodeEncodeError:
        enc = getattr(out, "encoding", None) or "utf-8"
        out.write(text.encode(enc, "backslashreplace").decode(enc))


def _write_schema_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lifecycle.audit --write-schema")
    p.add_argument("--write-schema", action="store_true", required=True)
    p.add_argument("--out", default=str(schema_path()))
    a = p.parse_args(argv)
    Path(a.out).write_text(render_schema(_spec.load_default()), encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--write-schema" in argv:
        sys.exit(_write_schema_main(argv))
    from .cli import main  # `lifecycle audit`'s handling (bad input: exit 2, a closed pipe: 141), not main_audit bare

    sys.exit(main(["audit", *argv]))
