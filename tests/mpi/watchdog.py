"""A rank that never arrives: the others must fail within the watchdog and name it.

The last rank makes ``PREFIX`` collectives with the others, then "hangs" (sleeps far past the
watchdog) instead of joining the next one.  The other ranks must raise CollectiveTimeoutError
naming it, with its last completed sequence number and call site.  Each of them prints a RESULT
line with ``t_enter`` (wall time when it entered the collective); then the lowest such rank aborts
the job, which also ends the sleeping rank, so the driver can check that no process outlived
watchdog + 5 s.

``--raw`` is the negative control: the same program with a plain mpi4py allreduce and no watchdog;
it hangs until the driver's timeout kills it.
"""

from __future__ import annotations

import argparse
import time

from _harness import emit, load_collectives, now

from mpi4py import MPI

PREFIX = 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--watchdog", type=float, default=2.0)
    ap.add_argument("--raw", action="store_true")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    absent = size - 1
    if args.raw:
        for i in range(PREFIX):
            comm.allreduce(i)
        if rank == absent:
            time.sleep(600)
        emit(rank, phase="entering", t_enter=now())
        comm.allreduce(1)  # hangs: the absent rank never comes
        emit(rank, phase="returned")
        return

    C = load_collectives()
    g = C.RankGroup(comm, watchdog=args.watchdog)
    for i in range(PREFIX):
        g.any_rank(i == rank)  # the last completed collective is this line, seq PREFIX - 1
    prefix_seq = g.statistics().seq - 1
    if rank == absent:
        time.sleep(600)  # never arrives; the abort below ends this process
        return
    t_enter = now()
    try:
        g.agree_count(rank)
    except C.CollectiveTimeoutError as exc:
        emit(rank, t_enter=t_enter, t_raise=now(), seq_no=exc.seq_no, missing=list(exc.missing),
             last_completed={str(r): list(v) for r, v in exc.last_completed.items()},
             arrived=sorted(exc.arrived), site=exc.site, message=str(exc), prefix_seq=prefix_seq,
             broken=g.broken is exc)
        # wait (bounded) until every arrived rank has printed, then end the whole job
        arrived = sorted(exc.arrived)
        if rank == arrived[0]:
            pending = [comm.irecv(source=r, tag=99) for r in arrived[1:]]
            deadline = time.monotonic() + 3
            while pending and time.monotonic() < deadline:
                pending = [p for p in pending if not p.test()[0]]
                time.sleep(0.01)
            g.abort(7)
        else:
            comm.isend("printed", dest=arrived[0], tag=99).wait()
            time.sleep(60)  # ended by the abort
    else:
        emit(rank, error="agree_count returned although a rank never arrived")


if __name__ == "__main__":
    main()
