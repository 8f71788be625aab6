"""Cost of the rank-symmetric gate and its ledger, next to a bare 8-byte Allreduce.

Run: ``mpiexec -n 2 python benchmarks/bench_collectives.py`` (and ``-n 4``).  Rank 0 prints one table:
microseconds per operation (median of ``--reps`` timed blocks of ``--iters`` calls) and ratios to
the bare Allreduce.  Prints numbers only; asserts no time.

  bare Allreduce      comm.Allreduce of one int64 (8 bytes), blocking: the floor
  bare Iallreduce     the same, non-blocking and polled with Test (what the watchdog needs)
  bare persistent     Allreduce_init once, then Start + Test per call (what RankGroup uses)
  OR-gate             RankGroup(ledger=False).any_rank: header exchange, no fingerprint check
  OR-gate + ledger    RankGroup(ledger=True).any_rank: fingerprint + call site folded into the gate
  flush (empty)       RankGroup.flush with nothing buffered anywhere (one header exchange)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpi4py import MPI  # noqa: E402

from lifecycle.bench import count_arg  # noqa: E402
from lifecycle.collectives import RankGroup  # noqa: E402


def _timed(comm, fn, iters: int, reps: int) -> float:
    """Median over reps of the mean time per call, in microseconds (max over ranks per rep)."""
    for _ in range(min(iters, 200)):
        fn()
    samples = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        dt = (time.perf_counter() - t0) / iters * 1e6
        samples.append(comm.allreduce(dt, op=MPI.MAX))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=count_arg(), default=20000)
    ap.add_argument("--reps", type=count_arg(), default=7)
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    flag = rank == 0
    send = np.array([int(flag)], dtype=np.int64)
    recv = np.empty(1, dtype=np.int64)

    def bare() -> None:
        comm.Allreduce(send, recv, MPI.MAX)

    def bare_nb() -> None:
        req = comm.Iallreduce(send, recv, MPI.MAX)
        while not req.Test():
            pass

    psend = np.array([int(flag)], dtype=np.int64)
    precv = np.empty(1, dtype=np.int64)
    preq = comm.Allreduce_init(psend, precv, MPI.MAX)

    def bare_persistent() -> None:
        preq.Start()
        while not preq.Test():
            pass

    plain = RankGroup(comm, ledger=False)
    ledger = RankGroup(comm, ledger=True)

    def gate() -> None:
        plain.any_rank(flag)

    def gate_ledger() -> None:
        ledger.any_rank(flag)

    def flush_empty() -> None:
        ledger.flush()

    cases = [
        ("bare Allreduce (8 B)", bare),
        ("bare Iallreduce+Test (8 B)", bare_nb),
        ("bare Allreduce_init+Start/Test", bare_persistent),
        ("OR-gate (no ledger)", gate),
        ("OR-gate + ledger", gate_ledger),
        ("flush, all empty (+ ledger)", flush_empty),
    ]
    results = {name: _timed(comm, fn, args.iters, args.reps) for name, fn in cases}
    if rank == 0:
        base = results["bare Allreduce (8 B)"]
        print(f"ranks={comm.Get_size()} iters={args.iters} reps={args.reps} "
              f"mpi={MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"{'case':32s} {'us/op':>8s} {'x bare':>8s}")
        for name, us in results.items():
            print(f"{name:32s} {us:8.2f} {us / base:8.2f}")
        overhead = results["OR-gate + ledger"] - base
        target = max(5.0, 0.5 * base)
        print(f"ledger gate overhead vs bare Allreduce: {overhead:.2f} us "
              f"(target <= max(5 us, 1.5x bare) -> <= {target:.2f} us over bare): "
              f"{'within' if overhead <= target else 'OVER'} target")
        if args.json:
            print(json.dumps({"ranks": comm.Get_size(), "us_per_op": results}))
    preq.Free()
    plain.close()
    ledger.close()


if __name__ == "__main__":
    main()
