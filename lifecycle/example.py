"""``lifecycle example``: the engine embedded in a toy executor loop, in one process (< 5 s).

A context (prefill) engine and a generation (decode) engine, each with a LoopbackTransport (an
in-process copy on a worker thread, paced so transfers take a few milliseconds).  Three requests:

1. a normal READ: advertise, expose (``expect`` / ``read``), poll until Quiesced, terminate;
2. cancelled before expose: ``CancelledBeforeAdvertise`` frees at once;
3. cancelled mid-transfer: ``CancelRequestedInFlight``; ``terminate`` returns ``Deferred`` and the
   executor's ``on_terminate`` callback runs exactly once, from ``poll()``, when the transfer reached
   DONE (positive evidence) -- only then are the request's blocks given back.

Then it prints both health snapshots and the lifecycle diagram (Mermaid).  Run it with
``python -m lifecycle example``; the code below is the documentation.
"""

from __future__ import annotations

import sys
import time

__all__ = ["main"]

MiB = 1 << 20


def _print_transitions(_logger, _method, ev):
    """The application's structlog processor: one short line per lifecycle event, then drop it."""
    import structlog

    if ev["event"] == "lifecycle.transition":
        print(f"    log  {ev['role']:<8} request {ev['request']}: {ev['from_state'] or '(new)'} "
              f"--{ev['trigger']}--> {ev['to_state']}" + (f" [{ev['outcome']}]" if ev["outcome"] else ""))
    elif ev["event"] in ("lifecycle.cancel", "lifecycle.terminate"):
        print(f"    log  {ev['event']} request {ev['request']}: {ev['result']}")
    raise structlog.DropEvent


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="lifecycle example", description=__doc__.splitlines()[0]).parse_args(argv)
    import structlog

    from . import CancelResult, State, TransferEngine, cancel_frees_now
    from .diagram import render
    from .transport import LoopbackTransport, pool_slot

    # The application (not the library) configures logging.
    structlog.configure(processors=[_print_transitions], logger_factory=structlog.ReturnLoggerFactory())

    freed: list[int] = []  # the executor's "free the KV blocks" hook (deferred termination lands here)

    def on_terminate(req: int) -> None:
        print(f"    on_terminate({req}): executor frees request {req}'s blocks (exactly once)")
        freed.append(req)

    kw = dict(num_slots=4, slot_size=4 * MiB, transfer_timeout=5.0, cancel_grace=2.0)
    ctx = TransferEngine(on_terminate=on_terminate, **kw)  # context / prefill worker (sender)
    gen = TransferEngine(on_terminate=on_terminate, **kw)  # generation / decode worker (receiver)
    pace = dict(bytes_per_second=200 * MiB)  # 4 MiB takes ~20 ms: long enough to cancel mid-transfer
    with LoopbackTransport(ctx, "example-ctx", **pace) as tc, LoopbackTransport(gen, "example-gen", **pace) as tg:
        tc.register(ctx.pool)
        tg.register(gen.pool)
        gen_at_ctx = tc.add_peer(tg.metadata())  # metadata exchange (bytes: any channel)
        ctx_at_gen = tg.add_peer(tc.metadata())

        def step(timeout: float = 0.005) -> None:
            """One iteration of the toy executor loop: poll both engines (never blocks for long)."""
            ctx.drain(timeout)
            gen.drain(0)

        def start(req: int, nbytes: int) -> None:
            ctx.advertise(req, "sender", nbytes)  # lease a slot; prefill writes the KV blocks into it
            src = pool_slot(ctx, req).slice(0, nbytes)
            ctx.pool.slot_view(ctx.info(req).slot)[:nbytes] = bytes([req]) * nbytes
            offer = tc.expect(req, gen_at_ctx, src)  # expose, and a tag, BEFORE handing the offer to the peer
            gen.advertise(req, "receiver", nbytes)
            tg.read(req, pool_slot(gen, req).slice(0, nbytes), ctx_at_gen, offer)  # expose + post

        print("1. transfer: advertise -> expose -> poll until Quiesced -> terminate")
        start(1, 1 * MiB)
        while not (gen.state(1) is State.Quiesced and ctx.state(1) is State.Quiesced):
            step()
        assert bytes(gen.pool.slot_view(gen.info(1).slot)[:16]) == bytes([1]) * 16
        print(f"   terminate: receiver {gen.terminate(1).value}, sender {ctx.terminate(1).value}")
        step(0)

        print("2. cancel before expose: never exposed is proof; free now")
        gen.advertise(2, "receiver", 1 * MiB)
        r = gen.cancel(2)
        print(f"   cancel -> {r.value} (frees now: {cancel_frees_now(r)}); terminate -> {gen.terminate(2).value}")
        step(0)

        print("3. cancel mid-transfer: terminate is deferred until the transport proves it stopped")
        start(3, 4 * MiB)
        r = gen.cancel(3)
        print(f"   cancel -> {r.value} (frees now: {cancel_frees_now(r)})")
        t = gen.terminate(3)
        print(f"   terminate -> {t.value}; the executor keeps polling ...")
        deadline = time.monotonic() + 5
        while 3 not in freed and time.monotonic() < deadline:
            step()
        if r is CancelResult.CancelRequestedInFlight and 3 not in freed:
            print("   on_terminate never ran", file=sys.stderr)
            return 1
        if ctx.state(3) is not State.Terminated:
            while ctx.state(3) not in (State.Quiesced, State.Poisoned):
                step()
            ctx.terminate(3)
        step(0)

        for name, eng in (("context", ctx), ("generation", gen)):
            h = eng.health()
            counts = ", ".join(f"{s.value} {n}" for s, n in h.counts.items() if n)
            print(f"\nhealth ({name}): {'healthy' if h.healthy else 'UNHEALTHY ' + '; '.join(h.reasons)}; "
                  f"live {h.live}; quarantined {h.quarantined}/{h.quarantine_budget}; {counts}")
            st = eng.statistics()
            print(f"statistics ({name}): transitions {st.transitions}, deferred {st.deferred}, "
                  f"terminate_now {st.terminate_now}, illegal {st.illegal}, late {st.late}")
            print(f"pool ({name}): {eng.pool.stats()}")
    print("\nlifecycle (generated from schemas/lifecycle.table):\n")
    print(render("mermaid"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
