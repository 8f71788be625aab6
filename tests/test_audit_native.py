"""The native replay (``lifecycle._core.AuditReplay``, cpp/src/audit.cpp) gives exactly the Python
``Auditor``'s result: same ``as_dict()`` (compared as JSON text, so key order counts too), same
``format_text()``, same findings (kind, file, line, rank, request, message, extra), same counts.

The Python replay is the reference and the one hand-written copy of the audit's rules; this file is what
keeps the C++ copy honest: golden logs, every hand-broken copy test_audit.py builds, hypothesis-mutated
logs (dropped, repeated, swapped lines; any value of any type in any field; raw JSON oddities such as big
integers, escaped keys, duplicate keys; truncated, garbage, blank, CRLF and over-long lines; gzip, cut
gzip; several files, some on clocks hours apart; chunk sizes down to one byte so lines span reads), and
the reader's JSON acceptance against orjson's byte for byte.  A negative control shows a perturbed native
result is caught.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import subprocess
import sys

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import _core, audit, errors, spec
from lifecycle.audit import audit_paths, format_text
from tests.golden import make_golden as mg
from tests.test_audit import (BREAKS, DEFER_ORDERS, _already_terminated_for_another_request,
                              _already_terminated_moved_up, _moved, _same_pid_ranks, _skewed, _stream, _strip,
                              _two_rank_disagreeing,
                              big_value_events, deferred_batch, orphan_results, real_cancelled_deferred_log,
                              real_deferred_log,
                              real_cancel_results_log, real_late_and_rejected_log, real_level_changed_log,
                              real_live_across_a_filtered_stretch, real_random_workload, renumber,
                              stretch_and_another_rank_without_keys,
                              two_engines_one_process)

SPEC = spec.load(spec.default_table_path())
GOLDEN = sorted(p for p in mg.HERE.glob("*.jsonl"))


def _fixed_ids(events: list[dict]) -> list[dict]:
    """A real engine's log with proc and engine numbers that do not depend on the run (hypothesis replays)."""
    low = min(d["engine"] for d in events)
    return [{**d, "proc": 77, "engine": d["engine"] - low} for d in events]


# ------------------------------------------------------------------------------------ the comparison


def fingerprint(res) -> dict:
    """Everything observable in a result (as_dict as JSON text keeps key order and int/float apart)."""
    return {
        "as_dict": json.dumps(res.as_dict()),
        "text": format_text(res),
        "text_all": format_text(res, max_findings=10**6),
        "findings": [(f.kind, f.file, f.line, f.rank, f.request, f.message, json.dumps(f.extra)) for f in res.findings],
        "counts": sorted(res.finding_counts.items()),
        "ok": res.ok,
        "summaries": [json.dumps(dataclasses.asdict(r)) for r in res.slowest + res.violating],
        "hist": {s: (sorted(h.buckets.items()), h.max, h.total) for s, h in res.time_in_state.items()},
    }


def run(paths, native: bool, **kw):
    try:
        return fingerprint(audit_paths(paths, SPEC, native=native, **kw))
    except RecursionError as exc:  # both engines refuse to repr() absurdly nested values
        return ("raised", type(exc).__name__)


def differences(a, b) -> list[str]:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [f"native {a!r} != python {b!r}"]
    out = []
    for k in a:
        if a[k] != b[k]:
            out.append(f"{k}: native {str(a[k])[:3000]}\n   python {str(b[k])[:3000]}")
    return out


def assert_same(paths, **kw) -> None:
    assert audit.native_unavailable(SPEC, **kw) is None
    paths = [str(p) for p in paths]
    diff = differences(run(paths, True, **kw), run(paths, False, **kw))
    assert not diff, "\n".join(diff)


# ------------------------------------------------------------------------------------ fixed inputs


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_every_golden_log_audits_identically(path):
    assert_same([path])


@pytest.mark.parametrize("names", [
    ["two_rank.rank0", "two_rank.rank1"],
    ["two_rank.rank1", "two_rank.rank0", "two_rank.merged"],
    ["clean_run", "cancellation", "poisoning", "deferred_termination"],
    ["clean_run", "clean_run"],  # the same path twice
])
def test_multi_file_audits_identically(names):
    assert_same([mg.HERE / f"{n}.jsonl" for n in names])


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_every_hand_broken_copy_audits_identically(name, tmp_path):
    ev, _kind, _req, line = BREAKS[name]()
    text = mg.render(ev)
    if name == "malformed":
        lines = text.splitlines(keepends=True)
        lines.insert(line - 1, '{"event": "lifecycle.transition", "request": 1\n')
        text = "".join(lines)
    p = tmp_path / f"{name}.jsonl"
    p.write_text(text, encoding="utf-8")
    assert_same([p])
    assert_same([p, mg.HERE / "clean_run.jsonl"])


@pytest.mark.parametrize("name", sorted(DEFER_ORDERS))
@pytest.mark.parametrize("kw", [{}, {"window": 1}, {"keep_violating": 0}])
def test_every_deferral_out_of_order_audits_identically(name, kw, tmp_path):
    """The real engine's deferral log with a record moved or changed (deferred_order), with and without the
    proc/engine keys, and a small tombstone window (a Deferred after the end then finds no tombstone: orphan)."""
    ev = _fixed_ids(real_deferred_log())
    for keys, log in (("new", ev), ("old", _strip(ev, "proc", "engine"))):
        p = tmp_path / f"{name}.{keys}.jsonl"
        p.write_text(mg.render(DEFER_ORDERS[name](log)[0]), encoding="utf-8")
        assert_same([p], **kw)


@pytest.mark.parametrize("edit", [_already_terminated_moved_up, _already_terminated_for_another_request])
@pytest.mark.parametrize("kw", [{}, {"window": 1}, {"keep_violating": 0}])
def test_every_already_terminated_for_a_live_session_audits_identically(edit, kw, tmp_path):
    ev = edit(real_deferred_log())[0]
    for name, log in (("new", ev), ("old", _strip(ev, "proc", "engine"))):
        p = tmp_path / f"{name}.jsonl"
        p.write_text(mg.render(log), encoding="utf-8")
        assert_same([p], **kw)


@pytest.mark.parametrize(("frm", "to"), [(7, 6), (8, 5), (14, 9), (14, 1), (7, 14)])
def test_every_cancel_result_out_of_state_audits_identically(frm, to, tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(mg.render(_moved(real_cancel_results_log(), frm, to)), encoding="utf-8")
    assert_same([p])


@pytest.mark.parametrize("line", [3, 5, 7, 15])
@pytest.mark.parametrize("edit", [{"state": "InFlight"}, {"state": "Poisoned", "trigger": "fail"},
                                  {"result": "Terminated", "state": "Poisoned"}])
def test_every_misclassified_record_audits_identically(line, edit, tmp_path):
    """Late and rejected records the table classifies otherwise (misclassified_event), and a Terminated result
    after a deferred retry (double_termination), on the real engines' logs."""
    ev = _fixed_ids(real_late_and_rejected_log())
    d = _fixed_ids(real_deferred_log())
    for name, log in (("late", ev), ("deferred", d)):
        log = [dict(x) for x in log]
        if line <= len(log):
            log[line - 1].update(edit)
        p = tmp_path / f"{name}.jsonl"
        p.write_text(mg.render(log), encoding="utf-8")
        assert_same([p])


@pytest.mark.parametrize("edit", [{}, {"state": "InFlight"}, {"state": "CancelRequested"}, {"state": "Quiesced"},
                                  {"result": "CancelledBeforeAdvertise"}, {"result": "CancelRequestedInFlight"}])
def test_every_cancelled_deferred_result_audits_identically(edit, tmp_path):
    """The real engine's CancelledDeferred (a cancel that fired a deferred terminate) as logged, in other states'
    cells (wrong_result with the refinements listed) and replaced by other results."""
    ev = _fixed_ids(real_cancelled_deferred_log())
    i = next(i for i, d in enumerate(ev) if d["event"] == "lifecycle.cancel" and d["result"] == "CancelledDeferred")
    ev[i] = {**ev[i], **edit}
    p = tmp_path / "x.jsonl"
    p.write_text(mg.render(ev), encoding="utf-8")
    assert_same([p])


@pytest.mark.parametrize(("frm", "to"), [(5, 4), (3, 2), (5, 1), (7, 6)])
def test_every_late_or_rejected_record_out_of_order_audits_identically(frm, to, tmp_path):
    """Late and rejected records moved before the session's move to their state (misclassified_event)."""
    ev = _fixed_ids(real_late_and_rejected_log())
    ev.insert(to - 1, ev.pop(frm - 1))
    p = tmp_path / "x.jsonl"
    p.write_text(mg.render(ev), encoding="utf-8")
    assert_same([p])


@pytest.mark.parametrize("kw", [{}, {"window": 1}, {"window": 3, "top": 1, "keep_violating": 1},
                                {"keep_findings": 0}, {"leak_age_ns": -1}, {"leak_age_ns": 10**30}])
def test_long_logs_with_small_windows_audit_identically(tmp_path, kw):
    ev = list(_stream(700))
    del ev[100]
    ev.insert(200, dict(ev[199]))
    ev[300] = {**ev[300], "to_state": "Poisoned"}
    ev[400] = {**ev[400], "table": "feedfacefeedface"}
    ev = ev[:-40]  # leave some requests live
    p = tmp_path / "long.jsonl"
    p.write_text(mg.render(ev), encoding="utf-8")
    assert_same([p], **kw)
    # the same log as two ranks, one with a clock hours ahead (the merge goes relative)
    r1 = [{**d, "rank": 1, "pid": d["pid"] + 1, "t_mono_ns": d["t_mono_ns"] + 7200 * 10**9} for d in ev]
    q = tmp_path / "rank1.jsonl"
    q.write_text(mg.render(r1), encoding="utf-8")
    assert_same([p, q], **kw)


@pytest.mark.parametrize("window", [8192, 1])
def test_rank_disagreement_audits_identically(tmp_path, window):
    r0, r1 = mg.two_rank()
    i = next(i for i, d in enumerate(r1) if d.get("outcome") == "completed")
    r1[i] = {**r1[i], "outcome": "cancelled"}
    p0, p1, m = tmp_path / "r0.jsonl", tmp_path / "r1.jsonl", tmp_path / "merged.jsonl"
    p0.write_text(mg.render(r0), encoding="utf-8")
    p1.write_text(mg.render(r1), encoding="utf-8")
    m.write_text(mg.render(mg.merge_by_time(r0, r1)), encoding="utf-8")
    res = audit_paths([p0, p1], native=True, window=window)
    assert res.by_kind("rank_disagreement") or res.finding_counts.get("window_evicted")
    assert_same([p0, p1], window=window)
    assert_same([m], window=window)


def _deferred_batch_cases() -> dict[str, list[dict]]:
    """A batch ending 6 deferred sessions (the real engine's), its notices after every move, and what a window
    smaller than the batch must still judge the same way in both replays: notices lost, reordered, repeated, a
    notice or a result for a tombstone kept aside, the request advertised again before its notice, no proc/engine."""
    ev = _fixed_ids(deferred_batch(6))
    notices = [d for d in ev if d["event"] == "lifecycle.terminate_now"]
    rest = [d for d in ev if d["event"] != "lifecycle.terminate_now"]
    last = ev[-1]
    adv = next(d for d in ev if d["event"] == "lifecycle.transition" and d["request"] == 0)
    term = next(d for d in ev if d["event"] == "lifecycle.terminate" and d["request"] == 0)
    return {
        "as logged": ev,
        "no keys": _strip(ev, "proc", "engine"),
        "notices lost": rest,
        "two notices lost": rest + notices[2:],
        "notices reversed": rest + notices[::-1],
        "notices twice": ev + notices,
        "first notice twice": ev + notices[:1],
        "results after": ev + [{**term, "result": r} for r in ("Deferred", "AlreadyDeferred", "Terminated")],
        "results before the notices": rest + [{**term, "result": "Terminated"}] + notices,
        "advertised again before its notice": rest + [adv] + notices,
        "advertised again, no keys": _strip(rest + [adv] + notices, "proc", "engine"),
        "two batches": ev + [{**d, "request": d["request"] + 100, "t_mono_ns": d["t_mono_ns"] + last["t_mono_ns"]}
                             for d in ev],
    }


@pytest.mark.parametrize("name", sorted(_deferred_batch_cases()))
@pytest.mark.parametrize("window", [1, 2, 3, 5, 6, 8192])
def test_a_batch_ending_more_deferred_sessions_than_the_window_audits_identically(tmp_path, name, window):
    p = tmp_path / "batch.jsonl"
    events = _deferred_batch_cases()[name]
    p.write_text(mg.render([{**d, "seq": i} for i, d in enumerate(events)]), encoding="utf-8")
    assert_same([p], window=window)
    assert_same([p], window=window, keep_findings=1)


def _who_is_who_cases() -> dict[str, list[list[dict]]]:
    """Logs where sessions, slots and streams must be told apart by proc, engine, role or file (one list of events
    per file): the cases of tests/test_audit.py's who-is-who tests, and what breaks them."""
    ev = _fixed_ids(two_engines_one_process(True))
    sender = [{**d, "role": "sender" if d["role"] else None} for d in mg.clean_run()]
    receiver = [{**d, "pid": d["pid"] + 1, "role": "receiver" if d["role"] else None} for d in sender]
    r0, r1, _ = _two_rank_disagreeing()
    s0, s1 = _same_pid_ranks(False)
    p0, p1 = _same_pid_ranks(True)
    bad = [dict(d) for d in ev]
    for i, v in enumerate([-1, "7", 1.5, True, None, 2**64 - 1, [1], {"a": 1}]):
        bad[3 + i] = {**bad[3 + i], ("proc", "engine")[i % 2]: v}
    return {
        "two engines": [ev],
        "two engines, one engine id": [[{**d, "engine": 0} for d in ev]],
        "two engines, no keys": [[{k: v for k, v in d.items() if k not in ("proc", "engine")} for d in ev]],
        "two engines, bad keys": [bad],
        "two engines in two files": [ev[: len(ev) // 2], ev[len(ev) // 2:]],
        "sender and receiver files": [sender, receiver],
        "sender and receiver merged": [mg.merge_by_time(sender, receiver)],
        "same pid ranks": [s0, s1],
        "same pid ranks, procs": [p0, p1],
        "same pid ranks, one file": [s0 + s1],
        "disagreement concatenated": [r0 + r1],
        "disagreement skewed": [r0, _skewed(r1, 10**9)],
        "disagreement, roles": [r0, [{**d, "role": "receiver" if d["role"] else None} for d in r1]],
        "request reused": [mg.two_rank()[1] + [{**d, "pid": d["pid"] + 20} for d in r1]],
        "orphan terminate results": [orphan_results()],
        "long values quoted": [big_value_events(2, 5000), [{**d, "pid": 3} for d in big_value_events(2, 150)]],
    }


@pytest.mark.parametrize("name", sorted(_who_is_who_cases()))
@pytest.mark.parametrize("kw", [{}, {"window": 1}])
def test_who_is_who_audits_identically(tmp_path, name, kw):
    files = _who_is_who_cases()[name]
    paths = []
    for i, events in enumerate(files):
        p = tmp_path / f"f{i}.jsonl"
        p.write_text(mg.render(events), encoding="utf-8")
        paths.append(p)
    assert_same(paths, **kw)
    assert_same(paths[::-1], **kw)


def _level_cases() -> dict[str, list[list[dict]]]:
    """Logs with lifecycle.log_level lines (a real engine's level raised and lowered, or not) and what the two
    replays must read alike: the lines lost, repeated, reordered, a bad info_filtered, two engines, no keys, two
    files (one list of events per file)."""
    ev = _fixed_ids(real_level_changed_log((20, 30, 20)))
    marks = [i for i, d in enumerate(ev) if d["event"] == "lifecycle.log_level"]
    on, off = ev[marks[0]], ev[marks[1]]
    other = [{**d, "engine": d["engine"] + 1, "request": d["request"] and d["request"] + 50} for d in ev]
    bad = [dict(d) for d in ev]
    for i, v in zip(marks, ["yes", None]):
        bad[i]["info_filtered"] = v
    return {
        "as logged": [ev],
        "to the end": [_fixed_ids(real_level_changed_log((20, 30)))],
        "nothing written meanwhile": [_fixed_ids(real_level_changed_log((20, 60, 20)))],
        "filtered from the start": [_fixed_ids(real_level_changed_log((30, 20)))],
        "written again, twice": [ev + [off]],
        "filtered, twice": [ev[:marks[1]] + [on] + ev[marks[1]:]],
        "filtered, logged last": [[d for d in ev if d is not on] + [on]],
        "bad info_filtered": [bad],
        "info_filtered missing": [[{k: v for k, v in d.items() if k != "info_filtered"} for d in ev]],
        "two engines": [mg.merge_by_time(ev, other)],
        "two engines, one stretch each": [ev[:marks[1]] + other + ev[marks[1]:]],
        "no keys": [_strip(ev, "proc", "engine")],
        "two files": [ev[:marks[1]], ev[marks[1]:]],
        **_stretch_cases(),
    }


def _stretch_cases() -> dict[str, list[list[dict]]]:
    """Sessions live across a stretch (real_live_across_a_filtered_stretch): adopted after it, unjudged, tombstones
    and slots forgotten; a deferral whose TerminateNow is filtered out; violations outside the stretch."""
    live = _fixed_ids(real_live_across_a_filtered_stretch(True))
    marks = [i for i, d in enumerate(live) if d["event"] == "lifecycle.log_level"]
    bad = [dict(d) for d in live]
    last2 = max(i for i, d in enumerate(bad) if d.get("request") == 2 and d["event"] == "lifecycle.transition")
    bad.insert(last2 + 1, dict(bad[last2]))
    before = [dict(d) for d in live]  # (3 marked violating, then unjudged: its summary is kept)
    next(d for d in before if d.get("request") == 3 and d.get("trigger") == "expose")["from_state"] = "InFlight"
    deferred = _fixed_ids(real_deferred_log())
    now = next(i for i, d in enumerate(deferred) if d["event"] == "lifecycle.terminate_now" and d["request"] == 30)
    on = {k: v for k, v in deferred[now].items() if k not in ("request", "role")}
    on.update(event="lifecycle.log_level", request=None, role=None, info_filtered=True)
    off = dict(on, info_filtered=False)
    return {
        "live across": [live],
        "live to the end": [_fixed_ids(real_live_across_a_filtered_stretch(False))],
        "live across, another engine": [_fixed_ids(real_live_across_a_filtered_stretch(True, second_engine=True))],
        "live across, no keys": [_strip(live, "proc", "engine")],
        "no keys, another rank": list(stretch_and_another_rank_without_keys()),
        "live across, two files": [live[:marks[1]], live[marks[1]:]],
        "live across, start not logged": [[d for i, d in enumerate(live) if i != marks[0]]],
        "live across, a violation after": [renumber(bad)],
        "live across, a violation before": [before],
        "a deferral's notice filtered out": [renumber(deferred[:now] + [on] + deferred[now + 1:])],
        "a deferral's notice filtered out and back": [renumber(deferred[:now] + [on, off] + deferred[now + 1:])],
    }


@pytest.mark.parametrize("name", sorted(_level_cases()))
@pytest.mark.parametrize("kw", [{}, {"keep_findings": 1}])
def test_level_changes_audit_identically(tmp_path, name, kw):
    paths = []
    for i, events in enumerate(_level_cases()[name]):
        p = tmp_path / f"f{i}.jsonl"
        p.write_text(mg.render(events), encoding="utf-8")
        paths.append(p)
    assert_same(paths, **kw)
    counts = audit_paths(paths, SPEC, native=True).finding_counts
    if name == "as logged":  # (not vacuous: the stretch is a finding)
        assert counts.get("log_filtered") == 1
    if name.startswith("live across") or name.startswith("a deferral's"):  # (sessions and tombstones set aside)
        assert counts.get("unjudged"), counts
    if name == "live across, a violation after":
        assert counts.get("double_termination") == 1, counts


@pytest.mark.parametrize("lookahead", [1, 2, 3, 4096])
@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_first_timestamps_past_the_lookahead_audit_identically(tmp_path, monkeypatch, lookahead, chunk):
    """Merging, a file's first timestamp is looked for in its first _LOOKAHEAD lines only (what is held
    before the merge starts stays bounded): lines without one first, clocks hours apart, a file with none."""
    monkeypatch.setattr(audit, "_LOOKAHEAD", lookahead)
    monkeypatch.setattr(audit, "_CHUNK", chunk)
    junk = [b"x", b"{}", b"", b"[1]", b'{"t_mono_ns": "5"}', b'{"t_mono_ns": true}']
    r0 = (mg.HERE / "two_rank.rank0.jsonl").read_bytes().splitlines()
    r1 = [json.dumps({**json.loads(x), "t_mono_ns": json.loads(x)["t_mono_ns"] + 3 * 3600 * 10**9}).encode()
          for x in (mg.HERE / "two_rank.rank1.jsonl").read_bytes().splitlines()]
    p0, p1, p2 = tmp_path / "r0.jsonl", tmp_path / "r1.jsonl", tmp_path / "none.jsonl"
    p0.write_bytes(b"\n".join(junk[:2] + r0) + b"\n")
    p1.write_bytes(b"\n".join(junk[3:] + r1) + b"\n")
    p2.write_bytes(b"\n".join(junk * 3))
    for paths in ([p0, p1], [p1, p0], [p0, p1, p2], [p2, p0]):
        assert_same(paths)


# Peak RSS of the child process in KiB. Not ru_maxrss: Linux carries the parent's resident size at fork
# through exec into it, so under a big pytest process every child "peaked" at pytest's size and the
# growth read 0. VmHWM is the high-water mark of the child's own address space.
PEAK_RSS = ("rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]); ")


def test_merging_holds_a_bounded_number_of_parsed_lines(tmp_path):
    """A merged file of 1 M two-byte lines and no timestamps: the native replay once held a whole file with no
    timestamps parsed before the merge started, and parsed every fed chunk at once (~1 KiB per line), over
    1 GiB here; now a source holds its last chunk and at most _LOOKAHEAD parsed lines."""
    p = tmp_path / "tiny.jsonl"
    p.write_bytes(b"{}\n" * (1 << 20))
    code = ("import sys; from lifecycle import audit; " + PEAK_RSS + "before = rss(); "
            "r = audit.audit_paths(sys.argv[1:], native=True); assert r.lines == (1 << 20) + 20, r.lines; "
            "print(rss() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(p), str(mg.HERE / "clean_run.jsonl")],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) < 256 * 1024, f"peak RSS grew by {int(out.stdout) // 1024} MiB"


@pytest.mark.parametrize("cap", [64, 3, 0])
def test_mismatched_table_values_are_remembered_up_to_a_bound(tmp_path, monkeypatch, cap):
    """Mismatched `table` values are reported once each for the first _MAX_TABLES distinct values (Python's
    == decides: 1, 1.0 and true are one value), then on every line with a value not remembered; both
    engines, alone and merged."""
    monkeypatch.setattr(audit, "_MAX_TABLES", cap)
    evs = [dict(e) for e in mg.clean_run()]
    values = ["a", 1, 1.0, True, "b", [1], "[1]", {"x": 1}, None, "a", 2, "c", "d", 1, "b", "e", "f", True]
    lines = [json.dumps({**e, "table": values[i % len(values)]}) for i, e in enumerate(evs * 3)]
    p = tmp_path / "tables.jsonl"
    p.write_text("\n".join(lines) + "\n")
    assert_same([p])
    assert_same([p, mg.HERE / "clean_run.jsonl"])
    res = audit_paths([p], native=True)
    n = len(res.by_kind("table_mismatch"))
    distinct = 11  # the values above by the reference's rule: 1 == 1.0 == True, repr([1]) == "[1]"; None counts
    assert n == distinct if cap >= distinct else n > distinct


def test_distinct_table_values_do_not_grow_memory(tmp_path):
    """20 000 lines, each with its own 4 KiB `table` value: remembered values stay bounded (before, every
    distinct value was kept by both engines: 80 MiB of keys here)."""
    e = dict(mg.clean_run()[0])
    p = tmp_path / "tables.jsonl"
    with open(p, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({**e, "seq": i, "table": f"{i:08d}" + "x" * 4096}) + "\n")
    code = ("import sys; from lifecycle import audit; " + PEAK_RSS + "before = rss(); "
            "r = audit.audit_paths(sys.argv[1:], native=True); "
            "assert r.finding_counts['table_mismatch'] == 20_000, r.finding_counts; print(rss() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 40 * 1024, f"peak RSS grew by {int(out.stdout) // 1024} MiB"
    # negative control: with no bound, the same run holds every value (the measurement can fail)
    # (values longer than 256 characters are remembered by digest: the Python side keeps them whole here)
    unbounded = code.replace("before = rss(); ", "before = rss(); audit._MAX_TABLES = 10**9; "
                                                 "audit._MAX_KEPT_TABLE = 10**9; ")
    out = subprocess.run([sys.executable, "-c", unbounded, str(p)], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 60 * 1024, f"unbounded: peak RSS grew by only {int(out.stdout) // 1024} MiB"


def test_long_mismatched_table_values_are_remembered_by_digest(tmp_path):
    """Up to _MAX_TABLES mismatched `table` values are remembered, and each could be a whole line (1 MiB) long:
    64 of them were 64 MiB of keys in each engine.  Values longer than 256 characters are remembered by digest
    now; each distinct one is still reported once (its repeat is not).  Negative control: with the Python
    side keeping values whole again, the same run grows by their size (the measurement can fail)."""
    e = dict(mg.clean_run()[0])
    p = tmp_path / "tables.jsonl"
    with open(p, "w") as f:
        for i in range(128):  # 64 distinct 900 KiB values, each twice
            f.write(json.dumps({**e, "seq": i, "table": f"{i % 64:02d}" + "x" * (900 << 10)}) + "\n")
    code = ("import sys; from lifecycle import audit; " + PEAK_RSS + "before = rss(); "
            "r = audit.audit_paths(sys.argv[1:], native=True); "
            "assert r.finding_counts['table_mismatch'] == 64, r.finding_counts; print(rss() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 30 * 1024, f"peak RSS grew by {int(out.stdout) // 1024} MiB"
    whole = code.replace("before = rss(); ", "before = rss(); audit._MAX_KEPT_TABLE = 10**9; ")
    out = subprocess.run([sys.executable, "-c", whole, str(p)], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 50 * 1024, f"values kept whole: peak RSS grew by only {int(out.stdout) // 1024} MiB"
    assert_same([p])


def test_unreadable_inputs_audit_identically(tmp_path):
    data = gzip.compress((mg.HERE / "cancellation.jsonl").read_bytes() * 50)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert_same([cut])
    assert_same([cut, mg.HERE / "clean_run.jsonl"])
    assert_same([tmp_path / "missing.jsonl"])
    assert_same([tmp_path, mg.HERE / "clean_run.jsonl"])  # a directory
    assert_same([])


LINE_CASES = [
    b"", b"   ", b"\t\r", b"\x0b", b"\x1c\x1d", b"\xc2\xa0", b"\xe3\x80\x80 ", b"\xc2\x85", b"\xe2\x80\xa8",
    b"\xff", b"\xed\xa0\x80", b"null", b"[]", b"[1, 2]", b'"x"', b"1", b"1.5", b"true", b"-0", b"{}",
    b'{"event": 1}', b"NaN", b"Infinity", b"{} {}", b'{"a": 1,}', b"[" * 3000, b"[" * 3000 + b"]" * 3000,
    b'{"event": "lifecycle.transition", "request": [' * 5 + b"]" * 5 + b"}",
    b'{"event": "lifecycle.bogus", "rank": 0, "seq": 0, "pid": 1, "t_mono_ns": 5, "request": null, "table": 1}',
    b'{"\\u0065vent": "lifecycle.health", "rank": 18446744073709551615, "seq": 0, "pid": -9223372036854775808, '
    b'"t_mono_ns": 1, "request": null, "healthy": false, "reasons": {"a": 1, "a": [2]}, "table": [1.0, {}]}',
    b'{"event": "lifecycle.health", "rank": 18446744073709551616, "seq": 0, "pid": 1, "t_mono_ns": 1}',
    b'{"event": "lifecycle.callback_error", "rank": 0, "seq": 1e400, "pid": 1, "t_mono_ns": 1}',
    b'{"event": "lifecycle.callback_error", "rank": 0, "seq": 3, "pid": 1, "t_mono_ns": 1, "error": '
    b'"\\ud83d\\ude00 \xc3\xa9 \\u0000 \\" \x7f"}',
    b'{"event": "lifecycle.collective_desync", "rank": 0, "seq": 4, "pid": 1, "t_mono_ns": 1, "seq_no": 1.5e300, '
    b'"field": {"k": [true, null]}, "sites": "s"}',
    b'{"event": "lifecycle.terminate", "rank": 0, "seq": 5, "pid": 1, "t_mono_ns": 1, "request": 1, "result": "' +
    b"\\u00e9" * 100 + b'"}',
]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_odd_lines_audit_identically(tmp_path, chunk, monkeypatch):
    monkeypatch.setattr(audit, "_CHUNK", chunk)
    good = (mg.HERE / "deferred_termination.jsonl").read_bytes().splitlines()
    lines = []
    for i, case in enumerate(LINE_CASES):
        lines.append(case)
        lines.append(good[i % len(good)])
    p = tmp_path / "odd.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n" + b"   ")
    assert_same([p], max_line=2048)
    q = tmp_path / "odd_crlf.jsonl"
    q.write_bytes(b"\r\n".join(lines))
    assert_same([q, p], max_line=2048)


DEEP_CASES = {
    "at the limit": b"[" * audit.MAX_DEPTH + b"]" * audit.MAX_DEPTH,
    "one over": b"[" * (audit.MAX_DEPTH + 1) + b"]" * (audit.MAX_DEPTH + 1),
    "200k, where orjson overflows its stack": b"[" * 200_000 + b"]" * 200_000,
    "unclosed": b"{\"a\":" * 600,
    "brackets in a string do not count": b'["' + b"[" * 5000 + b'"]',
    "an escaped quote keeps the string open": b'["\\"' + b"[" * 5000 + b'"]',
    "an escaped backslash closes it": b'["\\\\"' + b"[" * 5000 + b'"]',
    "an unterminated string runs to the end": b'["' + b"[" * 5000,
    "closers first do not bank depth": b"]" * 600 + b"[" * 600,
}


@pytest.mark.parametrize("name", sorted(DEEP_CASES))
def test_deeply_nested_lines_are_findings_in_both_engines(tmp_path, name):
    """A line nesting deeper than MAX_DEPTH is a malformed-line finding in both engines, never handed to a
    parser (orjson recurses and overflows its stack near 150 k levels; the native reader has no recursion
    but applies the same rule so the results stay identical), alone, as a field value, and merged."""
    raw = DEEP_CASES[name]
    ev = dict(mg.clean_run()[0])
    p = tmp_path / "deep.jsonl"
    lines = [raw, json.dumps({**ev, "role": "R"}).encode().replace(b'"R"', raw)]  # the object adds a level
    p.write_bytes(b"\n".join(lines) + b"\n")
    assert_same([p])
    assert_same([p, mg.HERE / "clean_run.jsonl"])
    res = audit_paths([p], native=True)
    deep = [f.line for f in res.by_kind("malformed") if "nested deeper" in f.message]
    over = name in ("one over", "200k, where orjson overflows its stack", "unclosed", "an escaped backslash closes it")
    assert deep == ([1, 2] if over else [2] if name == "at the limit" else [])
    assert [audit._too_deep(x, audit.MAX_DEPTH) for x in lines] == [over, over or name == "at the limit"]


def test_without_the_depth_rule_the_python_replay_crashes(tmp_path):
    """Negative control: the rule is what keeps a 200k-deep line from killing the audit (orjson 3.8
    overflows its stack, SIGSEGV)."""
    p = tmp_path / "deep.jsonl"
    p.write_bytes(DEEP_CASES["200k, where orjson overflows its stack"] + b"\n")
    code = ("import sys; from lifecycle import audit; audit._too_deep = lambda raw, d: False; "
            f"sys.exit(0 if audit.audit_paths([{str(p)!r}], native=False).violations else 3)")
    crashed = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert crashed.returncode < 0 or crashed.returncode not in (0, 3), crashed.returncode
    code = code.replace("audit._too_deep = lambda raw, d: False; ", "")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_every_whitespace_line_is_blank_exactly_as_python_strips():
    for cp in range(sys.maxunicode + 1):
        line = chr(cp).encode("utf-8", "surrogatepass")
        assert _core._audit_is_blank(line) == audit._blank(line), hex(cp)
    rnd = random.Random(5)
    for _ in range(20_000):
        line = bytes(rnd.choice(b" \t\x0b\x1c\x85\xa0\xc2\xe2\x80\x81\x9f\xe3\x00x") for _ in range(rnd.randint(0, 6)))
        assert _core._audit_is_blank(line) == audit._blank(line), line


# ------------------------------------------------------------------------------------ the JSON reader


def orjson_accepts(b: bytes) -> bool:
    try:
        orjson.loads(b)
    except orjson.JSONDecodeError:
        return False
    return True


JSON_SEEDS = [
    b'{"a":1,"b":[1,2,{"c":"d\\u00e9\\ud83d\\ude00"}],"e":null,"f":true,"g":false,"h":-0.5e-3}',
    b'[1, 2.5, "x", {"\\u0065vent": "y"}]', b'"abc"', b"123", b"-0", b"18446744073709551616", b"1e308",
    b"1.7976931348623157e308", b'{"k": "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}', b'  {"a" : [ ] , "b" : { } }  \r',
    b"0.000001e-5", b"1E+2", b"[[[[[]]]]]", b"9" * 309, b"1" + b"0" * 308,
]
JSON_BYTES = b'{}[]",:\\/ \t\r\n0123456789.eE+-truefalsnu\x00\x01\x7f\x80\xbf\xc0\xc2\xe0\xed\xf0\xf4\xf5\xff'
JSON_CHUNKS = [b"\\u", b"\\ud800", b"\\udc00", b"e400", b"999999999999999999999", b'"', b"\\", b"1e-400", b"nul",
               b"tru"]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(JSON_SEEDS), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6),
                                                       st.sampled_from(range(len(JSON_BYTES))),
                                                       st.sampled_from(JSON_CHUNKS)), max_size=4))
def test_the_reader_accepts_exactly_what_orjson_accepts(seed, edits):
    s = bytearray(seed)
    for op, pos, byte, chunk in edits:
        pos = pos % (len(s) + 1)
        if op == 0 and s:
            del s[min(pos, len(s) - 1)]
        elif op == 1:
            s[pos:pos] = JSON_BYTES[byte:byte + 1]
        elif op == 2 and s:
            s[min(pos, len(s) - 1)] = JSON_BYTES[byte]
        else:
            s[pos:pos] = chunk
    assert _core._audit_json_valid(bytes(s)) == orjson_accepts(bytes(s)), bytes(s)


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                    max_leaves=12))
def test_the_reader_accepts_every_json_document(value):
    text = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert _core._audit_json_valid(text) == orjson_accepts(text), text


# ------------------------------------------------------------------------------------ mutated logs

BASES = {name: [l.encode() for l in mg.render(ev).splitlines()] for name, ev in mg.scenarios().items()}
BASES["two_engines"] = [l.encode() for l in mg.render(_fixed_ids(two_engines_one_process(True))).splitlines()]
BASES["keyed_deferred"] = [l.encode() for l in mg.render(
    [{**d, "proc": 5, "engine": 0} for d in mg.deferred_termination()]).splitlines()]
# the real engine's logs: a deferral (ending in AlreadyTerminated) and random calls with re-entrant callbacks
# and a batch ending 4 deferred sessions, its notices after every move (windows 1 to 5: kept aside, dropped unchecked)
for _name, _ev in (("real_deferred", real_deferred_log()), ("real_workload_raising", real_random_workload(5)),
                   ("real_workload_reentrant", real_random_workload(6)), ("real_deferred_batch", deferred_batch(4)),
                   ("real_level_changed", real_level_changed_log((20, 30, 20, 60, 20, 30))),
                   ("real_live_across_stretch", real_live_across_a_filtered_stretch(True, second_engine=True))):
    BASES[_name] = [l.encode() for l in mg.render(_fixed_ids(_ev)).splitlines()]
BASES["no_keys_stretch_and_another_rank"] = [l.encode() for l in mg.render(
    [d for ev in stretch_and_another_rank_without_keys() for d in ev]).splitlines()]
KEYS = ["event", "rank", "seq", "pid", "t_mono_ns", "request", "table", "from_state", "to_state", "trigger",
        "outcome", "deferred", "slot", "generation", "role", "result", "state", "error", "healthy", "reasons",
        "seq_no", "field", "sites", "schema", "proc", "engine", "info_filtered", "zzz"]
NAMES = list(SPEC.states) + list(SPEC.events) + list(SPEC.outcomes) + list(SPEC.cancel_results) + \
    list(SPEC.terminate_results) + list(audit._EVENT_NAMES) + [SPEC.digest, "none", "Poisoned", "sender"]
RAW_VALUES = [b"18446744073709551616", b"-9223372036854775809", b"18446744073709551615", b"-0", b"1.0", b"1e2",
              b"1e400", b"NaN", b'"\\u0041dvertised"', b'"\\ud800"', b"[[[[1]]]]", b'{"a": 1, "a": 2}', b"-0.0",
              b'"' + SPEC.digest.encode() + b'"', b"[1, 1.0, true]", b'"\\u006cifecycle.transition"']
values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5000), st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, -1, 4096, 4097, 8193, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**15]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10), st.sampled_from(NAMES),
    st.lists(st.sampled_from(NAMES) | st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(NAMES), st.integers() | st.none(), max_size=2),
)
WS = [b"", b" ", b"\t", b"\x0b", b"\xc2\xa0", b"\xe3\x80\x80", b"\x1c", b"\r"]


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["drop", "dup", "swap", "set", "set_raw", "del_key", "truncate", "garbage",
                                 "blank", "huge", "crlf", "escape_key", "insert_bytes"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)), draw(values), \
        draw(st.sampled_from(RAW_VALUES)), draw(st.binary(min_size=1, max_size=12).filter(lambda b: b"\n" not in b))


def apply(lines: list[bytes], muts, max_line: int) -> list[bytes]:
    lines = list(lines)
    for kind, a, b, value, raw, junk in muts:
        if not lines:
            lines.append(junk)
            continue
        i = a % len(lines)
        line = lines[i]
        if kind == "drop":
            del lines[i]
        elif kind == "dup":
            lines.insert(i, line)
        elif kind == "swap":
            j = b % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif kind in ("set", "set_raw", "del_key"):
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if type(d) is not dict:
                continue
            key = KEYS[b % len(KEYS)]
            if kind == "set":
                d[key] = value
                lines[i] = json.dumps(d).encode()
            elif kind == "del_key":
                d.pop(key, None)
                lines[i] = json.dumps(d).encode()
            else:  # a raw JSON value, appended: a duplicate key when the line has it (the last one wins)
                lines[i] = line.rstrip()[:-1] + b', "' + key.encode() + b'": ' + raw + b"}"
        elif kind == "truncate":
            lines[i] = line[: b % max(len(line), 1)]
        elif kind == "garbage":
            lines[i] = junk
        elif kind == "insert_bytes":
            p = b % (len(line) + 1)
            lines[i] = line[:p] + junk + line[p:]
        elif kind == "blank":
            lines.insert(i, WS[b % len(WS)] + WS[a % len(WS)])
        elif kind == "huge":
            lines.insert(i, b'{"event": "' + b"x" * (max_line + b % 50 - 25) + b'"}')
        elif kind == "crlf":
            lines[i] = line + b"\r"
        else:  # escape_key
            lines[i] = line.replace(b'"event"', b'"\\u0065vent"', 1).replace(b'"seq"', b'"s\\u0065q"', 1)
    return lines


def write_log(path, lines: list[bytes], trailing: bool, gz: int) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    if gz:
        data = gzip.compress(data)
        if gz == 2:
            data = data[: max(len(data) * 2 // 3, 1)]
    path.write_bytes(data)


options = st.fixed_dictionaries({}, optional={
    "window": st.integers(1, 5), "top": st.integers(1, 3), "keep_findings": st.integers(-1, 4),
    "keep_violating": st.integers(0, 3), "leak_age_ns": st.sampled_from([-1, 0, 10**6, 10**12]),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(BASES)), st.lists(mutation(), max_size=8), st.booleans(), st.sampled_from([0, 0, 1, 2]),
       st.sampled_from([1, 3, 64, 4096, 1 << 20]), options)
def test_mutated_logs_audit_identically(tmp_path_factory, base, muts, trailing, gz, chunk, kw):
    max_line = 512
    lines = apply(BASES[base], muts, max_line)
    p = tmp_path_factory.mktemp("mut") / ("log.jsonl.gz" if gz else "log.jsonl")
    write_log(p, lines, trailing, gz)
    old = audit._CHUNK
    audit._CHUNK = chunk
    try:
        assert_same([p], max_line=max_line, **kw)
    finally:
        audit._CHUNK = old


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(BASES)), st.lists(mutation(), max_size=5),
                          st.sampled_from([0, 0, 3 * 3600 * 10**9, -10**6]), st.integers(0, 3)),
                min_size=2, max_size=4),
       st.sampled_from([0, 0, 1, 2]), st.sampled_from([5, 4096, 1 << 20]), options, st.sampled_from([4096, 4096, 1, 3]))
def test_mutated_multi_file_audits_identically(tmp_path_factory, files, gz, chunk, kw, lookahead):
    d = tmp_path_factory.mktemp("multi")
    paths = []
    for n, (base, muts, shift, rank) in enumerate(files):
        lines = []
        for line in BASES[base]:
            ev = json.loads(line)
            ev.update(rank=rank, t_mono_ns=ev["t_mono_ns"] + shift)
            lines.append(json.dumps(ev).encode())
        p = d / f"r{n}.jsonl"
        write_log(p, apply(lines, muts, 512), True, gz if n == 0 else 0)
        paths.append(p)
    old = audit._CHUNK, audit._LOOKAHEAD
    audit._CHUNK, audit._LOOKAHEAD = chunk, lookahead
    try:
        assert_same(paths, max_line=512, **kw)
    finally:
        audit._CHUNK, audit._LOOKAHEAD = old


# ------------------------------------------------------------------------------------ negative controls


def test_a_perturbed_native_result_is_caught(monkeypatch):
    """The comparison is not vacuous: the native result with one histogram off by one, or one finding's
    message changed, or audited with another window, differs from the reference."""
    paths = [str(mg.HERE / "poisoning.jsonl")]
    good = run(paths, True)
    assert not differences(good, run(paths, False))
    real = audit._histogram

    def off_by_one(d):
        h = real(d)
        h._max += 1
        return h

    monkeypatch.setattr(audit, "_histogram", off_by_one)
    assert differences(run(paths, True), run(paths, False))
    monkeypatch.setattr(audit, "_histogram", real)
    real_message = audit._NativeFindings._message
    monkeypatch.setattr(audit._NativeFindings, "_message", lambda self, pieces: real_message(self, pieces) + ".")
    broken = [str(mg.HERE / "clean_run.jsonl"), str(mg.HERE / "clean_run.jsonl")]  # repeated seqs: findings
    assert "findings" in [d.split(":")[0] for d in differences(run(broken, True), run(broken, False))]
    monkeypatch.setattr(audit._NativeFindings, "_message", real_message)
    assert not differences(run(broken, True), run(broken, False))
    assert differences(run(paths, True, top=1), run(paths, False))  # a native run with other options


# ------------------------------------------------------------------------------------ engine selection and API


def test_native_is_the_default_and_python_can_be_forced(monkeypatch):
    calls = []
    real = audit._audit_native
    monkeypatch.setattr(audit, "_audit_native", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv(audit.ENGINE_ENV, raising=False)
    p = [mg.HERE / "clean_run.jsonl"]
    audit_paths(p)
    assert calls == [1]
    audit_paths(p, native=False)
    monkeypatch.setenv(audit.ENGINE_ENV, "python")
    audit_paths(p)
    assert calls == [1]
    assert audit.main_audit([str(p[0]), "--engine", "native"]) == 0
    assert calls == [1, 1]
    monkeypatch.setenv(audit.ENGINE_ENV, "fast")
    with pytest.raises(ValueError, match="LIFECYCLE_AUDIT_ENGINE"):
        audit_paths(p)


def test_another_table_falls_back_to_the_python_replay(monkeypatch):
    other = dataclasses.replace(SPEC, digest="0123456789abcdef")
    assert "not the compiled table" in audit.native_unavailable(other)
    monkeypatch.setattr(audit, "_audit_native", lambda *a, **k: pytest.fail("native replay used"))
    log = mg.HERE / "clean_run.jsonl"
    for env in (None, "", "auto", " Auto ", "python"):  # unset, empty and auto fall back; python never asks
        if env is None:
            monkeypatch.delenv(audit.ENGINE_ENV, raising=False)
        else:
            monkeypatch.setenv(audit.ENGINE_ENV, env)
        res = audit_paths([log], other)
        assert res.table_digest == "0123456789abcdef" and res.by_kind("table_mismatch"), env
    with pytest.raises(ValueError, match="cannot be used: table"):
        audit_paths([log], other, native=True)
    # LIFECYCLE_AUDIT_ENGINE=native asks for the native replay as --engine native does: refused with the reason,
    # not silently replayed in python (it had fallen back, and the caller's choice was lost)
    monkeypatch.setenv(audit.ENGINE_ENV, "native")
    with pytest.raises(errors.InvalidArgument, match=r"LIFECYCLE_AUDIT_ENGINE=native.*not the compiled table") as ei:
        audit_paths([log], other)
    assert ei.value.argument == audit.ENGINE_ENV
    audit_paths([log], other, native=False)  # an explicit argument still wins over the environment


def test_required_native_engine_from_the_environment_exits_2_with_the_reason(monkeypatch, tmp_path, capsys):
    """The command line: LIFECYCLE_AUDIT_ENGINE=native with a table other than the compiled one is exit 2 and a
    message, as --engine native is; with auto the same run falls back and audits."""
    from lifecycle import cli
    table = tmp_path / "another.table"
    line = "expired           no evidence arrived within cancel_grace\n"
    text = spec.default_table_path().read_text()
    assert line in text
    table.write_text(text.replace(line, line + "spare             an outcome no row gives (another table)\n"))
    assert spec.load(table).digest != spec.load_default().digest
    log = str(mg.HERE / "clean_run.jsonl")
    monkeypatch.setenv(audit.ENGINE_ENV, "native")
    assert cli.main(["audit", log, "--table", str(table)]) == 2
    err = capsys.readouterr().err
    assert "LIFECYCLE_AUDIT_ENGINE=native" in err and "not the compiled table" in err and "Traceback" not in err, err
    monkeypatch.setenv(audit.ENGINE_ENV, "auto")
    assert cli.main(["audit", log, "--table", str(table)]) in (0, 1)


@pytest.mark.parametrize(("kw", "why"), [({"window": 0}, ">= 1"), ({"top": 0}, ">= 1"), ({"max_line": -1}, ">= 0"),
                                         ({"window": 2.5}, "expected an int"), ({"top": 2**70}, "int64")])
def test_options_neither_replay_takes_are_refused_by_both(kw, why):
    """native_unavailable() names them, and audit_paths refuses them for either replay before reading (the
    Python one took window=0 silently, and failed later on the others)."""
    assert why in audit.native_unavailable(None, **kw)
    for native in (None, False):
        with pytest.raises(errors.InvalidArgument, match=why.replace("*", r"\*")) as ei:
            audit_paths([mg.HERE / "clean_run.jsonl"], native=native, **kw)
        assert ei.value.argument == next(iter(kw))


def test_the_native_defaults_are_the_python_ones():
    """The C++ Options defaults (for C++ callers) are a second copy of the Python constants and defaults;
    audit.py always passes its own, and this keeps the two equal."""
    opts = audit._native_options()
    assert _core.AUDIT_DEFAULTS == {
        **{k: v for k, v in opts.items() if k != "leak_age_ns"},
        "max_depth": audit.MAX_DEPTH, "lookahead": audit._LOOKAHEAD, "max_tables": audit._MAX_TABLES}


def test_bad_use_of_the_binding_raises_typed_errors(tmp_path):
    def new(**kw):
        return _core.AuditReplay(**{"window": 8, "top": 2, "keep_findings": 5, "keep_violating": 5, "leak_age_ns": 0,
                                    "max_line": 100, "max_depth": 512, "lookahead": 4, "max_tables": 2, **kw})
    with pytest.raises(errors.InvalidArgument, match="window"):
        new(window="8")
    with pytest.raises(errors.InvalidArgument, match="window"):
        new(window=0)
    with pytest.raises(errors.InvalidArgument, match="max_line"):
        new(max_line=2**64)
    with pytest.raises(errors.InvalidArgument, match="max_depth"):
        new(max_depth=-1)
    r = new()
    with pytest.raises(errors.InvalidArgument, match="source"):
        r.feed(0, b"x")  # no group yet
    with pytest.raises(errors.InvalidArgument, match="files"):
        r.begin((0,))
    with pytest.raises(errors.InvalidArgument, match="files"):
        r.begin([])
    r.begin([0, 1])
    with pytest.raises(errors.InvalidArgument, match="files"):
        r.begin([0])
    with pytest.raises(errors.InvalidArgument, match="data"):
        r.feed(0, "text")
    with pytest.raises(errors.InvalidArgument, match="source"):
        r.feed(2, b"x")
    with pytest.raises(errors.InvalidArgument, match="source"):
        r.feed(True, b"x")
    r.feed(0, b'{"event": 1}\n{"ev')
    r.end(0)
    with pytest.raises(errors.InvalidArgument, match="after its end"):
        r.feed(0, b"x")
    with pytest.raises(errors.InvalidArgument, match="finish"):
        r.finish([0, 1])
    r.unreadable(1, "boom")
    assert r.run() == -1
    with pytest.raises(errors.InvalidArgument, match="file_order"):
        r.finish((0, 1))
    raw = r.finish([0, 1])
    # file 0 holds malformed lines only: no event, so no_events too (file 1 is unreadable: reported as that alone)
    assert raw["lines"] == 2 and [f[0] for f in r.take_findings()] == ["malformed", "malformed", "unreadable",
                                                                       "no_events"]
    with pytest.raises(errors.InvalidArgument, match="finished"):
        r.begin([0])
    with pytest.raises(TypeError):
        r.run(1)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_files_with_no_events_audit_identically(tmp_path, chunk, monkeypatch):
    """no_events (a file read to its end without one event): the same findings from both engines, alone,
    merged with good logs, given twice, unreadable, and gzip."""
    monkeypatch.setattr(audit, "_CHUNK", chunk)
    good = mg.HERE / "two_rank.rank0.jsonl"
    files = {}
    for name, data in {"empty": b"", "blank": b"\n \n\t\n  ", "noise": b"noise\n{}\n",
                       "gz": gzip.compress(b"\n\n"), "gz_empty": gzip.compress(b""),
                       "one": b"\n" + good.read_bytes().splitlines(keepends=True)[0]}.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_bytes(data)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b"\n" * 1000)[:20])
    for name, p in files.items():
        assert_same([p])
        assert_same([good, p])
        assert_same([p, good, p])
    assert_same(list(files.values()))
    assert_same([cut, files["empty"], good])
    assert_same([files["empty"]], keep_findings=0)
    res = audit_paths([files["empty"], good, files["blank"]], SPEC, native=True)
    assert [(f.file, f.line) for f in res.by_kind("no_events")] == [(str(files["blank"]), 0),  # (by file name)
                                                                   (str(files["empty"]), 0)]
