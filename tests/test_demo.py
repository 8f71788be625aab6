"""`lifecycle demo` end to end (two processes over real NIXL; MPI ranks), its negative control, and
`lifecycle example`.  Every run is a subprocess with a bounded timeout (process group killed), and
assertions read the machine-readable summary.json the demo writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_transport_harness import needs_nixl

ROOT = Path(__file__).resolve().parents[1]
needs_mpi = pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not found (pip install mpich mpi4py)")


def run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-m", "lifecycle", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"`lifecycle {' '.join(args)}` hung (> {timeout}s)\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def demo(tmp_path: Path, *args: str, timeout: float = 90.0) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path / "demo-out"
    res = run_cli(["demo", *args, "--out", str(out), "--quiet"], timeout)
    summary_path = out / "summary.json"
    assert summary_path.is_file(), f"no summary.json (rc {res.returncode})\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res, json.loads(summary_path.read_text()), out


def explain(res: subprocess.CompletedProcess, summary: dict) -> str:
    return (f"rc {res.returncode}, seed {summary.get('seed')}, failures {summary.get('failures')}\n"
            f"{res.stdout[-2500:]}\n{res.stderr[-2500:]}")


@needs_nixl
@pytest.mark.nixl
def test_demo_cancellation_storm_with_faults_is_clean(tmp_path):
    res, s, out = demo(tmp_path, "--requests", "300", "--concurrency", "16", "--cancel-fraction", "0.5",
                       "--faults", "delay,error,drop-notif", "--seed", "1")
    assert res.returncode == 0 and s["ok"], explain(res, s)
    t = s["totals"]
    assert (t["wedged"], t["leaked"], t["checksum_errors"], t["audit_violations"]) == (0, 0, 0, 0), t
    assert t["checksum_ok"] > 0
    sides = {x["name"]: x for x in s["sides"]}
    assert set(sides) == {"sender-0", "receiver-0"}
    assert sides["sender-0"]["started"] == 300
    # every poisoned session kept its slot quarantined (nothing reused without evidence)
    for x in sides.values():
        assert x["leak"]["quarantined"] == x["leak"]["expected_quarantined"]
        assert x["leak"]["live_sessions"] == 0 and x["leak"]["leased"] == 0
    # the cancellation storm really hit every point
    points = {}
    for x in sides.values():
        for k, n in x["cancel_points"].items():
            points[k] = points.get(k, 0) + n
    assert set(points) == {"before_expose", "mid_transfer", "after_completion"}, points
    for f in ("summary.json", "audit.json", "audit.txt", "report-sender-0.html", "report-receiver-0.html",
              "diagram.svg", "diagram.mmd", "logs/sender-0.jsonl", "logs/receiver-0.jsonl"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    audit = json.loads((out / "audit.json").read_text())
    assert audit["ok"] and audit["violations"] == 0
    assert "<svg" in (out / "diagram.svg").read_text()
    first = json.loads((out / "logs" / "sender-0.jsonl").read_text().splitlines()[0])
    assert first["event"].startswith("lifecycle.") and first["schema"] == "kv-lifecycle.events/1"
    assert "audit violations 0  ->  OK" in res.stdout


@needs_nixl
@pytest.mark.nixl
def test_demo_write_mode_is_clean(tmp_path):
    res, s, _ = demo(tmp_path, "--mode", "write", "--requests", "200", "--concurrency", "16",
                     "--cancel-fraction", "0.5", "--faults", "delay,disconnect", "--seed", "2")
    assert res.returncode == 0 and s["ok"], explain(res, s)
    assert s["mode"] == "write" and s["totals"]["checksum_ok"] > 0


@needs_nixl
@pytest.mark.nixl
def test_kill_peer_leaves_survivor_poisoned_and_unhealthy_with_reason_without_hanging(tmp_path):
    # killed at a fifth of the run: the rest (~0.5 s at ~900 sessions/s) outlasts the launcher's reaction
    res, s, out = demo(tmp_path, "--requests", "600", "--concurrency", "32", "--cancel-fraction", "0.3",
                       "--faults", "kill-peer", "--kill-at", "0.2", "--seed", "3", timeout=90)
    assert res.returncode == 0 and s["ok"], explain(res, s)
    assert s["killed"] == ["receiver-0"]  # READ mode: the active side dies, the passive one survives
    surv = next(x for x in s["sides"] if x["name"] == "sender-0")
    assert surv["peer_lost"]
    # the sessions still live when the peer died had no evidence left: Poisoned, slots quarantined
    assert surv["live_at_loss"] > 0
    assert surv["poisoned_after_loss"] > 0
    assert surv["completed_after_loss"] + surv["cancelled_after_loss"] + surv["poisoned_after_loss"] == surv["live_at_loss"]
    assert surv["leak"]["quarantined"] == surv["leak"]["expected_quarantined"] >= surv["poisoned_after_loss"]
    # Poisoned since the kill (the launcher's kill time): those the lost peer ended, and any the timers did
    # before the loss was seen; the run's "cut" count
    assert surv["poisoned"] >= surv["poisoned_after_kill"] >= surv["poisoned_after_loss"]
    assert s["totals"]["poisoned_after_kill"] == surv["poisoned_after_kill"]
    assert surv["wedged_total"] == 0 and surv["leak"]["leaked"] == 0
    h = surv["health"]
    assert not h["healthy"] and any("peer receiver-0 lost" in r for r in h["reasons"]), h
    assert s["totals"]["audit_violations"] == 0
    assert (out / "logs" / "receiver-0.jsonl").is_file()  # the killed process's log is audited too


@needs_nixl
@pytest.mark.nixl
def test_a_kill_point_at_the_end_of_the_run_is_reported_as_cutting_nothing(tmp_path):
    """--kill-at 1.0: the kill comes when the run is over, or not at all.  The launcher had killed a worker
    that had already finished (found by soaking the demo at --kill-at 0.95); the killed process then counted
    as a surviving side that "did not notice that its peer was killed", and its sessions twice.  Now the
    failure says what happened: no kill (the victim's run was over), a kill after the victim finished, or a
    kill that found no session live."""
    res, s, _ = demo(tmp_path, "--requests", "200", "--faults", "kill-peer", "--kill-at", "1.0", "--seed", "5",
                     timeout=90)
    assert res.returncode == 1 and not s["ok"], explain(res, s)
    assert all("lower --kill-at" in f for f in s["failures"]) and len(s["failures"]) == 1, s["failures"]
    assert not any("did not notice" in f for f in s["failures"]), s["failures"]
    assert s["totals"]["completed"] <= 2 * 200  # no side counted twice


def test_faults_none_means_no_faults(capsys):
    from lifecycle import demo as demo_mod

    assert demo_mod.parse_args(["--faults", "none"]).fault_list == ()
    assert demo_mod.parse_args(["--faults", " none "]).fault_list == ()
    with pytest.raises(SystemExit):  # the control: none mixed with faults is no fault name
        demo_mod.parse_args(["--faults", "none,delay"])
    assert "unknown fault(s) none" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--transfer-timeout", "--cancel-grace"])
def test_a_zero_timer_is_refused_not_a_timer_that_never_fires(capsys, flag):
    """The engine reads a timer of 0 as no timer: --cancel-grace 0 left a cancelled session whose ack was lost in
    CancelRequested for ever (drop-notif,disconnect,delay, seed 5: "1 session(s) wedged", the sender unhealthy, where
    docs/demo.md promises Poisoned after --cancel-grace and the wedge bound is 2 x (timeout + grace) + 5 s).  It is
    an argparse error now; the control: the shortest positive timer is taken."""
    from lifecycle import demo as demo_mod

    with pytest.raises(SystemExit) as exc:
        demo_mod.parse_args([flag, "0"])
    assert exc.value.code == 2 and f"{flag} must be seconds in (0, 1e6], got 0.0" in capsys.readouterr().err
    assert getattr(demo_mod.parse_args([flag, "0.001"]), flag[2:].replace("-", "_")) == 0.001


@needs_nixl
@pytest.mark.nixl
def test_negative_control_one_flipped_byte_fails_the_demo(tmp_path):
    res, s, _ = demo(tmp_path, "--requests", "100", "--concurrency", "8", "--seed", "4", "--corrupt-one")
    assert res.returncode != 0
    assert s["totals"]["checksum_errors"] == 1, s["totals"]
    assert not s["ok"] and any("checksum" in f for f in s["failures"])


@needs_nixl
@pytest.mark.nixl
def test_a_side_that_never_heard_of_a_request_is_clean_with_an_empty_log(tmp_path):
    # seed 22, one request, READ: the client cancels it on the sender before expose, so the receiver never
    # advertises anything and its log holds no line; the audit's no_events finding is expected for that side
    from lifecycle.demo_worker import client_plan

    plan = client_plan(22, 1, 1.0, 4)[0]
    assert (plan.cancel_side, plan.cancel_at) == ("sender", "before_expose")
    res, s, out = demo(tmp_path, "--requests", "1", "--cancel-fraction", "1", "--seed", "22")
    assert res.returncode == 0 and s["ok"], explain(res, s)
    sides = {x["name"]: x for x in s["sides"]}
    assert sides["receiver-0"]["started"] == 0 and (out / "logs" / "receiver-0.jsonl").stat().st_size == 0
    assert s["totals"]["audit_violations"] == 0


def test_demo_audit_excuses_an_empty_log_only_for_a_side_with_no_sessions(tmp_path):
    from lifecycle.demo import _audit

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "receiver-0.jsonl").write_text("")
    doc, text, violations, _ = _audit(tmp_path, set(), {"receiver-0": 0})
    assert violations == 0 and doc["per_log"]["receiver-0"]["excused"] == {"no_events": 1}, doc
    assert "excused (not violations: empty logs allowed): no_events 1" in text, text
    # control: a side that started sessions and logged nothing is still a no_events violation
    doc, _, violations, _ = _audit(tmp_path, set(), {"receiver-0": 3})
    assert violations == 1 and doc["per_log"]["receiver-0"]["violations"]["no_events"] == 1
    assert doc["per_log"]["receiver-0"]["excused"] == {}


@needs_nixl
@needs_mpi
@pytest.mark.nixl
@pytest.mark.mpi
def test_demo_two_ranks_per_side_agree_and_are_clean(tmp_path):
    res, s, out = demo(tmp_path, "--ranks", "2", "--requests", "80", "--concurrency", "8",
                       "--cancel-fraction", "0.5", "--seed", "5", timeout=120)
    assert res.returncode == 0 and s["ok"], explain(res, s) + (out / "mpiexec.log").read_text()[-2000:]
    sides = {x["name"]: x for x in s["sides"]}
    assert set(sides) == {"sender-0", "sender-1", "receiver-0", "receiver-1"}
    # poll_symmetric: both ranks of a side finalized the same requests with the same outcomes
    for role in ("sender", "receiver"):
        a, b = sides[f"{role}-0"], sides[f"{role}-1"]
        assert (a["completed"], a["cancelled"], a["poisoned"]) == (b["completed"], b["cancelled"], b["poisoned"])
        assert a["shards"] == 2


@needs_nixl
@needs_mpi
@pytest.mark.nixl
@pytest.mark.mpi
def test_demo_ranks_at_deadline_every_worker_exits_by_itself_and_reports(tmp_path):
    """Soak (ranks 2): at --deadline the side that finished its wind-down first finalized MPI and exited while the
    other side still waited for its exposed sessions (wait_idle) with its offers unreceived; the job then killed the
    survivors (SIGKILL): no summary from them, `mpiexec exited with code 9` (or 0 and "wrote no summary")."""
    res, s, out = demo(tmp_path, "--ranks", "2", "--requests", "3000", "--concurrency", "256", "--deadline", "1",
                       "--transfer-timeout", "5", "--cancel-grace", "5", "--seed", "21", timeout=120)
    log = (out / "mpiexec.log").read_text()[-2000:]
    names = {x["name"] for x in s["sides"]}
    assert names == {"sender-0", "sender-1", "receiver-0", "receiver-1"}, explain(res, s) + log
    assert s["exit_codes"] == {"mpiexec": 0}, explain(res, s) + log
    # control: the deadline did cut the run (the workers stopped with work left, counted as wedged)
    assert not s["ok"] and s["totals"]["wedged"] > 0, explain(res, s)
    assert all("wedged" in f or "leaked" in f or "audit violation" in f for f in s["failures"]), explain(res, s) + log


def test_example_runs_quickly_and_prints_health_and_diagram():
    res = run_cli(["example"], timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stateDiagram-v2" in res.stdout
    assert "healthy" in res.stdout
    assert "on_terminate" in res.stdout


@needs_nixl
@pytest.mark.nixl
def test_demo_out_never_deletes_what_no_demo_wrote(tmp_path):
    """`--out ""` (the current directory), `--out .` or `--out ~` once ran shutil.rmtree on it.  A directory is
    replaced only if it is empty or an earlier demo wrote it (its marker file); anything else is refused with
    exit 2 and nothing is touched.  Control: a directory a demo made is replaced by the next run."""
    scratch = tmp_path / "cwd"
    (scratch / "keepme").mkdir(parents=True)
    (scratch / "keepme" / "data").write_text("precious")
    for out in ("", ".", str(scratch)):
        p = subprocess.run([sys.executable, "-m", "lifecycle", "demo", "--quiet", "--requests", "1", "--out", out],
                           cwd=scratch, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == 2 and "refusing to delete" in p.stderr, (out, p.returncode, p.stderr[-800:])
        assert (scratch / "keepme" / "data").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    p = subprocess.run([sys.executable, "-m", "lifecycle", "demo", "--quiet", "--out", str(afile)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "is not a directory" in p.stderr and afile.read_text() == "x", p.stderr[-800:]
    # bad sizes and times are argparse errors (exit 2), not a worker failure and a TypeError in the summary
    for args in (["--layers", "0"], ["--head-dim", "-1"], ["--block-tokens", "0"], ["--max-blocks", "0"],
                 ["--transfer-timeout", "nan"], ["--deadline", "nan"], ["--kill-at", "2"]):
        p = subprocess.run([sys.executable, "-m", "lifecycle", "demo", "--quiet", "--out", str(tmp_path / "o"), *args],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == 2 and "must be" in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-800:])
    # the control: a demo's own directory is replaced
    res, summary, out = demo(tmp_path, "--requests", "20", "--concurrency", "4")
    assert res.returncode == 0 and (out / ".kv-lifecycle-demo").is_file(), explain(res, summary)
    (out / "stale").write_text("from the last run")
    res, summary, out = demo(tmp_path, "--requests", "20", "--concurrency", "4")
    assert res.returncode == 0 and not (out / "stale").exists(), explain(res, summary)
    # a demo directory from before the marker (summary.json and logs/) is a demo's too: replaced
    (out / ".kv-lifecycle-demo").unlink()
    (out / "stale").write_text("from an older demo")
    res, summary, out = demo(tmp_path, "--requests", "20", "--concurrency", "4")
    assert res.returncode == 0 and not (out / "stale").exists(), explain(res, summary)


@needs_nixl
@pytest.mark.nixl
def test_a_second_demo_refuses_the_out_directory_of_a_demo_still_running(tmp_path):
    """Two demos on one --out (two `make demo` in one directory): the second deleted the first's directory
    while it ran, so the first's workers wrote on into unlinked logs, and the first then audited the second's
    300-request logs and reported them, "OK", as its own 8000 (seen against the old code).  A running demo
    holds its marker locked; a second one is refused with exit 2 and the directory is left alone.  Control:
    once the lock is released, the directory is replaced as before."""
    import fcntl

    out = tmp_path / "demo-out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "sender-0.jsonl").write_text("the running demo's log\n")
    marker = out / ".kv-lifecycle-demo"
    marker.write_text("written by `python -m lifecycle demo`\n")
    fd = os.open(marker, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running demo holds
        res = run_cli(["demo", "--requests", "20", "--concurrency", "4", "--out", str(out), "--quiet"], 60)
        assert res.returncode == 2 and "in use by another demo" in res.stderr, (res.returncode, res.stderr[-1500:])
        assert (out / "logs" / "sender-0.jsonl").read_text() == "the running demo's log\n"
    finally:
        os.close(fd)
    res, summary, out = demo(tmp_path, "--requests", "20", "--concurrency", "4")
    assert res.returncode == 0 and summary["requests"] == 20, explain(res, summary)
    assert "the running demo's log" not in (out / "logs" / "sender-0.jsonl").read_text()


def test_a_demo_checks_and_claims_its_out_directory_under_a_lock_on_the_folder_above(tmp_path):
    """The check ("is a demo running there?"), the delete and the claim were three steps: a demo that claimed the
    directory between another's check and its delete lost it while running (review: both ran, one in a deleted
    directory).  They now run under a lock on --out's parent folder.  Here the test holds that lock as a demo in
    the middle of claiming --out would: the second demo waits instead of deleting, and once the first holds its
    marker it is refused with exit 2, the directory untouched.  Control (seen against the old code): the second
    demo deleted the directory while the lock was held."""
    import fcntl

    out = tmp_path / "demo-out"
    out.mkdir()
    marker = out / ".kv-lifecycle-demo"
    marker.write_text("written by `python -m lifecycle demo`\n")  # a finished demo's: free to replace
    ino = marker.stat().st_ino
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(folder, fcntl.LOCK_EX)  # the first demo, between its check and its claim
    proc = subprocess.Popen([sys.executable, "-m", "lifecycle", "demo", "--requests", "4", "--concurrency", "2",
                             "--out", str(out), "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(5)  # the second demo has parsed its arguments and reached the claim
        assert proc.poll() is None and marker.exists() and marker.stat().st_ino == ino, "it did not wait"
        fd = os.open(marker, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first demo claims it: its marker locked
        os.close(folder)  # ... and lets the folder go
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "in use by another demo" in err, (proc.returncode, err[-1500:])
        assert marker.stat().st_ino == ino
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@needs_nixl
@pytest.mark.nixl
@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_an_interrupted_demo_stops_its_workers_without_a_traceback(tmp_path, sig, to_group):
    """SIGTERM to the launcher ended it at once and left both workers running on, orphaned, until --deadline
    (120 s by default, at full CPU); Ctrl-C (SIGINT to the whole group) printed three KeyboardInterrupt
    tracebacks, the launcher's and each worker's (both seen against the old code).  Now the launcher stops the
    workers and exits 128 + the signal with one line; nothing of the group is left running (the multiprocessing
    resource tracker exits by itself once the pipe closes).  The control is the clean runs of the other tests."""
    out = tmp_path / "demo-out"
    p = subprocess.Popen([sys.executable, "-m", "lifecycle", "demo", "--requests", "1000000", "--out", str(out),
                          "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (out / "status" / "receiver-0.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / "status" / "receiver-0.json").is_file(), "the workers never started"
        (os.killpg if to_group else os.kill)(p.pid, sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 128 + sig and "Traceback" not in err and "interrupted" in err, (p.returncode, err[-3000:])
        deadline = time.monotonic() + 15
        while _group_pids(p.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_pids(p.pid) == [], "workers left running"
        assert not list((out / "workers").glob("*.error.txt")), "a worker failed with a traceback"
    finally:
        for pid in _group_pids(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_ranks_without_mpiexec_is_refused_with_a_message_before_out_is_touched(tmp_path, capsys, monkeypatch):
    """`--ranks K` launches `mpiexec`; where there is none, the launcher raised FileNotFoundError with a traceback
    (after it had cleared and claimed --out).  Now exit 2, one line, and --out left as it was."""
    from lifecycle import demo as demo_mod

    real_which = shutil.which
    monkeypatch.setattr(demo_mod.shutil, "which", lambda name, *a, **k: None if name == "mpiexec" else
                        real_which(name, *a, **k))
    out = tmp_path / "earlier"
    out.mkdir()
    (out / ".kv-lifecycle-demo").write_text("")
    (out / "keep").write_text("an earlier demo's file")
    assert demo_mod.main(["--ranks", "2", "--requests", "4", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mpiexec not found" in err and "--ranks 2" in err and "Traceback" not in err, err
    assert (out / "keep").is_file()
