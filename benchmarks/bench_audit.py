"""Audit throughput and memory: a 100k-event and a 1M-event log, side by side.

Each audit runs in its own subprocess so peak RSS (ru_maxrss) is per run; a second subprocess per size
measures the tracemalloc peak (Python allocations only).  Also prints the floor: the same file read and
``json.loads``-ed per line with nothing else, so the audit's own overhead is visible on any machine.  The
audit's clock starts after ``lifecycle`` is imported (a fixed ~0.2 s, not throughput).  A last line gives
the audit's rate with the stdlib JSON parser (what users without orjson get).
Prints numbers and ratios; asserts nothing.

    python benchmarks/bench_audit.py [--sizes 100000,1000000] [--keep DIR] [--no-stdlib]
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
    import resource

    if mode == "tracemalloc":
        import tracemalloc

        tracemalloc.start()
    from lifecycle import audit

    if mode == "audit-stdlib":
        audit._ORJSON_LOADS = None  # the parser audit falls back to when orjson is not installed
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
        r = audit.audit_paths([path])
        res = {"events": r.events, "ok": r.ok, "requests": r.requests}
    res["seconds"] = time.perf_counter() - t0
    res["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "tracemalloc":
        import tracemalloc

        res["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps(res))


def _run(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--keep", help="write the logs here instead of a temp dir")
    p.add_argument("--no-stdlib", action="store_true", help="skip the audit run with the stdlib JSON parser")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(*a.child)
        return 0
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in sizes:
            path = d / f"audit-{n}.jsonl"
            t0 = time.perf_counter()
            got = generate(path, n)
            gen_s = time.perf_counter() - t0
            audit = _run("audit", path)
            floor = _run("floor", path)
            traced = _run("tracemalloc", path)
            stdlib = None if a.no_stdlib else _run("audit-stdlib", path)
            rows.append((n, got, path.stat().st_size, gen_s, audit, floor, traced, stdlib))
            if not audit["ok"]:
                print(f"warning: the {n}-event log did not audit clean: {audit}", file=sys.stderr)
        print(f"{'events':>10} {'MiB':>8} {'audit ev/s':>12} {'floor ev/s':>12} {'audit/floor':>11} "
              f"{'maxrss MiB':>11} {'traced peak MiB':>16}")
        for n, got, size, gen_s, au, fl, tr, _ in rows:
            eps, feps = au["events"] / au["seconds"], fl["events"] / fl["seconds"]
            print(f"{au['events']:>10} {size / 2**20:>8.1f} {eps:>12,.0f} {feps:>12,.0f} {eps / feps:>11.2f} "
                  f"{au['maxrss_kib'] / 1024:>11.1f} {tr['traced_peak_bytes'] / 2**20:>16.2f}")
        if not a.no_stdlib:
            print("stdlib json (no orjson): " + ", ".join(
                f"{r[7]['events']:,} events {r[7]['events'] / r[7]['seconds']:,.0f} ev/s" for r in rows))
        if len(rows) >= 2:
            (n0, *_, a0, _f0, t0_, _s0), (n1, *_, a1, _f1, t1_, _s1) = rows[0], rows[-1]
            print(f"\nratio {rows[-1][1]}/{rows[0][1]} events: length x{rows[-1][1] / rows[0][1]:.1f}, "
                  f"throughput x{(a1['events'] / a1['seconds']) / (a0['events'] / a0['seconds']):.2f}, "
                  f"maxrss x{a1['maxrss_kib'] / a0['maxrss_kib']:.2f}, "
                  f"traced peak x{t1_['traced_peak_bytes'] / t0_['traced_peak_bytes']:.2f}")
        print("target: >= 200k events/s; peak memory independent of file length (ratio ~1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
