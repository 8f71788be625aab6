"""poll_budget benchmark: one cancellation burst, polled with and without a budget, side by side in one run.

Workload: S sessions advertised, exposed, cancelled, terminated (Deferred) and completed before the first poll(), 8
records each (5 transitions, 2 call results, 1 TerminateNow), then poll() until nothing is left, with a no-op
on_terminate.  For each budget (None: all at once) and each logging setup (transition lines filtered out by level;
JSON lines to a file): the polls it took, the total, the median and the slowest poll, best of --reps by total.  A
budget spreads the work, so the slowest poll is the number it is for.  Prints numbers; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog  # noqa: E402

from lifecycle import TransferEngine  # noqa: E402
from lifecycle.bench import count_arg  # noqa: E402


def burst(sessions: int, budget: int | None) -> tuple[int, float, float, float]:
    """(polls, total s, median poll s, slowest poll s) for one burst, polled to the end."""
    e = TransferEngine(poll_budget=budget, on_terminate=lambda r: None, tombstones=2 * sessions)
    for r in range(sessions):
        e.advertise(r, "sender")
        e.expose(r)
    for r in range(sessions):
        e.cancel(r)
        e.terminate(r)
        e.complete(r)
    records = e.pending()
    times = []
    t0 = time.perf_counter()
    while True:
        a = time.perf_counter()
        got = e.poll()
        times.append(time.perf_counter() - a)
        if not got and e.pending() == 0 and not e._inbox and not e._notices:
            break
    total = time.perf_counter() - t0
    times.pop()  # the empty poll() that found nothing left (in the total, not counted as a poll)
    if records != 8 * sessions:
        raise SystemExit(f"the burst queued {records} records, expected {8 * sessions}")
    return len(times), total, statistics.median(times or [0.0]), max(times or [0.0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=count_arg(1, 1_000_000), default=12_500)
    ap.add_argument("--reps", type=count_arg(1, 100), default=2)
    ap.add_argument("--budgets", default="1024,128", help="comma-separated budgets besides None")
    args = ap.parse_args(argv)
    budgets: list[int | None] = [None]
    for part in args.budgets.split(","):
        try:
            budgets.append(count_arg(1)(part))
        except argparse.ArgumentTypeError as exc:
            ap.error(f"argument --budgets: {exc}")
    print(f"{8 * args.sessions:,} records ({args.sessions:,} sessions x 8), best of {args.reps} by total\n")
    print("| `poll_budget` | polls | total | median poll | slowest poll |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("logs off", "JSON lines"):
            for budget in budgets:
                best = None
                for _ in range(args.reps):
                    structlog.reset_defaults()
                    with open(Path(tmp) / "events.jsonl", "w") as f:
                        if label == "logs off":
                            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                                                logger_factory=structlog.ReturnLoggerFactory())
                        else:
                            structlog.configure(processors=[structlog.processors.JSONRenderer()],
                                                logger_factory=structlog.WriteLoggerFactory(f))
                        got = burst(args.sessions, budget)
                    best = got if best is None or got[1] < best[1] else best
                polls, total, med, slowest = best
                print(f"| {budget}, {label} | {polls:,} | {total * 1e3:.0f} ms | {med * 1e3:.2f} ms | "
                      f"{slowest * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
