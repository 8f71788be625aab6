"""The VRAM check, prepared for a machine with a GPU (CI and the development VM have none).

Two NIXL agents in one process move torch tensors through the engine, in both initiator modes, for
every pair of memory kinds that involves the chosen device (device -> device, cpu -> device, device ->
cpu), 1 KiB .. 16 MiB; every session must end Quiesced(completed) on both sides with the bytes equal.
Prints one line per case and a summary; exit 0 when every case passed, 1 when one failed, 2 when the
device is not there (nothing was checked).

    python scripts/device_check.py                 # --device cuda: the check the issue asks for
    python scripts/device_check.py --device cpu    # the same flow on CPU tensors (CI runs this one)
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
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # transitions: not printed

    import torch

    from lifecycle import Outcome, State, TransferEngine
    from lifecycle.transport import NixlTransport, connect_all, mem_of

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
              f"memory kinds: " + ", ".join(f"{s.mem.kind}->{d.mem.kind}" for _, _, s, d in bufs))
        for (src, dst, sreg, dreg), (src_dev, dst_dev) in zip(bufs, kinds):
            for mode in ("read", "write"):
                for n in SIZES:
                    req += 1
                    src[:n].copy_(torch.randint(1, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(req)))
                    dst[:n].zero_()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
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
    print(f"{req - len(failures)} of {req} cases passed" + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
