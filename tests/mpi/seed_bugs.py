"""The seed bugs (DESIGN.md §8), raw mpi4py versus the RankGroup helpers.

  --bug gate    seed 000: a TP collective gated on a rank-local value (hang)
  --bug gather  seed 001: a conditional allgather on a per-rank-divergent path; the next collective
                receives that payload (misread)
  --bug ready   seed 003: each rank processes "what is ready locally", one collective per item (hang)

  --mode raw    the buggy program, plain mpi4py: it hangs (the driver bounds it with a timeout) or
                prints a misread and aborts
  --mode fixed  the same program through RankGroup: OR-reduced gate / push+flush / agree_count;
                prints the values every rank computed so the driver checks them
"""

from __future__ import annotations

import argparse
import os

from _harness import emit, load_collectives

from mpi4py import MPI

ITERS = 8
DIVERGE_AT = 3  # the iteration where rank-local values drift


def local_need(rank: int, i: int) -> bool:
    # per-rank KV free counts drift by one block on one iteration: rank 0 alone sees "0 fits"
    return rank == 0 and i == DIVERGE_AT


def gate(mode: str, comm, rank: int) -> dict:
    out = []
    if mode == "raw":
        for i in range(ITERS):
            if local_need(rank, i):  # BUG: collective gated on a rank-local value
                comm.allgather(("status", rank))
            out.append(comm.allreduce(rank + i))  # the next phase's collective
            print(f"rank {rank} iteration {i}", flush=True)
        return {"values": out}
    g = load_collectives().RankGroup(comm, watchdog=10)
    checked = []
    for i in range(ITERS):
        if g.any_rank(local_need(rank, i)):  # every rank joins; ranks with nothing contribute empty
            statuses = g.allgather_ints([i] if local_need(rank, i) else [])
            checked.append([s.tolist() for s in statuses])
        out.append(int(g.allreduce_ints([rank + i], "sum")[0]))
    g.close()
    return {"values": out, "checked": checked}


def gather(mode: str, comm, rank: int) -> dict:
    loads, timeouts = [], []
    for i in range(ITERS):
        # the per-rank-divergent gate: rank 1 has an empty batch on one iteration and skips it
        process_previous = not (rank == 1 and i == DIVERGE_AT)
        if mode == "raw":
            if process_previous:
                comm.allgather(bool(i % 2))  # BUG: conditional collective (timed-out requests)
            states = comm.allgather({"rank": rank, "load": 10 * i + rank})
            try:
                loads.append([s["load"] for s in states])
            except TypeError as exc:
                emit(rank, misread=repr(exc), iteration=i, payloads=[repr(s) for s in states])
                comm.Abort(3)
                # MPI_Abort asks the process manager to end the job; under load the ranks were seen to run
                # on for up to 4 more iterations meanwhile (each misreading again), so leave at once
                os._exit(3)
        else:
            if i == 0:
                g = load_collectives().RankGroup(comm, watchdog=10)
            if process_previous:
                g.push(("timed_out", i, bool(i % 2)))  # buffered, flushed at a symmetric point
            timeouts.append(g.flush())
            g.push({"rank": rank, "load": 10 * i + rank})
            states = [items[0] for items in g.flush()]
            loads.append([s["load"] for s in states])
    if mode == "fixed":
        g.close()
    return {"loads": loads, "timeouts": timeouts}


def ready(mode: str, comm, rank: int) -> dict:
    processed = []
    for i in range(ITERS):
        n_ready = 2 + (1 if (rank == 0 and i == DIVERGE_AT) else 0)  # one rank has one more ready
        if mode == "raw":
            for k in range(n_ready):  # BUG: one collective per locally-ready item
                processed.append(comm.allreduce(k))
            comm.bcast(i, root=0)
        else:
            if i == 0:
                g = load_collectives().RankGroup(comm, watchdog=10)
            n = g.agree_count(n_ready)
            for k in range(n):
                processed.append(int(g.allreduce_ints([k], "sum")[0]))
    if mode == "fixed":
        g.close()
    return {"processed": processed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", choices=["gate", "gather", "ready"], required=True)
    ap.add_argument("--mode", choices=["raw", "fixed"], required=True)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    result = {"gate": gate, "gather": gather, "ready": ready}[args.bug](args.mode, comm, rank)
    emit(rank, bug=args.bug, mode=args.mode, size=comm.Get_size(), **result)


if __name__ == "__main__":
    main()
