"""Engine benchmark: one workload, every way of driving it, side by side in one run.

Workload: N sessions driven advertise -> expose -> complete -> terminate (4 transitions each), and a
cancelled variant advertise -> expose -> cancel -> complete -> terminate (5).  Prints numbers and
ratios; asserts nothing about time.  `--json` prints one machine-readable line as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog  # noqa: E402

# The benchmark is the application: drop info-level events (a no-op logger call), as production
# configurations that ship JSON logs asynchronously would not pay rendering on the hot path.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30), cache_logger_on_first_use=True)

from lifecycle import TABLE, TransferEngine, _core  # noqa: E402
from lifecycle.audit import nearest_rank  # noqa: E402
from lifecycle.bench import count_arg  # noqa: E402
from lifecycle.model import ReferenceEngine  # noqa: E402

EV = {e: i for i, e in enumerate(TABLE.events)}


def best(fn, reps=3):
    out = None
    for _ in range(reps):
        r = fn()
        if out is None or r[1] < out[1]:
            out = r
    return out


def native(n, cancelled):
    t, s = _core.bench_native(n, cancelled)
    return t, s


def batch(n, cancelled, chunk=None):
    """advertise_batch + one apply_batch per event + drain; all n ids per call, or `chunk` per call
    with a drain after each chunk (an executor's loop: a batch of events per iteration, then poll)."""
    e = TransferEngine(transfer_timeout=None, cancel_grace=None)
    chunk = chunk or n
    groups = [array("Q", range(lo, min(n, lo + chunk))) for lo in range(0, n, chunk)]
    seq = [EV["expose"]] + ([EV["cancel"]] if cancelled else []) + [EV["complete"], EV["terminate"]]
    evs = {len(g): [bytes([code]) * len(g) for code in seq] for g in groups}
    t0 = time.perf_counter()
    for ids in groups:
        e.advertise_batch(ids, 0, 0)
        for b in evs[len(ids)]:
            e.apply_batch(ids, b)
        e._drain()
    dt = time.perf_counter() - t0
    return e.statistics().transitions, dt


def batch_loop(n, cancelled):
    return batch(n, cancelled, chunk=4096)


def single(n, cancelled):
    e = TransferEngine(transfer_timeout=None, cancel_grace=None)
    adv, expose, complete, cancel, term = e._advertise, e.expose, e.complete, e._cancel, e._terminate
    drain = e._drain
    t0 = time.perf_counter()
    if cancelled:
        for i in range(n):
            adv(i, 0, 0); expose(i); cancel(i); complete(i); term(i)  # noqa: E702
            if not i & 4095:
                drain()
    else:
        for i in range(n):
            adv(i, 0, 0); expose(i); complete(i); term(i)  # noqa: E702
            if not i & 4095:
                drain()
    drain()
    dt = time.perf_counter() - t0
    return e.statistics().transitions, dt


def facade(n, cancelled):
    """The Pythonic surface (Role strings, enum results) — what most executors call."""
    e = TransferEngine(transfer_timeout=None, cancel_grace=None)
    t0 = time.perf_counter()
    for i in range(n):
        e.advertise(i, "sender")
        e.expose(i)
        if cancelled:
            e.cancel(i)
        e.complete(i)
        e.terminate(i)
        if not i & 4095:
            e._drain()
    e._drain()
    dt = time.perf_counter() - t0
    return e.statistics().transitions, dt


def model(n, cancelled):
    m = ReferenceEngine(TABLE)
    t0 = time.perf_counter()
    k = 0
    for i in range(n):
        m.advertise(i, "sender")
        k += 1
        for ev in (["expose", "cancel", "complete", "terminate"] if cancelled else ["expose", "complete", "terminate"]):
            m.apply(i, ev)
            k += 1
    return k, time.perf_counter() - t0


def model_create(n=300):
    gc.collect()  # the earlier runs' machines are garbage: do not time their collection
    m = ReferenceEngine(TABLE)
    t0 = time.perf_counter()
    for i in range(n):
        m.advertise(i, "sender")
    return (time.perf_counter() - t0) / n


def advertise_cost(n):
    e = TransferEngine(transfer_timeout=None, cancel_grace=None)
    adv = e.advertise
    t0 = time.perf_counter()
    for i in range(n):
        adv(i, "sender")
    return (time.perf_counter() - t0) / n


def rss_kib():
    """Current resident set (not the high-water mark), KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def memory_per_session(n):
    gc.collect()
    e = TransferEngine(transfer_timeout=None, cancel_grace=None)
    base_table = e.memory_bytes()
    rss0 = rss_kib()
    step = 1 << 16
    for lo in range(0, n, step):
        e.advertise_batch(array("Q", range(lo, min(n, lo + step))), 0, 0)
        e._drain()
    table = e.memory_bytes() - base_table
    rss = (rss_kib() - rss0) * 1024
    assert e.live_sessions() == n
    return table / n, rss / n


def poll_cost(idle, ready=256, rounds=200):
    e = TransferEngine(transfer_timeout=30, cancel_grace=5)
    step = 1 << 16
    for lo in range(0, idle, step):
        ids = array("Q", range(lo, min(idle, lo + step)))
        e.advertise_batch(ids, 0, 0)
        e.apply_batch(ids, bytes([EV["expose"]]) * len(ids))  # live, InFlight, with timers armed
        e._drain()
    base = 10**12
    samples = []
    for r in range(rounds):
        ids = array("Q", range(base + r * ready, base + (r + 1) * ready))
        e.advertise_batch(ids, 0, 0)
        t0 = time.perf_counter()
        got = e.poll()
        samples.append(time.perf_counter() - t0)
        assert len(got) == ready
    samples.sort()
    return samples[nearest_rank(0.5, len(samples)) - 1], samples[nearest_rank(0.99, len(samples)) - 1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=count_arg(1, 20_000_000), default=200_000)  # (the native loop runs 5 n, <= 10**8)
    ap.add_argument("--live", type=count_arg(), default=1_000_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    n = a.n
    rows = []
    res = {}
    for variant, cancelled in (("complete", False), ("cancelled", True)):
        for name, fn, nn in (("C++ native loop", native, n * 5), ("batch API, one call", batch, n),
                             ("batch API, 4096/call", batch_loop, n),
                             ("single calls (raw)", single, n), ("facade calls", facade, n // 2),
                             ("transitions model", model, max(n // 50, 2000))):
            t, s = best(lambda: fn(nn, cancelled))
            rate = t / s
            res[f"{variant}/{name}"] = rate
            rows.append((variant, name, t, s, rate))
    print(f"\nengine benchmark  (one core; N={n}; best of 3; steady clock source: {_core.steady_source()})\n")
    print(f"{'workload':<10} {'driver':<22} {'transitions':>12} {'seconds':>9} {'transitions/s':>14} {'vs model':>9}")
    for variant, name, t, s, rate in rows:
        ratio = rate / res[f"{variant}/transitions model"]
        print(f"{variant:<10} {name:<22} {t:>12,} {s:>9.3f} {rate:>14,.0f} {ratio:>8.0f}x")
    adv = advertise_cost(200_000)
    create = model_create()
    per_table, per_rss = memory_per_session(a.live)
    p_small = min(poll_cost(1_000), poll_cost(1_000))
    p_big = min(poll_cost(a.live), poll_cost(a.live))
    targets = [
        ("native transitions/s", res["complete/C++ native loop"], ">= 10,000,000", res["complete/C++ native loop"] >= 10e6),
        ("native transitions/s (cancelled variant)", res["cancelled/C++ native loop"], ">= 10,000,000",
         res["cancelled/C++ native loop"] >= 10e6),
        ("batch from Python /s (all N in one call)", res["complete/batch API, one call"], ">= 5,000,000",
         res["complete/batch API, one call"] >= 5e6),
        ("batch from Python /s (4096 per call)", res["complete/batch API, 4096/call"], ">= 5,000,000",
         res["complete/batch API, 4096/call"] >= 5e6),
        ("single calls /s", res["complete/single calls (raw)"], ">= 1,000,000", res["complete/single calls (raw)"] >= 1e6),
        ("advertise (facade) µs/call", adv * 1e6, "<= 1.0", adv * 1e6 <= 1.0),
        (f"bytes/live session @{a.live:,} (table)", per_table, "<= 128", per_table <= 128),
        (f"bytes/live session @{a.live:,} (RSS)", per_rss, "(info)", True),
        ("poll p50 µs, 1k idle live", p_small[0] * 1e6, "(info)", True),
        (f"poll p50 µs, {a.live:,} idle live", p_big[0] * 1e6, "(info)", True),
        ("poll p50 ratio big/small", p_big[0] / p_small[0], "<= 1.5", p_big[0] / p_small[0] <= 1.5),
        ("poll p99 µs (256 ready)", p_big[1] * 1e6, "< 1000", p_big[1] * 1e6 < 1000),
        ("transitions model: create µs", create * 1e6, "(baseline)", True),
    ]
    print(f"\n{'target':<44} {'measured':>14} {'goal':>14}  met")
    for name, v, goal, ok in targets:
        print(f"{name:<44} {v:>14,.2f} {goal:>14}  {'yes' if ok else 'NO'}")
    if a.json:
        print(json.dumps({"suite": "engine", "rates": res, "targets": [
            {"name": t[0], "value": t[1], "goal": t[2], "met": t[3]} for t in targets]}))


if __name__ == "__main__":
    main()
