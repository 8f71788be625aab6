"""Fuzz the log reader: truncated, non-JSON, wrong-typed and huge lines never crash the audit, and every
bad line becomes a finding that names its file and line; nor does any JSON value in any field."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import audit
from lifecycle.audit import audit_events, audit_paths
from tests.golden import make_golden as mg

GOOD = [json.dumps(d) for d in mg.clean_run() + mg.deferred_termination()]
MAX_LINE = 4096


@pytest.fixture(autouse=True, params=["native", "python"])
def engine(request, monkeypatch):
    """Every test here runs with both replay engines (audit_paths reads the choice from the environment)."""
    monkeypatch.setenv(audit.ENGINE_ENV, request.param)
    return request.param


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)


@st.composite
def bad_line(draw):
    kind = draw(st.sampled_from(["truncated", "text", "wrong_type", "huge", "not_object", "bytes", "deep"]))
    base = draw(st.sampled_from(GOOD))
    if kind == "truncated":
        return kind, base[: draw(st.integers(1, len(base) - 1))]
    if kind == "text":
        return kind, draw(st.text(min_size=1, max_size=80).filter(lambda s: "\n" not in s and "\r" not in s
                                                                   and s.strip() and not _is_json(s)))
    if kind == "wrong_type":
        d = json.loads(base)
        key = draw(st.sampled_from(["event", "rank", "seq", "pid", "t_mono_ns", "request"]))
        val = draw(json_values.filter(lambda v: not (type(v) is int or (key == "request" and v is None))))
        d[key] = val
        return kind, json.dumps(d)
    if kind == "huge":
        return kind, '{"event": "' + "x" * draw(st.integers(MAX_LINE + 1, 3 * MAX_LINE)) + '"}'
    if kind == "not_object":
        return kind, json.dumps(draw(st.lists(json_values, max_size=3) | st.integers() | st.text(max_size=5)))
    if kind == "bytes":
        return kind, b"\xff\xfe{bad".decode("latin-1")
    n = draw(st.integers(audit.MAX_DEPTH - 4, MAX_LINE // 2))  # around the depth limit, up to the line limit
    return kind, "[" * n + "]" * draw(st.integers(0, n))


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


@settings(max_examples=60, deadline=None, 
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(GOOD)), bad_line()), min_size=1, max_size=6))
def test_bad_lines_never_crash_and_are_reported_by_line(tmp_path_factory, inserts):
    lines = list(GOOD)
    bad_at = []
    for pos, (_kind, text) in sorted(inserts, key=lambda x: -x[0]):
        lines.insert(pos, text)
    # recompute where the bad lines ended up
    bad_texts = {t for _, (_, t) in inserts}
    bad_at = [i for i, l in enumerate(lines, start=1) if l in bad_texts]
    p = tmp_path_factory.mktemp("fuzz") / "log.jsonl"
    p.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    res = audit_paths([str(p)], max_line=MAX_LINE)
    malformed_lines = {f.line for f in res.by_kind("malformed")}
    assert set(bad_at) <= malformed_lines, (bad_at, [str(f) for f in res.findings])
    for f in res.findings:
        assert f.file == str(p) and 0 < f.line <= len(lines)
    assert not res.ok


def test_truncated_gzip_is_reported_and_audit_goes_on(tmp_path):
    import gzip

    data = gzip.compress(("\n".join(GOOD) + "\n").encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    res = audit_paths([str(p), str(mg.HERE / "cancellation.jsonl")])
    (u,) = res.by_kind("unreadable")
    assert u.file == str(p) and u.line >= 1
    assert res.requests >= 3  # the second file was still audited


def test_no_trailing_newline_and_blank_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n\n" + "\n".join(GOOD[:20]) + "\n   \n", encoding="utf-8")
    r = audit_paths([str(p)])
    assert r.ok and r.events == 20


# ------------------------------------------------------------------------------------ any JSON value in any field

EVENTS = [d for name in ("clean_run", "cancellation", "poisoning", "deferred_termination")
          for d in mg.scenarios()[name]]


@settings(max_examples=150, deadline=None, 
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(EVENTS) - 1), st.integers(0, 30), json_values), min_size=1,
                max_size=4))
def test_any_value_in_any_field_never_crashes(tmp_path_factory, edits):
    events = [dict(d) for d in EVENTS]
    for i, k, value in edits:
        keys = sorted(events[i])
        events[i][keys[k % len(keys)]] = value
    p = tmp_path_factory.mktemp("fields") / "log.jsonl"
    p.write_text("".join(json.dumps(d) + "\n" for d in events), encoding="utf-8")
    res = audit_paths([str(p)])
    for f in res.findings:
        assert f.file == str(p) and 0 < f.line <= len(events)


def _first(name: str) -> int:
    return next(i for i, d in enumerate(EVENTS) if d["event"] == name)


@pytest.mark.parametrize("bad", [[1], {"a": 1}], ids=["list", "object"])
@pytest.mark.parametrize(("event", "key"), [
    ("lifecycle.transition", "from_state"), ("lifecycle.transition", "to_state"),
    ("lifecycle.transition", "trigger"), ("lifecycle.transition", "outcome"),
    ("lifecycle.cancel", "result"), ("lifecycle.terminate", "result"),
    ("lifecycle.late_event", "trigger"), ("lifecycle.late_event", "state"),
])
def test_unhashable_names_are_malformed_at_their_line(tmp_path, event, key, bad):
    events = [dict(d) for d in EVENTS]
    i = _first(event)
    events[i][key] = bad
    p = tmp_path / "log.jsonl"
    p.write_text("".join(json.dumps(d) + "\n" for d in events), encoding="utf-8")
    res = audit_paths([str(p)])
    assert i + 1 in {f.line for f in res.by_kind("malformed")}, [str(f) for f in res.findings]


def test_unhashable_table_and_odd_health_reasons_are_reported(tmp_path):
    events = [dict(d) for d in EVENTS]
    events[0]["table"] = ["not", "a", "digest"]
    events[1]["table"] = ["not", "a", "digest"]
    events.append({**events[-1], "seq": events[-1]["seq"] + 1, "request": None, "event": "lifecycle.health",
                   "healthy": False, "reasons": 5})
    res = audit_events(events)
    assert [f.line for f in res.by_kind("table_mismatch")] == [1]
    # the last one (the poisoning golden has an unhealthy period of its own, before it)
    unhealthy = res.by_kind("unhealthy")[-1]
    assert unhealthy.message == "engine unhealthy: 5" and unhealthy.line == len(events)


def test_a_null_line_in_one_of_several_files_is_malformed(tmp_path):
    lines = GOOD[:20]
    p0, p1 = tmp_path / "r0.jsonl", tmp_path / "r1.jsonl"
    p0.write_text("\n".join(lines[:5] + ["null"] + lines[5:]) + "\n", encoding="utf-8")
    p1.write_text((mg.HERE / "cancellation.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    res = audit_paths([str(p0), str(p1)])
    (f,) = res.by_kind("malformed")
    assert (f.file, f.line, f.message) == (str(p0), 6, "not a JSON object but NoneType")
