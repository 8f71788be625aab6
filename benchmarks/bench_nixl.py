"""NIXL transfers through the engine vs a bare NIXL loop, side by side (prints numbers, asserts nothing).

Both loops run in C++ (``_core._bench_transfers``, GIL released) on the same agent wrapper and the same
progress thread; the only difference is the engine: with it, each transfer is advertise + expose +
post + complete (by the progress thread) + drain + terminate; without it, post + completion count.
Same process, two agents over UCX (cma for RMA), WRITEs of 4 KiB .. 16 MiB, 1 and 64 in flight.

Also measured: completion-to-poll latency (engine record timestamp of `complete` -> the record
drained by the waiting C++ loop (batch 1 only: with 64 in flight the loop is busy posting), and ->
returned by Python ``TransferEngine.drain()/poll()``, with transition logs off and with them rendered as
JSON lines to a file).

    python benchmarks/bench_nixl.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog  # noqa: E402

from lifecycle import TransferEngine, _core  # noqa: E402
from lifecycle.transport import Mem, NixlTransport  # noqa: E402

KiB, MiB = 1024, 1024 * 1024


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    # The benchmark is an application: transition logs off (they are not the subject of the table).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.ReturnLoggerFactory())

    sizes = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB]
    counts = {4 * KiB: 4096, 64 * KiB: 2048, 1 * MiB: 512, 16 * MiB: 128}
    if args.quick:
        counts = {k: max(64, v // 8) for k, v in counts.items()}
    span = 64 * 16 * MiB
    src = (ctypes.c_char * span)()
    dst = (ctypes.c_char * span)()
    ctypes.memset(src, 1, span)
    src_mem = Mem(ctypes.addressof(src), span)
    dst_mem = Mem(ctypes.addressof(dst), span)

    engine = TransferEngine(transfer_timeout=60, cancel_grace=10, tombstones=1 << 12)
    with NixlTransport(engine, "bench-eng") as te, NixlTransport(None, "bench-bare") as tb, \
            NixlTransport(None, "bench-peer") as tp:
        te.register(src_mem)
        tb.register(src_mem)
        tp.register(dst_mem)
        for t in (te, tb):
            t.add_peer(tp.metadata())
            tp.add_peer(t.metadata())
        req = 1
        print("engine and bare alternate within each rep (order flipped every rep). 'best': the fastest rep of")
        print("each (mean us per transfer); 'median': the median batch over all reps (robust to the VM's")
        print("millisecond preemptions), per transfer; 'paired': the median over reps of engine/bare back to back.\n")
        print(f"{'size':>8} {'batch':>5} {'n':>5} | {'best: engine':>12} {'bare':>8} {'overhead':>9} {'ratio':>6} | "
              f"{'median: engine':>14} {'bare':>8} {'overhead':>9} {'ratio':>6} | {'paired':>6} | "
              f"{'eng GB/s':>8} | c2drain p50/p99 us")
        for size in sizes:
            for batch in (1, 64):
                n = counts[size]
                best = {}
                batches = {"engine": [], "bare": []}
                lat = []
                paired = []
                for rep in range(args.reps):
                    took = {}
                    order = (("engine", te), ("bare", tb)) if rep % 2 == 0 else (("bare", tb), ("engine", te))
                    for mode, t in order:
                        r = _core._bench_transfers(t._core, "bench-peer", "write", src_mem.addr, dst_mem.addr,
                                                   size, batch, n, req)
                        req += n
                        if r["failed"]:
                            raise SystemExit(f"{r['failed']} transfers failed")
                        best[mode] = min(best.get(mode, 1e9), r["seconds"])
                        took[mode] = r["seconds"]
                        batches[mode] += r["batch_ns"]
                        if mode == "engine":
                            lat += r["latency_ns"]
                    paired.append(took["engine"] / took["bare"])
                e_us, b_us = best["engine"] / n * 1e6, best["bare"] / n * 1e6
                em, bm = (statistics.median(batches[m]) / batch / 1e3 for m in ("engine", "bare"))
                print(f"{size // KiB:>6}Ki {batch:>5} {n:>5} | {e_us:>12.2f} {b_us:>8.2f} {e_us - b_us:>+8.2f}u "
                      f"{e_us / b_us:>6.3f} | {em:>14.2f} {bm:>8.2f} {em - bm:>+8.2f}u {em / bm:>6.3f} | "
                      f"{statistics.median(paired):>6.3f} | {size / e_us / 1e3:>8.2f} | "
                      + (f"{pct(lat, 50) / 1e3:.1f} / {pct(lat, 99) / 1e3:.1f}" if batch == 1 else "-"))

        # The engine's own work per transfer, without the transport's timing noise: the same calls
        # (advertise, expose, complete, terminate, drain) in a native loop on one thread.
        nat = _core.bench_native(200_000, False)
        per = nat[1] / 200_000 * 1e6  # (transitions, seconds)
        print(f"\nengine work per transfer (advertise+expose+complete+terminate+drain, native loop, one thread, "
              f"warm caches): {per:.3f} us = {per / 100:.2%} of a 100 us transfer")

        # Completion-to-poll() from Python: the executor waits in drain() (GIL released) and gets the
        # Quiesced transition from poll(); latency = return time - the record's timestamp.  Twice: with
        # transition logs off (structlog level filter), and rendered as JSON lines to a file (the audit
        # setup; the rendering of every record drained with the completion is part of the latency).
        print("\ncompletion-to-poll() (Python TransferEngine.drain/poll, 4 KiB, 1 in flight):")
        with tempfile.TemporaryDirectory() as tmp:
            logfile = open(Path(tmp) / "events.jsonl", "w")
            for label, conf in (
                ("logs off (level filter)", dict(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                                                 logger_factory=structlog.ReturnLoggerFactory())),
                ("JSON lines to a file", dict(processors=[structlog.processors.JSONRenderer()],
                                              logger_factory=structlog.WriteLoggerFactory(logfile))),
            ):
                structlog.configure(**conf)
                lat = []
                for i in range(2000 if not args.quick else 300):
                    r = req + i
                    engine.advertise(r, "sender")
                    te.write(r, src_mem.slice(0, 4 * KiB), "bench-peer", dst_mem.slice(0, 4 * KiB))
                    got = None
                    while got is None:
                        for tr in engine.drain(1.0):
                            if tr.request == r and tr.to_state.value == "Quiesced":
                                got = time.monotonic_ns() - tr.t_ns
                    lat.append(got)
                    engine.terminate(r)
                req += len(lat)
                print(f"  {label:<26} p50 {pct(lat, 50) / 1e3:.1f} us, p99 {pct(lat, 99) / 1e3:.1f} us, "
                      f"max {max(lat) / 1e3:.1f} us (n={len(lat)}, mean {statistics.mean(lat) / 1e3:.1f} us)")
            logfile.close()

if __name__ == "__main__":
    main()
