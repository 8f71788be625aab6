"""Rank-symmetric collectives (lifecycle.collectives) under real MPI: ``mpiexec -n 2`` and ``-n 4``.

Each test launches one program from tests/mpi as a subprocess, bounded by a timeout (the process
group is killed on expiry), and asserts on the ``RESULT {json}`` line every rank prints.  Every
safety test has a negative control that shows the failure it guards against actually happens:
the raw mpi4py versions of the seed bugs hang or misread, a ledger-less group mis-pairs silently,
a plain allreduce with an absent rank hangs, rank-local decisions diverge across ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MPI_DIR = ROOT / "tests" / "mpi"
MPIEXEC = shutil.which("mpiexec")

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(MPIEXEC is None, reason="MPI missing: no `mpiexec` on PATH (pip install mpich)"),
    pytest.mark.skipif(
        importlib.util.find_spec("mpi4py") is None, reason="MPI missing: mpi4py is not installed"
    ),
]

RANKS = [2, 4]
ITERS, DIVERGE_AT = 8, 3  # keep equal to tests/mpi/seed_bugs.py
PREFIX = 3  # tests/mpi/watchdog.py
WATCHDOG = 2.0


@dataclass
class Run:
    timed_out: bool
    rc: int | None
    out: str
    results: list[dict]
    t_end: float  # wall clock (time.time()) when the launcher exited or was killed

    def by_rank(self) -> dict[int, dict]:
        return {r["rank"]: r for r in self.results}


def mpirun(n: int, program: str, *args: str, timeout: float) -> Run:
    cmd = [MPIEXEC, "-n", str(n), sys.executable, str(MPI_DIR / program), *args]
    folder = tempfile.mkdtemp(prefix="kvlc-mpi-")
    env = dict(os.environ, PYTHONUNBUFFERED="1", KVLC_MPI_RESULTS=folder)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # so a hang can be ended with every rank it started
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
    t_end = time.time()
    # results from the ranks' files (stdout can lose the last lines of a job ended by MPI_Abort)
    lines = []
    for name in sorted(os.listdir(folder), key=lambda x: int(x[4:-6])):
        with open(os.path.join(folder, name)) as f:
            lines += f.read().splitlines()
    shutil.rmtree(folder, ignore_errors=True)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in lines if line.startswith("RESULT {")]
    return Run(timed_out, proc.returncode, out, results, t_end)


def explain(run: Run) -> str:
    return f"timed_out={run.timed_out} rc={run.rc}\n{run.out[-4000:]}"


# --------------------------------------------------------------------------- seed 000: gate on a local value


@pytest.mark.parametrize("n", RANKS)
def test_raw_gate_on_rank_local_value_hangs_at_the_divergent_iteration(n):
    run = mpirun(n, "seed_bugs.py", "--bug", "gate", "--mode", "raw", timeout=6)
    assert run.timed_out, explain(run)
    assert not run.results, explain(run)
    for rank in range(n):  # every rank got to the iteration before the drift, none past it
        assert f"rank {rank} iteration {DIVERGE_AT - 1}" in run.out, explain(run)
        assert f"rank {rank} iteration {DIVERGE_AT}" not in run.out, explain(run)


@pytest.mark.parametrize("n", RANKS)
def test_or_reduced_gate_makes_every_rank_join_the_gated_collective(n):
    run = mpirun(n, "seed_bugs.py", "--bug", "gate", "--mode", "fixed", timeout=60)
    assert run.rc == 0 and not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == list(range(n)), explain(run)
    for rank in range(n):
        assert got[rank]["values"] == [sum(r + i for r in range(n)) for i in range(ITERS)]
        # the gated gather ran once, on every rank; ranks with nothing to report joined empty
        assert got[rank]["checked"] == [[[DIVERGE_AT]] + [[]] * (n - 1)]


# --------------------------------------------------------------------------- seed 001: divergent allgather


@pytest.mark.parametrize("n", RANKS)
def test_raw_conditional_allgather_makes_the_next_collective_misread(n):
    run = mpirun(n, "seed_bugs.py", "--bug", "gather", "--mode", "raw", timeout=10)
    misreads = [r for r in run.results if "misread" in r]
    assert misreads, explain(run)
    # the first misread of every rank that misread is at the divergent iteration (a rank's later ones, if
    # MPI_Abort was slow to end the job, follow from the same shifted collective)
    first = {}
    for r in misreads:
        first[r["rank"]] = min(first.get(r["rank"], r["iteration"]), r["iteration"])
    assert set(first.values()) == {DIVERGE_AT}, (misreads, explain(run))
    assert any("'bool' object is not subscriptable" in r["misread"] for r in misreads), explain(run)


@pytest.mark.parametrize("n", RANKS)
def test_buffered_payloads_flushed_at_a_symmetric_point_reach_the_right_collective(n):
    run = mpirun(n, "seed_bugs.py", "--bug", "gather", "--mode", "fixed", timeout=60)
    assert run.rc == 0 and not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == list(range(n)), explain(run)
    for rank in range(n):
        assert got[rank]["loads"] == [[10 * i + r for r in range(n)] for i in range(ITERS)]
        for i, per_rank in enumerate(got[rank]["timeouts"]):
            want = [[] if (r == 1 and i == DIVERGE_AT) else [["timed_out", i, bool(i % 2)]] for r in range(n)]
            assert per_rank == want


# --------------------------------------------------------------------------- seed 003: agree on what is ready


@pytest.mark.parametrize("n", RANKS)
def test_raw_per_rank_ready_count_hangs(n):
    run = mpirun(n, "seed_bugs.py", "--bug", "ready", "--mode", "raw", timeout=6)
    assert run.timed_out and not run.results, explain(run)


@pytest.mark.parametrize("n", RANKS)
def test_agreed_count_processes_the_same_items_on_every_rank(n):
    run = mpirun(n, "seed_bugs.py", "--bug", "ready", "--mode", "fixed", timeout=60)
    assert run.rc == 0 and not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == list(range(n)), explain(run)
    for rank in range(n):
        assert got[rank]["processed"] == [0, n] * ITERS  # min-reduce: 2 items, never the extra one


# --------------------------------------------------------------------------- the ledger


@pytest.mark.parametrize("n", RANKS)
@pytest.mark.parametrize("seed", [20260523, 7])
def test_ledger_detects_every_random_desync_at_the_first_divergent_collective(n, seed):
    run = mpirun(n, "desync_patterns.py", "--seed", str(seed), "--trials", "60", timeout=90)
    assert run.rc == 0 and not run.timed_out, f"seed={seed}\n{explain(run)}"
    got = run.by_rank()
    assert sorted(got) == list(range(n)), f"seed={seed}\n{explain(run)}"
    for rank, res in got.items():
        assert res["failures"] == [], f"seed={seed} rank={rank}: {res['failures'][:3]}"
        assert res["detected"] == res["trials"] == 60, f"seed={seed} rank={rank}"
        assert res["silent_wrong"] == 0, f"seed={seed} rank={rank}"
        assert set(res["patterns"]) == {"swap", "loop", "subset", "error", "length"}, f"seed={seed}"


@pytest.mark.parametrize("n", RANKS)
def test_without_the_ledger_the_same_desyncs_mis_pair_silently(n):
    seed = 20260523
    run = mpirun(n, "desync_patterns.py", "--seed", str(seed), "--trials", "30", "--no-ledger", timeout=90)
    assert run.rc == 0 and not run.timed_out, f"seed={seed}\n{explain(run)}"
    got = run.by_rank()
    assert sorted(got) == list(range(n)), f"seed={seed}\n{explain(run)}"
    assert all(res["detected"] == 0 for res in got.values()), f"seed={seed}"
    assert all(res["silent_wrong"] == res["trials"] for res in got.values()), f"seed={seed}"
    # values no correct pairing could produce (a negative agreed count, an OR that lost a True)
    assert sum(res["corrupt"] for res in got.values()) > 0, f"seed={seed}\n{explain(run)}"


# --------------------------------------------------------------------------- the watchdog


@pytest.mark.parametrize("n", RANKS)
def test_watchdog_names_the_rank_that_never_arrives_and_nothing_outlives_it(n):
    run = mpirun(n, "watchdog.py", "--watchdog", str(WATCHDOG), timeout=WATCHDOG + 30)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    absent = n - 1
    assert sorted(got) == list(range(n - 1)), explain(run)
    for rank, res in got.items():
        assert res["missing"] == [absent], explain(run)
        assert res["arrived"] == list(range(n - 1))
        assert res["seq_no"] == PREFIX and res["prefix_seq"] == PREFIX - 1
        site = res["last_completed"][str(absent)]
        assert site[0] == PREFIX - 1 and site[1].startswith("watchdog.py:") and site[1].endswith(":main")
        assert res["broken"] is True
        assert f"ranks never arrived: {absent}; last completed seq {PREFIX - 1} at watchdog.py:" in res["message"]
    # a correctness bound, not a benchmark: every process (the absent one too) is gone by then
    assert run.t_end - min(r["t_enter"] for r in got.values()) <= WATCHDOG + 5, explain(run)


@pytest.mark.parametrize("n", RANKS)
def test_without_the_watchdog_an_absent_rank_hangs_the_others(n):
    run = mpirun(n, "watchdog.py", "--raw", timeout=WATCHDOG + 5 + 2)
    assert run.timed_out, explain(run)
    phases = [r["phase"] for r in run.results]
    assert phases.count("entering") == n - 1 and "returned" not in phases, explain(run)


# --------------------------------------------------------------------------- poll_symmetric


@pytest.mark.parametrize("n", RANKS)
def test_poll_symmetric_decisions_are_identical_on_every_rank(n):
    seed = 20260523
    run = mpirun(n, "property_poll.py", "--seed", str(seed), "--examples", "150", timeout=120)
    assert run.rc == 0 and not run.timed_out, f"seed={seed}\n{explain(run)}"
    got = run.by_rank()
    assert sorted(got) == list(range(n)), f"seed={seed}\n{explain(run)}"
    for rank, res in got.items():
        assert res["n_failures"] == 0, f"seed={seed} rank={rank}: {res['failures']}"
        assert res["examples"] == 150 and res["seq"] == 150, f"seed={seed} rank={rank}"
        assert res["poll_error_examples"] > 0
        # examples with an id terminal everywhere and Poisoned somewhere: `quiesced` held them (it meant terminal)
        assert res["poisoned_examples"] > 0
        # negative control: deciding from the local engine alone diverges across ranks
        assert res["naive_diverged"] > 0


@pytest.mark.parametrize("n", [2])
def test_bad_input_on_one_rank_never_strands_the_others(n):
    """poll_symmetric with bad ids (negative, not ints, not iterable), flush with an unpicklable payload and
    agree_count with a negative count raised on that rank before the collective: the other ranks waited out
    their watchdog.  Now that rank
    joins with nothing, raises InvalidArgument afterwards (the payloads on the error), and the group stays
    usable; ids from 2**63 up (valid engine ids; they overflowed int64) agree everywhere.  Negative control:
    ``--raw`` raises before the collective, and the other ranks time out."""
    run = mpirun(n, "bad_input.py", timeout=90)
    assert run.rc == 0 and not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == list(range(n)), explain(run)
    for rank, res in got.items():
        assert "error" not in res and res["after"] == "barrier ok" and res["big_pending"], (rank, res)
        assert res["op"] == "op" and res["watchdog"] == "watchdog" and res["closed"], res
        assert res["op_list"] == ["op", res["op_list"][1]] and res["op_list"][1] > 0, res  # seq advanced
        # values that are not int64 on rank 0 (a str, a float, uint64 past int64, NaN): every rank raises
        # naming rank 0, and the group stays usable (they were a desync that broke it; floats were truncated)
        assert [res[f"reduce{i}"] for i in range(4)] == [["values", True]] * 4, res
        assert res["reduce_ok"] == [2 * n], res
        assert res["sum_over"] == ["values", True], res
        assert res["sum_edges"] == [-((1 << 63) // n) * n, ((1 << 63) // n - 1) * n, 0xFFFFFFFF * n,
                                    -0xFFFFFFFF * n - sum(range(n))], res
        assert res["reduce"] == ["CollectiveDesyncError", "site", True], res  # a non-str site on rank 0
        assert res["same_bad_site"] == ["site", True, True], res  # the same non-str site on every rank
        assert res["no_ledger"] == ["values", [n]], res
        assert res["no_ledger_agree"] == ["n", True, 3], res
        assert res["op_object"] == ["kind", True], res  # an op whose str() is "sum", on rank 0 only
        assert res["options"] == ["spin", "announce_after"], res
        assert res["close_payloads"] == ["close", ["never flushed"]] and res["after_close"] == "group", res
        # an unpicklable payload, a negative count, values that are not int64, a flag with no truth value, on
        # rank 0: every rank raises naming rank 0 (the others got an answer that silently lacked rank 0's part
        # and went on while rank 0 raised: the ranks on two paths); each keeps its own payloads (2 on rank 0)
        assert res["flush"] == ["invalid", "payload", 2 if rank == 0 else 1, True], res
        assert res["agree"] == ["invalid", "n", True], res
        assert res["gather"] == ["invalid", "values", True], res
        assert res["flag"] == ["invalid", "flag", True], res
        # pickles on rank 0, unpickles nowhere: every rank raises, the others' payloads on .result
        assert res["unpickle"] == ["payload", [[r] for r in range(1, n)], [0]], res
        # a class only rank 0 has: every rank raises naming the others (rank 0 returned, the others raised)
        assert res["missing_class"] == ["payload", ["OnlyHere" if rank == 0 else None] + ["int"] * (n - 1),
                                        [] if rank == 0 else [0], list(range(1, n))], res
        if rank == 0:
            assert res["steps"] == [["invalid", "requests"]] * 3, res
            assert res["state_raises"] == "engine state unavailable", res
        else:
            assert res["steps"] == [["decided", [0], True]] * 3, res
            assert res["state_raises"] == [0], res
    raw = mpirun(n, "bad_input.py", "--raw", timeout=90)
    assert not raw.timed_out, explain(raw)
    others = {r: res for r, res in raw.by_rank().items() if r != 0}
    assert others and all(res.get("error") == "CollectiveTimeoutError" for res in others.values()), explain(raw)


# --------------------------------------------------------------------------- misuse and long runs (robustness.py)


def test_a_rank_that_never_waits_reads_the_arrival_notices_sent_to_it():
    """Rank 0 arrives last at every step, so the other rank waits and sends a notice each time, while rank 0
    never waits long enough to read them.  It reads them every ``_DRAIN_EVERY`` collectives now; before, all
    of them stayed in MPI's unexpected queue (about 4.8 KB each) for the life of the job.  Negative control:
    with the periodic read off, every notice is still unread after 400 steps."""
    steps = 400
    run = mpirun(2, "robustness.py", "--case", "notices", "--steps", str(steps), timeout=90)
    assert run.rc == 0 and not run.timed_out, explain(run)
    got = run.by_rank()
    every = got[0]["every"]
    assert got[1]["slow_waits"] > steps // 2, got  # the notices were sent
    assert got[0]["unread"] < every, got
    control = mpirun(2, "robustness.py", "--case", "notices", "--steps", str(steps), "--no-drain", timeout=90)
    assert control.rc == 0 and not control.timed_out, explain(control)
    c = control.by_rank()
    assert c[0]["unread"] > max(every, steps // 2), c


def test_an_exception_inside_a_wait_breaks_the_group_with_a_typed_error():
    """A timer's exception raised inside rank 0's wait left the header request active; the next call raised a
    raw mpi4py error.  It raises CollectiveDesyncError (field 'interrupted') and the group is broken; the other
    rank's next collective times out naming rank 0.  Control: with the check's flag cleared, the raw error."""
    run = mpirun(2, "robustness.py", "--case", "interrupt", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert got[0] == {"rank": 0, "first": "interrupted", "next": ["CollectiveDesyncError", "interrupted", True, True],
                      "close": "interrupted",
                      "events": [["lifecycle.collective_desync", "interrupted", ["gate", None]]]}, got
    assert got[1]["first"] is True and got[1]["next"] == ["CollectiveTimeoutError", [0]], got
    # the audit's line of the break on rank 0 (it logged none); rank 1's shows the capture works
    assert [e[:2] for e in got[1]["events"]] == [["lifecycle.collective_desync", "arrival"]], got
    control = mpirun(2, "robustness.py", "--case", "interrupt", "--no-check", timeout=60)
    assert not control.timed_out, explain(control)
    assert control.by_rank()[0]["next"] == ["mpi4py.MPI", "Exception"], explain(control)


def test_a_desync_filtered_out_by_level_takes_no_seq(tmp_path):
    """The collectives' logger filters at CRITICAL and an engine logs at INFO into the same file, across a desync on
    every rank: the lifecycle.collective_desync line (ERROR) took its seq all the same, a gap in the engine's log
    (seq_gap, exit 1, where nothing was lost).  It takes one only when written now.  Control (the logger at ERROR):
    the desync line is written, at the seq the filtered one had taken, and is the audit's only finding."""
    for level, n, findings in (("critical", 5, {}), ("error", 6, {"collective_desync": 1})):
        folder = tmp_path / level
        folder.mkdir()
        run = mpirun(2, "robustness.py", "--case", "desync-level", "--level", level, "--log", str(folder), timeout=60)
        assert not run.timed_out, explain(run)
        got = run.by_rank()
        assert sorted(got) == [0, 1], explain(run)
        for rank, res in got.items():
            assert res["got"] == ["CollectiveDesyncError", "op"], (level, rank, res)
            assert [s for _, s in res["events"]] == list(range(n)), (level, rank, res)
            desync = [s for e, s in res["events"] if e == "lifecycle.collective_desync"]
            assert desync == ([1] if level == "error" else []), (level, rank, res)
            assert res["findings"] == findings, (level, rank, res)


@pytest.mark.parametrize("wrapper", ["generic", "critical"])
def test_a_desync_is_logged_through_a_generic_structlog_bound_logger(monkeypatch, wrapper):
    """structlog's generic BoundLogger (wrapper_class=structlog.BoundLogger) proxies any attribute to the logger it
    wraps: asking it is_enabled_for raised AttributeError (PrintLogger has none), and the break's
    lifecycle.collective_desync line was never written, only a note on the error (seen failing).  Such a logger is
    asked nothing now: the line is written.  Control: a filtering logger at CRITICAL is still asked (no line, no
    note).  (No MPI needed: _break on a stand-in group.)"""
    import io
    import json
    import types

    import structlog

    from lifecycle import collectives

    out = io.StringIO()
    wc = structlog.BoundLogger if wrapper == "generic" else structlog.make_filtering_bound_logger(50)
    monkeypatch.setattr(collectives, "log", structlog.wrap_logger(
        structlog.PrintLogger(out), wrapper_class=wc, processors=[structlog.processors.JSONRenderer()]))
    err = RuntimeError("desync")
    event = {"rank": 0, "request": None, "role": None, "seq_no": 1, "field": "op", "sites": ["a.py:1", "b.py:2"]}
    with pytest.raises(RuntimeError) as got:
        collectives.RankGroup._break(types.SimpleNamespace(), err, event)
    assert got.value is err and not getattr(err, "__notes__", None), getattr(err, "__notes__", None)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [d["event"] for d in lines] == (["lifecycle.collective_desync"] if wrapper == "generic" else []), lines


def test_a_logger_that_raises_never_replaces_the_desync_error():
    run = mpirun(2, "robustness.py", "--case", "logger", timeout=60)
    assert not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["got"] == ["CollectiveDesyncError", "op", True, True] and res["after"] is True, (rank, res)


def test_engine_poll_symmetric_records_its_callers_site():
    """TransferEngine.poll_symmetric recorded its own line as the call site, so calls from two different lines
    agreed.  Control: one explicit site from both lines agrees (the site is what the ledger compares)."""
    run = mpirun(2, "robustness.py", "--case", "engine-site", timeout=60)
    assert not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["got"] == ["CollectiveDesyncError", "site", ["robustness.py"], 2, True], (rank, res)
    control = mpirun(2, "robustness.py", "--case", "engine-site", "--same-site", timeout=60)
    assert not control.timed_out, explain(control)
    assert [res["got"][0] for res in control.by_rank().values()] == ["returned"] * 2, explain(control)


def test_a_rank_that_never_constructs_the_group_times_the_others_out():
    """The constructor's communicator duplicates ran blocking: a rank that raised before it (or never got there)
    hung the others for good.  Now they raise CollectiveTimeoutError within the watchdog (1.5 s).  Negative
    control: a plain ``comm.Dup()`` hangs until the driver's timeout."""
    run = mpirun(2, "robustness.py", "--case", "ctor", timeout=60)
    assert not run.timed_out, explain(run)
    res = run.by_rank()[1]
    assert res["got"] == ["CollectiveTimeoutError", True], explain(run)
    raw = mpirun(2, "robustness.py", "--case", "ctor", "--raw", timeout=15)
    assert raw.timed_out and not raw.results, explain(raw)


def test_ranks_that_disagree_on_the_ledger_all_raise():
    run = mpirun(2, "robustness.py", "--case", "ledger", timeout=60)
    assert run.rc == 0 and not run.timed_out, explain(run)
    assert [r["got"] for r in run.by_rank().values()] == [["ledger"]] * 2, explain(run)


def test_an_intercommunicator_or_a_non_communicator_is_refused():
    """Over an intercommunicator every reduction returns the remote group's result: any_rank(True) answered
    False on the rank that passed True, and every decision came from the other group's engines (silently
    wrong).  It is InvalidArgument('comm') now, as are a str and COMM_NULL (a bare AttributeError and a raw
    MPI error before).  Control: with the check skipped, the wrong answer comes back."""
    run = mpirun(2, "robustness.py", "--case", "intercomm", timeout=60)
    assert run.rc == 0 and not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["got"] == ["comm", True] and res["refused"] == ["comm", "comm"], (rank, res)
    control = mpirun(2, "robustness.py", "--case", "intercomm", "--no-check", timeout=60)
    assert control.rc == 0 and not control.timed_out, explain(control)
    assert control.by_rank()[0]["got"] == ["any_rank", False, 1], explain(control)


def test_a_requests_iterable_that_raises_joins_the_collective_first():
    """A generator passed as ``requests`` that raised (not a TypeError) escaped poll_symmetric before the
    collective: rank 0's next call paired with rank 1's poll_symmetric.  Rank 0 joins now and re-raises
    after it; rank 1 decides with rank 0 in poll_errors, and the group stays usable.  Control: raising before
    the collective (the old behaviour) is a desync on both ranks."""
    run = mpirun(2, "robustness.py", "--case", "gen-raises", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert got[0]["got"] == ["ValueError", "generator broke"] and got[0]["after"] == "barrier ok", got
    assert got[1]["got"] == ["decided", [0], [7]] and got[1]["after"] == "barrier ok", got
    control = mpirun(2, "robustness.py", "--case", "gen-raises", "--raw", timeout=60)
    assert not control.timed_out, explain(control)
    c = control.by_rank()
    assert c[0]["after"] == ["CollectiveDesyncError", "op"] and c[1]["got"] == ["CollectiveDesyncError", "op"], c


def test_close_on_one_rank_against_a_collective_on_another_is_a_desync_on_both():
    """close() freed the communicators without a ledger-checked exchange: the closing rank went on silently
    while the other timed out waiting for it.  It is a desync naming both ops on both ranks now.  Control:
    freeing without the exchange (the old close) leaves the closing rank unaware."""
    run = mpirun(2, "robustness.py", "--case", "close", timeout=60)
    assert not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["got"] == ["CollectiveDesyncError", "op", ["barrier", "close"]], (rank, explain(run))
    control = mpirun(2, "robustness.py", "--case", "close", "--raw", timeout=60)
    assert not control.timed_out, explain(control)
    c = control.by_rank()
    assert c[1]["got"] == "closed" and c[0]["got"][0] == "CollectiveTimeoutError", explain(control)


def test_a_site_that_is_not_utf8_never_breaks_the_arrival_notice():
    """A site holding a lone surrogate (what a source file named with non-UTF-8 bytes gives) raised
    UnicodeEncodeError out of the waiting rank's arrival notice and broke the group on that rank alone.
    Control: an ASCII site in the same slow wait, which shows the notice path ran (slow_waits > 0)."""
    for extra in ([], ["--ascii"]):
        run = mpirun(2, "robustness.py", "--case", "site-utf8", *extra, timeout=60)
        assert not run.timed_out, explain(run)
        got = run.by_rank()
        assert got[0]["got"] == ["returned", None] and got[1]["got"] == ["returned", True], (extra, explain(run))


def test_a_site_passed_as_a_str_subclass_compares_by_its_text():
    """A numpy str as the site on one rank (the same text as the others' str) made the fingerprints differ (the
    hash took repr(), "np.str_('step')") while every field compared equal: each rank raised a bare IndexError
    out of the desync report, and the group was left "interrupted".  Sites compare by text now.  Control: a
    numpy str whose text differs is still a desync naming the site field on every rank."""
    run = mpirun(2, "robustness.py", "--case", "site-str", timeout=60)
    assert not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["got"] == ["returned", ["CollectiveDesyncError", "site", ["a", "b"]]], (rank, explain(run))


def test_an_int_too_long_to_print_is_refused_on_every_rank():
    """agree_count(10**5000), a request id or a site of 10**5000 on rank 0: repr() of it in the InvalidArgument's
    message raised ValueError (past the 4300 digits Python prints) on rank 0 alone, before the header, so rank 0's
    next call paired with rank 1's agree_count (a desync on both).  Every rank raises InvalidArgument now (a desync
    naming the site for the site), in step.  Control: agree_count(3) on both ranks afterwards agrees."""
    run = mpirun(2, "robustness.py", "--case", "huge-int", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    for rank in (0, 1):
        assert got[rank]["agree"] == ["InvalidArgument", "n"], (rank, explain(run))
        assert got[rank]["usable"] == ["returned", 3], (rank, explain(run))
        assert got[rank]["ctor"] == ["InvalidArgument", "watchdog"], (rank, explain(run))
        assert got[rank]["site"] == ["CollectiveDesyncError", "site"], (rank, explain(run))
    assert got[0]["requests"] == ["InvalidArgument", "requests"], explain(run)
    assert got[1]["requests"] == ["returned", [0]], explain(run)


def test_values_whose_conversion_raises_are_refused_on_every_rank():
    """allreduce_ints / allgather_ints values that raise RuntimeError when numpy converts them (a torch tensor that
    requires grad) on rank 0: only TypeError/ValueError/OverflowError were caught, so rank 0 raised alone before the
    header and its next call paired with rank 1's collective (a desync on both, the group broken).  Every rank
    raises InvalidArgument("values") now.  Control: a sum over both ranks afterwards."""
    run = mpirun(2, "robustness.py", "--case", "values-raise", timeout=60)
    assert not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["reduce"] == res["gather"] == ["InvalidArgument", "values"], (rank, explain(run))
        assert res["after"] == ["returned", [2]], (rank, explain(run))


def test_an_engine_state_interrupted_on_one_rank_joins_poll_symmetric_first():
    """engine.state() raising KeyboardInterrupt (Ctrl-C while poll_symmetric reads the states) on rank 0: poll()
    and the requests iterable were joined first whatever they raised, state() only for an Exception, so rank 0
    left before the collective and its next call paired with rank 1's poll_symmetric (a desync on both).  Rank 0
    joins now and re-raises after it, rank 1 decides with rank 0 in poll_errors.  Control: a barrier on both
    afterwards (the group in step)."""
    run = mpirun(2, "robustness.py", "--case", "state-ctrlc", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert got[0]["poll"] == ["KeyboardInterrupt", None] and got[1]["poll"] == ["returned", [0]], explain(run)
    assert got[0]["after"] == got[1]["after"] == ["returned", None], explain(run)


def test_a_flush_refused_before_the_exchange_keeps_its_payloads():
    """flush(site=5) on every rank raised InvalidArgument("site") after the header (the group usable), and a flush
    after close() InvalidArgument("group"): the payloads pushed for it were gone, on no error.  They are on the
    error's ``payloads`` now, as for a payload that cannot be pickled.  Control: the next flush agrees, empty."""
    run = mpirun(2, "robustness.py", "--case", "flush-site", timeout=60)
    assert not run.timed_out, explain(run)
    for rank, res in run.by_rank().items():
        assert res["site"] == ["site", [["p", rank]]], (rank, explain(run))
        assert res["usable"] == ["returned", [[], []]], (rank, explain(run))
        assert res["closed"] == ["group", ["late"]], (rank, explain(run))


def test_close_with_payloads_never_flushed_on_one_rank_raises_on_every_rank():
    """Rank 0 pushed a payload and never flushed it, then both ranks closed: rank 0 raised InvalidArgument("close")
    and rank 1 returned and went on (the ranks on two paths, what the header's p1 flag prevents everywhere else).
    Every rank raises it now, naming rank 0, each with its own payloads; the group is closed on both.  Control: a
    barrier on another group afterwards returns on both."""
    run = mpirun(2, "robustness.py", "--case", "close-push", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert got[0]["close"] == ["close", ["x"], True] and got[1]["close"] == ["close", [], True], explain(run)
    for rank, res in got.items():
        assert res["closed"] == ["InvalidArgument", "group"], (rank, explain(run))
        assert res["after"] == ["returned", None], (rank, explain(run))


def test_a_notice_sent_in_the_constructor_never_counts_as_arriving_at_the_first_collective():
    """Rank 1 waited in the constructor's ledger exchange (and announced it) and never arrives at the first
    collective: its constructor notice carried the same (seq 0, phase 0), so rank 0 named no missing rank."""
    run = mpirun(2, "robustness.py", "--case", "ctor-notice", timeout=60)
    res = run.by_rank()
    assert res[1]["ctor_slow_waits"] == 1, run.out  # its notice from the constructor was sent
    assert res[0]["got"] == ["CollectiveTimeoutError", [1], [0]], run.out
    control = mpirun(2, "robustness.py", "--case", "ctor-notice", "--raw", timeout=60)  # rank 1 only late
    assert [v["got"][0] for v in control.by_rank().values()] == ["returned", "returned"], control.out


def test_a_loop_that_is_an_iterations_only_collective_is_caught_only_with_a_symmetric_end_point():
    """The ledger's documented limit: calls that differ only in which iteration they belong to look alike."""
    run = mpirun(2, "robustness.py", "--case", "loop-only", timeout=60)
    res = run.by_rank()
    # no symmetric point: rank 0's iteration-0 item pairs with rank 1's iteration-1 item, silently
    mixed = [[[[0, 0]], [[0, 0]]], [[[0, 1]], [[1, 0]]], [[[1, 0]], [[1, 1]]]]
    assert res[0]["False"] == res[1]["False"] == ["returned", mixed], run.out
    # a barrier at the end of every iteration: caught at the first divergent call, on every rank
    first = [[[[0, 0]], [[0, 0]]]]
    assert res[0]["True"] == res[1]["True"] == ["CollectiveDesyncError", 1, "op", first], run.out


def test_a_receive_buffer_that_one_rank_cannot_allocate_raises_on_every_rank():
    """Rank 1 cannot allocate 2 MiB (MemoryError, injected into the module's numpy there) and rank 0 flushes a
    4 MiB payload, then allgather_ints 4 MiB of values: rank 1 raised MemoryError alone out of the receive buffer's
    allocation, and rank 0 waited in the gather until its watchdog (CollectiveTimeoutError).  Every rank raises the
    same InvalidArgument now, naming rank 1 and the MemoryError, each keeping its own payloads, and the next flush
    pairs.  Control: the same 4 MiB flush with memory returns on both."""
    run = mpirun(2, "robustness.py", "--case", "alloc", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == [0, 1], explain(run)
    for rank, res in got.items():
        assert res["control"] == ["returned", [4 << 20, [1]]], (rank, explain(run))
        assert res["flush"][:3] == ["InvalidArgument", "payload", [1]], (rank, explain(run))
        assert "MemoryError" in res["flush"][3] and "rank(s) [1]" in res["flush"][3], (rank, explain(run))
        assert res["flush"][4] == ([4 << 20, "more"] if rank == 0 else [1, "more"]), (rank, explain(run))
        assert res["gather"][:3] == ["InvalidArgument", "values", [1]], (rank, explain(run))
        assert "MemoryError" in res["gather"][3], (rank, explain(run))
        assert res["after"] == ["returned", [[0], [1]]] and res["seq"] == 4, (rank, explain(run))
    assert got[0]["flush"][3] == got[1]["flush"][3] and got[0]["gather"][3] == got[1]["gather"][3], explain(run)


def test_a_flush_payload_that_only_some_ranks_can_unpickle_raises_on_every_rank():
    """Rank 0 flushes an instance of a class only it defines: rank 1 raised InvalidArgument("payload") and rank 0
    returned, the ranks on two paths.  Every rank raises the same error now, naming rank 1 and its cause, each with
    what it decoded on .result; the next flushes pair.  The agreement costs one small allgather only where a
    payload holds more than builtin scalars and containers: counted besides the header, a plain flush still
    starts 2 MPI requests (sizes, bytes), one with a class in it 3, an all-empty one none."""
    run = mpirun(2, "robustness.py", "--case", "unpickle-some", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == [0, 1], explain(run)
    for rank, res in got.items():
        assert res["flush"][:2] == ["payload", [1]], (rank, explain(run))
        assert "rank 1: rank 0's payload: AttributeError" in res["flush"][2], (rank, explain(run))
        assert res["flush"][3:] == ([["OnlyHere", "int"], []] if rank == 0 else [[None, "int"], [0]]), explain(run)
        plain = [[{"ids": [r, 2.5, None, "b'x'", [1], "{3}", "frozenset()"], "rank": r}] for r in (0, 1)]
        assert res["plain"] == [2, plain], (rank, explain(run))
        assert res["classy"] == [3, [0, 1]] and res["empty"] == [0, [[], []]], (rank, explain(run))
        assert res["seq"] == 4, (rank, explain(run))
    assert got[0]["flush"][2] == got[1]["flush"][2], explain(run)


def test_a_memory_error_after_poll_symmetrics_exchange_raises_on_every_rank():
    """Rank 1 cannot build a set of 1000 ids (MemoryError, injected into the module's frozenset there) while
    poll_symmetric makes its decisions, after the exchange.  Past _AGREE_BYTES gathered (rank 0 passes 70,000 ids)
    rank 1 raised MemoryError alone and rank 0 returned, the ranks on two paths: every rank raises the same
    InvalidArgument("values") naming rank 1 now.  Under it the failure is still rank 1's alone (the documented
    limit).  A rank whose engine.poll() raised raises that error now, whatever failed after it (its decisions, or a
    receive buffer rank 1 could not allocate: the MemoryError or the InvalidArgument had replaced it), the other
    failure as its context.  Control: with memory the same calls return on both; counted, a call under 1 MiB still
    starts 2 MPI requests besides the header."""
    run = mpirun(2, "robustness.py", "--case", "poll-memory", timeout=90)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == [0, 1], explain(run)
    for rank, res in got.items():
        assert res["control"] == [["returned", 70_000, [], 4], ["returned", 2000, [], 2]], (rank, explain(run))
        assert res["large"][:3] == ["InvalidArgument", "values", [1]], (rank, explain(run))
        assert "MemoryError" in res["large"][3] and "rank(s) [1]" in res["large"][3], (rank, explain(run))
        assert res["after"] == ["returned", 70_000, [], 4] and res["seq"] == 8, (rank, explain(run))
    assert got[0]["large"][3] == got[1]["large"][3], explain(run)
    # the documented limit: under 1 MiB gathered, the decisions' MemoryError is rank 1's alone
    assert got[0]["small"] == ["returned", 2000, [], 2] and got[1]["small"][0] == "MemoryError", explain(run)
    # rank 1's poll error is what it raises, its decisions' MemoryError the context; rank 0 has it in poll_errors
    for key, count in (("poll_large", 4), ("poll_small", 2)):
        n = 70_000 if key == "poll_large" else 2000
        assert got[0][key] == ["returned", n, [1], count], (key, explain(run))
        assert got[1][key] == ["RuntimeError", None, [], "engine poll failed", "MemoryError"], (key, explain(run))
    # rank 1 cannot allocate the receive buffer: rank 1 raises InvalidArgument, rank 0 its own poll error
    assert got[1]["poll_buffer"][:3] == ["InvalidArgument", "values", [1]], explain(run)
    assert got[0]["poll_buffer"] == ["RuntimeError", None, [], "engine poll failed", "InvalidArgument"], explain(run)


def test_a_small_plain_flush_that_one_rank_cannot_decode_raises_there_alone():
    """The documented limit: nobody agrees on decoding a flush of plain payloads under 1 MiB (it would be a collective
    more on every flush), so a rank that runs out of memory decoding it (rank 1: MemoryError from the module's
    pickle.loads) raises InvalidArgument("payload") naming itself alone, and rank 0 returns.  Control: past 1 MiB
    the same failure raises on every rank, and the next flush pairs."""
    run = mpirun(2, "robustness.py", "--case", "decode-memory", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == [0, 1], explain(run)
    assert got[0]["small"] == ["returned", [1, 1]], explain(run)
    assert got[1]["small"] == ["InvalidArgument", "payload", [1], True], explain(run)
    for rank, res in got.items():
        assert res["large"] == ["InvalidArgument", "payload", [1], True], (rank, explain(run))
        assert res["after"] == ["returned", [1, 1]] and res["seq"] == 3, (rank, explain(run))


def test_poll_symmetric_ids_one_rank_cannot_send_join_the_collective_first():
    """Rank 1 passes 200,000 ids and cannot allocate the array it sends them in (MemoryError, injected into the
    module's numpy there): it raised before the collective, alone; its next poll_symmetric paired with rank 0's
    (an answer from the wrong call, silently) and rank 0's next call timed out.  Rank 1 joins with no ids now and
    re-raises the MemoryError after it; rank 0 decides with rank 1 in poll_errors.  Control: with memory the same
    call returns on both, before and after."""
    run = mpirun(2, "robustness.py", "--case", "poll-own-memory", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == [0, 1], explain(run)
    for rank, res in got.items():
        assert res["control"] == res["after"] == ["returned", [200_000, []]], (rank, explain(run))
    assert got[0]["poll"] == ["returned", [2, [1]]], explain(run)
    assert got[1]["poll"] == ["MemoryError", None], explain(run)


def test_poll_symmetric_joins_when_the_flags_cannot_be_put_into_the_array():
    """The ids' flags went into the array sent after the guarded allocation, unguarded: a MemoryError converting
    them (a list as long as the ids) raised on that rank alone, before the collective (rank 0 then paired its next
    call with rank 1's, or timed out).  Rank 1 joins with no ids now and re-raises it after; rank 0 has it in
    poll_errors.  Control: the same call before and after returns on both."""
    run = mpirun(2, "robustness.py", "--case", "poll-flags-memory", timeout=60)
    assert not run.timed_out, explain(run)
    got = run.by_rank()
    assert sorted(got) == [0, 1], explain(run)
    for rank, res in got.items():
        assert res["control"] == res["after"] == ["returned", [3, []]], (rank, explain(run))
    assert got[0]["poll"] == ["returned", [2, [1]]], explain(run)
    assert got[1]["poll"] == ["MemoryError", None], explain(run)
