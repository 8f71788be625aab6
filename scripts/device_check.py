"""The VRAM check, prepared for a machine with a GPU (CI and the development VM have none).

Two NIXL agents in one process move torch tensors through the engine, in both initiator modes, for
every pair of memory kinds that involves the chosen device (device -> device, cpu -> device, device ->
cpu), 1 KiB .. 16 MiB; every session must end Quiesced(completed) on both sides with the bytes equal.
Then, through a second pair of agents, cancel right after post on the active and on the passive side,
both modes, 16 MiB: both sides must end Quiesced with nothing released without evidence (on CPU a 50 ms
delay fault keeps the active side's request in flight, so its cancels must land in flight).  Prints one line per
case and a summary; exit 0 when every case passed, 1 when one failed, 2 when the device is not there
(nothing was checked).  Results on a GPU: docs/transport.md.

    python scripts/device_check.py                 # --device cuda: the check the issue asks for
    python scripts/device_check.py --device cpu    # the same flow on CPU tensors (CI runs this one)
    ... --corrupt-one    # negative control: one received byte changed; that case must fail
    ... --drop-notes     # negative control: the cancel pair drops every notification; all its cases must fail
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog  # noqa: E402

SIZES = [1 << 10, 64 << 10, 1 << 20, 16 << 20]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds each session may take")
    ap.add_argument("--corrupt-one", action="store_true",
                    help="negative control: change one received byte of the first case; the check must fail it")
    ap.add_argument("--drop-notes", action="store_true",
                    help="negative control: the cancel cases' agents drop every notification; they must fail")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # transitions: not printed

    import torch

    from lifecycle import Outcome, State, TransferEngine
    from lifecycle.transport import NixlTransport, connect_all, cuda12_runtime, mem_of

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, cuda {torch.version.cuda}): nothing checked")
        return 2
    dev = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    kinds = [(dev, dev), (torch.device("cpu"), dev), (dev, torch.device("cpu"))]
    if args.device == "cpu":
        kinds = kinds[:1]
    snd_e, rcv_e = TransferEngine(transfer_timeout=args.timeout), TransferEngine(transfer_timeout=args.timeout)
    failures, req = [], 0
    with NixlTransport(snd_e, "devchk-snd") as snd, NixlTransport(rcv_e, "devchk-rcv") as rcv:
        bufs = []
        for src_dev, dst_dev in kinds:
            src = torch.empty(max(SIZES), dtype=torch.uint8, device=src_dev)
            dst = torch.empty(max(SIZES), dtype=torch.uint8, device=dst_dev)
            bufs.append((src, dst, snd.register(src), rcv.register(dst)))
        connect_all(snd, rcv)
        rcv_at_snd, snd_at_rcv = "devchk-rcv", "devchk-snd"
        print(f"device {dev} ({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'host'}); "
              f"memory kinds: " + ", ".join(f"{s.mem.kind}->{d.mem.kind}" for _, _, s, d in bufs)
              + (f"; CUDA 12 runtime for UCX: {cuda12_runtime()}" if args.device == "cuda" else ""))
        for (src, dst, sreg, dreg), (src_dev, dst_dev) in zip(bufs, kinds):
            for mode in ("read", "write"):
                for n in SIZES:
                    req += 1
                    fill(src, dst, n, req, dev)
                    s_mem, d_mem = mem_of(src).slice(0, n), mem_of(dst).slice(0, n)
                    snd_e.advertise(req, "sender")
                    rcv_e.advertise(req, "receiver")
                    t0 = time.monotonic()
                    if mode == "read":
                        offer = snd.expect(req, rcv_at_snd, s_mem)
                        rcv.read(req, d_mem, snd_at_rcv, offer)
                    else:
                        offer = rcv.expect(req, snd_at_rcv, d_mem)
                        snd.write(req, s_mem, rcv_at_snd, offer)
                    states = (snd_e.wait_terminal(req, args.timeout), rcv_e.wait_terminal(req, args.timeout))
                    ms = (time.monotonic() - t0) * 1e3
                    outcomes = (snd_e.outcome(req), rcv_e.outcome(req))
                    if args.corrupt_one and req == 1:
                        dst[n // 2] ^= 0xFF
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    same = bool(torch.equal(src[:n].cpu(), dst[:n].cpu()))
                    ok = states == (State.Quiesced, State.Quiesced) and outcomes == (Outcome.completed,) * 2 and same
                    case = f"{sreg.mem.kind}->{dreg.mem.kind} {mode:<5} {n >> 10:>6} KiB"
                    print(f"  {case}: {'ok' if ok else 'FAILED'} ({ms:.2f} ms; states {states[0].value}/"
                          f"{states[1].value}; bytes {'equal' if same else 'DIFFER'})")
                    if not ok:
                        failures.append(case)
                    snd_e.terminate(req)
                    rcv_e.terminate(req)
                    snd_e.poll()
                    rcv_e.poll()
        for _, _, sreg, dreg in bufs:
            snd.deregister(sreg)
            rcv.deregister(dreg)
        req = cancel_cases(args, dev, bufs, req, failures)
    print(f"{req - len(failures)} of {req} cases passed" + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


def fill(src, dst, n: int, seed: int, dev) -> None:
    """Source bytes 1..255 from ``seed``, destination zeroed, both settled on the device."""
    import torch

    src[:n].copy_(torch.randint(1, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    dst[:n].zero_()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def cancel_cases(args, dev, bufs, req: int, failures: list) -> int:
    """Cancel right after post, on the active side (it releases and waits for DONE or an error) and on the
    passive side (it asks its peer to stop and waits for the peer's "quiesced"), both modes, on the first
    pair of kinds, through a second pair of agents.  Every case must end Quiesced on both sides with no
    release without evidence: Poisoned means the evidence never came.  With --drop-notes that pair drops
    every notification (the negative control): every cancel case must then end Poisoned and fail."""
    import torch

    from lifecycle import Faults, Outcome, State, TransferEngine, TransportError
    from lifecycle.transport import NixlTransport, connect_all, mem_of

    # on CPU a transfer completes inside post (cma): a 50 ms delay fault keeps the active side's request in
    # flight for its cancel (the passive side learns completion from NIXL's note, which the delay leaves alone)
    in_flight = dev.type == "cpu"
    kw = dict(delay=1.0, delay_s=0.05) if in_flight else {}
    if args.drop_notes:
        kw["drop_notification"] = 1.0
    faults = Faults(seed=1, **kw) if kw else None
    grace = 1.0 if args.drop_notes else args.timeout
    snd_e = TransferEngine(transfer_timeout=grace, cancel_grace=grace)
    rcv_e = TransferEngine(transfer_timeout=grace, cancel_grace=grace)
    src, dst = bufs[0][0], bufs[0][1]
    n = max(SIZES)
    with NixlTransport(snd_e, "devchk-csnd", faults=faults) as snd, \
            NixlTransport(rcv_e, "devchk-crcv", faults=faults) as rcv:
        sreg, dreg = snd.register(src), rcv.register(dst)
        connect_all(snd, rcv)
        landed = 0
        for mode in ("read", "write"):
            for who in ("active", "passive"):
                req += 1
                fill(src, dst, n, req, dev)
                s_mem, d_mem = mem_of(src).slice(0, n), mem_of(dst).slice(0, n)
                snd_e.advertise(req, "sender")
                rcv_e.advertise(req, "receiver")
                if mode == "read":
                    rcv.read(req, d_mem, "devchk-csnd", snd.expect(req, "devchk-crcv", s_mem))
                    active_e, passive_e = rcv_e, snd_e
                else:
                    snd.write(req, s_mem, "devchk-crcv", rcv.expect(req, "devchk-csnd", d_mem))
                    active_e, passive_e = snd_e, rcv_e
                res = (active_e if who == "active" else passive_e).cancel(req)
                wait = 2 * grace + 5
                states = (snd_e.wait_terminal(req, wait), rcv_e.wait_terminal(req, wait))
                outcomes = (snd_e.outcome(req), rcv_e.outcome(req))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                same = bool(torch.equal(src[:n].cpu(), dst[:n].cpu()))
                unsafe = snd.stats().unsafe_releases + rcv.stats().unsafe_releases
                ok = (states == (State.Quiesced, State.Quiesced) and unsafe == 0
                      and all(o in (Outcome.completed, Outcome.cancelled) for o in outcomes)
                      and (same or outcomes != (Outcome.completed,) * 2)
                      and res.value in (("CancelRequestedInFlight",) if in_flight and who == "active"
                                        else ("CancelRequestedInFlight", "AlreadyComplete")))
                landed += res.value == "CancelRequestedInFlight"
                case = f"cancel {who:<7} {sreg.mem.kind}->{dreg.mem.kind} {mode:<5} {n >> 10:>6} KiB"
                print(f"  {case}: {'ok' if ok else 'FAILED'} (cancel -> {res.value}; states "
                      f"{states[0].value}/{states[1].value}; outcomes "
                      f"{'/'.join(o.value if o else '-' for o in outcomes)}; bytes "
                      f"{'equal' if same else 'differ'}; unsafe releases {unsafe})")
                if not ok:
                    failures.append(case)
                for e in (snd_e, rcv_e):
                    e.terminate(req)
                    e.poll()
        req += 1
        live = snd.stats().live_xfers + rcv.stats().live_xfers
        refused = []
        for t, reg in ((snd, sreg), (rcv, dreg)):
            try:
                t.deregister(reg)
            except TransportError as e:  # a buffer without evidence stays registered (closing strands it)
                refused.append(str(e))
        ok = live == 0 and not refused
        print(f"  cancel pair: {'ok' if ok else 'FAILED'} ({landed} of 4 cancels landed in flight; {live} transfer "
              f"requests live; deregistration "
              f"{'; '.join(refused) or 'accepted'})")
        if not ok:
            failures.append("cancel pair teardown")
    return req


if __name__ == "__main__":
    sys.exit(main())
