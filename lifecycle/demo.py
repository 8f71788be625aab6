"""``lifecycle demo``: disaggregated KV-cache transfer over real NIXL with a cancellation storm.

Starts a context (sender) and a generation (receiver) worker (two processes, or ``--ranks K`` MPI
ranks per side under ``mpiexec``), moves synthetic KV caches for N requests at a given concurrency,
cancels a fraction of them at random points, optionally injects faults, verifies every completed
cache by checksum, then audits both processes' JSON logs and draws the observed state diagram.
Exit 0 only when nothing wedged or leaked, every checksum matched and the audit found no violation.
See docs/demo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .demo_worker import (FAULT_RATES, KILL_TIME_FILE, DemoOptions, KVConfig, _atomic_json, fault_seed,
                          _read_json, kill_victim)

__all__ = ["main", "parse_args"]

FAULT_NAMES = (*FAULT_RATES, "kill-peer")
MAX_REQUESTS = 10_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lifecycle demo", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=None, help="requests to run (default 3000; 200 with --ranks > 1)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight per side (default 64; 16 with --ranks > 1)")
    p.add_argument("--mode", choices=("read", "write"), default="read",
                   help="read: the receiver READs from the sender (default); write: the sender WRITEs")
    p.add_argument("--cancel-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of requests the client cancels at a random point (0..1)")
    p.add_argument("--faults", default="", metavar="LIST",
                   help=f"comma-separated faults to inject: {','.join(FAULT_NAMES)} (or none)")
    p.add_argument("--seed", type=int, default=0, help="seeds the client plan and the fault injection")
    p.add_argument("--out", default="demo-out", help="output directory (default ./demo-out; replaced if an earlier demo wrote it or it is empty, "
                        "refused otherwise)")
    p.add_argument("--ranks", type=int, default=1, metavar="K", help="MPI ranks per side (tensor-parallel shards)")
    p.add_argument("--transfer-timeout", type=float, default=2.0, metavar="S")
    p.add_argument("--cancel-grace", type=float, default=2.0, metavar="S")
    p.add_argument("--deadline", type=float, default=120.0, metavar="S",
                   help="hard bound on the run; workers stop and count what is left as wedged")
    p.add_argument("--kill-at", type=float, default=0.4, metavar="F",
                   help="with kill-peer: SIGKILL the active side's process (READ: generation, WRITE: context) "
                        "at the offer of the first request past this fraction of the run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the KV cache lives (auto: CUDA when torch.cuda.is_available())")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--max-blocks", type=int, default=4, help="blocks per request are uniform in 1..N")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.add_argument("--corrupt-one", action="store_true", help=argparse.SUPPRESS)  # negative control
    a = p.parse_args(argv)
    multi = a.ranks > 1
    a.requests = a.requests if a.requests is not None else (200 if multi else 3000)
    a.concurrency = a.concurrency if a.concurrency is not None else (16 if multi else 64)
    faults = tuple(f for f in (x.strip() for x in a.faults.split(",")) if f)
    if faults == ("none",):  # (the summary prints no faults as "none")
        faults = ()
    bad = [f for f in faults if f not in FAULT_NAMES]
    if bad:
        p.error(f"unknown fault(s) {', '.join(bad)}; choose from {', '.join(FAULT_NAMES)}")
    a.fault_list = faults
    if a.requests < 1 or a.concurrency < 1 or a.ranks < 1:
        p.error("--requests, --concurrency and --ranks must be >= 1")
    if a.requests > MAX_REQUESTS:
        # every worker builds the whole client plan first: 10^8 took 35 s and 1.8 GB a worker before the first
        # request (a short --deadline then reported it as a wedge), 10^9 runs the machine out of memory
        p.error(f"--requests must be <= {MAX_REQUESTS:,} (every worker holds the whole client plan), got {a.requests}")
    if not 0.0 <= a.cancel_fraction <= 1.0:
        p.error("--cancel-fraction must be in [0, 1]")
    for flag in ("layers", "kv_heads", "head_dim", "block_tokens", "max_blocks"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    # the timers > 0: the engine reads 0 as no timer (--cancel-grace 0 left a session whose ack was lost in
    # CancelRequested for ever, a wedge, where Poisoned after cancel_grace is what the demo expects)
    for flag, low, closed in (("transfer_timeout", 0.0, False), ("cancel_grace", 0.0, False), ("deadline", 1e-3, True)):
        v = getattr(a, flag)
        if not ((low <= v) if closed else (low < v)) or not v <= 1e6:  # (NaN too)
            p.error(f"--{flag.replace('_', '-')} must be seconds in {'[' if closed else '('}{low:g}, 1e6], got {v}")
    if not 0.0 <= a.kill_at <= 1.0:
        p.error("--kill-at must be in [0, 1]")
    # every rank's fault seed (derived from --seed) is a 64-bit seed: a negative or huge --seed failed only inside
    # the workers, naming the derived seed (-1000 for --seed -1) and not the option
    if a.seed < 0 or fault_seed(a.seed, "receiver", a.ranks - 1) >= 1 << 64:
        p.error(f"--seed must be in [0, {((1 << 64) - 100 - a.ranks) // 1000}] with --ranks {a.ranks}, got {a.seed}")
    if a.kv_heads % a.ranks:
        p.error(f"--kv-heads {a.kv_heads} must be divisible by --ranks {a.ranks}")
    if "kill-peer" in faults and multi:
        p.error("kill-peer is supported with --ranks 1 only (mpiexec ends the whole job when a rank dies)")
    # Sizes, before any worker starts: each side's rank holds concurrency + quarantine slack slots of
    # max_blocks blocks (the workers raised InvalidArgument tracebacks, or ran the machine out of memory)
    a.kv = KVConfig(layers=a.layers, block_tokens=a.block_tokens, kv_heads=a.kv_heads, head_dim=a.head_dim,
                    max_blocks=a.max_blocks)
    slot = a.kv.slot_bytes(a.ranks)
    slots = a.concurrency + DemoOptions.quarantine_slack
    if a.device == "cuda":
        try:
            import torch
        except ImportError:
            p.error("--device cuda needs torch (pip install torch)")
        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    for where, procs, have in _buffer_homes(a.device, a.ranks):
        # each process: its pool's slots, plus a source and a scratch slot for the checksums
        need = procs * slot * (slots + 2)
        if have and need > have // 2:
            p.error(f"--concurrency {a.concurrency} (+{DemoOptions.quarantine_slack} quarantine slots, +2 working) x "
                    f"{slot / 2**20:.3g} MiB a slot x {procs} processes = {need / 2**30:.3g} GiB of buffers in {where}, "
                    f"more than half of it ({have / 2**30:.3g} GiB): lower --concurrency, --max-blocks or the KV "
                    "layout")
    return a


def _buffer_homes(device: str, ranks: int) -> list[tuple[str, int, int]]:
    """Where the workers' KV buffers will live: (what, processes there, its memory in bytes, 0 when unknown).
    Host memory for CPU buffers: the least of the machine's and this process's cgroup limits.  With CUDA
    (``--device cuda``, or ``auto`` where torch sees a GPU) the workers put them on ``cuda:rank % count``,
    both sides of a rank on the same device; its total memory (read without creating a context)."""
    # (auto on a machine without NVIDIA's driver node: no GPU, and no torch import in this process)
    if device == "cuda" or (device == "auto" and os.path.exists("/dev/nvidiactl")):
        try:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 (no torch or no driver: the workers fall back to the CPU, as here)
            count = 0
        if count:
            homes = []
            for d in range(count):
                procs = 2 * sum(1 for r in range(ranks) if r % count == d)
                if procs:
                    homes.append((f"cuda:{d}", procs, torch.cuda.get_device_properties(d).total_memory))
            return homes
    have, where = memory_limit()
    return [(where, 2 * ranks, have)]


_UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as the largest page-aligned int64


def memory_limit(root: str | Path = "/") -> tuple[int, str]:
    """(bytes, what) of the memory this process may use: the least of the machine's physical memory and the
    limits of its cgroups and their ancestors (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); (0, ...) when
    none can be read.  ``root`` prefixes /proc and /sys (tests)."""
    root = Path(root)
    best, where = 0, "this machine's memory"
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                best = int(line.split()[1]) * 1024  # (kB)
    except (OSError, ValueError, IndexError):
        best = 0
    if best == 0 and root == Path("/"):
        try:
            best = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            best = 0
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, name = root / "sys/fs/cgroup", "memory.max"
            if not (base / "cgroup.controllers").exists():
                base = root / "sys/fs/cgroup/unified"
        elif "memory" in controllers.split(","):
            base, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        rel = Path(path.lstrip("/"))
        # the cgroup's own folder and its ancestors; a namespaced mount shows the process's cgroup as its root
        folders = [base / rel, *(base / q for q in rel.parents)]
        for folder in folders:
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                continue
            if text == "max":
                continue
            try:
                limit = int(text)
            except ValueError:
                continue
            if 0 < limit < _UNLIMITED and (best == 0 or limit < best):
                rel_folder = folder.relative_to(root)
                best, where = limit, f"this process's cgroup memory limit (/{rel_folder}/{name})"
    return best, where


# ---- progress ----------------------------------------------------------------------------------------
class Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.t0 = time.monotonic()
        self.width = 0

    def update(self, st: dict[str, dict]) -> None:
        if not self.enabled:
            return
        rcv = [s for s in st.values() if s.get("role") == "receiver"]
        snd = [s for s in st.values() if s.get("role") == "sender"]
        side = rcv or snd
        if not side:
            return
        done = min(s.get("finalized", 0) for s in side)
        canc = min(s.get("cancelled", 0) for s in side)
        pois = max(s.get("poisoned", 0) for s in side)
        mb = sum(s.get("bytes_completed", 0) for s in rcv) / 1e6
        dt = max(time.monotonic() - self.t0, 1e-3)
        health = "/".join("ok" if s.get("healthy", True) else "UNHEALTHY" for s in (snd + rcv))
        pct = 100.0 * done / max(self.total, 1)
        line = (f"[{self.label}] {done}/{self.total} ({pct:4.1f}%) cancelled {canc} poisoned {pois} | "
                f"{done / dt:6.0f} req/s {mb / dt:7.1f} MB/s | health {health}")
        pad = max(0, self.width - len(line))
        self.width = len(line)
        sys.stderr.write("\r" + line + " " * pad)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---- launching ---------------------------------------------------------------------------------------
class _Launch:
    """The worker processes: two spawned processes, or one mpiexec job."""

    def __init__(self, opts: DemoOptions):
        self.opts = opts
        self.procs: dict[str, object] = {}
        self.killed: dict[str, int] = {}
        self.mpi: subprocess.Popen | None = None

    def start(self) -> None:
        opts_json = self.opts.to_json()
        if self.opts.ranks == 1:
            import multiprocessing as mp

            from .demo_worker import run_pipe_worker

            ctx = mp.get_context("spawn")
            a, b = ctx.Pipe()
            for role, conn in (("sender", a), ("receiver", b)):
                p = ctx.Process(target=run_pipe_worker, args=(role, opts_json, conn), name=f"demo-{role}")
                p.start()
                self.procs[f"{role}-0"] = p
            a.close()  # the workers hold their ends: a dead peer then reads as EOF
            b.close()
        else:
            mpiexec = shutil.which("mpiexec")
            if mpiexec is None:
                raise FileNotFoundError("mpiexec not found (pip install mpich mpi4py)")
            path = Path(self.opts.out) / "options.json"
            path.write_text(opts_json, encoding="utf-8")
            cmd = [mpiexec, "-n", str(2 * self.opts.ranks), sys.executable, "-m", "lifecycle.demo_worker",
                   "--opts", str(path)]
            self.mpi_log = open(Path(self.opts.out) / "mpiexec.log", "w")  # noqa: SIM115
            self.mpi = subprocess.Popen(cmd, stdout=self.mpi_log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        if self.mpi is not None:
            return self.mpi.poll() is None
        return any(p.is_alive() for p in self.procs.values())

    def kill(self, name: str, at: float | None = None) -> bool:
        """SIGKILL ``name`` (kill-peer); False, and nothing done, when it already exited by itself: a worker that
        crashed is not a kill (its pid, reaped by alive(), raised ProcessLookupError out of the launcher, or, not
        yet reaped, counted as killed, which hid its crash: its exit code and traceback went unreported).
        ``at``: the victim's own kill at its kill point (KILL_TIME_FILE), recorded when it exited by SIGKILL."""
        p = self.procs[name]
        if not p.is_alive():  # (reaps it: its pid is not ours to signal any more)
            if at is None or p.exitcode != -signal.SIGKILL:
                return False
            t = at
        else:
            t = time.monotonic()  # (CLOCK_MONOTONIC: the same clock in every process of this machine)
            os.kill(p.pid, signal.SIGKILL)
            if at is not None:
                t = min(t, at)
        self.killed[name] = p.pid
        # the survivor counts its sessions Poisoned from here on: those the kill cut, whether its timers or
        # the lost peer (seen some 25-50 ms later) ended them
        _atomic_json(Path(self.opts.out) / "status" / KILL_TIME_FILE, {"victim": name, "t_mono": t})
        return True

    def stop_all(self) -> list[str]:
        """Kill whatever is still running; returns the names that did not exit by themselves."""
        stuck = []
        if self.mpi is not None:
            if self.mpi.poll() is None:
                stuck.append("mpiexec")
                os.killpg(self.mpi.pid, signal.SIGKILL)
                self.mpi.wait(10)
            self.mpi_log.close()
            return stuck
        for name, p in self.procs.items():
            if p.is_alive():
                stuck.append(name)
                p.kill()
            p.join(10)
        return stuck

    def exit_codes(self) -> dict[str, int | None]:
        if self.mpi is not None:
            return {"mpiexec": self.mpi.returncode}
        return {n: p.exitcode for n, p in self.procs.items()}


def _take_kill(launch: _Launch, out: Path, victim: str) -> None:
    """kill-peer: the victim kills itself at its kill point and writes the time (KILL_TIME_FILE): record it."""
    asked = _read_json(out / "status" / KILL_TIME_FILE)
    if asked is not None and isinstance(asked.get("t_mono"), (int, float)):
        launch.kill(victim, asked["t_mono"])


# ---- after the run -----------------------------------------------------------------------------------
def _audit(out: Path, killed: set[str], started: dict[str, object]) -> tuple[dict, str, int, dict]:
    """``started``: sessions each worker created (its summary's ``started``), by log name."""
    from . import spec as _spec
    from .audit import audit_paths, format_text
    from .report import write_html

    sp = _spec.load_default()
    per, texts, violations, edges = {}, [], 0, {}
    for log in sorted((out / "logs").glob("*.jsonl")):
        name = log.stem
        # a process we SIGKILLed cannot terminate its sessions: what it left live is "live", not a leak
        leak_age = 10**15 if name in killed else 0
        res = audit_paths([log], sp, leak_age_ns=leak_age)
        # a side that created no session logs nothing (the receiver when the sender cancelled every request
        # before exposing it): its empty log is expected, not an audit that could not fail
        if started.get(name) == 0:
            res.excuse("no_events")
        per[name] = res.as_dict()
        violations += res.violations
        texts.append(f"== {log.name} ==\n{format_text(res)}")
        write_html(res, sp, str(out / f"report-{name}.html"))
        for k, n in res.edges.items():
            edges[k] = edges.get(k, 0) + n
    doc = {"format": "kv-lifecycle.demo-audit/1", "ok": violations == 0, "violations": violations,
           "killed": sorted(killed), "per_log": per}
    return doc, "\n".join(texts), violations, edges


def _diagram(out: Path, edges: dict) -> None:
    from . import diagram

    (out / "diagram.mmd").write_text(diagram.render("mermaid", counts=edges), encoding="utf-8")
    try:
        (out / "diagram.svg").write_text(diagram.render("svg", counts=edges), encoding="utf-8")
    except (FileNotFoundError, RuntimeError) as exc:
        (out / "diagram.svg.txt").write_text(f"SVG not rendered: {exc}\n", encoding="utf-8")


def _last_error(path: Path) -> str:
    """The last line of a worker's traceback file (its exception, e.g. a typed error), or ''."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _table(summary: dict) -> str:
    rows = summary["sides"]
    cols = [("side", "name"), ("sessions", "started"), ("completed", "completed"), ("cancelled", "cancelled"),
            ("poisoned", "poisoned"), ("deferred", "deferred"), ("quarantined", "quarantined"),
            ("recovered", "recovered"), ("checksum ok", "checksum_ok"), ("checksum err", "checksum_errors"),
            ("wedged", "wedged"), ("leaked", "leaked")]
    widths = [max([len(h)] + [len(str(r.get(k, ""))) for r in rows]) for h, k in cols]  # (no rows: every worker failed)
    out = ["  ".join(h.rjust(w) for (h, _), w in zip(cols, widths))]
    for r in rows:
        out.append("  ".join(str(r.get(k, "")).rjust(w) for (_, k), w in zip(cols, widths)))
    t = summary["totals"]
    out.append("")
    out.append(f"requests {summary['requests']} ({summary['mode'].upper()}, concurrency {summary['concurrency']}, "
               f"ranks {summary['ranks']}, device {summary['device']}), cancel fraction {summary['cancel_fraction']}, "
               f"faults [{','.join(summary['faults']) or 'none'}], seed {summary['seed']}")
    out.append(f"elapsed {summary['elapsed_s']:.1f} s (workers' run {summary['run_s']:.1f} s: "
               f"{summary['throughput_req_s']:.0f} sessions/s, {summary['throughput_mb_s']:.1f} MB/s "
               f"{'verified' if summary.get('throughput_verified', not summary.get('killed')) else 'moved'})")
    if summary.get("killed"):
        out.append(f"killed (kill-peer): {', '.join(summary['killed'])}; survivors' sessions Poisoned since the kill: "
                   f"{t['poisoned_after_kill']}")
    for name, h in summary["health"].items():
        out.append(f"health {name}: {'healthy' if h['healthy'] else 'UNHEALTHY'}"
                   + ("" if h["healthy"] else f" ({'; '.join(h['reasons'])})"))
    out.append(f"wedged {t['wedged']}, leaked {t['leaked']}, checksum errors {t['checksum_errors']}, "
               f"audit violations {t['audit_violations']}  ->  {'OK' if summary['ok'] else 'FAILED'}")
    if summary["failures"]:
        out.extend(f"  failure: {f}" for f in summary["failures"])
    return "\n".join(out)


DEMO_MARKER = ".kv-lifecycle-demo"


def _marker_in_use(marker: Path) -> bool:
    """Whether a running demo holds ``marker`` locked (it holds it for its whole run)."""
    import fcntl

    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # (a filesystem without flock: no lock to honour)
        return False
    finally:
        os.close(fd)
    return False


def _lock_marker(marker: Path) -> int | None:
    """Creates ``marker`` and locks it for this run (the fd stays open until the process exits); None when
    another demo holds it or replaced it meanwhile."""
    import fcntl

    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # (no flock on this filesystem: run unlocked, as before)
        pass
    try:
        same = os.fstat(fd).st_ino == os.stat(marker).st_ino
    except OSError:
        same = False
    if not same:  # another demo deleted the directory between our open and our lock
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, (f"written by `python -m lifecycle demo` (pid {os.getpid()}, which holds this file locked while it "
                  "runs): the next demo run may delete this directory\n").encode())
    return fd


_MARKER_FD: int | None = None  # this run's lock on its --out (see _lock_marker)


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP to the launcher, raised like Ctrl-C's KeyboardInterrupt so that the workers are stopped on
    the way out (the default action ended the launcher at once and left both workers running on, orphaned, until
    --deadline); ``signum`` gives the exit status (128 + signum)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    global _MARKER_FD
    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, _raise_interrupted)
    except ValueError:  # (not the main thread: no handlers; the caller owns the signals)
        pass
    try:
        return _run(argv)
    finally:
        for sig, handler in old.items():
            if handler is not None:  # (None: a handler not installed from Python, which cannot be put back)
                signal.signal(sig, handler)
        if _MARKER_FD is not None:  # the run is over: --out may be replaced
            os.close(_MARKER_FD)
            _MARKER_FD = None


def _claim_out(arg: str, out: Path) -> int:
    """Check, clear and claim ``out`` for this run (0), or say why not (2).  Under a lock on its parent folder:
    another demo's check-then-delete could otherwise fall between this run's check and its lock (both run, one
    in a deleted directory; review)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"demo: --out {arg!r}: cannot create the output directory: {exc}", file=sys.stderr)
        return 2
    with _folder_lock(out.parent):
        return _claim_out_locked(arg, out)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive flock on ``folder`` while the block runs (waits for it), or none where the folder cannot be
    opened or the filesystem has no flock."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _claim_out_locked(arg: str, out: Path) -> int:
    global _MARKER_FD
    if out.exists():
        # Only a directory an earlier demo made (its marker inside) or an empty one is cleared: `--out ""`
        # or `--out .` once wiped the current directory.
        if not out.is_dir():
            print(f"demo: --out {arg!r} is not a directory: refusing to replace it", file=sys.stderr)
            return 2
        cwd = Path.cwd().resolve()
        if out == cwd or out in cwd.parents:
            print(f"demo: --out {str(out)!r} is the current directory or holds it: refusing to delete it", file=sys.stderr)
            return 2
        # (a demo from before the marker left summary.json and logs/: that is a demo's directory too)
        earlier = (out / DEMO_MARKER).is_file() or ((out / "summary.json").is_file() and (out / "logs").is_dir())
        if any(out.iterdir()) and not earlier:
            print(f"demo: --out {str(out)!r} holds files that no demo wrote (no {DEMO_MARKER} in it): refusing to "
                  "delete them; pass a new or empty directory", file=sys.stderr)
            return 2
        # Another demo still running there: deleting its directory lost its logs (its workers wrote on into
        # unlinked files) and it then audited this run's logs and reported them as its own, "OK".
        if _marker_in_use(out / DEMO_MARKER):
            print(f"demo: --out {str(out)!r} is in use by another demo that is still running: refusing to delete "
                  "it; pass another --out or wait for that run to end", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _MARKER_FD = _lock_marker(out / DEMO_MARKER)
        if _MARKER_FD is None:
            print(f"demo: --out {str(out)!r} was taken by another demo that started at the same time: refusing to "
                  "share it; pass another --out", file=sys.stderr)
            return 2
        for d in ("logs", "status", "workers"):
            (out / d).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"demo: --out {arg!r}: cannot create the output directory: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(argv: list[str] | None) -> int:
    a = parse_args(argv)
    if a.ranks > 1 and shutil.which("mpiexec") is None:  # (raised from the launch, a traceback, --out cleared)
        print(f"demo: --ranks {a.ranks} runs the workers under mpiexec, and mpiexec not found on PATH "
              "(pip install mpich mpi4py)", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    code = _claim_out(a.out, out)
    if code:
        return code
    kill_peer = "kill-peer" in a.fault_list
    opts = DemoOptions(
        out=str(out), mode=a.mode, requests=a.requests, concurrency=a.concurrency,
        cancel_fraction=a.cancel_fraction, faults=tuple(f for f in a.fault_list if f != "kill-peer"),
        seed=a.seed, transfer_timeout=a.transfer_timeout, cancel_grace=a.cancel_grace, deadline=a.deadline,
        ranks=a.ranks, corrupt_one=a.corrupt_one, device=a.device,
        kv=a.kv, kill_at=a.kill_at if kill_peer else None)
    label = f"demo {a.mode}" + (f" x{a.ranks} ranks" if a.ranks > 1 else "")
    prog = Progress(sys.stderr.isatty() and not a.quiet, a.requests, label)
    launch = _Launch(opts)
    t0 = time.monotonic()
    hard = t0 + a.deadline + 30.0  # workers bound themselves by --deadline; this bounds the workers
    status: dict[str, dict] = {}
    victim = f"{kill_victim(a.mode)}-0"
    try:
        launch.start()  # (in the try: an interrupt while it starts them stops what it started)
        while launch.alive() and time.monotonic() < hard:
            for f in (out / "status").glob("*.json"):
                s = _read_json(f)
                if s is not None:
                    status[f.stem] = s
            prog.update(status)
            if kill_peer and not launch.killed:
                # kill the active side (READ: the receiver, WRITE: the sender): the survivor is then the
                # passive side, holding exposed sessions whose evidence can now never come.  The victim kills
                # itself past the kill point, with a survivor's offer in hand, and writes KILL_TIME_FILE.
                _take_kill(launch, out, victim)
            time.sleep(0.1)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (Interrupted): the workers are stopped below
        interrupted: int | None = getattr(exc, "signum", signal.SIGINT)
    else:
        interrupted = None
    finally:
        held = {}
        try:  # a second Ctrl-C must not cut the cleanup short and leave workers behind
            held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        except ValueError:  # (not the main thread)
            pass
        try:
            stuck = launch.stop_all()
            prog.close()
        finally:
            for sig, handler in held.items():
                if handler is not None:
                    signal.signal(sig, handler)
    if interrupted is not None:
        print(f"demo: interrupted by {signal.Signals(interrupted).name}: workers stopped, no audit or summary; "
              f"their partial logs are in {out}", file=sys.stderr)
        return 128 + interrupted
    if kill_peer and not launch.killed:
        _take_kill(launch, out, victim)  # (the run may have ended before the loop read it)
    for name in launch.killed:  # a killed side's table: its last status (written just before its kill)
        last = _read_json(out / "status" / f"{name}.json")
        if last is not None:
            status[name] = last
    elapsed = time.monotonic() - t0
    codes = launch.exit_codes()
    killed = set(launch.killed)

    failures: list[str] = []
    if kill_peer and not killed:
        failures.append("kill-peer requested but the run ended before the kill point (lower --kill-at)")
    # (The victim kills itself while it handles a survivor's offer, so within its run: a kill that landed after
    # the run, cutting nothing, as the launcher's own timing allowed, cannot happen.)
    for name in stuck:
        failures.append(f"{name} did not exit within the deadline (wedge)")
    for name, code in codes.items():
        # (a victim that exited by itself just before the SIGKILL landed on its zombie: its own code, not -9)
        if code not in (0, None) and (name not in killed or code != -signal.SIGKILL):
            err = _last_error(out / "workers" / f"{name}.error.txt")
            failures.append(f"{name} exited with code {code}" + (f": {err}" if err else ""))
    names = [f"{r}-{k}" for r in ("sender", "receiver") for k in range(a.ranks)]
    sides = []
    for name in names:
        w = _read_json(out / "workers" / f"{name}.json")
        if w is None:
            if name in killed:
                last = status.get(name, {})
                sides.append({"name": name + " (killed)", "started": last.get("started", "?"),
                              "completed": last.get("completed", "?"), "cancelled": last.get("cancelled", "?"),
                              "poisoned": last.get("poisoned", "?"), "killed": True})
            else:
                err = _last_error(out / "workers" / f"{name}.error.txt")
                if err:
                    failures.append(f"{name} failed: {err}")
                else:
                    failures.append(f"{name} wrote no summary (crashed or wedged; see {out / 'mpiexec.log'})"
                                    if a.ranks > 1 else f"{name} wrote no summary (crashed or wedged)")
            continue
        leak = w["leak"]
        sides.append(dict(w, quarantined=leak["quarantined"], recovered=w["engine"]["recovered"],
                          wedged=w["wedged_total"], leaked=leak["leaked"]))
    started = {s["name"].removesuffix(" (killed)"): s.get("started") for s in sides}
    audit_doc, audit_text, audit_violations, edges = _audit(out, killed, started)
    (out / "audit.json").write_text(json.dumps(audit_doc, indent=2), encoding="utf-8")
    (out / "audit.txt").write_text(audit_text, encoding="utf-8")
    _diagram(out, edges)

    real = [s for s in sides if not s.get("killed")]
    tot = lambda k: sum(int(s.get(k, 0)) for s in real)  # noqa: E731
    totals = dict(wedged=tot("wedged"), leaked=tot("leaked"), checksum_errors=tot("checksum_errors"),
                  checksum_ok=tot("checksum_ok"), audit_violations=audit_violations,
                  poisoned=tot("poisoned"), cancelled=tot("cancelled"), completed=tot("completed"),
                  poisoned_after_kill=0)
    health = {s["name"]: s["health"] for s in real}
    for s in real:
        h = s["health"]
        if h["healthy"]:
            continue
        # the only acceptable reason to end unhealthy: the peer we killed on purpose
        if killed and s.get("peer_lost") and all(r.startswith("backend: peer") or "quarantine" in r
                                                 for r in h["reasons"]):
            continue
        failures.append(f"{s['name']} unhealthy at the end: {'; '.join(h['reasons'])}")
    if killed:
        for s in real:
            if s.get("peer_lost"):
                totals["poisoned_after_kill"] += s.get("poisoned_after_kill", 0)
                if s["health"]["healthy"]:
                    failures.append(f"{s['name']} lost its peer but health did not report it")
                # cut: sessions still live when the loss was seen, or ended Poisoned since the kill (short
                # timers end the cut ones before the control channel's EOF arrives)
                if not s.get("live_at_loss") and not s.get("poisoned_after_kill"):
                    failures.append(f"kill-peer cut nothing: {s['name']} had no session live when it lost its peer, "
                                    "and none ended Poisoned after the kill (nothing was tested; rerun, or lower "
                                    "--kill-at)")
            else:
                failures.append(f"{s['name']} did not notice that its peer was killed")
    if totals["wedged"]:
        failures.append(f"{totals['wedged']} session(s) wedged (not terminal within {opts.wedge_bound:.0f} s)")
    if totals["leaked"]:
        failures.append(f"{totals['leaked']} leaked (live sessions, leased or unexplained quarantined slots, remembered stops)")
    if totals["checksum_errors"]:
        failures.append(f"{totals['checksum_errors']} checksum error(s)")
    if audit_violations:
        failures.append(f"{audit_violations} audit violation(s) (see audit.txt)")
    rcv = [s for s in real if s["role"] == "receiver"]
    moved_mb = (sum(s.get("bytes_verified", 0) for s in rcv) if rcv
                else sum(s.get("bytes_completed", 0) for s in real)) / 1e6
    finished = max((s.get("finalized", 0) for s in real), default=0)
    run_s = max((s.get("elapsed_s", 0.0) for s in real), default=0.0) or elapsed
    summary = dict(
        format="kv-lifecycle.demo-summary/1", ok=not failures, failures=failures,
        requests=a.requests, concurrency=a.concurrency, mode=a.mode, ranks=a.ranks,
        device=real[0]["device"] if real else "?", cancel_fraction=a.cancel_fraction,
        faults=list(a.fault_list), seed=a.seed, elapsed_s=elapsed, killed=sorted(killed),
        run_s=run_s, throughput_req_s=finished / max(run_s, 1e-9), throughput_mb_s=moved_mb / max(run_s, 1e-9),
        # (verified: the receivers' checksummed bytes; without a receiver's summary, a crashed one too, the
        # senders' completed bytes, which nobody checked)
        throughput_verified=bool(rcv),
        totals=totals, health=health, exit_codes=codes, sides=sides,
        files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "status" not in p.parts),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    if a.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(_table(summary))
        print(f"output: {out} (summary.json, audit.json/.txt, report-*.html, diagram.svg, logs/)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
