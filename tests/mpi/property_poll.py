"""Property test of poll_symmetric over random per-rank local states (hypothesis, derandomized).

Every rank runs the same hypothesis test under ``@seed(--seed)`` (no database, no shrinking), so
every rank draws the same examples in the same order.  An example is a table of
request ids x ranks: each cell is what that rank's engine says about that request (untracked, or a
(state, outcome) pair).  Rank r builds a fake local engine from column r and calls
``poll_symmetric`` once.  Checks, on every rank:

  * the decisions equal a reference model computed from the whole table (which every rank has),
  * the decisions and the group's sequence number are identical on every rank (compared through a
    raw mpi4py allgather, outside the group, so the check does not trust the code under test),
  * an engine.poll() that raises on one rank is re-raised there after the collective, and every
    rank sees that rank in ``poll_errors``.

Negative control: the naive per-rank decision (each rank reads only its own engine) is computed for
the same examples; the run reports in how many examples it differed across ranks.  Shrinking is off:
a shrinking phase on one rank would change that rank's collective sequence.
"""

from __future__ import annotations

import argparse
import enum
import json

from _harness import emit, load_collectives

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from mpi4py import MPI

C = load_collectives()

State = enum.Enum("State", {n: n for n in
                            ("Advertised", "InFlight", "CancelRequested", "Quiesced", "Poisoned", "Terminated")})
Outcome = enum.Enum("Outcome", {n: n for n in ("completed", "cancelled", "failed", "expired")})

CELLS = [
    None,  # this rank does not track the request (yet)
    ("Advertised", None), ("InFlight", None), ("CancelRequested", None),
    ("Quiesced", "completed"), ("Quiesced", "cancelled"),
    ("Poisoned", "failed"), ("Poisoned", "expired"),
    ("Terminated", "completed"), ("Terminated", "cancelled"), ("Terminated", "failed"),
]


class PollFailed(Exception):
    pass


class FakeEngine:
    """A local-state engine: request id -> (State, Outcome | None). Unknown ids raise KeyError."""

    def __init__(self, cells: dict[int, tuple[str, str | None]], poll_raises: bool):
        self.cells = {r: (State[s], None if o is None else Outcome[o]) for r, (s, o) in cells.items()}
        self.poll_raises = poll_raises
        self.polls = 0

    def poll(self):
        self.polls += 1
        if self.poll_raises:
            raise PollFailed("on_terminate callback raised")
        return []

    def state(self, req):
        return self.cells[req][0]

    def outcome(self, req):
        return self.cells[req][1]


def passed_ids(table: dict[int, list], rank: int) -> set[int]:
    """The ids rank passes to poll_symmetric: those it tracks, plus (odd ranks) one it may not."""
    mine = {req for req, cells in table.items() if cells[rank] is not None}
    return mine | ({max(table)} if table and rank % 2 else set())


def model(table: dict[int, list], size: int) -> dict[str, list[int]]:
    """The consensus rules of DESIGN.md §8 over the union of the ids the ranks pass in."""
    union = set().union(*(passed_ids(table, r) for r in range(size)))
    failed, completed, quiesced, poisoned, terminal, pending = set(), set(), set(), set(), set(), set()
    for req, cells in table.items():
        if req not in union:
            continue
        if any(c is not None and (c[0] == "Poisoned" or (c[0] == "Terminated" and c[1] in ("failed", "expired")))
               for c in cells):
            failed.add(req)
        if all(c is not None and c[0] in ("Quiesced", "Terminated") and c[1] == "completed" for c in cells):
            completed.add(req)
        # evidence on every rank: Quiesced, or Terminated after it (its outcome completed or cancelled)
        if all(c is not None and c[0] in ("Quiesced", "Terminated") and c[1] in ("completed", "cancelled")
               for c in cells):
            quiesced.add(req)
        if all(c is not None and c[0] in ("Quiesced", "Poisoned", "Terminated") for c in cells):
            terminal.add(req)
            if req not in quiesced:
                poisoned.add(req)
        else:
            pending.add(req)
    return {"failed": sorted(failed), "completed": sorted(completed), "quiesced": sorted(quiesced),
            "poisoned": sorted(poisoned), "terminal": sorted(terminal), "pending": sorted(pending)}


def as_dict(d) -> dict[str, list[int] | None]:
    # (getattr: a release without the field shows as a mismatch with the model, not a crash)
    return {k: None if getattr(d, k, None) is None else sorted(getattr(d, k))
            for k in ("failed", "completed", "quiesced", "poisoned", "terminal", "pending")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=150)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    group = C.RankGroup(comm, watchdog=20)
    stats = {"examples": 0, "poll_error_examples": 0, "naive_diverged": 0, "max_requests": 0, "poisoned_examples": 0}
    failures: list[str] = []

    tables = st.dictionaries(
        st.integers(0, 40), st.lists(st.sampled_from(CELLS), min_size=size, max_size=size), max_size=12
    )

    @seed(args.seed)  # the same seed on every rank: every rank draws the same examples
    @settings(database=None, max_examples=args.examples, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(table=tables, raiser=st.one_of(st.none(), st.integers(0, size - 1)))
    def check(table, raiser):
        stats["examples"] += 1
        stats["max_requests"] = max(stats["max_requests"], len(table))
        mine = {req: cells[rank] for req, cells in table.items() if cells[rank] is not None}
        engine = FakeEngine(mine, poll_raises=(raiser == rank))
        # a rank may also list ids it does not track: unknown ids count as "not terminal here"
        requests = passed_ids(table, rank)
        raised = False
        try:
            decisions = C.poll_symmetric(engine, group, requests)
        except PollFailed:
            raised = True
            decisions = None
        if raiser is not None:
            stats["poll_error_examples"] += 1
        if raised != (raiser == rank):
            failures.append(f"poll error re-raised={raised} on rank {rank}, raiser={raiser}")
            return
        got = None if decisions is None else as_dict(decisions)
        if got is not None:
            want = model(table, size)
            stats["poisoned_examples"] += bool(want["poisoned"])  # terminal everywhere, Poisoned somewhere
            if got != want:
                failures.append(f"decisions {got} != model {want} for table {table}")
            if decisions.poll_errors != (frozenset() if raiser is None else frozenset({raiser})):
                failures.append(f"poll_errors {sorted(decisions.poll_errors)}, raiser {raiser}")
        # identical on every rank? (raw mpi4py, outside the code under test; all ranks reach it)
        naive = model({r: [c] for r, c in mine.items()}, 1)  # rank-local view, no agreement
        everyone = comm.allgather((json.dumps(got) if got else None, group.statistics().seq, json.dumps(naive)))
        decided = {e[0] for e in everyone if e[0] is not None}
        if len(decided) > 1:
            failures.append(f"ranks disagree: {decided}")
        if len({e[1] for e in everyone}) != 1:
            failures.append(f"collective sequences differ: {[e[1] for e in everyone]}")
        if len({e[2] for e in everyone}) > 1:
            stats["naive_diverged"] += 1

    check()
    emit(rank, seed=args.seed, failures=failures[:5], n_failures=len(failures), seq=group.statistics().seq,
         **stats)
    if failures:
        print(f"rank {rank}: property_poll FAILED with --seed {args.seed}", flush=True)
    group.close()


if __name__ == "__main__":
    main()
