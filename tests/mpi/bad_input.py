"""Bad input on one rank must not strand the others (every rank still joins each collective).

Rank 0 alone passes what cannot be used: request ids that are negative, not ints, or not iterable to
``poll_symmetric``, and an unpicklable payload to ``flush``.  It gets InvalidArgument after the exchange;
every other rank gets its decisions (with rank 0 in ``poll_errors``) or its payloads, within the watchdog,
and the group stays usable (a barrier afterwards).  Ids from 2**63 up (valid engine ids) agree on every rank.

``--raw`` is the negative control: rank 0 raises before the collective, as poll_symmetric and flush did
before; the other ranks then time out in it (CollectiveTimeoutError), which the driver checks.
"""

from __future__ import annotations

import argparse
import time

from _harness import emit, load_collectives

from mpi4py import MPI

from lifecycle import InvalidArgument, TransferEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--watchdog", type=float, default=3.0)
    ap.add_argument("--raw", action="store_true")
    args = ap.parse_args()
    col = load_collectives()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    group = col.RankGroup(comm, watchdog=args.watchdog)
    engine = TransferEngine()
    big = (1 << 63) + 5
    engine.advertise(big, "sender")
    out: dict = {"steps": []}
    try:
        d = col.poll_symmetric(engine, group, [big])
        out["big_pending"] = big in d.pending and not d.poll_errors
        for bad in ([-1], ["a"], None):
            mine = bad if rank == 0 else [big]
            if args.raw and rank == 0:
                raise InvalidArgument("requests", "raised before the collective (the old behaviour)")
            try:
                d = col.poll_symmetric(engine, group, mine)
                out["steps"].append(("decided", sorted(d.poll_errors), big in d.pending))
            except InvalidArgument as exc:
                out["steps"].append(("invalid", exc.argument))
        group.push(f"from {rank}")
        if rank == 0:
            group.push(lambda: None)  # cannot be pickled
        try:
            got = group.flush()
            out["flush"] = [len(p) for p in got]
        except InvalidArgument as exc:
            out["flush"] = ("invalid", exc.argument, len(exc.payloads))
        try:
            out["agree"] = group.agree_count(-1 if rank == 0 else 5)
        except InvalidArgument as exc:
            out["agree"] = ("invalid", exc.argument)
        try:  # the same bad op on every rank: every rank raises, after the header
            group.allreduce_ints([1], op="avg")
        except InvalidArgument as exc:
            out["op"] = exc.argument
        try:
            parts = group.allgather_ints(["x"] if rank == 0 else [rank])
            out["gather"] = [p.tolist() for p in parts]
        except InvalidArgument as exc:
            out["gather"] = ("invalid", exc.argument)
        group.barrier()
        out["after"] = "barrier ok"
        try:
            col.RankGroup(comm, watchdog="x")
        except InvalidArgument as exc:
            out["watchdog"] = exc.argument
        group.close()
        group.close()  # idempotent
        out["closed"] = True
        # values that are not int64 on one rank: it joins with a length no rank has, a desync on every rank
        g2 = col.RankGroup(comm, watchdog=args.watchdog)
        try:
            g2.allreduce_ints(["x"] if rank == 0 else [1])
            out["reduce"] = "returned"
        except col.CollectiveDesyncError as exc:
            out["reduce"] = type(exc).__name__
    except Exception as exc:  # a timeout here is what the negative control shows
        out["error"] = type(exc).__name__
    emit(rank, **out)
    if "error" in out:
        if args.raw and rank == 0:
            time.sleep(60)  # the one that raised early: the others' watchdogs end the job
        group.abort(0)


if __name__ == "__main__":
    main()
