"""A RankGroup under misuse and long runs: each ``--case`` is one run of this program.

notices      rank 0 always arrives last (it works 2 ms before each collective), so the others wait and
             send arrival notices every step, while rank 0 never waits long.  Rank 0 read notices only
             inside its own slow waits: MPI's unexpected queue grew by one notice per step and rank for
             the life of the job.  Each rank counts the notices still unread after N steps.
             ``--no-drain`` (the negative control) turns the periodic read off.
interrupt    an exception raised into rank 0's wait (a timer's signal handler) leaves that collective
             unfinished; the next call raised a raw mpi4py error (Start on an active request).  It
             raises CollectiveDesyncError (field "interrupted") now, and the group is broken; the break
             is logged for the audit (lifecycle.collective_desync), as the other rank's timeout is.
             ``--no-check`` (the control) clears the flag the check reads: the raw MPI error comes back.
logger       the structlog sink is closed before a desync: the logging error replaced the desync error
             and left the group unbroken.
engine-site  TransferEngine.poll_symmetric from two different lines: the ledger recorded the engine's
             own line for every caller, so the divergence went unseen.  ``--same-site`` (the control)
             passes one explicit site from both lines: no desync, as the site is what is compared.
ctor         rank 0 never constructs the group; the others' constructor raises CollectiveTimeoutError
             within the watchdog (a blocking Dup hung for good).  ``--raw`` (the control) uses a plain
             ``comm.Dup()``: it hangs until the driver's timeout.
ledger       rank 0 passes ledger=False, the others True: every rank raises InvalidArgument("ledger").
intercomm    an intercommunicator (or something that is not a communicator) is refused with
             InvalidArgument("comm"): over an intercommunicator every reduction returned the *other* group's
             result, so any_rank(True) answered False on the rank that passed True (silently wrong).
             ``--no-check`` (the control) skips the check: that wrong answer comes back.
gen-raises   rank 0's ``requests`` to poll_symmetric is a generator that raises ValueError: it was raised
             before the collective, so rank 0's next call paired with the others' poll_symmetric.  Rank 0
             joins now and re-raises after it; the others see it in poll_errors; a barrier follows on both.
             ``--raw`` (the control) raises on rank 0 before the collective: the others meet a desync.
close        rank 1 closes the group while rank 0 makes a barrier: close() was not ledger-checked, so
             rank 1 went on silently while rank 0 timed out.  Both raise CollectiveDesyncError (field op)
             now.  ``--raw`` (the control) frees the communicators without the exchange (the old close).
site-utf8    a site that is a str but not encodable as UTF-8 (a lone surrogate: a source file whose name is
             not UTF-8 gives one) on the rank that waits: its arrival notice raised UnicodeEncodeError out
             of the wait and broke the group on that rank alone.  ``--ascii`` (the control) uses a plain
             site: the same slow wait sends notices (slow_waits > 0), so the notice path ran.
site-str     rank 0 passes its site as a numpy str (np.str_("step"), equal text), the others as a str: the
             fingerprint hashed repr() ("np.str_('step')"), so the headers differed while no field did, and
             every rank raised a bare IndexError (then "interrupted").  It agrees now.  The control: sites
             whose text differs (np.str_ on rank 0) are still a desync naming the site field.
huge-int     rank 0 passes an int past the 4300 digits repr() prints (10**5000) as a count, a request id and a
             site: the message of the InvalidArgument being made raised ValueError instead, on rank 0 alone and
             before the collective (rank 0's next call paired with rank 1's agree_count: a desync on both).
             Every rank raises InvalidArgument now (a desync naming the site for the site), in step.
values-raise rank 0's values to allreduce_ints / allgather_ints raise RuntimeError when numpy converts them (what a
             torch tensor that requires grad does): only TypeError/ValueError/OverflowError were caught, so rank 0
             raised alone, before the header, and its next call paired with rank 1's allreduce_ints.  Every rank
             raises InvalidArgument("values") naming rank 0 now, and a barrier follows on both.
state-ctrlc  rank 0's engine.state raises KeyboardInterrupt inside poll_symmetric: poll() and the requests
             iterable were joined first whatever they raised, state() only for an Exception, so rank 0 left before
             the collective and its next call paired with rank 1's poll_symmetric.  Rank 0 joins now and re-raises
             after it (rank 1 has it in poll_errors), and a barrier follows on both.
flush-site   every rank flushes with a site that is not a str (InvalidArgument("site") on every rank, the group
             usable), then after close() (InvalidArgument("group")): the payloads pushed before were dropped, with
             nothing on the error.  They are on its ``payloads`` now, as for a payload that cannot be pickled.
ctor-notice  rank 0 is descheduled between its communicator dups and the constructor's ledger exchange, so rank 1
             waits there and announces; then rank 1 never arrives at the first collective.  The constructor's
             wait announced the same (seq 0, phase 0) as that collective, so rank 0 counted rank 1's old notice
             as its arrival and named no missing rank.  Rank 0 names rank 1 now.  ``--raw`` (the control):
             rank 1 arrives late instead of never, and the collective returns on both.
loop-only    one flush per locally ready item (seed 003), ready counts per iteration [2, 1] on rank 0 and [1, 2] on
             rank 1: where that loop is an iteration's only collective, every call has the same (seq, site, op,
             kind, size) on both ranks, so the ledger cannot see them diverge (the docs claimed divergent calls
             "never mis-pair silently"): rank 0's second item of iteration 0 pairs with rank 1's first item of
             iteration 1.  With a barrier at the end of each iteration (rule (b)'s symmetric point) every rank
             raises CollectiveDesyncError at the first divergent call (seq 1, field op).
close-push   rank 0 pushed a payload and never flushed it; both ranks close: only rank 0 raised (its payload on
             the error), rank 1 returned and went on, the ranks on two paths.  Every rank raises InvalidArgument
             ("close") naming rank 0 now, each with its own payloads, the group closed on both.
alloc        rank 1 cannot allocate 2 MiB or more (np.empty raises MemoryError there, as with less memory than rank 0)
             and rank 0 flushes a 4 MiB payload, then allgather_ints 4 MiB of values: rank 1 raised MemoryError
             alone, out of the receive buffer's allocation, while rank 0 waited in the gather until its watchdog.
             Every rank raises InvalidArgument naming rank 1 and the MemoryError now, nothing exchanged, and the
             next flush pairs.  Control: the same flush with the allocation working returns on both.
unpickle-some  rank 0 flushes an instance of a class only it defines: rank 1 raised InvalidArgument("payload")
             alone and rank 0 returned (the ranks on two paths).  Every rank raises the same error now, naming
             rank 1 and its ModuleNotFoundError/AttributeError; the next flush pairs.  Also counted: the MPI
             requests each flush starts besides the header (plain payloads: 2, as before; a payload with a class
             in it: 3, the agreement; all empty: 0).
poll-memory  rank 1 cannot build a set of 1000 ids or more (MemoryError from the module's frozenset there) while
             poll_symmetric makes its decisions, after the exchange.  Rank 0 passes 70,000 ids (1.1 MB gathered,
             past _AGREE_BYTES): rank 1 raised MemoryError alone and rank 0 returned its decisions, the ranks on
             two paths.  Every rank raises the same InvalidArgument("values") naming rank 1 now.  Under 1 MiB (2000
             ids) it is still rank 1's alone (the documented limit: agreeing there is a collective more on every
             call).  A rank whose engine.poll() raised kept that error whatever failed after it: its decisions
             (MemoryError) and a receive buffer another rank could not allocate (InvalidArgument) replaced it;
             it raises its poll error now, the other failure as its context.  Control: with memory the same calls
             return on both; counted, the MPI requests besides the header (under 1 MiB: 2, as before; past it: 4).
decode-memory  the documented limit of a flush of plain payloads under 1 MiB: rank 1 runs out of memory decoding
             them (MemoryError from the module's pickle.loads there).  Nobody agrees on decoding such a flush (it
             would be a collective more on every flush), so rank 1 raises InvalidArgument("payload") naming itself
             alone and rank 0 returns them.  Past 1 MiB the same failure is raised on every rank (the control).
poll-own-memory  rank 1 passes 200,000 ids to poll_symmetric and cannot allocate the 3.2 MB array it sends them in
             (MemoryError from the module's numpy there), before the collective: it raised there alone, its next
             poll_symmetric paired with rank 0's (silently) and rank 0's next call timed out.  Rank 1 joins with no
             ids now and re-raises after it, like a raising poll(); rank 0 decides with rank 1 in poll_errors.
             Control: with memory, the same call returns.
poll-flags-memory  the same, where rank 1 cannot put its ids' flags into that array (a MemoryError converting the
             list: as big as the ids' own array, and converted after the guarded allocation): it raised there alone,
             before the collective.  Control: the same call before and after returns on both.
desync-level the collectives' module logger filters at --level (structlog configured at CRITICAL), an engine logs
             at INFO into the same file, and the ranks desync between its lines: the filtered
             lifecycle.collective_desync line took a seq all the same, so the engine's log had a gap, a seq_gap
             violation in the audit of that file.  Each rank audits its own file.  Control (--level error): the
             desync line is written, at that very seq, and audited as a collective_desync.
"""

from __future__ import annotations

import argparse
import json
import signal
import time

from _harness import emit, load_collectives

from mpi4py import MPI


class Interrupted(Exception):
    pass


class Fake:
    """An engine-like object for poll_symmetric: every id is InFlight."""

    class _S:
        name = "InFlight"

    def poll(self):
        return []

    def state(self, req):
        return self._S()

    def outcome(self, req):
        return None


class NoArray:
    """Values whose conversion to an array raises RuntimeError (a torch tensor that requires grad does)."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad")


class StateInterrupted(Fake):
    """An engine-like object whose state() is interrupted (Ctrl-C while it reads)."""

    def state(self, req):
        raise KeyboardInterrupt


class LowMemory:
    """The collectives module's numpy on rank 1 (the cases set it): any array of 2 MiB or more cannot be allocated."""

    def __getattr__(self, name):
        import numpy as np

        return getattr(np, name)

    def empty(self, shape, dtype=float):
        import numpy as np

        if np.prod(shape) * np.dtype(dtype).itemsize >= 1 << 21:
            raise MemoryError(f"cannot allocate {shape} x {np.dtype(dtype)} (the test's limit)")
        return np.empty(shape, dtype)


class Counting:
    """A group's communicator, counting the MPI requests a call starts besides the header (its Iall* calls)."""

    def __init__(self, comm):
        self.comm, self.n = comm, 0

    def __getattr__(self, name):
        if name.startswith("Iall"):
            self.n += 1
        return getattr(self.comm, name)


def outcome_of(call) -> list:
    """What ``call()`` did, for a RESULT line: ["returned", value] or [error type, its argument or field]."""
    try:
        return ["returned", call()]
    except BaseException as exc:  # noqa: B036 - a KeyboardInterrupt is one of the outcomes compared
        return [type(exc).__name__, getattr(exc, "argument", None) or getattr(exc, "field", None)]


def end_job(comm, rank: int, group) -> None:
    """Every rank has emitted; rank 0 ends the job (a rank may still wait in a collective that never ends)."""
    comm.Barrier()
    if rank == 0:
        group.abort(0) if group is not None else comm.Abort(0)
    time.sleep(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--no-drain", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--same-site", action="store_true")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--ascii", action="store_true")
    ap.add_argument("--level", default="critical")
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    col = load_collectives()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    out: dict = {}
    case = args.case

    if case == "notices":
        if args.no_drain:
            col._DRAIN_EVERY = 1 << 62
        # rank 0 never announces (so never reads notices inside a wait of its own, which a loaded machine can
        # give it); the others announce at once
        g = col.RankGroup(comm, watchdog=10.0, announce_after=9.0 if rank == 0 else 0.0, spin=0.0)
        for _ in range(args.steps):
            if rank == 0:
                time.sleep(0.002)
            g.any_rank(False)
        unread = 0
        st = MPI.Status()
        while g._side.Iprobe(MPI.ANY_SOURCE, col._TAG_ARRIVAL, st):
            buf = bytearray(st.Get_count(MPI.BYTE))
            g._side.Recv([buf, MPI.BYTE], st.Get_source(), col._TAG_ARRIVAL)
            unread += 1
        g.barrier()
        emit(rank, unread=unread, slow_waits=g.statistics().slow_waits, every=col._DRAIN_EVERY)
        g.close()
        return

    if case == "interrupt":
        from structlog.testing import capture_logs

        g = col.RankGroup(comm, watchdog=2.0)
        g.barrier()
        logs = capture_logs()
        captured = logs.__enter__()  # the audit's events on each rank (rank 1's timeout shows the capture works)
        if rank == 0:
            def handler(signum, frame):
                raise Interrupted("timer")

            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            try:
                g.any_rank(True, site="gate")
                out["first"] = "returned"
            except Interrupted:
                out["first"] = "interrupted"
            if args.no_check:
                g._open = False
            else:
                try:  # first close(): freeing the pending request was a raw MPI error too
                    g.close()
                    out["close"] = "returned"
                except col.CollectiveDesyncError as exc:
                    out["close"] = exc.field
            try:
                g.barrier()
                out["next"] = "returned"
            except col.CollectiveDesyncError as exc:
                out["next"] = [type(exc).__name__, exc.field, g.broken is exc,
                               "collective #1 (any_rank at gate)" in str(exc)]
            except Exception as exc:
                out["next"] = [type(exc).__module__, type(exc).__name__]
        else:
            time.sleep(1.0)
            out["first"] = g.any_rank(False, site="gate")  # rank 0's request went on without it: True arrives
            try:
                g.barrier()
                out["next"] = "returned"
            except col.CollectiveTimeoutError as exc:
                out["next"] = [type(exc).__name__, sorted(exc.missing)]
        logs.__exit__(None, None, None)
        out["events"] = [[e["event"], e.get("field"), e.get("sites")] for e in captured]
        emit(rank, **out)
        end_job(comm, rank, g)

    if case == "logger":
        import structlog

        sink = open("/dev/null", "w")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
        sink.close()
        g = col.RankGroup(comm, watchdog=5.0)
        try:
            g.any_rank(True) if rank == 0 else g.barrier()
            out["got"] = "returned"
        except col.CollectiveDesyncError as exc:
            notes = getattr(exc, "__notes__", [])
            out["got"] = [type(exc).__name__, exc.field, g.broken is exc,
                          any("could not be logged" in n for n in notes)]
        try:
            g.barrier()
        except col.CollectiveDesyncError as exc:
            out["after"] = g.broken is exc
        emit(rank, **out)
        end_job(comm, rank, g)

    if case == "engine-site":
        from lifecycle import TransferEngine

        g = col.RankGroup(comm, watchdog=5.0)
        engine = TransferEngine()
        site = "step.py:1:same" if args.same_site else None
        try:
            if rank == 0:
                d = engine.poll_symmetric(g, [], site=site)
            else:
                d = engine.poll_symmetric(g, [], site=site)
            out["got"] = ["returned", d.seq_no]
        except col.CollectiveDesyncError as exc:
            out["got"] = [type(exc).__name__, exc.field, sorted({s.rsplit(":", 2)[0] for s in exc.sites.values()}),
                          len(set(exc.sites.values())), "poll_symmetric(" in str(exc)]
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "ctor":
        if rank == 0:
            time.sleep(60)  # never constructs it; the abort ends this process
        t0 = time.monotonic()
        try:
            if args.raw:
                comm.Dup()
                out["got"] = "returned"
            else:
                col.RankGroup(comm, watchdog=1.5)
                out["got"] = "returned"
        except col.CollectiveTimeoutError as exc:
            out["got"] = [type(exc).__name__, "RankGroup() at robustness.py:" in str(exc)]
        out["waited"] = time.monotonic() - t0
        emit(rank, **out)
        if rank == 1:
            comm.Abort(0)
        time.sleep(60)

    if case == "desync-level":
        import logging
        import os

        import structlog

        from lifecycle import TransferEngine
        from lifecycle.audit import audit_paths

        path = os.path.join(args.log, f"rank{rank}.jsonl")
        with open(path, "w") as f:
            level = getattr(logging, args.level.upper())
            structlog.configure(processors=[structlog.processors.JSONRenderer()],
                                logger_factory=structlog.WriteLoggerFactory(f),
                                wrapper_class=structlog.make_filtering_bound_logger(level))
            engine = TransferEngine(logger=structlog.wrap_logger(
                structlog.WriteLogger(f), processors=[structlog.processors.JSONRenderer()],
                wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)))
            g = col.RankGroup(comm, watchdog=5.0)
            engine.advertise(1, "sender")
            engine.poll()
            out["got"] = outcome_of(lambda: g.any_rank(True) if rank == 0 else g.barrier())
            engine.cancel(1)
            engine.terminate(1)
            engine.poll()
        with open(path) as f:
            out["events"] = [[d["event"], d["seq"]] for d in map(json.loads, f)]
        out["findings"] = audit_paths([path]).finding_counts
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "ledger":
        try:
            col.RankGroup(comm, watchdog=5.0, ledger=rank != 0)
            out["got"] = "returned"
        except col.InvalidArgument as exc:
            out["got"] = [exc.argument]
        emit(rank, **out)
        return

    if case == "intercomm":
        local = comm.Split(rank % 2, rank)
        inter = local.Create_intercomm(0, comm, 1 - rank % 2, tag=3)
        check = getattr(col, "_check_comm", None)  # absent before the check existed
        if args.no_check:
            col._check_comm = lambda parent, MPI: None
        try:
            g = col.RankGroup(inter, watchdog=5.0)
            out["got"] = ["any_rank", g.any_rank(rank == 0), g.size]  # only rank 0 passes True
        except col.InvalidArgument as exc:
            out["got"] = [exc.argument, "intercommunicator" in str(exc)]
        col._check_comm = check
        refused = []
        for bad in ("world", MPI.COMM_NULL):
            try:
                col.RankGroup(bad, watchdog=5.0)
                refused.append("made")
            except col.InvalidArgument as exc:
                refused.append(exc.argument)
            except Exception as exc:  # what came out before the check: a bare AttributeError, a raw MPI error
                refused.append(type(exc).__name__)
        out["refused"] = refused
        emit(rank, **out)
        return

    if case == "gen-raises":
        from lifecycle import TransferEngine

        g = col.RankGroup(comm, watchdog=5.0)
        engine = TransferEngine()
        engine.advertise(7, "sender")

        def ids():
            yield 7
            raise ValueError("generator broke")

        try:
            if rank == 0 and args.raw:
                list(ids())  # the old behaviour: raises before the collective
            d = engine.poll_symmetric(g, ids() if rank == 0 else [7], site="step")
            out["got"] = ["decided", sorted(d.poll_errors), sorted(d.pending)]
        except ValueError as exc:
            out["got"] = ["ValueError", str(exc)]
        except col.CollectiveDesyncError as exc:
            out["got"] = [type(exc).__name__, exc.field]
        try:
            g.barrier(site="after")
            out["after"] = "barrier ok"
        except col.CollectiveDesyncError as exc:
            out["after"] = [type(exc).__name__, exc.field]
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "close":
        g = col.RankGroup(comm, watchdog=2.0)
        try:
            if rank == 0:
                g.barrier()
                out["got"] = "returned"
            elif args.raw:
                g._free()
                out["got"] = "closed"
            else:
                g.close()
                out["got"] = "closed"
        except col.CollectiveDesyncError as exc:
            out["got"] = [type(exc).__name__, exc.field, sorted({fp.op for fp in getattr(exc, "fingerprints", {}).values()})]
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "site-utf8":
        site = "gate" if args.ascii else "gate\udcff"
        g = col.RankGroup(comm, watchdog=5.0, announce_after=0.0, spin=0.0)
        try:
            if rank == 0:
                time.sleep(0.5)  # rank 1 waits: it announces its arrival (under the site)
            g.barrier(site=site)
            g.barrier(site=site)
            out["got"] = ["returned", g.statistics().slow_waits > 0 if rank == 1 else None]
        except Exception as exc:
            out["got"] = [type(exc).__name__, str(exc)[:80]]
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "site-str":
        import numpy as np

        g = col.RankGroup(comm, watchdog=5.0)
        got = []
        for mine, theirs in (("step", "step"), ("a", "b")):
            try:
                g.barrier(site=np.str_(mine) if rank == 0 else theirs)
                got.append("returned")
            except col.CollectiveDesyncError as exc:
                got.append([type(exc).__name__, exc.field, sorted(exc.sites.values())])
            except Exception as exc:
                got.append([type(exc).__name__])
                break
        out["got"] = got
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "huge-int":
        g = col.RankGroup(comm, watchdog=3.0)
        huge = 10**5000
        out["agree"] = outcome_of(lambda: g.agree_count(huge if rank == 0 else 3))
        out["requests"] = outcome_of(lambda: sorted(col.poll_symmetric(Fake(), g, [huge] if rank == 0 else [7],
                                                                       site="poll").poll_errors))
        out["usable"] = outcome_of(lambda: g.agree_count(3))  # the control: every rank still in step
        out["ctor"] = outcome_of(lambda: col.RankGroup(comm, watchdog=huge))  # local: refused before any exchange
        out["site"] = outcome_of(lambda: g.barrier(site=huge if rank == 0 else "b"))
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "values-raise":
        g = col.RankGroup(comm, watchdog=3.0)
        out["reduce"] = outcome_of(lambda: g.allreduce_ints(NoArray() if rank == 0 else [1]).tolist())
        out["gather"] = outcome_of(lambda: len(g.allgather_ints(NoArray() if rank == 0 else [1])))
        out["after"] = outcome_of(lambda: g.allreduce_ints([1]).tolist())  # the control: in step, usable
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "state-ctrlc":
        g = col.RankGroup(comm, watchdog=3.0)
        engine = StateInterrupted() if rank == 0 else Fake()
        out["poll"] = outcome_of(lambda: sorted(col.poll_symmetric(engine, g, [7], site="poll").poll_errors))
        out["after"] = outcome_of(lambda: g.barrier(site="after"))
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "flush-site":
        g = col.RankGroup(comm, watchdog=3.0)

        def flush(**kw):
            try:
                return ["returned", g.flush(**kw)]
            except col.InvalidArgument as exc:
                return [exc.argument, getattr(exc, "payloads", "lost")]

        g.push(["p", rank])
        out["site"] = flush(site=5)
        out["usable"] = flush()  # the control: in step, nothing left buffered
        g.close()
        g.push("late")
        out["closed"] = flush()
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "ctor-notice":
        if rank == 0:  # descheduled (a loaded host) after the dups, before the ledger exchange: rank 1 announces
            dup = col.RankGroup._dup
            col.RankGroup._dup = lambda self, *a: (dup(self, *a), time.sleep(0.5))[0]
        g = col.RankGroup(comm, watchdog=1.0, announce_after=0.05)
        if rank == 1:
            out["ctor_slow_waits"] = g.statistics().slow_waits  # 1: it announced in the constructor
            if not args.raw:
                emit(rank, **out)
            time.sleep(0.3 if args.raw else 60)  # the control arrives late; else never (the abort ends it)
        try:
            g.any_rank(True)
            out["got"] = ["returned", g.statistics().slow_waits > 0]
        except col.CollectiveTimeoutError as exc:
            out["got"] = [type(exc).__name__, sorted(exc.missing), sorted(exc.arrived)]
        emit(rank, **out)
        if out["got"][0] != "returned":
            g.abort(0)  # rank 1 never arrives: nothing to wait for
        end_job(comm, rank, None)

    if case == "loop-only":
        got = {}
        for end_barrier in (False, True):
            g = col.RankGroup(comm, watchdog=3.0)
            pairs = []
            try:
                for it, n in enumerate({0: [2, 1], 1: [1, 2]}[rank]):
                    for i in range(n):
                        g.push([it, i])
                        pairs.append(g.flush(site="item"))
                    if end_barrier:
                        g.barrier(site="end of iteration")
                got[str(end_barrier)] = ["returned", pairs]
            except col.CollectiveDesyncError as exc:
                got[str(end_barrier)] = [type(exc).__name__, exc.seq_no, exc.field, pairs]
            if g.broken is None:
                g.close()
        emit(rank, **got)
        end_job(comm, rank, None)

    if case == "close-push":
        g = col.RankGroup(comm, watchdog=3.0)
        g2 = col.RankGroup(comm, watchdog=3.0)
        if rank == 0:
            g.push("x")
        try:
            g.close()
            out["close"] = "returned"
        except col.InvalidArgument as exc:
            out["close"] = [exc.argument, exc.payloads, "rank(s) [0]" in str(exc)]
        out["closed"] = outcome_of(g.barrier)
        out["after"] = outcome_of(g2.barrier)  # the control: in step on another group
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "alloc":
        import numpy as np

        g = col.RankGroup(comm, watchdog=2.0)  # small: on the old code rank 0 timed out here
        g.push(bytes(4 << 20) if rank == 0 else rank)  # the control: with memory, the same flush returns
        out["control"] = outcome_of(lambda: [len(p[0]) if isinstance(p[0], bytes) else p for p in g.flush()])
        if rank == 1:
            col.np = LowMemory()

        def failed(call):
            try:
                return ["returned", call()]
            except BaseException as exc:  # noqa: B036 - what each rank raised is the result
                return [type(exc).__name__, getattr(exc, "argument", None), list(getattr(exc, "ranks", ())),
                        str(exc), getattr(exc, "payloads", None)]

        g.push(bytes(4 << 20) if rank == 0 else rank)
        g.push("more")
        got = failed(g.flush)
        if got[-1]:
            got[-1] = [len(p) if isinstance(p, bytes) else p for p in got[-1]]
        out["flush"] = got
        out["gather"] = failed(lambda: g.allgather_ints(np.zeros((1 << 19) if rank == 0 else 1, dtype=np.int64)))
        g.push(rank)
        out["after"] = outcome_of(g.flush)
        out["seq"] = g.statistics().seq
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "unpickle-some":
        g = col.RankGroup(comm, watchdog=2.0)

        g._comm = counting = Counting(g._comm)

        def requests(call):
            counting.n = 0
            got = call()
            return [counting.n, got]

        if rank == 0:
            global OnlyHere

            class OnlyHere:  # pickled by reference as __main__.OnlyHere: rank 1 has no such class
                pass

            OnlyHere.__module__, OnlyHere.__qualname__ = "__main__", "OnlyHere"
            g.push(OnlyHere())
        else:
            g.push(rank)
        try:
            got = g.flush()
            out["flush"] = ["returned", [type(p[0]).__name__ for p in got]]
        except col.InvalidArgument as exc:
            res = [type(p[0]).__name__ if p else None for p in exc.result]
            out["flush"] = [exc.argument, list(getattr(exc, "ranks", ())), str(exc), res, sorted(exc.blobs)]
        g.push({"rank": rank, "ids": [rank, 2.5, None, b"x", (1,), {3}, frozenset()]})
        out["plain"] = requests(g.flush)
        g.push(col.Fingerprint(rank, "s", "op", "kind", -1))  # a class every rank has: decodes, after the agreement
        out["classy"] = requests(lambda: [p[0].seq for p in g.flush()])
        out["empty"] = requests(g.flush)
        out["seq"] = g.statistics().seq
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "poll-memory":
        import builtins

        import numpy as np

        g = col.RankGroup(comm, watchdog=3.0)  # small: a rank left in a collective times out soon

        g._comm = counting = Counting(g._comm)

        class PollRaises(Fake):
            def poll(self):
                raise RuntimeError("engine poll failed")

        def tight(items=()):  # this module's frozenset on rank 1: a set of 1000 ids or more cannot be built
            got = builtins.frozenset(items)
            if len(got) >= 1000:
                raise MemoryError(f"cannot build a set of {len(got)} ids (the test's limit)")
            return got

        def poll(engine, ids):
            counting.n = 0
            try:
                d = col.poll_symmetric(engine, g, ids if rank == 0 else [1, 2], site="poll")
                return ["returned", len(d.pending), sorted(d.poll_errors), counting.n]
            except Exception as exc:
                ctx = exc.__context__
                return [type(exc).__name__, getattr(exc, "argument", None), list(getattr(exc, "ranks", ())),
                        str(exc), None if ctx is None else type(ctx).__name__]

        large, small = range(70_000), range(2000)
        out["control"] = [poll(Fake(), large), poll(Fake(), small)]
        if rank == 1:
            col.frozenset = tight
        out["large"] = poll(Fake(), large)
        out["small"] = poll(Fake(), small)
        out["poll_large"] = poll(PollRaises() if rank == 1 else Fake(), large)
        out["poll_small"] = poll(PollRaises() if rank == 1 else Fake(), small)
        if rank == 1:
            col.np = LowMemory()
        out["poll_buffer"] = poll(PollRaises() if rank == 0 else Fake(), range(150_000))  # 2.4 MB gathered
        if rank == 1:
            col.np, col.frozenset = np, builtins.frozenset
        out["after"] = poll(Fake(), large)
        out["seq"] = g.statistics().seq
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "decode-memory":
        import pickle

        g = col.RankGroup(comm, watchdog=3.0)

        class NoMemory:  # this module's pickle on rank 1: decoding runs out of memory
            def __getattr__(self, name):
                return getattr(pickle, name)

            def loads(self, data):
                raise MemoryError("cannot decode (the test's limit)")

        def flush(payload):
            g.push(payload)
            try:
                return ["returned", [len(p) for p in g.flush()]]
            except col.InvalidArgument as exc:
                return [type(exc).__name__, exc.argument, list(exc.ranks), "MemoryError" in str(exc)]

        if rank == 1:
            col.pickle = NoMemory()
        out["small"] = flush(list(range(1000)))  # plain, a few KB: no agreement
        out["large"] = flush(bytes(3 << 19) if rank == 0 else 1)  # 1.5 MiB: agreed
        if rank == 1:
            col.pickle = pickle
        out["after"] = flush(rank)
        out["seq"] = g.statistics().seq
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "poll-own-memory":
        import numpy as np

        g = col.RankGroup(comm, watchdog=3.0)  # small: on the old code rank 0 timed out here

        def poll():
            d = col.poll_symmetric(Fake(), g, range(200_000) if rank == 1 else [1, 2], site="poll")
            return [len(d.pending), sorted(d.poll_errors)]

        out["control"] = outcome_of(poll)
        if rank == 1:
            col.np = LowMemory()
        out["poll"] = outcome_of(poll)
        if rank == 1:
            col.np = np
        out["after"] = outcome_of(poll)
        emit(rank, **out)
        end_job(comm, rank, None)

    if case == "poll-flags-memory":
        g = col.RankGroup(comm, watchdog=3.0)  # small: a rank left alone times out here

        class Unconvertible:  # a flag whose conversion into the int64 array fails as an allocation there would
            def __int__(self):
                raise MemoryError("cannot convert the flags (the test's limit)")

            __index__ = __int__

        def poll():
            d = col.poll_symmetric(Fake(), g, [1, 2, 3] if rank == 1 else [1, 2], site="poll")
            return [len(d.pending), sorted(d.poll_errors)]

        local_flags = col._local_flags
        out["control"] = outcome_of(poll)
        if rank == 1:
            col._local_flags = lambda *a: Unconvertible()
        out["poll"] = outcome_of(poll)
        col._local_flags = local_flags
        out["after"] = outcome_of(poll)
        emit(rank, **out)
        end_job(comm, rank, None)


if __name__ == "__main__":
    main()
