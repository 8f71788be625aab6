"""Fuzz the log reader: truncated, non-JSON, wrong-typed and huge lines never crash the audit, and every
bad line becomes a finding that names its file and line."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.audit import Auditor
from tests.golden import make_golden as mg

GOOD = [json.dumps(d) for d in mg.clean_run() + mg.deferred_termination()]
MAX_LINE = 4096

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
    return kind, "[" * 3000  # nesting deeper than the recursion limit


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    a = Auditor(max_line=MAX_LINE)
    a.feed_files([str(p)])
    res = a.finish()
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
    a = Auditor()
    a.feed_files([str(p), str(mg.HERE / "cancellation.jsonl")])
    res = a.finish()
    (u,) = res.by_kind("unreadable")
    assert u.file == str(p) and u.line >= 1
    assert res.requests >= 3  # the second file was still audited


def test_no_trailing_newline_and_blank_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n\n" + "\n".join(GOOD[:20]) + "\n   \n", encoding="utf-8")
    res = Auditor()
    res.feed_files([str(p)])
    r = res.finish()
    assert r.ok and r.events == 20
