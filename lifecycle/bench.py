"""``lifecycle bench``: run the benchmark suites and print one table of results and ratios.

Each suite is a script in ``benchmarks/`` run as a subprocess (bounded by a timeout); its own
output is parsed (``--json`` where the script has it, else its printed table).  A suite that is
missing, fails, times out or prints nothing parseable is shown as failed (with its output) and the
command exits 1.  Benchmarks print numbers; nothing here asserts a time.

    lifecycle bench [--quick] [--only engine,nixl,collectives,audit] [--json] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SUITES", "count_arg", "counts_arg", "main"]

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@dataclass
class Row:
    metric: str
    value: float
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline else self.value / self.baseline


@dataclass
class Result:
    suite: str
    status: str  # ok | failed | missing | timeout | unparsed
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    output: str = ""


def count_arg(low: int = 1, high: int | None = None):
    """An argparse ``type`` for the benchmark scripts' counts: a whole number in ``low .. high``, else the usage
    error (exit status 2) naming the option; a count the script cannot run (``--reps 0``, ``--iters 0``) ended in
    a traceback (IndexError, ZeroDivisionError, StatisticsError) after the setup."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {low} .. {high}, got {v}" if high is not None
                                             else f"expected a whole number >= {low}, got {v}")
        return v
    return parse


def counts_arg(low: int = 1, high: int | None = None):
    """An argparse ``type`` for a comma-separated list of counts (``--sizes 4,64``), each as :func:`count_arg`."""
    one = count_arg(low, high)

    def parse(text: str) -> list[int]:
        return [one(x.strip()) for x in text.split(",")]
    return parse


def _last_json(out: str) -> dict | None:
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def parse_engine(out: str) -> list[Row]:
    doc = _last_json(out)
    if not doc:
        return []
    rates = doc.get("rates", {})
    rows = []
    for key, rate in rates.items():
        variant = key.split("/")[0]
        model = rates.get(f"{variant}/transitions model")
        if not key.endswith("transitions model"):
            rows.append(Row(f"{key} transitions/s", rate, "/s", model, "transitions model"))
    for t in doc.get("targets", []):
        rows.append(Row(t["name"], t["value"], "", None, "", f"goal {t['goal']}: {'met' if t['met'] else 'NOT MET'}"))
    return rows


_NIXL_ROW = re.compile(r"^\s*(\d+)Ki\s+(\d+)\s+(\d+)\s+\|\s+([\d.]+)\s+([\d.]+)\s+\|\s+([-+\d.]+)\s+\[\s*([-+\d.]+),\s*([-+\d.]+)\]")
_NIXL_GOAL = re.compile(r"\|\s*(<= [\d.]+ ?(?:us|%)): (met|MISS)\s*$")
_C2P_ROW = re.compile(r"^\s{2}(\S.*?)\s{2,}(p50 [^(;]*?),?\s*(?:\(.*)?$")
_C2P_GOAL = re.compile(r"; target (p99 <= [\d.]+ ?us): (met|MISS)\s*$")


def parse_nixl(out: str) -> list[Row]:
    rows = []
    in_c2p = batch_calls = False
    for line in out.splitlines():
        m = _NIXL_ROW.match(line)
        if m:
            size, batch, _pairs, e_us, b_us, diff, lo, hi = m.groups()
            goal = _NIXL_GOAL.search(line)
            how = ", batch calls" if batch_calls else ""  # the section after the table (its own verdicts)
            rows.append(Row(f"WRITE {size} KiB x{batch} in flight{how}: engine us/xfer", float(e_us), "us",
                            float(b_us), "bare NIXL loop", f"paired diff {diff} us [{lo}, {hi}] 95% CI"
                            + (f"; goal {goal.group(1)}: {'met' if goal.group(2) == 'met' else 'NOT MET'}"
                               if goal else "")))
        elif line.startswith("with batch calls"):
            batch_calls = True
        elif line.startswith("completion-to-poll"):
            in_c2p, batch_calls = True, False
        elif line.startswith("engine work per transfer"):
            batch_calls = False
        elif in_c2p and (c := _C2P_ROW.match(line)):
            # the note: the percentiles, then the line's verdict (cut at 60 characters, the verdict at the end of
            # the line was lost: a MISS showed as nothing)
            goal = _C2P_GOAL.search(line)
            rows.append(Row(f"completion-to-poll, {c.group(1)}", float("nan"), "", None, "", c.group(2)
                            + (f"; goal {goal.group(1)}: {'met' if goal.group(2) == 'met' else 'NOT MET'}"
                               if goal else "")))
    return rows


def parse_collectives(out: str) -> list[Row]:
    doc = _last_json(out)
    if not doc:
        return []
    res = doc.get("us_per_op", {})
    base_name = "bare Allreduce (8 B)"
    base = res.get(base_name)
    return [Row(f"{name} (n={doc.get('ranks')})", us, "us/op", base if name != base_name else None,
                base_name if name != base_name else "") for name, us in res.items()]


_AUDIT_ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+(native|python|stdlib)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def parse_audit(out: str) -> list[Row]:
    found = []
    for line in out.splitlines():
        m = _AUDIT_ROW.match(line)
        if m:
            ev, _mib, engine, eps, rss, traced = m.groups()
            found.append((int(ev), engine, float(eps.replace(",", "")), rss, traced))
    python = {ev: eps for ev, engine, eps, _r, _t in found if engine == "python"}
    return [Row(f"audit @{ev:,} events, {engine} replay: events/s", eps, "/s",
                python.get(ev) if engine != "python" else None, "python replay" if engine != "python" else "",
                f"maxrss {rss} MiB, traced peak {traced} MiB") for ev, engine, eps, rss, traced in found]


def _suites(quick: bool) -> dict[str, tuple[list[str], object]]:
    py = sys.executable
    mpiexec = shutil.which("mpiexec") or "mpiexec"
    coll_iters = ["--iters", "2000", "--reps", "3"] if quick else []
    audit_sizes = ["--sizes", "100000,300000"] if quick else []
    engine_n = ["--n", "50000", "--live", "200000"] if quick else []
    return {
        "engine": ([py, str(BENCH / "bench_engine.py"), "--json", *engine_n], parse_engine),
        "nixl": ([py, str(BENCH / "bench_nixl.py"), *(["--quick"] if quick else [])], parse_nixl),
        "collectives": ([mpiexec, "-n", "2", py, str(BENCH / "bench_collectives.py"), "--json", *coll_iters],
                        parse_collectives),
        "audit": ([py, str(BENCH / "bench_audit.py"), *audit_sizes], parse_audit),
    }


SUITES = ("engine", "nixl", "collectives", "audit")


def run_suite(name: str, cmd: list[str], parse, timeout: float) -> Result:
    script = next((Path(c) for c in cmd if c.endswith(".py")), None)
    if script is None or not script.is_file():
        return Result(name, "missing", command=cmd, output=f"{script} not found")
    if cmd[0].endswith("mpiexec") and shutil.which(cmd[0]) is None:
        return Result(name, "missing", command=cmd, output="mpiexec not found (pip install mpich mpi4py)")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return Result(name, "timeout", time.monotonic() - t0, cmd, output=out)
    secs = time.monotonic() - t0
    if p.returncode != 0:
        return Result(name, f"failed (exit {p.returncode})", secs, cmd, output=out)
    try:
        rows = parse(out)
        for row in rows:  # (a value that is no number raised TypeError from the table, after every suite ran)
            for v in (row.value, row.baseline):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise TypeError(f"{row.metric}: {v!r} is not a number")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (AttributeError: a JSON list for a dict)
        rows = []
        out += f"\n[lifecycle bench: parse error: {exc}]"
    return Result(name, "ok" if rows else "unparsed", secs, cmd, rows, out)


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if v != v:  # nan
        return ""
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"


def format_table(results: list[Result]) -> str:
    head = ("suite", "metric", "value", "baseline", "ratio", "note")
    lines = []
    body = []
    for r in results:
        if not r.rows:
            body.append((r.suite, f"[{r.status}]", "", "", "", f"{r.seconds:.1f} s"))
        for i, row in enumerate(r.rows):
            base = "" if row.baseline is None else f"{_fmt(row.baseline)} ({row.baseline_name})"
            ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
            body.append((r.suite if i == 0 else "", row.metric, _fmt(row.value), base, ratio, row.note))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[1] = min(widths[1], 58)
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(b, widths))).rstrip())
    lines.append("")
    lines.append("suites: " + ", ".join(f"{r.suite} {r.status} ({r.seconds:.1f} s)" for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lifecycle bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer iterations")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per suite")
    p.add_argument("--json", action="store_true", help="machine-readable results")
    p.add_argument("--show-output", action="store_true", help="print every suite's own output too")
    a = p.parse_args(argv)
    if not 0 < a.timeout <= 86400:  # (NaN too: the suite's wait raised, its child left running)
        p.error(f"--timeout must be seconds in (0, 86400], got {a.timeout}")
    wanted = list(dict.fromkeys(s.strip() for s in a.only.split(",") if s.strip()))  # each suite once, in order
    bad = [s for s in wanted if s not in SUITES]
    if bad:
        p.error(f"unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)}")
    if not wanted:  # (an empty --only ran nothing and exited 0)
        p.error(f"--only names no suite; choose from {', '.join(SUITES)}")
    suites = _suites(a.quick)
    results = []
    for name in wanted:
        cmd, parse = suites[name]
        print(f"[lifecycle bench] {name}: {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd)}",
              file=sys.stderr, flush=True)
        results.append(run_suite(name, cmd, parse, a.timeout))
    ok = all(r.status == "ok" for r in results)
    if a.json:  # (a row without a number, NaN, came out as the bare NaN that JSON does not have: null now)
        print(json.dumps({"ok": ok, "results": [dict(asdict(r), rows=[
            {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in dict(asdict(x), ratio=x.ratio).items()} for x in r.rows]) for r in results]},
            indent=2, default=str, allow_nan=False))
    else:
        print(format_table(results))
        for r in results:
            if r.status != "ok" or a.show_output:
                print(f"\n---- {r.suite}: {r.status}; output ({' '.join(r.command)}) ----")
                print(r.output[-4000:].rstrip() or "(no output)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
