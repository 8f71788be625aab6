"""Bad input on one rank must not strand the others (every rank still joins each collective).

Rank 0 alone passes what cannot be used: request ids that are negative, not ints, or not iterable to
``poll_symmetric``, an unpicklable payload to ``flush``, a negative count, values that are not int64 and a
flag with no truth value.  ``poll_symmetric``: rank 0 gets InvalidArgument after the exchange, every other
rank its decisions (with rank 0 in ``poll_errors``).  The others: every rank raises InvalidArgument naming
rank 0.  The group stays usable (a barrier afterwards).  Ids from 2**63 up (valid engine ids) agree on every
rank.

Also checked here: bad values for any_rank/allreduce_ints/an op/a site, payloads that pickle but do not
unpickle (on every rank, or only where the class is missing: every rank raises either way), an engine whose
``state`` raises, ``close`` with payloads never flushed, use after ``close``, and options that do not fit the
watchdog.

``--raw`` is the negative control: rank 0 raises before the collective, as poll_symmetric and flush did
before; the other ranks then time out in it (CollectiveTimeoutError), which the driver checks.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _harness import emit, load_collectives

from mpi4py import MPI

from lifecycle import CollectiveDesyncError, InvalidArgument, TransferEngine


class TwoArgs(Exception):
    """Pickles, but does not unpickle: BaseException's reduce passes only the message to __init__."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


class StateRaises:
    """An engine-like object whose ``state`` raises something other than a lookup error."""

    def poll(self):
        return []

    def state(self, req):
        raise RuntimeError("engine state unavailable")

    def outcome(self, req):
        return None


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
            out["flush"] = ("invalid", exc.argument, len(exc.payloads), "rank(s) [0]" in str(exc))
        try:
            out["agree"] = group.agree_count(-1 if rank == 0 else 5)
        except InvalidArgument as exc:
            out["agree"] = ("invalid", exc.argument, "rank(s) [0]" in str(exc))
        try:  # the same bad op on every rank: every rank raises, after the header
            group.allreduce_ints([1], op="avg")
        except InvalidArgument as exc:
            out["op"] = exc.argument
        try:
            parts = group.allgather_ints(["x"] if rank == 0 else [rank])
            out["gather"] = [p.tolist() for p in parts]
        except InvalidArgument as exc:
            out["gather"] = ("invalid", exc.argument, "rank(s) [0]" in str(exc))
        try:
            out["flag"] = group.any_rank(np.array([1, 2]) if rank == 0 else True)
        except InvalidArgument as exc:
            out["flag"] = ("invalid", exc.argument, "rank(s) [0]" in str(exc))
        try:
            group.allreduce_ints([1], op=["sum"])  # unhashable, on every rank
        except InvalidArgument as exc:
            out["op_list"] = [exc.argument, group.statistics().seq]
        for i, bad in enumerate((["x"], [1.5], [2**64 - 1], [float("nan")])):
            try:  # values that are not int64 on rank 0: every rank raises, the group stays usable
                out[f"reduce{i}"] = group.allreduce_ints(bad if rank == 0 else [1]).tolist()
            except InvalidArgument as exc:
                out[f"reduce{i}"] = [exc.argument, "[0]" in str(exc)]
        out["reduce_ok"] = group.allreduce_ints(np.array([2], dtype=np.uint8)).tolist()
        try:  # a sum past int64 on every rank (MPI's SUM wrapped it to -2**63 with no error)
            out["sum_over"] = group.allreduce_ints([1, (1 << 62) + rank, 1]).tolist()
        except InvalidArgument as exc:
            out["sum_over"] = [exc.argument, "index 1" in str(exc)]
        # control: sums at the edges of int64, exact (negative halves, carries from the low half)
        size = group.size
        out["sum_edges"] = group.allreduce_ints([-((1 << 63) // size), (1 << 63) // size - 1, 0xFFFFFFFF,
                                                -0xFFFFFFFF - rank]).tolist()
        group.push(TwoArgs("a", "b") if rank == 0 else rank)
        try:  # pickles on rank 0, unpickles nowhere: every rank raises, the decoded payloads on the error
            out["unpickle"] = group.flush()
        except InvalidArgument as exc:
            out["unpickle"] = [exc.argument, exc.result[1:], sorted(exc.blobs)]
        if rank == 0:
            global OnlyHere

            class OnlyHere:  # pickled by reference as bad_input.OnlyHere: the other ranks cannot find it
                pass

            OnlyHere.__module__, OnlyHere.__qualname__ = "__main__", "OnlyHere"
            group.push(OnlyHere())
        else:
            group.push(rank)
        try:
            got = group.flush()
            out["missing_class"] = ["ok", [type(p[0]).__name__ if p else None for p in got]]
        except InvalidArgument as exc:
            out["missing_class"] = [exc.argument, [type(p[0]).__name__ if p else None for p in exc.result],
                                    sorted(exc.blobs), list(exc.ranks)]
        try:
            d = col.poll_symmetric(StateRaises() if rank == 0 else engine, group, [big])
            out["state_raises"] = sorted(d.poll_errors)
        except RuntimeError as exc:
            out["state_raises"] = str(exc)
        group.barrier()
        out["after"] = "barrier ok"
        try:
            col.RankGroup(comm, watchdog="x")
        except InvalidArgument as exc:
            out["watchdog"] = exc.argument
        options = []
        for kw in ({"spin": 2.0}, {"announce_after": 1.0}):
            try:
                col.RankGroup(comm, watchdog=1.0, **kw)
            except InvalidArgument as exc:
                options.append(exc.argument)
        out["options"] = options
        group.push("never flushed")
        try:
            group.close()
        except InvalidArgument as exc:
            out["close_payloads"] = [exc.argument, exc.payloads]
        group.close()  # idempotent
        out["closed"] = True
        try:
            group.barrier()
        except InvalidArgument as exc:
            out["after_close"] = exc.argument
        # a site that is not a str on one rank: a desync naming it on every rank (the group then breaks)
        g2 = col.RankGroup(comm, watchdog=args.watchdog)
        try:
            g2.barrier(site=["x"] if rank == 0 else None)
            out["reduce"] = "returned"
        except col.CollectiveDesyncError as exc:
            out["reduce"] = [type(exc).__name__, exc.field, "invalid site" in exc.sites[0]]
        # the same values without the ledger: p1 carries "invalid" instead of the fingerprint
        g3 = col.RankGroup(comm, watchdog=args.watchdog, ledger=False)
        try:
            g3.allreduce_ints(["x"] if rank == 0 else [1])
        except InvalidArgument as exc:
            out["no_ledger"] = [exc.argument, g3.allreduce_ints([1]).tolist()]
        try:  # the p1 flag of the header, without the ledger too
            g3.agree_count(-1 if rank == 0 else 3)
        except InvalidArgument as exc:
            out["no_ledger_agree"] = [exc.argument, "rank(s) [0]" in str(exc), g3.agree_count(3)]

        class SumName:  # not a str, though its str() is one
            def __str__(self):
                return "sum"

        g4 = col.RankGroup(comm, watchdog=args.watchdog)
        try:  # on rank 0 only: a desync on every rank (it passed the ledger, then rank 0 alone raised "op")
            g4.allreduce_ints([1], op=SumName() if rank == 0 else "sum")
            out["op_object"] = "returned"
        except CollectiveDesyncError as exc:
            out["op_object"] = [exc.field, g4.broken is not None]
        # the same non-str site on every rank: no desync (every rank joins under the same name), InvalidArgument
        # ("site") on every rank, and the group stays usable
        g5 = col.RankGroup(comm, watchdog=args.watchdog)
        try:
            g5.barrier(site=5)
            out["same_bad_site"] = "returned"
        except InvalidArgument as exc:
            out["same_bad_site"] = [exc.argument, g5.broken is None, g5.all_ranks(True)]
    except Exception as exc:  # a timeout here is what the negative control shows
        out["error"] = type(exc).__name__
    emit(rank, **out)
    if "error" in out:
        if args.raw and rank == 0:
            time.sleep(60)  # the one that raised early: the others' watchdogs end the job
        group.abort(0)


if __name__ == "__main__":
    main()
