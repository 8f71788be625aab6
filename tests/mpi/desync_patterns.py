"""Randomized desync patterns: the ledger must catch each at the first divergent collective.

Every rank draws the same trials from ``--seed`` (so each rank knows what every rank will call and
can compute the expected outcome).  Each trial opens a fresh RankGroup, runs a common prefix of
random collectives, then one divergence pattern:

  swap     a subset of ranks calls X then Y, the others Y then X
  loop     a subset runs a loop L-1 times, the others L times, then everyone flushes
  subset   a subset makes one extra collective before the common next one
  error    one rank takes an error path that reports through a different collective
  length   same op, same site, a subset sends a longer array

With the ledger on (default) every rank must raise CollectiveDesyncError at the expected sequence
number, with the expected field and every rank's call site, and every value returned before it must
be right (no silent mis-pairing).  ``--no-ledger`` is the negative control: same draws restricted to
patterns whose ranks make equally many header exchanges; the run reports how many trials went wrong
silently.  On any failure the program prints the seed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random

import numpy as np
from _harness import emit, load_collectives

from mpi4py import MPI

C = load_collectives()


# One function per call site; each calls exactly one helper on one line.
def any_a(g, x):
    return g.any_rank(x % 2 == 1)


def any_b(g, x):
    return g.any_rank(x % 2 == 1)


def count_c(g, x):
    return g.agree_count(x)


def ints_d(g, x):
    return g.allreduce_ints(np.arange(x, dtype=np.int64), "sum").tolist()


def flush_e(g, x):
    g.push(x)
    return g.flush()


def gather_f(g, x):
    return [p.tolist() for p in g.allgather_ints([x] * (x % 3))]


OPS = {f.__name__: f for f in (any_a, any_b, count_c, ints_d, flush_e, gather_f)}
HELPER = {"any_a": "any_rank", "any_b": "any_rank", "count_c": "agree_count",
          "ints_d": "allreduce_ints", "flush_e": "flush", "gather_f": "allgather_ints"}
HEADER_ONLY = ("any_a", "any_b", "count_c")


def site_of(name: str) -> str:
    fn = OPS[name]
    lines, first = inspect.getsourcelines(fn)
    offset = next(i for i, line in enumerate(lines) if "g." in line and "return" in line or "flush()" in line)
    return f"{os.path.basename(__file__)}:{first + offset}:{name}"


def expected_value(name: str, args: list[int]):
    if name in ("any_a", "any_b"):
        return any(a % 2 == 1 for a in args)
    if name == "count_c":
        return min(args)
    if name == "ints_d":
        return (np.arange(args[0]) * len(args)).tolist()
    if name == "flush_e":
        return [[a] for a in args]
    return [[a] * (a % 3) for a in args]


def impossible(name: str, value, own) -> bool:
    """A result that no correct pairing could give this rank (proof of a silent mis-pairing)."""
    if name in ("any_a", "any_b"):
        return own % 2 == 1 and value is not True
    if name == "count_c":
        return not 0 <= value <= own
    return False


def draw_trial(rng: random.Random, size: int, ledger: bool):
    """Per-rank programs [(op, arg), ...] plus the expected divergence (seq, field) or None."""
    ops = list(HEADER_ONLY) if not ledger else list(OPS)
    patterns = ["swap", "error"] if not ledger else ["swap", "loop", "subset", "error", "length"]
    pattern = rng.choice(patterns)
    subset = set(rng.sample(range(size), rng.randint(1, size - 1)))
    prefix = []
    for _ in range(rng.randint(0, 4)):
        name = rng.choice(ops)
        x = rng.randint(1, 6) if name == "ints_d" else None
        prefix.append((name, [x if x is not None else rng.randint(0, 5) for _ in range(size)]))
    progs = [[(name, args[r]) for name, args in prefix] for r in range(size)]
    k = len(prefix)

    def arg():
        return rng.randint(1, 5)

    if pattern == "swap":
        x, y = rng.sample(ops if ledger else list(HEADER_ONLY), 2)
        ax, ay = arg(), arg()
        for r in range(size):
            progs[r] += [(x, ax), (y, ay)] if r in subset else [(y, ay), (x, ax)]
        div = (k, "op" if HELPER[x] != HELPER[y] else "site")
    elif pattern == "loop":
        n = rng.randint(2, 10)
        for r in range(size):
            progs[r] += [("any_a", arg())] * (n - 1 if r in subset else n) + [("flush_e", r)]
        div = (k + n - 1, "op")
    elif pattern == "subset":
        x, y = rng.sample(ops, 2)
        for r in range(size):
            progs[r] += ([(x, arg())] if r in subset else []) + [(y, 2)] + [("flush_e", r)]
        div = (k, "op" if HELPER[x] != HELPER[y] else "site")
    elif pattern == "error":
        bad = rng.randrange(size)
        normal = rng.choice(["count_c"] if not ledger else ["count_c", "flush_e", "ints_d"])
        for r in range(size):
            progs[r] += [("any_b", 1) if r == bad else (normal, 3)]
        div = (k, "op")
    else:  # length
        m = rng.randint(1, 5)
        for r in range(size):
            progs[r] += [("ints_d", m + 1 if r in subset else m)]
        div = (k, "size")
    return pattern, progs, div


def run_trial(comm, rank, size, progs, div, ledger):
    g = C.RankGroup(comm, watchdog=15, ledger=ledger)
    mine = progs[rank]
    silent_wrong = []
    got = None
    for i, (name, x) in enumerate(mine):
        try:
            value = OPS[name](g, x)
        except C.CollectiveDesyncError as exc:
            got = {"seq": exc.seq_no, "field": exc.field, "sites": exc.sites, "step": i, "msg": str(exc)}
            break
        same_step = all(len(p) > i and p[i][0] == name for p in progs)
        if same_step:
            want = expected_value(name, [p[i][1] for p in progs])
            if value != want:
                silent_wrong.append({"step": i, "op": name, "got": value, "want": want})
        else:
            silent_wrong.append({"step": i, "op": name, "got": value, "want": "a desync error",
                                 "impossible": impossible(name, value, x)})
    if not ledger or got is None:
        g.close()
    return got, silent_wrong


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--no-ledger", action="store_true")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    ledger = not args.no_ledger
    failures, detected, silent, corrupt = [], 0, 0, 0
    patterns: dict[str, int] = {}
    for t in range(args.trials):
        rng = random.Random(args.seed * 100003 + t)
        pattern, progs, (div_seq, div_field) = draw_trial(rng, size, ledger)
        patterns[pattern] = patterns.get(pattern, 0) + 1
        got, wrong = run_trial(comm, rank, size, progs, (div_seq, div_field), ledger)
        if wrong:
            silent += 1
        if any(w.get("impossible") for w in wrong):
            corrupt += 1
        if got is not None:
            detected += 1
        if not ledger:
            continue
        want_sites = {r: site_of(progs[r][div_seq][0]) if div_seq < len(progs[r]) else None for r in range(size)}
        problem = None
        if got is None:
            problem = "no CollectiveDesyncError"
        elif got["seq"] != div_seq or got["step"] != div_seq:
            problem = f"detected at seq {got['seq']} (step {got['step']}), expected {div_seq}"
        elif got["field"] != div_field:
            problem = f"field {got['field']!r}, expected {div_field!r}"
        elif {int(r): s for r, s in got["sites"].items()} != want_sites:
            problem = f"sites {got['sites']}, expected {want_sites}"
        elif wrong:
            problem = f"silent mis-pairing before the divergence: {wrong}"
        elif not all(f"rank {r}: #{div_seq}" in got["msg"] for r in range(size)):
            problem = f"message does not name every rank's fingerprint: {got['msg']}"
        if problem:
            failures.append({"trial": t, "pattern": pattern, "problem": problem, "seed": args.seed})
    emit(rank, seed=args.seed, trials=args.trials, ledger=ledger, detected=detected,
         silent_wrong=silent, corrupt=corrupt, failures=failures, patterns=patterns)
    if failures:
        print(f"rank {rank}: desync_patterns FAILED with --seed {args.seed}", flush=True)


if __name__ == "__main__":
    main()
