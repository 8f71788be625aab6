"""Real NIXL over UCX between two processes (multiprocessing spawn; metadata over a pipe): both
initiator modes with checksums, and a peer killed with SIGKILL mid-transfer."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lifecycle import ManualClock, Outcome, State
from lifecycle.transport import Faults, Offer

from test_transport_harness import (
    MiB, SIZES, Side, attach_peer, call, crc, needs_nixl, pattern, spawn_peer,
)

pytestmark = [pytest.mark.nixl, needs_nixl]


def test_two_processes_both_modes_every_size_matches_checksum():
    """Both initiator modes, 1 KiB to 16 MiB, each way: the child sends to us (we READ from it / it WRITEs to
    us), then we send to it (it READs from us / we WRITE to it).  For every session both sides end
    Quiesced(completed) and the receiving side's checksum matches the pattern sent."""
    me = Side("proc-parent", slots=2, slot_size=16 * MiB)
    proc, conn = spawn_peer("proc-child", slots=2, slot_size=16 * MiB)
    try:
        peer, _ = attach_peer(me, conn)
        req = 100
        for mode in ("read", "write"):
            for n in SIZES:
                req += 1
                dst = me.advertise(req, "receiver", n, 0)
                if mode == "read":  # we READ from the child's slot; the child learns by notification
                    desc = call(conn, "serve", req, "sender", n, req)
                    me.t.read(req, dst, peer, Offer.from_bytes(desc))
                else:  # the child WRITEs into our slot; we learn by notification
                    offer = me.t.expect(req, peer, dst)
                    call(conn, "active", req, "sender", n, req, offer.to_bytes())
                assert me.wait(req) is State.Quiesced
                assert me.engine.outcome(req) is Outcome.completed
                their_state, their_outcome, their_crc = call(conn, "wait", req, n, 10.0)
                assert (their_state, their_outcome) == ("Quiesced", "completed"), (mode, n)
                assert crc(me.view(req, n)) == crc(pattern(n, req)) == their_crc, f"{mode} {n} B checksum"
                me.engine.terminate(req)
        for mode in ("read", "write"):  # the other way: we send, the child receives
            for n in SIZES:
                req += 1
                src = me.advertise(req, "sender", n, pattern(n, req))
                if mode == "read":  # the child READs from our slot; we learn by its notification
                    offer = me.t.expect(req, peer, src)
                    call(conn, "active", req, "receiver", n, req, offer.to_bytes())
                else:  # we WRITE into the child's slot; it learns by notification
                    desc = call(conn, "serve", req, "receiver", n, req)
                    me.t.write(req, src, peer, Offer.from_bytes(desc))
                assert me.wait(req) is State.Quiesced
                assert me.engine.outcome(req) is Outcome.completed
                # the child's checksum: its slot's first n bytes (zeroed first) once its session is terminal
                their_state, their_outcome, their_crc = call(conn, "wait", req, n, 10.0)
                assert (their_state, their_outcome) == ("Quiesced", "completed"), (mode, n)
                assert their_crc == crc(pattern(n, req)), f"reverse {mode} {n} B checksum"
                me.engine.terminate(req)
        me.engine.poll()
        st = me.t.stats()
        assert st.live_xfers == 0 and st.active == 0 and st.passive == 0
        assert call(conn, "exit") == "bye"
    finally:
        me.close()
        reap(proc)


def test_peer_sigkill_mid_transfer_every_session_terminal_in_time_then_fresh_peer_works(monkeypatch):
    """The child SIGKILLs itself right after posting its last WRITE (session 4): every session here ends
    terminal (within transfer_timeout + cancel_grace + 1 s: the test below checks that bound on the engine's
    clock), those without evidence Poisoned and their slots
    quarantined, and a fresh peer then works.  On a loaded machine the child's UCX thread now and then
    finished that WRITE (and sent its DONE) before the child's kill ran: such an attempt cut nothing, so
    it is checked like the others and tried again, at most 3 times (a review of a load soak's failure)."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # so the big transfers are really in flight when the peer dies
    for attempt in range(3):
        if kill_peer_mid_transfer(attempt):
            return
    pytest.fail("in 3 attempts the child's last WRITE always completed before its SIGKILL: nothing was cut")


def kill_peer_mid_transfer(attempt: int) -> bool:
    """One attempt of the test above; True when the kill cut session 4 (no DONE: Poisoned)."""
    timeout, grace = 2.0, 1.0
    n = 64 * MiB  # the kill follows the last post at once, while it moves (checked below)
    # 7 slots: all 5 sessions below may end Poisoned (on a loaded machine 1-3 can all be moving at the kill),
    # and the fresh peer's transfers still find 2 free
    me = Side(f"kill-parent-{attempt}", slots=7, slot_size=n, transfer_timeout=timeout, cancel_grace=grace)
    proc, conn = spawn_peer(f"kill-child-{attempt}", env={"UCX_TLS": "tcp"}, slots=4, slot_size=n)
    procs: list = []  # fresh peers, reaped below
    try:
        peer, _ = attach_peer(me, conn)
        reqs = []
        # (c) exposed to the child, which never posts (passive here, no evidence will ever come); first,
        # so that its fill does not delay the kill behind the transfers below
        src5 = me.advertise(5, "sender", n, pattern(n, 5))
        t_exposed5 = time.monotonic()  # before its expose: its timer fires at t_exposed5 + timeout or later
        me.t.expect(5, peer, src5)
        reqs.append(5)
        # (a) we READ from the child (active here)
        for req in (1, 2):
            dst = me.advertise(req, "receiver", n, 0)
            desc = call(conn, "serve", req, "sender", n, req)
            me.t.read(req, dst, peer, Offer.from_bytes(desc))
            reqs.append(req)
        # (b) the child WRITEs into us (passive here); right after posting the last one it SIGKILLs itself,
        # so that transfer is cut mid-way (a kill sent from here often came after its DONE)
        for req in (3, 4):
            dst = me.advertise(req, "receiver", n, 0)
            offer = me.t.expect(req, peer, dst)
            if req == 3:
                call(conn, "active", req, "sender", n, req, offer.to_bytes())
            else:
                conn.send(("active-then-die", req, "sender", n, req, offer.to_bytes()))
            reqs.append(req)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        t_dead = time.monotonic()  # the child died before this

        # the bound (timeout + grace + 1 s) is checked on the engine's clock, not timed here (a wall-clock assert
        # fails on a loaded machine): test_peer_sigkill_bound_holds_on_the_engines_clock_not_the_wall_clock.
        # Here the real clock only has to get every session terminal at all.
        states = {req: me.engine.wait_terminal(req, timeout + grace + 30.0) for req in reqs}
        assert set(states.values()) <= {State.Quiesced, State.Poisoned}, states
        # 5 never gets evidence if the child died before 5's timer fired: the stop it sends then finds no
        # one.  Under load the posts above took longer than the timeout once: the stop reached the live
        # child, which holds no session 5 and answered quiesced (it never posts that offer: evidence).
        if t_dead < t_exposed5 + timeout:
            assert states[5] is State.Poisoned, states
        else:
            assert states[5] is State.Poisoned or me.t.stats().quiesced_received >= 1, (states, me.t.stats())
        # The last transfer's peer died right after its post, before its DONE could go out: no evidence,
        # Poisoned (its bytes may even all be there: data in the socket outlives the sender, the DONE
        # does not).  Any session whose bytes did not all arrive was moving when the peer died and is
        # Poisoned too; one that completed before the kill is Quiesced, with every byte.
        cut = [r for r in (1, 2, 3, 4) if crc(me.view(r, n)) != crc(pattern(n, r))]
        assert all(states[r] is State.Poisoned for r in cut), (cut, states)
        if states[4] is not State.Poisoned:  # its DONE came before the kill: every byte is there
            assert 4 not in cut and me.engine.outcome(4) is Outcome.completed, (cut, states)
        poisoned = [r for r, s in states.items() if s is State.Poisoned]
        for req in reqs:
            me.engine.terminate(req)
        me.engine.poll()
        pool = me.engine.pool.stats()
        # a Poisoned session whose evidence came late (5's quiesced, above) gets its slot back, not quarantined
        recovered = me.engine.statistics().recovered
        diag = dict(states=states, cut=cut, pool=pool, recovered=recovered, stats=me.t.stats(),
                    dead_after_exposed5=t_dead - t_exposed5)
        assert pool["quarantined"] == len(poisoned) - recovered, diag
        assert pool["leased"] == 0, diag

        assert me.engine.pool.stats()["free"] >= 2, diag
        fresh_peer_moves_both_ways(me, peer, f"kill-fresh-{attempt}", n, procs)
        return states[4] is State.Poisoned
    finally:
        me.close()
        reap(proc, *procs)


def reap(*procs) -> None:
    """Each child process given: joined (10 s), killed if it still runs."""
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()


def fresh_peer_moves_both_ways(me, dead: str, name: str, slot_size: int, procs: list) -> None:
    """After ``dead``'s death: forget it, and a fresh peer (appended to ``procs``, for the caller to reap) moves 1 MiB
    each way (we READ, it WRITEs), both sides Quiesced(completed), the bytes checksummed."""
    me.t.remove_peer(dead)
    fresh, fconn = spawn_peer(name, env={"UCX_TLS": "tcp"}, slots=2, slot_size=slot_size)
    procs.append(fresh)
    fpeer, _ = attach_peer(me, fconn)
    for req, mode in ((11, "read"), (12, "write")):
        size = 1 * MiB
        dst = me.advertise(req, "receiver", size, 0)
        if mode == "read":
            me.t.read(req, dst, fpeer, Offer.from_bytes(call(fconn, "serve", req, "sender", size, req)))
        else:
            call(fconn, "active", req, "sender", size, req, me.t.expect(req, fpeer, dst).to_bytes())
        assert me.wait(req) is State.Quiesced and me.engine.outcome(req) is Outcome.completed
        assert call(fconn, "wait", req, size, 10.0)[0] == "Quiesced"
        assert crc(me.view(req, size)) == crc(pattern(size, req))
        me.engine.terminate(req)
    assert call(fconn, "exit") == "bye"


@pytest.mark.parametrize("never_completes", [False, True], ids=["nixl", "control-never-completes"])
def test_an_active_read_cut_by_the_peers_death_fails_on_nixls_error_not_on_its_timer(never_completes, monkeypatch):
    """The SIGKILL test above mostly sees its reads complete before the kill (only under load are they cut),
    so the path from a real UCX error to the engine's `fail` went unasserted (a review finding).  Here the
    parent kills the child right after posting a 64 MiB READ over tcp, so the read is cut: NIXL reports the
    error (recent_failures names it), the session goes to Poisoned by `fail`, not by its transfer timer, and
    its slot is quarantined.  Negative control: with the fault "never completes" on this side the death is
    never reported, the timer poisons the session, and the same counters tell the two apart.  A read that
    completed before the kill landed (a descheduled test thread) proves nothing either way: tried again, at
    most 3 times."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # so the READ is still moving when the peer dies
    # the timer: far beyond UCX's report of the death (~15 ms here), so that on a loaded machine the error
    # still comes first; the control waits it out, so a short one there
    n, timeout, grace = 64 * MiB, (2.0 if never_completes else 10.0), 1.0
    kw = {"faults": Faults(seed=17, never_completes=1.0)} if never_completes else None
    for attempt in range(3):
        me = Side(f"cut-parent-{attempt}", slots=2, slot_size=n, transfer_timeout=timeout, cancel_grace=grace,
                  transport_kw=kw)
        proc, conn = spawn_peer(f"cut-child-{attempt}", env={"UCX_TLS": "tcp"}, slots=2, slot_size=n)
        try:
            peer, _ = attach_peer(me, conn)
            dst = me.advertise(1, "receiver", n, 0)
            me.t.read(1, dst, peer, Offer.from_bytes(call(conn, "serve", 1, "sender", n, 1)))
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            state = me.wait(1, timeout + grace + 5)
            if crc(me.view(1, n)) == crc(pattern(n, 1)):
                continue  # every byte arrived before the kill: not the case under test
            stats, counters, failures = me.t.stats(), me.engine.statistics(), me.t.recent_failures()
            diag = dict(state=state, stats=stats, counters=counters, failures=failures, attempt=attempt)
            assert state is State.Poisoned, diag
            me.engine.terminate(1)
            me.engine.poll()
            assert me.engine.pool.stats()["quarantined"] == 1, diag
            if never_completes:  # the control: no error seen, the timer did it
                assert (stats.failed, counters.timeouts) == (0, 1) and failures == [], diag
            else:
                assert (stats.failed, counters.timeouts) == (1, 0), diag
                assert [r for r, _ in failures] == [1] and "nixl transfer status error" in failures[0][1], diag
            return
        finally:
            me.close()
            if proc.is_alive():
                proc.kill()
    pytest.fail("the 64 MiB READ completed before the peer's death in 3 attempts: the cut was never tested")


def test_peer_sigkill_bound_holds_on_the_engines_clock_not_the_wall_clock(monkeypatch):
    """The bound of the test above (every session terminal within transfer_timeout + cancel_grace + 1 s of the
    kill), checked without timing the test: the parent's engine runs on a ManualClock that stands still from the
    first expose to the child's SIGKILL (right after posting its WRITE of 4), then walks to kill + bound in 50 ms
    steps, polling at each; every session must then be terminal at once (no wait), those without evidence
    Poisoned (5: exposed, never posted; any session whose bytes did not all arrive), their slots quarantined
    once terminated, and a fresh peer works.  Control: one step short of timeout + grace, 5 is not terminal
    yet (a dead peer proves nothing; only the grace ends it), so the check can fail."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # so the last WRITE is still moving when the child dies
    sec, step = 1_000_000_000, 50_000_000
    timeout, grace = 2.0, 1.0
    n = 64 * MiB
    clock = ManualClock(1_000 * sec)
    me = Side("clock-parent", slots=6, slot_size=n, transfer_timeout=timeout, cancel_grace=grace, clock=clock)
    proc, conn = spawn_peer("clock-child", env={"UCX_TLS": "tcp"}, slots=4, slot_size=n)
    procs: list = []  # fresh peers, reaped below
    try:
        peer, _ = attach_peer(me, conn)
        me.t.expect(5, peer, me.advertise(5, "sender", n, pattern(n, 5)))  # passive; the child never posts
        dst = me.advertise(1, "receiver", n, 0)  # active: we READ from the child
        me.t.read(1, dst, peer, Offer.from_bytes(call(conn, "serve", 1, "sender", n, 1)))
        for req in (3, 4):  # passive: the child WRITEs into us, and SIGKILLs itself right after posting 4
            offer = me.t.expect(req, peer, me.advertise(req, "receiver", n, 0))
            msg = ("active" if req == 3 else "active-then-die", req, "sender", n, req, offer.to_bytes())
            if req == 3:
                call(conn, *msg)
            else:
                conn.send(msg)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        reqs = (1, 3, 4, 5)

        def walk_to(seconds: float) -> dict:
            while clock.now_ns() < t_kill + int(seconds * sec):
                clock.advance(min(step, t_kill + int(seconds * sec) - clock.now_ns()))
                me.engine.poll()
            return {r: me.engine.state(r) for r in reqs}

        t_kill = clock.now_ns()  # every expose and the kill happened at this engine time
        short = walk_to(timeout + grace - step / sec)
        assert short[5] is State.CancelRequested, short  # the control: the bound below is not met vacuously
        states = walk_to(timeout + grace + 1.0)
        diag = dict(states=states, stats=me.t.stats(), counters=me.engine.statistics())
        assert set(states.values()) <= {State.Quiesced, State.Poisoned}, diag
        assert states[5] is State.Poisoned, diag
        cut = [r for r in (1, 3, 4) if crc(me.view(r, n)) != crc(pattern(n, r))]
        assert all(states[r] is State.Poisoned for r in cut), (cut, diag)
        assert all(me.engine.outcome(r) is Outcome.completed for r in reqs if states[r] is State.Quiesced), diag
        poisoned = [r for r, s in states.items() if s is State.Poisoned]
        for req in reqs:
            me.engine.terminate(req)
        me.engine.poll()
        pool, recovered = me.engine.pool.stats(), me.engine.statistics().recovered
        assert pool["quarantined"] == len(poisoned) - recovered and pool["leased"] == 0, (pool, recovered, diag)

        fresh_peer_moves_both_ways(me, peer, "clock-fresh", n, procs)
    finally:
        me.close()
        reap(proc, *procs)
