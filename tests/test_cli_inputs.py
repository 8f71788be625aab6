"""Hostile input at the command line (a fuzzing pass of `python -m lifecycle ...`): each case that hung,
printed a traceback or accepted garbage silently now ends with exit status 2 (or the command's own failure
status) and one message naming the input.  Controls: the valid inputs still work."""

from __future__ import annotations

import os
import threading

import pytest

from lifecycle import audit, cli, demo, spec
from tests.golden import make_golden as mg

CLEAN = str(mg.HERE / "clean_run.jsonl")


def test_a_table_that_is_not_a_regular_file_or_is_huge_is_unreadable_not_a_hang(tmp_path, capsys):
    """A FIFO as the table blocked for ever; /dev/zero was read until memory ran out."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.table"
    big.write_bytes(b"#" * (spec.MAX_TABLE_BYTES + 1))
    done = threading.Event()
    results = {}

    def run():  # a hang would leave the thread running: the test fails rather than hangs
        for path in (fifo, "/dev/zero", big):
            results[str(path)] = spec.check_file(path)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "a table read did not return"
    for path, found in results.items():
        assert [(v.code, v.line) for v in found] == [("unreadable", 0)], (path, found)
    assert "not a regular file" in results[str(fifo)][0].message
    assert "larger than" in results[str(big)][0].message
    assert cli.main(["spec", "check", str(fifo)]) == 1
    assert cli.main(["spec", "check", str(spec.default_table_path())]) == 0  # the control


def test_a_bad_audit_engine_variable_and_an_unknown_command_exit_2_with_a_message(monkeypatch, capsys):
    monkeypatch.setenv(audit.ENGINE_ENV, "bogus")
    assert cli.main(["audit", CLEAN]) == 2
    err = capsys.readouterr().err
    assert "invalid LIFECYCLE_AUDIT_ENGINE" in err and "'bogus'" in err and "Traceback" not in err, err
    assert cli.main(["diagram", "--format", "mermaid", "--counts-from", CLEAN]) == 2
    monkeypatch.setenv(audit.ENGINE_ENV, "python")
    assert cli.main(["audit", CLEAN]) == 0  # the control
    capsys.readouterr()
    assert cli.main(["bogus"]) == 2
    out = capsys.readouterr()
    assert "unknown command 'bogus'" in out.err and out.out == ""
    assert cli.main(["--help"]) == 0 and "usage: lifecycle" in capsys.readouterr().out


def test_diagram_counts_from_garbage_is_refused_and_bad_lines_are_reported(tmp_path, capsys):
    """Counts from a log of garbage drew a diagram of zeros, with exit 0 and nothing said."""
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xff not json\n{\n")
    assert cli.main(["diagram", "--format", "mermaid", "--counts-from", str(garbage)]) == 2
    assert "no lifecycle events in" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(mg.HERE.joinpath("clean_run.jsonl").read_text() + "{bad\n")
    assert cli.main(["diagram", "--format", "mermaid", "--counts-from", str(mixed)]) == 0
    out = capsys.readouterr()
    assert "warning: 1 line(s) not counted" in out.err and f"{mixed}:" in out.err and "stateDiagram-v2" in out.out
    empty = tmp_path / "rank1.jsonl"  # one rank's log empty among the others': counted without a word
    empty.write_bytes(b"")
    assert cli.main(["diagram", "--format", "mermaid", "--counts-from", CLEAN, "--counts-from", str(empty)]) == 0
    out = capsys.readouterr()
    assert f"warning: no lifecycle events in {empty}" in out.err and "stateDiagram-v2" in out.out
    assert cli.main(["diagram", "--format", "mermaid", "--counts-from", CLEAN]) == 0  # the control
    assert capsys.readouterr().err == ""


def test_demo_refuses_sizes_beyond_the_machine_and_cuda_without_a_gpu_before_any_worker(monkeypatch, capsys):
    """Huge --concurrency / --max-blocks / KV layouts made every worker print a traceback (or ran the machine
    out of memory); --device cuda without CUDA died in the workers with ZeroDivisionError."""
    for argv in (["--concurrency", "99999999999999999999"], ["--max-blocks", "1000000000000"],
                 ["--layers", "100000", "--kv-heads", "64", "--head-dim", "4096"]):
        with pytest.raises(SystemExit) as ei:
            demo.parse_args(["--requests", "20", *argv])
        assert ei.value.code == 2, argv
        assert "of buffers in this machine's memory, more than half of it" in capsys.readouterr().err, argv
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        demo.parse_args(["--requests", "20", "--device", "cuda"])
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert demo.parse_args(["--requests", "20"]).concurrency == 64  # the control


def test_demo_out_that_cannot_be_created_exits_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert demo.main(["--requests", "20", "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the output directory" in err and "Traceback" not in err


def test_small_cli_findings_name_what_was_wrong(tmp_path, capsys):
    """A table with a UTF-8 byte order mark was "a line outside any known section"; a directory given as a
    log was "no such file"; an empty --html or diagram --out name was silently ignored."""
    table = tmp_path / "bom.table"
    table.write_bytes(b"\xef\xbb\xbf" + spec.default_table_path().read_bytes())
    assert spec.load(table).digest == spec.load(spec.default_table_path()).digest
    assert cli.main(["audit", str(tmp_path)]) == 2
    assert f"not a regular file: {tmp_path}" in capsys.readouterr().err
    assert cli.main(["audit", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file: " in capsys.readouterr().err
    for argv in (["audit", CLEAN, "--html", ""], ["diagram", "--format", "mermaid", "--out", ""]):
        with pytest.raises(SystemExit) as ei:
            cli.main(argv)
        assert ei.value.code == 2 and "needs a file name" in capsys.readouterr().err, argv


def test_bench_only_must_name_a_suite_and_runs_each_once(monkeypatch, capsys):
    """`bench --only ''` (or ',,,') ran nothing and exited 0; `--only audit,audit` ran the suite twice."""
    from lifecycle import bench

    for only in ("", ",,,", " , "):
        with pytest.raises(SystemExit) as ei:
            cli.main(["bench", "--only", only])
        assert ei.value.code == 2 and "--only names no suite" in capsys.readouterr().err, only
    ran = []  # a stand-in for the suite's subprocess: what main() asked for, and a result it can print
    monkeypatch.setattr(bench, "run_suite", lambda name, cmd, *_: ran.append(name) or bench.Result(name, "missing",
                                                                                                 command=cmd))
    assert bench.main(["--only", "audit,audit", "--quick"]) == 1  # (a "missing" suite is not ok)
    assert ran == ["audit"], ran


def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


MEMINFO = "MemTotal:       24683784 kB\nMemFree:  1 kB\n"


@pytest.mark.parametrize(("files", "limit", "source"), [
    # no cgroup files at all: the machine's memory (the control)
    ({"proc/self/cgroup": "0::/a/b\n"}, 24683784 * 1024, "this machine's memory"),
    # cgroup v2: the process's own cgroup has max, its parent a limit
    ({"proc/self/cgroup": "0::/a/b\n", "sys/fs/cgroup/cgroup.controllers": "memory\n",
      "sys/fs/cgroup/a/b/memory.max": "max\n", "sys/fs/cgroup/a/memory.max": "4294967296\n"},
     4 << 30, "/sys/fs/cgroup/a/memory.max"),
    # the least of two limits along the chain
    ({"proc/self/cgroup": "0::/a/b\n", "sys/fs/cgroup/cgroup.controllers": "memory\n",
      "sys/fs/cgroup/a/b/memory.max": "1073741824\n", "sys/fs/cgroup/a/memory.max": "4294967296\n"},
     1 << 30, "/sys/fs/cgroup/a/b/memory.max"),
    # cgroup v1, as on this VM: the memory controller's folder; "no limit" is a huge number
    ({"proc/self/cgroup": "9:pids:/\n4:memory:/process_api/x\n0::/\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
      "sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes": "2147483648\n"},
     2 << 30, "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes"),
    # a namespaced mount: the process's path is not there, the mount's root holds its limit
    ({"proc/self/cgroup": "0::/kubepods/pod1/c1\n", "sys/fs/cgroup/cgroup.controllers": "memory\n",
      "sys/fs/cgroup/memory.max": "3221225472\n"}, 3 << 30, "/sys/fs/cgroup/memory.max"),
    # a limit above the machine's memory, garbage and a zero change nothing
    ({"proc/self/cgroup": "0::/a\nbad line\n4:memory:/\n", "sys/fs/cgroup/cgroup.controllers": "",
      "sys/fs/cgroup/a/memory.max": str(1 << 50), "sys/fs/cgroup/memory.max": "lots",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": "0"}, 24683784 * 1024, "this machine's memory"),
])
def test_memory_limit_is_the_least_of_the_machine_and_its_cgroups(tmp_path, files, limit, source):
    have, where = demo.memory_limit(_tree(tmp_path, {"proc/meminfo": MEMINFO, **files}))
    want = f"this process's cgroup memory limit ({source})" if source.startswith("/") else source
    assert (have, where) == (limit, want)


def test_memory_limit_of_this_process_is_read():
    have, where = demo.memory_limit()
    assert 0 < have <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), (have, where)


def test_demo_checks_buffers_against_a_cgroup_limit_and_against_the_gpu_that_holds_them(monkeypatch, capsys):
    """The demo's size check used the machine's RAM: under a container's limit the workers were OOM-killed,
    and with CUDA buffers it checked host RAM, not the GPU they go to."""
    argv = ["--requests", "20", "--concurrency", "8", "--device", "cpu"]
    need = 2 * demo.KVConfig().slot_bytes(1) * (8 + demo.DemoOptions.quarantine_slack + 2)
    assert demo.parse_args(argv).concurrency == 8  # the control: fits this machine
    src = "this process's cgroup memory limit (/sys/fs/cgroup/memory.max)"
    monkeypatch.setattr(demo, "memory_limit", lambda: (need * 2 - 4096, src))
    with pytest.raises(SystemExit) as ei:
        demo.parse_args(argv)
    assert ei.value.code == 2 and f"of buffers in {src}, more than half of it" in capsys.readouterr().err
    monkeypatch.setattr(demo, "memory_limit", lambda: (need * 2, src))
    assert demo.parse_args(argv).concurrency == 8  # exactly half fits
    # CUDA: 3 ranks over 2 devices put ranks 0 and 2 (4 processes) on cuda:0, rank 1 (2) on cuda:1
    import torch

    class Props:
        total_memory = 1 << 40

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props)
    assert demo._buffer_homes("cuda", 3) == [("cuda:0", 4, 1 << 40), ("cuda:1", 2, 1 << 40)]
    assert demo._buffer_homes("cpu", 3) == [(src, 6, need * 2)]
    gpu = ["--requests", "20", "--concurrency", "8", "--device", "cuda"]
    assert demo.parse_args(gpu).device == "cuda"  # the host limit does not apply to GPU buffers
    Props.total_memory = need
    with pytest.raises(SystemExit):
        demo.parse_args(gpu)
    assert "of buffers in cuda:0, more than half of it" in capsys.readouterr().err


def _cli(args, tmp_path, env=None, stdin_cmd=None):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = {**os.environ, "PYTHONPATH": root, **(env or {})}
    cmd = [sys.executable, "-m", "lifecycle", *args]
    if stdin_cmd is None:
        return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, timeout=120)
    # the command's stdout into a reader that closes the pipe after a few bytes (`| head -c`)
    with subprocess.Popen(cmd, cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        head = p.stdout.read(stdin_cmd)
        p.stdout.close()
        err = p.stderr.read()
        p.wait(120)
    return head, err, p.returncode


def test_an_undecodable_file_name_is_escaped_in_the_text_report(tmp_path):
    """A log whose name is not UTF-8 (argv keeps the byte as a surrogate) crashed the text report with
    UnicodeEncodeError under PYTHONIOENCODING=utf-8 (seen against the old code): it is written as a backslash
    escape.  Control: --json (ASCII-escaped) and a plain name were always fine."""
    name = os.fsdecode(b"bad\xffname.jsonl")
    (tmp_path / name).write_bytes((mg.HERE / "clean_run.jsonl").read_bytes())
    out = _cli(["audit", name], tmp_path, {"PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode(errors="replace")
    assert b"1 file(s)" in out.stdout
    log = tmp_path / "bad.jsonl"
    log.write_bytes((mg.HERE / "clean_run.jsonl").read_bytes() + b"{oops\n")
    bad = tmp_path / name
    bad.write_bytes(log.read_bytes())
    out = _cli(["audit", name], tmp_path, {"PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 1 and b"bad\\udcffname.jsonl:" in out.stdout, (out.stdout, out.stderr)
    assert _cli(["audit", "--json", name], tmp_path, {"PYTHONIOENCODING": "utf-8"}).returncode == 1


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(tmp_path):
    """`lifecycle audit --json many.jsonl | head -1` printed a BrokenPipeError traceback (seen against the old
    code).  The CLI now stops quietly with the status of a writer killed by SIGPIPE (141).  Control: read to the
    end, the same command exits with the audit's own status."""
    big = tmp_path / "many.jsonl"  # a thousand findings kept: a report far larger than a pipe's buffer
    big.write_bytes(b"".join(b'{"not": "an event %d"}\n' % i for i in range(3000)))
    head, err, rc = _cli(["audit", "--json", str(big)], tmp_path, stdin_cmd=10)
    assert len(head) == 10 and err == b"" and rc == 141, (err.decode(), rc)
    out = _cli(["audit", "--json", str(big)], tmp_path)
    assert out.returncode == 1 and out.stderr == b"" and len(out.stdout) > 1 << 18, len(out.stdout)


@pytest.mark.parametrize("args", [["spec", "check"], ["diagram"], ["audit", CLEAN], ["example"]])
def test_a_closed_stdout_is_an_error_not_a_traceback(tmp_path, args):
    """`lifecycle ... >&-` (stdout closed at start): Python sets sys.stdout to None, so `spec check` printed
    nothing and `diagram` raised; both then ended with an AttributeError traceback from the CLI's flush (seen
    against the old code).  Now exit 2 and one line naming stdout.  Control: the same command with stdout open."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "lifecycle", *args]
    env = {**os.environ, "PYTHONPATH": root}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                       preexec_fn=lambda: os.close(1))
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 2 and "Traceback" not in err and "standard output is closed" in err, (p.returncode, err)
    ok = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout and b"Traceback" not in ok.stderr, ok.stderr.decode(errors="replace")


def test_demo_refuses_more_requests_than_a_worker_can_plan(capsys):
    """`--requests 100000000` was accepted: each worker first built the whole client plan (35 s and 1.8 GB a
    worker at 10^8; 10^9 runs the machine out of memory), and with a short --deadline the launcher then reported
    both workers as wedged.  Now an argparse error (exit 2) naming the bound.  Control: the bound itself parses."""
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--requests", str(demo.MAX_REQUESTS + 1), "--device", "cpu"])
    assert exc.value.code == 2 and "--requests must be <=" in capsys.readouterr().err
    assert demo.parse_args(["--requests", str(demo.MAX_REQUESTS), "--device", "cpu"]).requests == demo.MAX_REQUESTS


def test_demo_table_says_moved_not_verified_when_no_receiver_reported():
    """A receiver that crashed (not a kill-peer kill) left only the sender's completed bytes, yet the table
    printed them as "MB/s verified" (seen against the old code: a SIGKILLed receiver, `118.8 MB/s verified` with
    no checksum ok).  Control: with the receiver's summary they are verified."""
    base = dict(sides=[], totals=dict(wedged=0, leaked=0, checksum_errors=0, audit_violations=0, poisoned_after_kill=0),
                requests=10, mode="read", concurrency=4, ranks=1, device="cpu", cancel_fraction=0.0, faults=[],
                seed=0, elapsed_s=1.0, run_s=1.0, throughput_req_s=10.0, throughput_mb_s=1.0, killed=[], health={},
                ok=False, failures=["receiver-0 wrote no summary (crashed or wedged)"])
    assert "MB/s moved" in demo._table(dict(base, throughput_verified=False))
    assert "MB/s verified" in demo._table(dict(base, throughput_verified=True))


def test_an_empty_table_name_is_an_error_not_the_default_table(capsys):
    """`diagram --table ''` and `audit LOG --table ''` silently used the repository's table, and `spec check ''`
    reported a file named '.'."""
    for argv, status in ((["diagram", "--table", ""], 2), (["audit", CLEAN, "--table", ""], 2),
                         (["spec", "check", ""], 1)):
        assert cli.main(argv) == status, argv
        out = capsys.readouterr()
        assert "cannot read table: the file name is empty" in out.out + out.err and "stateDiagram" not in out.out, argv
    assert cli.main(["diagram", "--table", str(spec.default_table_path())]) == 0  # the control
    assert "stateDiagram-v2" in capsys.readouterr().out


def test_diagram_counts_that_the_table_cannot_show_are_reported(tmp_path, capsys):
    """Counts from a log whose moves the table does not have were dropped without a word (exit 0, the diagram
    simply showed fewer), and counts from a log written under another table were drawn over this one silently."""
    import json

    lines = [json.loads(ln) for ln in mg.HERE.joinpath("clean_run.jsonl").read_text().splitlines()]
    for d in lines:
        if d.get("from_state") == "InFlight" and d.get("trigger") == "complete":
            d["to_state"], d["outcome"] = "Poisoned", "failed"
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps(d) + "\n" for d in lines))
    assert cli.main(["diagram", "--counts-from", str(odd)]) == 0
    err = capsys.readouterr().err
    assert "warning: 8 observed transition(s) are not in the table, so not drawn (4 InFlight --complete--> Poisoned" in err
    other = tmp_path / "other.table"
    other.write_text(spec.default_table_path().read_text().replace(
        "CancelRequested  + timeout        = .stay", "CancelRequested  + timeout        = Poisoned / expired"))
    assert cli.main(["diagram", "--table", str(other), "--counts-from", CLEAN]) == 0
    err = capsys.readouterr().err
    assert f"warning: {CLEAN}:1: [table_mismatch] rank 0: event logged with table '{spec.load(spec.default_table_path()).digest}'" in err
    assert cli.main(["diagram", "--counts-from", CLEAN]) == 0  # the control: a clean log of this table
    assert capsys.readouterr().err == ""


def test_spec_check_of_an_undecodable_table_name_escapes_it(tmp_path):
    """`spec check` of a table whose name is not UTF-8 crashed with UnicodeEncodeError under PYTHONIOENCODING=utf-8,
    valid table or not (as the audit's text report did)."""
    name = os.fsdecode(b"bad\xffname.table")
    (tmp_path / name).write_bytes(b"garbage\n")
    out = _cli(["spec", "check", name], tmp_path, {"PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 1 and b"Traceback" not in out.stderr, out.stderr.decode(errors="replace")
    assert b"bad\\udcffname.table:1: [outside-section]" in out.stdout
    (tmp_path / name).write_bytes(spec.default_table_path().read_bytes())
    out = _cli(["spec", "check", name], tmp_path, {"PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 0 and b"bad\\udcffname.table: ok (" in out.stdout, out.stderr.decode(errors="replace")
    ok = _cli(["spec", "check", "--json", name], tmp_path, {"PYTHONIOENCODING": "utf-8"})  # the control: --json
    assert ok.returncode == 0


def test_demo_refuses_a_seed_no_rank_can_derive_its_fault_seed_from(capsys):
    """Review: --seed -1 (or one past 2**64 / 1000) passed the launcher and failed inside every worker, whose
    fault seed (seed * 1000 + side + rank) is a 64-bit seed: the error named the derived seed (-1000), not
    --seed.  It is a usage error now, before any worker starts.  Control: the largest seed taken is one whose
    last rank's fault seed Faults accepts."""
    from lifecycle.demo_worker import fault_seed
    from lifecycle.errors import InvalidArgument
    from lifecycle.transport import Faults

    best = ((1 << 64) - 100 - 2) // 1000  # with --ranks 2: the receiver's rank 1 derives the largest seed
    for argv in (["--seed", "-1"], ["--seed", str(2**62)], ["--ranks", "2", "--seed", str(best + 1)]):
        with pytest.raises(SystemExit) as ei:
            demo.parse_args(["--requests", "20", *argv])
        assert ei.value.code == 2, argv
        assert "--seed must be in [0, " in capsys.readouterr().err, argv
    assert demo.parse_args(["--requests", "20", "--ranks", "2", "--seed", str(best)]).seed == best  # the control
    assert Faults(seed=fault_seed(best, "receiver", 1), delay=0.1).seed == fault_seed(best, "receiver", 1)
    with pytest.raises(InvalidArgument):  # (one more, and that rank's Faults refuses it)
        Faults(seed=fault_seed(best + 1, "receiver", 1), delay=0.1)


def test_a_table_that_is_not_a_regular_file_or_too_big_is_reported_once(tmp_path, capsys):
    """spec.load raised its own SpecError inside the try whose `except ValueError` (SpecError is one) wrapped it
    again: 'X:0: [unreadable] cannot read table: invalid lifecycle table: X:0: [unreadable] cannot read table: not a
    regular file', the file and the reason said twice, for a directory, a FIFO, a device or a file past the limit."""
    big = tmp_path / "big.table"
    big.write_bytes(b"#" * (spec.MAX_TABLE_BYTES + 1))
    for path, why in ((tmp_path, "not a regular file"), (big, f"larger than {spec.MAX_TABLE_BYTES} bytes")):
        found = spec.check_file(path)
        assert [(v.code, v.line) for v in found] == [("unreadable", 0)], found
        assert found[0].message.startswith(f"cannot read table: {why}"), found[0].message
        assert cli.main(["spec", "check", str(path)]) == 1
        out = capsys.readouterr().out
        assert out.count(str(path)) == 1 and "invalid lifecycle table" not in out, out
    missing = tmp_path / "missing.table"  # the control: an OSError is reported as it was
    assert spec.check_file(missing)[0].message.startswith("cannot read table: [Errno 2]")


def test_the_command_summaries_say_the_table_file_is_optional(capsys):
    """`lifecycle --help` and `lifecycle spec` said 'spec check FILE [--json]', but FILE is optional (left out, the
    repository's table, else the compiled one, is checked), as `spec check --help` says."""
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert cli.main(["spec"]) == 2
    usage = capsys.readouterr().err
    for text in (top, usage):
        assert "spec check [FILE] [--json]" in text, text
    assert cli.main(["spec", "check"]) == 0  # the control: no FILE is a valid call


def test_python_m_lifecycle_audit_handles_bad_input_as_the_cli_does(tmp_path):
    """`python -m lifecycle.audit LOG` (the module's own entry, besides --write-schema) called main_audit bare: a bad
    LIFECYCLE_AUDIT_ENGINE ended in an InvalidArgument traceback with exit status 1, an audit's "violations" status
    (seen failing against the old code).  It now runs `lifecycle audit`'s handling: exit 2 and the message.  Control:
    a clean log exits 0 either way."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "LIFECYCLE_AUDIT_ENGINE": "bogus"}
    cmd = [sys.executable, "-m", "lifecycle.audit", str(mg.HERE / "clean_run.jsonl")]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert out.returncode == 2 and b"Traceback" not in out.stderr, out.stderr.decode(errors="replace")
    assert b"lifecycle audit: error: invalid LIFECYCLE_AUDIT_ENGINE" in out.stderr
    env["LIFECYCLE_AUDIT_ENGINE"] = "python"
    assert subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120).returncode == 0
