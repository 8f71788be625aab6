"""`lifecycle bench` reads the benchmark scripts' printed tables: run each script on a tiny workload and check
that the parser finds every row it prints (a format change that the parser misses fails here, instead of
`lifecycle bench` silently reporting a suite as "unparsed")."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle import bench
from lifecycle.bench import parse_audit, parse_nixl
from test_transport_harness import needs_nixl

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_audit_rows_are_parsed():
    rows = parse_audit(run("bench_audit.py", "--sizes", "2000"))
    by = {r.metric.split(", ")[1].split(" ")[0]: r for r in rows}
    assert sorted(by) == ["native", "python"], [r.metric for r in rows]
    assert all(r.value > 0 and "maxrss" in r.note for r in rows)
    assert by["native"].baseline == by["python"].value  # native is compared with the reference replay
    assert parse_audit("nothing like a table\n") == []  # negative control: the parser is not vacuous


@needs_nixl
@pytest.mark.nixl
def test_nixl_rows_are_parsed():
    out = run("bench_nixl.py", "--sizes", "4", "--count", "64", "--reps", "1", "--c2p", "20", "--no-pin")
    rows = parse_nixl(out)
    xfer = [r for r in rows if r.metric.startswith("WRITE") and "batch calls" not in r.metric]
    batched = [r for r in rows if "batch calls" in r.metric]
    c2p = [r for r in rows if r.metric.startswith("completion-to-poll")]
    assert [r.metric for r in xfer] == ["WRITE 4 KiB x1 in flight: engine us/xfer",
                                        "WRITE 4 KiB x64 in flight: engine us/xfer"], out
    # the batch-calls section repeats the batch-64 cell with advertise_batch/transfer_batch/apply_batch,
    # beside the per-call row's difference and the change, with a verdict of its own
    assert [r.metric for r in batched] == ["WRITE 4 KiB x64 in flight, batch calls: engine us/xfer"], out
    pc = re.search(r"per call ([-+\d.]+) us -> ([-+\d.]+) us \(([-+\d.]+)\) \| <= 2 us: (?:met|MISS)$", out, re.M)
    assert pc and abs(float(pc.group(2)) - float(pc.group(1)) - float(pc.group(3))) < 0.011, out
    assert all(r.value > 0 and r.baseline > 0 and "95% CI" in r.note for r in xfer + batched)
    for r in xfer + batched:  # each cell's verdict is the 4 KiB goal applied to the cell's own median difference
        m = re.match(r"^paired diff ([-+\d.]+) us \[.*\] 95% CI; goal <= 2 us: (met|NOT MET)$", r.note)
        assert m, r.note
        assert (float(m.group(1)) <= 2.0) == (m.group(2) == "met"), r.note
    cells = re.search(r"^overhead targets: (\d+) of 2 cells met", out, re.M)
    assert cells and int(cells.group(1)) == sum(r.note.endswith(": met") for r in xfer), out
    cells = re.search(r"^overhead targets with batch calls: (\d+) of 1 cells met", out, re.M)
    assert cells and int(cells.group(1)) == sum(r.note.endswith(": met") for r in batched), out
    assert len(re.findall(r"target p99 <= 100 us: (?:met|MISS)$", out, re.M)) == 2, out
    assert [r.metric for r in c2p] == ["completion-to-poll, logs off (level filter)",
                                       "completion-to-poll, JSON lines to a file"], out
    assert all(math.isnan(r.value) and r.note.startswith("p50 ") for r in c2p)
    for r in c2p:  # each line's own verdict, on its own p99
        m = re.match(r"^p50 [\d.]+ us, p99 ([\d.]+) us, max [\d.]+ us; goal p99 <= 100 us: (met|NOT MET)$", r.note)
        assert m and (float(m.group(1)) <= 100) == (m.group(2) == "met"), r.note
    # each completion-to-poll line says how much of its tail preemption and host steal explain
    attrib = re.findall(r"; (\d+) samples \(([\d.]+)%\) preempted, (?:p99 of the rest [\d.]+ us|no sample without "
                        r"one), host steal (?:[\d.]+%|unknown); target", out)
    assert len(attrib) == 2 and all(int(n) <= 20 for n, _share in attrib), out
    changed = parse_nixl(out.replace("Ki ", "KiB "))  # negative control: a changed row is not matched
    assert [r.metric for r in changed] == [r.metric for r in c2p]


C2P_LINES = """completion-to-poll() (Python TransferEngine.drain/poll, 4 KiB, 1 in flight):
  logs off (level filter)    p50 9.2 us, p99 61.7 us, max 61.7 us (n=20, mean 15.3 us); 0 samples (0.0%) preempted, \
p99 of the rest 61.7 us, host steal unknown; target p99 <= 100 us: met
  JSON lines to a file       p50 9.3 us, p99 177.3 us, max 177.3 us (n=20, mean 12.9 us); 1 samples (5.0%) \
preempted, p99 of the rest 13.3 us, host steal 0.0%; target p99 <= 100 us: MISS
"""


def test_completion_to_poll_rows_carry_their_verdicts():
    # (the note was the line's first 60 characters: the verdict at its end never reached the table, so a MISS
    # showed as nothing)
    rows = parse_nixl(C2P_LINES)
    assert [(r.metric, r.note) for r in rows] == [
        ("completion-to-poll, logs off (level filter)",
         "p50 9.2 us, p99 61.7 us, max 61.7 us; goal p99 <= 100 us: met"),
        ("completion-to-poll, JSON lines to a file",
         "p50 9.3 us, p99 177.3 us, max 177.3 us; goal p99 <= 100 us: NOT MET")]
    # control: a line without its verdict still makes a row, with no verdict made up
    assert [r.note for r in parse_nixl(C2P_LINES.replace("; target p99 <= 100 us: MISS", ""))][1] == \
        "p50 9.3 us, p99 177.3 us, max 177.3 us"


def _bench_nixl():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_nixl
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_nixl


def test_nixl_targets_judge_small_cells_in_microseconds_and_larger_ones_in_percent():
    bench_nixl = _bench_nixl()
    assert bench_nixl.target(4096, 2.0, 25.0) == ("<= 2 us", True)
    assert bench_nixl.target(4096, 2.01, 1000.0) == ("<= 2 us", False)  # 0.2 %, still a miss: the goal is absolute
    assert bench_nixl.target(65536, 1.75, 35.0) == ("<= 5%", True)
    assert bench_nixl.target(65536, 1.76, 35.0) == ("<= 5%", False)
    assert bench_nixl.target(16 << 20, -30.0, 2400.0) == ("<= 5%", True)


def test_native_loop_with_cache_churn_drives_every_session_and_refuses_absurd_churn():
    from lifecycle import _core
    from lifecycle.errors import InvalidArgument

    for churn in (0, 64 << 10):
        transitions, seconds = _core.bench_native(5000, False, churn)
        assert transitions == 4 * 5000 and seconds > 0  # advertise, expose, complete, terminate each
    assert _core.bench_native(100, True, 4096)[0] == 5 * 100  # the cancelled variant: one more each
    with pytest.raises(InvalidArgument, match=r"^invalid churn_bytes: 1073741825 is over 1073741824$"):
        _core.bench_native(1, False, (1 << 30) + 1)
    # the loop cannot be interrupted (GIL released): 2**40 sessions ran for hours
    with pytest.raises(InvalidArgument, match=r"^invalid n: expected 1 \.\. 100000000 sessions, got 1099511627776$"):
        _core.bench_native(1 << 40, False)
    with pytest.raises(InvalidArgument, match=r"^invalid n: 1048577 sessions x 1048576 churn bytes is over 2\*\*40"):
        _core.bench_native((1 << 20) + 1, False, 1 << 20)
    with pytest.raises(InvalidArgument, match=r"^invalid n: expected 1 \.\."):
        _core.bench_native(0, False)


def test_percentiles_are_nearest_rank():
    bench_nixl = _bench_nixl()
    hundred = list(range(100, 0, -1))  # 1 .. 100, unsorted
    # (the index was int(p/100 * n), one rank high whenever p/100 * n is whole: p99 of 100 samples was the max)
    assert bench_nixl.pct(hundred, 99) == 99 and bench_nixl.pct(hundred, 50) == 50
    assert bench_nixl.pct([2, 1], 50) == 1 and bench_nixl.pct([5], 99) == 5
    assert bench_nixl.pct(list(range(1, 301)), 99) == 297  # (0.99 * 300 is 297.00000000000006 in floats)
    # controls: where p/100 * n is not whole the rank rounds up, and p100 is the max
    assert bench_nixl.pct(list(range(1, 96)), 99) == 95 and bench_nixl.pct(hundred, 100) == 100
    assert math.isnan(bench_nixl.pct([], 50))


def test_c2p_attribution_counts_steal_and_preempted_samples():
    bench_nixl = _bench_nixl()
    #                 user nice sys idle iowait irq softirq steal
    before = [100, 0, 50, 800, 0, 0, 0, 50]
    after = [150, 0, 75, 965, 0, 0, 0, 60]  # 250 ticks passed, 10 of them stolen
    assert bench_nixl.steal_share(before, after) == "4.0%"
    assert bench_nixl.steal_share(before, before) == "unknown"  # no time passed: no share to give
    assert bench_nixl.steal_share(None, after) == "unknown" and bench_nixl.steal_share([1, 2], [3, 4]) == "unknown"
    lat = [1000 * (i + 1) for i in range(100)]  # 1 .. 100 us
    slow = [i >= 95 for i in range(100)]  # the 5 slowest samples were preempted
    assert bench_nixl.preemption(lat, slow) == "5 samples (5.0%) preempted, p99 of the rest 95.0 us"
    assert bench_nixl.preemption(lat, [True] * 100) == "100 samples (100.0%) preempted, no sample without one"


def test_json_output_is_json_without_nan(monkeypatch, capsys):
    # the completion-to-poll rows have no number (NaN): `lifecycle bench --json` printed "value": NaN, which
    # JSON parsers other than Python's refuse
    rows = parse_nixl(C2P_LINES) + [bench.Row("m", 2.0, "us", 4.0, "base"), bench.Row("z", float("inf"), "us", 2.0)]
    monkeypatch.setattr(bench, "run_suite", lambda name, cmd, parse, timeout: bench.Result(name, "ok", 1.0, cmd, rows))

    def refuse(const):
        raise ValueError(f"not JSON: {const}")

    assert bench.main(["--only", "nixl", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    got = [(r["metric"], r["value"], r["baseline"], r["ratio"]) for r in doc["results"][0]["rows"]]
    assert got == [(rows[0].metric, None, None, None), (rows[1].metric, None, None, None),
                   ("m", 2.0, 4.0, 0.5), ("z", None, 2.0, None)]  # control: finite numbers stay numbers


@pytest.mark.parametrize("script, args, message", [
    ("bench_nixl.py", ["--reps", "0"], "argument --reps: expected a whole number >= 1, got 0"),
    ("bench_nixl.py", ["--sizes", "4,x"], "argument --sizes: expected a whole number, got 'x'"),
    ("bench_nixl.py", ["--c2p", "-1"], "argument --c2p: expected a whole number >= 0, got -1"),
    ("bench_nixl.py", ["--count", "-3"], "argument --count: expected a whole number >= 0, got -3"),
    ("bench_engine.py", ["--n", "0"], "argument --n: expected 1 .. 20000000, got 0"),
    ("bench_engine.py", ["--live", "0"], "argument --live: expected a whole number >= 1, got 0"),
    ("bench_collectives.py", ["--iters", "0"], "argument --iters: expected a whole number >= 1, got 0"),
    ("bench_collectives.py", ["--reps", "0"], "argument --reps: expected a whole number >= 1, got 0"),
    ("bench_audit.py", ["--sizes", "x"], "argument --sizes: expected a whole number, got 'x'"),
    ("bench_audit.py", ["--sizes", ","], "argument --sizes: expected a whole number, got ''"),
    ("bench_poll_budget.py", ["--budgets", "0"], "argument --budgets: expected a whole number >= 1, got 0"),
    ("bench_poll_budget.py", ["--sessions", "0"], "argument --sessions: expected 1 .. 1000000, got 0"),
])
def test_benchmark_options_they_cannot_run_are_usage_errors(script, args, message):
    # (each ran its setup and ended in a traceback: IndexError, ZeroDivisionError, StatisticsError, ValueError,
    # InvalidArgument, a pybind TypeError; --live 0 only after the whole table, in a ZeroDivisionError)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].endswith(f"error: {message}"), p.stderr[-2000:]


def test_count_options_take_what_the_scripts_can_run():
    # controls: the bounds themselves are taken, a list keeps its order
    assert bench.count_arg()("1") == 1 and bench.count_arg(0)("0") == 0 and bench.count_arg(1, 5)("5") == 5
    assert bench.counts_arg()("4, 64,1024") == [4, 64, 1024]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected 1 \.\. 5, got 6$"):
        bench.count_arg(1, 5)("6")


def test_quick_is_what_makes_each_suite_quick():
    # (the nixl suite ran bench_nixl.py --quick without --quick too: a full `lifecycle bench` / `make bench` judged
    # the completion-to-poll p99 on 300 samples, not 2000, and ran an eighth of the transfers per cell)
    full, quick = bench._suites(False), bench._suites(True)
    assert all("--quick" not in cmd for cmd, _parse in full.values()), full
    assert "--quick" in quick["nixl"][0]
    for name in bench.SUITES:  # control: every suite's quick run differs from its full one
        assert quick[name][0] != full[name][0], name


# Runs bench_nixl's table on a fake _core._bench_paired that takes exactly 2 us per transfer through the engine and
# 1 us bare (batch_ns: the transfers in the batch x that), in a subprocess (main() configures structlog globally).
FAKE_PAIRED = """
import sys
sys.path.insert(0, "benchmarks")
import bench_nixl

def paired(a, b, peer, op, local, remote, size, batch, count, first, batch_calls=False):
    out = []
    for per_ns in (2000, 1000):
        ns = [min(batch, count - done) * per_ns for done in range(0, count, batch)]
        out.append({"batch_ns": ns, "post_ns": [x // 2 for x in ns], "latency_ns": [1000] * count, "failed": 0})
    return tuple(out)

bench_nixl._core._bench_paired = paired
sys.argv = ["bench_nixl.py", "--sizes", "4", "--reps", "1", "--c2p", "3", "--no-pin", *sys.argv[1:]]
bench_nixl.main()
"""


@needs_nixl
@pytest.mark.nixl
@pytest.mark.parametrize("count", ["100", "1", "128"])
def test_nixl_cells_are_per_transfer_when_the_count_is_not_whole_batches(count):
    # (each batch's time was divided by 64 however many transfers it had: --count 100 made a last batch of 36,
    # read as 36/64 of a transfer each, and --count 1 one transfer read as 1/64 of one; the cell's median and
    # verdict came out of those: 'engine us 1.56, bare 0.78' where both loops take 2 and 1 us a transfer.
    # count 128 is the control: whole batches)
    p = subprocess.run([sys.executable, "-c", FAKE_PAIRED, "--count", count], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [r for r in parse_nixl(p.stdout) if r.metric.startswith("WRITE")]
    assert len(rows) == 3, p.stdout  # x1, x64, x64 with batch calls
    assert all((r.value, r.baseline) == (2.0, 1.0) for r in rows), p.stdout
    assert all(r.note.startswith("paired diff +1.00 us [+1.00, +1.00]") for r in rows), p.stdout


@pytest.mark.parametrize("line, why", [
    ('{"rates": []}', "'list' object has no attribute 'items'"),
    ('{"rates": {"complete/x": "fast", "complete/transitions model": 1}}',
     "complete/x transitions/s: 'fast' is not a number"),
    ('{"rates": {"complete/x": true}}', "complete/x transitions/s: True is not a number"),
])
def test_a_suite_printing_json_of_another_shape_is_unparsed(tmp_path, line, why):
    # (a list where a dict belongs raised AttributeError out of `lifecycle bench`, a string value TypeError from the
    # table after every suite had run: tracebacks, the other suites' results lost)
    script = tmp_path / "suite.py"
    script.write_text(f"print({line!r})\n")
    res = bench.run_suite("engine", [sys.executable, str(script)], bench.parse_engine, 60)
    assert (res.status, res.rows) == ("unparsed", []) and res.output.endswith(f"parse error: {why}]"), res
    assert "[unparsed]" in bench.format_table([res])
    script.write_text('print(\'{"rates": {"complete/x": 4.0, "complete/transitions model": 2}}\')\n')  # control
    res = bench.run_suite("engine", [sys.executable, str(script)], bench.parse_engine, 60)
    assert res.status == "ok" and [(r.value, r.ratio) for r in res.rows] == [(4.0, 2.0)], res


def test_median_confidence_interval_is_symmetric_and_covers_95_percent():
    bench_nixl = _bench_nixl()
    # (the low end was one rank high for half of all n: (6, 10, 15) at n = 21, whose exact coverage is 94.75 %)
    assert bench_nixl.median_ci(list(range(21))) == (5, 10, 15)
    for n in range(1, 301):
        lo, mid, hi = bench_nixl.median_ci(list(range(n)))
        assert lo + hi == n - 1 and lo <= mid <= hi, n  # symmetric ranks around the median
        if n >= 6:  # (below 6 samples no interval of order statistics reaches 95 %: the widest is used)
            # exact coverage: the median lies in [x_(lo+1), x_(hi+1)] unless fewer than lo + 1 or more than hi
            # samples fall below it (Binomial(n, 1/2))
            assert sum(math.comb(n, i) for i in range(lo + 1, hi + 1)) / 2 ** n >= 0.95, n
    assert bench_nixl.median_ci(list(range(30))) == (9, 14.5, 20)  # control: where the old ranks were right


def test_bench_poll_budget_prints_every_row_and_the_polls_each_budget_takes():
    """benchmarks/bench_poll_budget.py on 10 sessions (80 records): a row per budget and logging setup, and the
    poll count is the budget's arithmetic (None: one poll; 3: ceil(80 / 3); the empty poll that ends the loop not
    counted), so a budget the engine ignored, or one it over-spent, shows in the table."""
    out = run("bench_poll_budget.py", "--sessions", "10", "--reps", "1", "--budgets", "3,80,200")
    rows = re.findall(r"^\| (None|\d+), (logs off|JSON lines) \| ([\d,]+) \|", out, re.M)
    assert [(b, label) for b, label, _ in rows] == [(b, label) for label in ("logs off", "JSON lines")
                                                     for b in ("None", "3", "80", "200")]
    assert {(b, int(n)) for b, _, n in rows} == {("None", 1), ("3", 27), ("80", 1), ("200", 1)}
