"""Audit throughput and memory, native replay and Python replay side by side: a 100k- and a 1M-event log.

Each audit runs in its own subprocess so peak RSS (VmHWM) is per run; a second subprocess per size and
engine measures the tracemalloc peak (Python allocations only: the native replay's own C++ memory shows in
RSS, not there).  Also prints the floor: the same file read and ``json.loads``-ed per line with nothing
else.  The audit's clock starts after ``lifecycle`` is imported (a fixed ~0.2 s, not throughput).
``--stdlib`` adds the Python replay with the stdlib JSON parser (what users without orjson get).
Prints numbers and ratios; asserts nothing.

    python benchmarks/bench_audit.py [--sizes 100000,1000000] [--keep DIR] [--stdlib]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_HEAD = '{"request": %d, "rank": 0, "role": %s, "t_mono_ns": %d, "seq": %d, "pid": 777, "table": "%s", ' \
        '"schema": "kv-lifecycle.events/1", '
_TR = '"from_state": %s, "to_state": "%s", "trigger": "%s", "outcome": %s, "slot": %d, "generation": %d, ' \
      '"deferred": false, "event": "lifecycle.transition", "level": "info"}\n'
_TERM = '"result": "Terminated", "state": null, "event": "lifecycle.terminate", "level": "info"}\n'


def generate(path: Path, n_events: int, concurrency: int = 64) -> int:
    """A realistic log: ``concurrency`` overlapping requests, each advertise/expose/complete/terminate
    (every 10th cancelled in flight); slots leased and returned.  Returns the number of events."""
    from lifecycle import spec

    digest = spec.load(spec.default_table_path()).digest
    t = 10**15
    seq = 0
    req = 0
    live: list[tuple[int, int, int]] = []  # (req, slot, gen)
    free = list(range(concurrency))
    gens = [0] * concurrency
    out = []
    w = out.append

    def tr(r, role, frm, to, trig, outc, slot, gen):
        nonlocal seq
        w(_HEAD % (r, role, t, seq, digest) + _TR % (frm, to, trig, outc, slot, gen))
        seq += 1

    with open(path, "w", encoding="utf-8") as f:
        stop = max(n_events - 6 * concurrency, 1)
        while seq < stop or live:
            t += 37_000
            if free and len(live) < concurrency and seq < stop:
                slot = free.pop()
                gens[slot] += 1
                role = '"sender"' if req % 2 else '"receiver"'
                tr(req, role, "null", "Advertised", "advertise", "null", slot, gens[slot])
                t += 5_000
                tr(req, role, '"Advertised"', "InFlight", "expose", "null", slot, gens[slot])
                live.append((req, slot, gens[slot]))
                req += 1
            if live and (len(live) >= concurrency or not free or seq >= stop):
                r, slot, gen = live.pop(0)
                role = '"sender"' if r % 2 else '"receiver"'
                t += 11_000 + (r * 7919) % 200_000
                if r % 10 == 0:
                    tr(r, role, '"InFlight"', "CancelRequested", "cancel", "null", slot, gen)
                    tr(r, role, '"CancelRequested"', "Quiesced", "complete", '"cancelled"', slot, gen)
                    outc = '"cancelled"'
                else:
                    tr(r, role, '"InFlight"', "Quiesced", "complete", '"completed"', slot, gen)
                    outc = '"completed"'
                w(_HEAD % (r, "null", t, seq, digest) + _TERM)
                seq += 1
                tr(r, role, '"Quiesced"', "Terminated", "terminate", outc, slot, gen)
                free.append(slot)
            if len(out) > 4096:
                f.write("".join(out))
                out.clear()
        f.write("".join(out))
    return seq


def _child(mode: str, path: str) -> None:
    if mode.startswith("traced"):
        import tracemalloc

        tracemalloc.start()
    from lifecycle import audit

    if mode == "audit-stdlib":
        audit._ORJSON_LOADS = None  # the parser audit falls back to when orjson is not installed
    native = mode in ("native", "traced-native")
    if native and audit.native_unavailable() is not None:
        raise SystemExit(f"native replay unavailable: {audit.native_unavailable()}")
    t0 = time.perf_counter()
    if mode == "floor":
        loads = json.loads
        n = 0
        with open(path, "rb") as f:
            for line in f:
                loads(line)
                n += 1
        res = {"events": n, "ok": True}
    else:
        r = audit.audit_paths([path], native=native)
        res = {"events": r.events, "ok": r.ok, "requests": r.requests}
    res["seconds"] = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries the parent's resident size at fork through exec into ru_maxrss,
    # so a small audit would read as at least this script's size
    with open("/proc/self/status") as st:
        res["maxrss_kib"] = next(int(x.split()[1]) for x in st if x.startswith("VmHWM:"))
    if mode.startswith("traced"):
        import tracemalloc

        res["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps(res))


def _run(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="events per log, comma-separated")
    p.add_argument("--keep", help="write the logs here instead of a temp dir")
    p.add_argument("--stdlib", action="store_true", help="also run the Python replay with the stdlib JSON parser")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(*a.child)
        return 0
    # (checked here, not by argparse: a child imports lifecycle after tracemalloc starts, so no import before)
    from lifecycle.bench import counts_arg

    try:
        sizes = counts_arg()(a.sizes)
    except argparse.ArgumentTypeError as exc:  # ('x' raised ValueError with a traceback)
        p.error(f"argument --sizes: {exc}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            path = d / f"audit-{n}.jsonl"
            generate(path, n)
            r = {"n": n, "mib": path.stat().st_size / 2**20}
            for mode in ("native", "python", "floor", "traced-native", "traced-python"):
                r[mode] = _run(mode, path)
            if a.stdlib:
                r["stdlib"] = _run("audit-stdlib", path)
            for mode in ("native", "python"):
                if not r[mode]["ok"]:
                    print(f"warning: the {n}-event log did not audit clean ({mode}): {r[mode]}", file=sys.stderr)
            if r["native"]["events"] != r["python"]["events"]:
                print(f"warning: the engines replayed different event counts: {r['native']} {r['python']}",
                      file=sys.stderr)
            rows.append(r)

    def eps(x: dict) -> float:
        return x["events"] / x["seconds"]

    print(f"{'events':>10} {'MiB':>7} {'engine':>8} {'events/s':>12} {'maxrss MiB':>11} {'traced peak MiB':>16}")
    for r in rows:
        for eng in ("native", "python"):
            x, t = r[eng], r[f"traced-{eng}"]
            print(f"{x['events']:>10} {r['mib']:>7.1f} {eng:>8} {eps(x):>12,.0f} {x['maxrss_kib'] / 1024:>11.1f} "
                  f"{t['traced_peak_bytes'] / 2**20:>16.2f}")
        print(f"{'':>10} {'':>7} {'floor':>8} {eps(r['floor']):>12,.0f}   (json.loads per line, nothing else)")
        if a.stdlib:
            print(f"{'':>10} {'':>7} {'stdlib':>8} {eps(r['stdlib']):>12,.0f}   (Python replay, no orjson)")
    print()
    for r in rows:
        print(f"{r['python']['events']:>10} events: native/python throughput x{eps(r['native']) / eps(r['python']):.2f}, "
              f"maxrss x{r['native']['maxrss_kib'] / r['python']['maxrss_kib']:.2f}")
    if len(rows) >= 2:
        r0, r1 = rows[0], rows[-1]
        for eng in ("native", "python"):
            print(f"{eng}: {r1['n']}/{r0['n']} events (length x{r1['n'] / r0['n']:.0f}): "
                  f"throughput x{eps(r1[eng]) / eps(r0[eng]):.2f}, "
                  f"maxrss x{r1[eng]['maxrss_kib'] / r0[eng]['maxrss_kib']:.2f}, traced peak "
                  f"x{r1['traced-' + eng]['traced_peak_bytes'] / r0['traced-' + eng]['traced_peak_bytes']:.2f}")
    print("target: >= 200k events/s; peak memory independent of file length (ratio ~1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
