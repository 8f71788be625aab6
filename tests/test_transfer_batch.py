"""transfer_batch: several read()/write() calls in one, each item exactly as its call alone (real NIXL over
UCX, and the loopback).  The evidence rule in the batch path has its own late-write probe and negative
control in test_nixl_cancel.py (``batch=True``)."""

from __future__ import annotations

import pytest

from lifecycle import IllegalTransition, InvalidArgument, Outcome, State, TransportError, UnknownRequest
from lifecycle.transport import Mem, Offer

from test_transport_harness import KiB, MiB, SIZES, Side, connect, crc, needs_nixl, pattern

KINDS = [pytest.param("nixl", marks=[pytest.mark.nixl, needs_nixl]), "loopback"]


def sides(kind: str, tag: str, slots: int = 8, slot_size: int = 16 * MiB):
    snd, rcv = Side(f"bs-{tag}", kind, slots=slots, slot_size=slot_size), Side(f"br-{tag}", kind, slots=slots,
                                                                                 slot_size=slot_size)
    return snd, rcv, connect(snd, rcv)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["read", "write"])
def test_batch_moves_every_item_and_every_checksum_matches(kind, mode):
    snd, rcv, (rcv_at_snd, snd_at_rcv) = sides(kind, f"{kind[0]}{mode[0]}")
    try:
        sizes = SIZES + [4 * KiB] * 4  # 1 KiB .. 16 MiB, and a few small ones in the same call
        items = []
        for i, n in enumerate(sizes, start=1):
            src = snd.advertise(i, "sender", n, pattern(n, i))
            dst = rcv.advertise(i, "receiver", n, 0)
            if mode == "read":
                items.append(("read", i, dst, snd_at_rcv, snd.t.expect(i, rcv_at_snd, src)))
            else:
                items.append(("write", i, src, rcv_at_snd, rcv.t.expect(i, snd_at_rcv, dst)))
        active, passive = (rcv, snd) if mode == "read" else (snd, rcv)
        res = active.t.transfer_batch(items)
        assert len(res) == len(sizes)
        assert all(r in ("Posted", "CompletedInPost") for r in res), res
        for i, n in enumerate(sizes, start=1):
            assert active.wait(i) is State.Quiesced and passive.wait(i) is State.Quiesced
            assert active.engine.outcome(i) is Outcome.completed and passive.engine.outcome(i) is Outcome.completed
            assert crc(rcv.view(i, n)) == crc(pattern(n, i)), f"{mode} item {i} ({n} B): checksum mismatch"
            snd.engine.terminate(i)
            rcv.engine.terminate(i)
        st = active.t.stats()
        assert st.posted == len(sizes) and st.completed == len(sizes) and st.failed == 0, st
        assert passive.t.stats().done_received == len(sizes)
        for s in (snd, rcv):
            s.engine.poll()
            st = s.t.stats()
            assert st.live_xfers == 0 and st.active == 0 and st.passive == 0 and st.watched == 0, st
            assert s.engine.pool.stats()["free"] == 8
            ps = s.t.progress_stats()  # every handler of the progress thread's events returned normally
            assert ps["sink_errors"] == 0 and ps["poll_errors"] == 0, ps
    finally:
        snd.close()
        rcv.close()


@pytest.mark.parametrize("kind", KINDS)
def test_items_are_independent_each_refused_as_its_call_alone(kind):
    """One batch: good items between every kind of refusal; each refused item gets the error its own
    read() raises, with nothing built or moved for it; the good ones move their bytes."""
    snd, rcv, (rcv_at_snd, snd_at_rcv) = sides(kind, f"ind{kind[0]}", slots=8, slot_size=64 * KiB)
    try:
        n = 64 * KiB
        offers, dsts = {}, {}
        for i in (1, 2, 3, 4, 6, 7):
            src = snd.advertise(i, "sender", n, pattern(n, i))
            dsts[i] = rcv.advertise(i, "receiver", n, 0)
            offers[i] = snd.t.expect(i, rcv_at_snd, src)
        rcv.engine.cancel(3)  # Advertised -> Quiesced(cancelled): its expose is illegal
        other_slot = dsts[7]  # request 6 names request 7's slot: outside the one leased to it
        res = rcv.t.transfer_batch([
            ("read", 1, dsts[1], snd_at_rcv, offers[1]),
            ("read", 1, dsts[1], snd_at_rcv, offers[1]),  # the same request again
            ("read", 5, dsts[2], snd_at_rcv, offers[2]),  # never advertised here
            ("read", 3, dsts[3], snd_at_rcv, offers[3]),  # cancelled before the batch
            ("read", 4, dsts[4], "no-such-peer", offers[4]),  # a descriptor the backend refuses
            ("read", 6, other_slot, snd_at_rcv, offers[6]),
            ("read", 2, dsts[2], snd_at_rcv, Mem(dsts[2].addr, n)),  # a bare descriptor: no tag
            ("bogus",),
            ("read", 2, dsts[2], snd_at_rcv, offers[2]),
        ])
        assert res[0] in ("Posted", "CompletedInPost") and res[8] in ("Posted", "CompletedInPost"), res
        assert isinstance(res[1], TransportError) and "request 1 already has a transfer" in str(res[1])
        assert isinstance(res[2], UnknownRequest) and res[2].request == 5
        assert isinstance(res[3], IllegalTransition) and "state=Quiesced for request 3" in str(res[3])
        assert isinstance(res[4], TransportError) and "request 4" in str(res[4]) and "no-such-peer" in str(res[4])
        assert isinstance(res[5], TransportError) and "request 6" in str(res[5]) and "slot" in str(res[5])
        assert isinstance(res[6], InvalidArgument) and res[6].argument == "remote"
        assert isinstance(res[7], InvalidArgument) and "item 7" in str(res[7])
        for i in (1, 2):
            assert rcv.wait(i) is State.Quiesced and rcv.engine.outcome(i) is Outcome.completed
            assert crc(rcv.view(i, n)) == crc(pattern(n, i))
        # refused: untouched, as after the call alone (a bad descriptor leaves the session Advertised)
        assert rcv.engine.state(4) is State.Advertised and rcv.engine.state(6) is State.Advertised
        assert rcv.engine.state(3) is State.Quiesced and rcv.engine.outcome(3) is Outcome.cancelled
        assert bytes(rcv.view(4, n)).count(0) == n and bytes(rcv.view(6, n)).count(0) == n
        st = rcv.t.stats()
        assert st.posted == 2 and st.live_xfers == 0 and st.active == 0, st
        # the refused ones can still go, one by one
        assert rcv.t.read(4, dsts[4], snd_at_rcv, offers[4]) in ("Posted", "CompletedInPost")
        assert rcv.wait(4) is State.Quiesced and crc(rcv.view(4, n)) == crc(pattern(n, 4))
    finally:
        snd.close()
        rcv.close()


def test_batch_after_stop_refuses_every_item_and_bad_arguments_are_named():
    snd, rcv, (rcv_at_snd, snd_at_rcv) = sides("loopback", "stop", slots=2, slot_size=4 * KiB)
    try:
        src = snd.advertise(1, "sender", 4096, pattern(4096, 1))
        dst = rcv.advertise(1, "receiver", 4096, 0)
        offer = snd.t.expect(1, rcv_at_snd, src)
        with pytest.raises(InvalidArgument, match=r"invalid transfers: expected a sequence"):
            rcv.t.transfer_batch(42)
        res = rcv.t.transfer_batch([("read", -1, dst, snd_at_rcv, offer), ("read", 1, dst, 7, offer),
                                    ("read", True, dst, snd_at_rcv, offer)])
        assert [type(r) for r in res] == [InvalidArgument] * 3
        assert [r.argument for r in res] == ["request", "peer", "request"]
        assert rcv.t.transfer_batch([]) == []
        rcv.t.stop()
        res = rcv.t.transfer_batch([("read", 1, dst, snd_at_rcv, offer)] * 2)
        assert all(isinstance(r, TransportError) and "is stopped" in str(r) for r in res), res
    finally:
        snd.close()
        rcv.close()


def test_core_batch_rejects_malformed_items_before_building_anything():
    """The C++ boundary on raw input: a wrong arity or type raises for the whole call, nothing built."""
    snd, rcv, (rcv_at_snd, snd_at_rcv) = sides("loopback", "raw", slots=1, slot_size=4 * KiB)
    try:
        dst = rcv.advertise(1, "receiver", 4096, 0)
        good = (1, "read", dst.addr, 4096, "dram", 0, snd_at_rcv, dst.addr, "dram", 0, 1)
        with pytest.raises(InvalidArgument, match=r"item 1: expected 11 or 12 fields, got 2"):
            rcv.t._core.transfer_batch([good, (1, 2)])
        with pytest.raises((TypeError, RuntimeError)):
            rcv.t._core.transfer_batch([good[:2] + ("x",) + good[3:]])
        with pytest.raises(InvalidArgument, match=r"op"):
            rcv.t._core.transfer_batch([good[:1] + ("send",) + good[2:]])
        with pytest.raises((TypeError, RuntimeError)):
            rcv.t._core.transfer_batch([None])
        st = rcv.t.stats()
        assert st.posted == 0 and st.live_xfers == 0 and st.active == 0
        assert rcv.engine.state(1) is State.Advertised
    finally:
        snd.close()
        rcv.close()
